"""Rate deck files: reading them for the pure rating core, and `sipcdr rates check`.

Reading is the only I/O rating needs; every failure to read becomes a deck report
with a reason, so a missing or unreadable file is refused like a bad row, never a
traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final, TextIO

import orjson

from sipcdr.rating import DeckReport, PlanLoad, RatePlans, check_deck, load_rate_plans
from sipcdr.rating.deck import Problem, unreadable

# The largest A-Z decks carriers send (about a million rows) are near 100 MB;
# anything far beyond is not a deck and would only fill memory.
MAX_DECK_BYTES: Final = 256 * 1024 * 1024


def read_deck(path: Path) -> bytes | DeckReport:
    """The file's bytes, or the report of why it cannot be used."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_DECK_BYTES + 1)
    except OSError as exc:
        return unreadable(f"cannot read the file: {exc.strerror or exc}")
    if len(data) > MAX_DECK_BYTES:
        return unreadable(f"larger than {MAX_DECK_BYTES // (1024 * 1024)} MiB: not a rate deck")
    return data


def check_file(path: Path, now: float) -> DeckReport:
    data = read_deck(path)
    return data if isinstance(data, DeckReport) else check_deck(data, now)


def load_plan_files(
    paths: Mapping[str, Path],
    default_plan: str | None,
    decimals: int,
    now: float,
    previous: RatePlans | None = None,
) -> PlanLoad:
    """Read every plan's deck and load them (see `load_rate_plans`): a deck that cannot
    be read or fails its check is refused and its plan keeps the previous deck."""
    decks = {name: read_deck(path) for name, path in paths.items()}
    return load_rate_plans(decks, default_plan, decimals, now, previous)


def problem_line(path: str, problem: Problem) -> str:
    """`rates.csv:17: error: rate 'abc' is not a plain decimal number [bad_number]`."""
    where = f"{path}:{problem.line}" if problem.line is not None else path
    return f"{where}: {problem.severity}: {problem.message} [{problem.reason}]"


def report_record(path: str, report: DeckReport) -> dict[str, object]:
    """The `--json` form: counts, then every problem in line order."""
    errors = len(report.errors)
    return {
        "file": path,
        "ok": errors == 0,
        "rows": report.rows_read,
        "valid_rows": len(report.rates),
        "prefixes": len({rate.prefix for rate in report.rates}),
        "errors": errors,
        "warnings": len(report.problems) - errors,
        "problems": [problem._asdict() for problem in report.problems],
    }


def run_check(path: Path, as_json: bool, now: float, out: TextIO) -> int:
    """`sipcdr rates check`: 0 when the deck has no error, else 1."""
    report = check_file(path, now)
    name = str(path)
    if as_json:
        out.write(orjson.dumps(report_record(name, report), option=orjson.OPT_INDENT_2).decode())
        out.write("\n")
    else:
        for problem in report.problems:
            out.write(problem_line(name, problem) + "\n")
        record = report_record(name, report)
        verdict = "ok" if record["ok"] else "refused"
        out.write(
            f"{name}: {verdict}: {record['rows']} rows ({record['valid_rows']} valid), "
            f"{record['prefixes']} prefixes, {record['errors']} errors, "
            f"{record['warnings']} warnings\n"
        )
    return 0 if report.ok else 1
