"""Rate deck files: reading them for the pure rating core, loading them into the rate
stage (at start and on SIGHUP), and `sipcdr rates check`.

Reading is the only I/O rating needs; every failure to read becomes a deck report
with a reason, so a missing or unreadable file is refused like a bad row, never a
traceback.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Final, TextIO

import orjson
import structlog

from sipcdr.config import Config, RatingConfig
from sipcdr.model import Trunk
from sipcdr.rating import (
    DeckReport,
    PlanLoad,
    RatePlans,
    RateStage,
    check_deck,
    load_rate_plans,
)
from sipcdr.rating.deck import Problem, unreadable

# The largest A-Z decks carriers send (about a million rows) are near 100 MB;
# anything far beyond is not a deck and would only fill memory.
MAX_DECK_BYTES: Final = 256 * 1024 * 1024
# A refused deck's first errors go to the log; `sipcdr rates check` lists them all.
LOGGED_PROBLEMS: Final = 5
_log = structlog.get_logger("sipcdr.rates")


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


class RateDecks:
    """The `[rating]` decks on disk and the rate stage they price with.

    `load` reads and checks every deck and puts the result in force in one
    assignment; a deck that fails is refused, logged with its first errors, and its
    plan keeps the deck it had. `on_sighup` does the same in a worker thread, so
    capture goes on while a large deck is checked.
    """

    def __init__(
        self,
        rating: RatingConfig,
        trunks: Iterable[Trunk],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rating = rating
        self.stage = RateStage(
            RatePlans(default_plan=rating.default_plan, decimals=rating.decimals), trunks
        )
        self._clock = clock
        self._lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[PlanLoad]] = set()

    def load(self) -> PlanLoad:
        load = self._read()
        self._install(load)
        return load

    async def reload(self) -> PlanLoad:
        async with self._lock:  # two SIGHUPs in a row: one load after the other
            load = await asyncio.to_thread(self._read)
            self._install(load)
            return load

    def on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload())
        self._reloads.add(task)  # held until done: the loop keeps only a weak reference
        task.add_done_callback(self._reloads.discard)

    def _read(self) -> PlanLoad:
        rating = self.rating
        return load_plan_files(
            rating.decks, rating.default_plan, rating.decimals, self._clock(), self.stage.plans
        )

    def _install(self, load: PlanLoad) -> None:
        self.stage.install(load)
        for name, report in load.reports.items():
            path = str(self.rating.decks[name])
            if name in load.refused:
                _log.error(
                    "rate_deck_refused",
                    plan=name,
                    path=path,
                    errors=len(report.errors),
                    problems=[problem_line(path, p) for p in report.errors[:LOGGED_PROBLEMS]],
                    kept="previous deck" if name in load.plans.decks else "none: calls unrated",
                )
            else:
                _log.info(
                    "rate_deck_loaded",
                    plan=name,
                    path=path,
                    rows=len(report.rates),
                    warnings=len(report.warnings),
                )


def rate_decks(config: Config, clock: Callable[[], float] = time.time) -> RateDecks:
    """The rate stage of `config`, its decks loaded; `clock` dates the decks' validity."""
    decks = RateDecks(config.rating, [trunk.to_trunk() for trunk in config.trunks], clock)
    decks.load()
    return decks


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
