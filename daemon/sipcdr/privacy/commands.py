"""The `sipcdr retention`, `hold`, `subject` and `audit` subcommands: argument parsing
and printing only; the work is in `retention`, `holds`, `subjects` and `audit`.

Exit codes: 0 done, 1 failed (database, file), 2 bad use or configuration, 3 refused
(a hold too long, an erasure a hold or statutory retention forbids, a broken audit
chain).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

import orjson

if TYPE_CHECKING:
    from sipcdr.config import Config

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_REFUSED: Final = 3

COMMANDS: Final = ("retention", "hold", "subject", "audit")


def register(sub: Any) -> None:
    """Add the subcommands to the top-level parser's subparsers."""
    retention = sub.add_parser("retention", help="drop what is past its retention period")
    retention_sub = retention.add_subparsers(dest="privacy_action", metavar="ACTION", required=True)
    run = retention_sub.add_parser("run", help="run retention once")
    run.add_argument("--dry-run", action="store_true", help="list what would go; change nothing")
    _common(run)

    hold = sub.add_parser("hold", help="legal holds: keep a subject's records past retention")
    hold_sub = hold.add_subparsers(dest="privacy_action", metavar="ACTION", required=True)
    add = hold_sub.add_parser("add", help="place a hold")
    target = add.add_mutually_exclusive_group(required=True)
    _number_options(target)
    target.add_argument("--trunk", help="trunk name")
    target.add_argument("--call-id", help="a call's Call-ID")
    add.add_argument("--reason", required=True, help="why (case reference)")
    add.add_argument("--from", dest="starts", type=_when, help="start, ISO 8601 (default now)")
    add.add_argument("--until", required=True, type=_when, help="end, ISO 8601 date or time")
    add.add_argument(
        "--tables",
        default="cdrs,sip_messages,fraud_alerts",
        help="what it keeps (default all: cdrs,sip_messages,fraud_alerts)",
    )
    _common(add)
    listing = hold_sub.add_parser("list", help="list holds")
    listing.add_argument("--all", action="store_true", help="include ended holds")
    listing.add_argument("--json", action="store_true")
    _common(listing)
    release = hold_sub.add_parser("release", help="end a hold now")
    release.add_argument("hold_id", type=int)
    _common(release)

    subject = sub.add_parser("subject", help="data-subject rights: export, erase, restrict")
    subject_sub = subject.add_subparsers(dest="privacy_action", metavar="ACTION", required=True)
    export = subject_sub.add_parser("export", help="everything stored about a number")
    _number_options(export.add_mutually_exclusive_group(required=True))
    export.add_argument("--format", choices=("json", "csv"), default="json")
    export.add_argument("--out", type=Path, metavar="FILE", help="default: standard output (json)")
    _common(export)
    for name, text in (
        ("erase", "delete a number's signaling, pseudonymize it in CDRs and alerts"),
        ("restrict", "keep a number's records but stop them leaving the daemon"),
        ("unrestrict", "lift a restriction"),
    ):
        action = subject_sub.add_parser(name, help=text)
        _number_options(action.add_mutually_exclusive_group(required=True))
        _common(action)

    audit = sub.add_parser("audit", help="the audit log")
    audit_sub = audit.add_subparsers(dest="privacy_action", metavar="ACTION", required=True)
    verify = audit_sub.add_parser("verify", help="check the hash chain")
    _common(verify)


def _number_options(group: Any) -> None:
    """The subject's number, given so that other local users do not see it: a command
    line is public to them (ps, /proc), standard input and a private file are not."""
    group.add_argument(
        "--number",
        help="E.164 number, e.g. +4930123456; '-' reads it from standard input (other "
        "local users see a command line, not what is piped in)",
    )
    group.add_argument(
        "--number-file", type=Path, metavar="FILE", help="read the number from FILE's first line"
    )


def _read_number(args: argparse.Namespace, stdin: TextIO) -> None:
    """Replace `--number -` and `--number-file` by the number they give."""
    number_file: Path | None = getattr(args, "number_file", None)
    if number_file is not None:
        try:
            with number_file.open(encoding="utf-8") as handle:
                line = handle.readline()
        except OSError as exc:
            raise ValueError(f"--number-file {number_file}: {exc.strerror or exc}") from None
        where = f"--number-file {number_file}"
    elif getattr(args, "number", None) == "-":
        line = stdin.readline()
        where = "standard input"
    else:
        return
    number = line.strip()
    if not number:
        raise ValueError(f"no number in {where}")
    args.number = number


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, metavar="FILE", help="TOML configuration")
    parser.add_argument("--operator", help="who acts, for the audit log (default: the OS user)")


def _when(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants an ISO 8601 date or time: {text!r}") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def main(
    config: Config, args: argparse.Namespace, out: TextIO | None = None, stdin: TextIO | None = None
) -> int:
    """Run one of the subcommands; the exit code."""
    from sipcdr.command_loop import run_command  # noqa: PLC0415
    from sipcdr.privacy.audit import default_operator  # noqa: PLC0415

    out = out or sys.stdout
    operator = args.operator or default_operator()
    handler = _HANDLERS[(args.command, args.privacy_action)]
    try:
        _read_number(args, stdin or sys.stdin)
        return run_command(handler(config, args, operator, out))
    except Refused as exc:
        print(f"sipcdr: {args.command} {args.privacy_action}: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except ValueError as exc:
        print(f"sipcdr: {args.command} {args.privacy_action}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # one line, not a traceback
        print(
            f"sipcdr: {args.command} {args.privacy_action}: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return EXIT_FAILED


class Refused(Exception):
    """The action is not allowed; the message says why."""


async def _retention_run(
    config: Config, args: argparse.Namespace, operator: str, out: TextIO
) -> int:
    from sipcdr.privacy.database import connected  # noqa: PLC0415
    from sipcdr.privacy.files import expire_files  # noqa: PLC0415
    from sipcdr.privacy.retention import run_retention  # noqa: PLC0415

    report_files = expire_files(config, dry_run=args.dry_run)
    if config.sinks.postgres.enabled:
        async with connected(config) as conn:
            report = await run_retention(
                conn, config.retention, dry_run=args.dry_run, operator=operator
            )
        verb = "would drop" if args.dry_run else "dropped"
        for item in report.dropped:
            held = f", {item.held_rows} rows held back" if item.held_rows else ""
            print(
                f"{verb} {item.name} ({item.table}, {item.day}, kept {item.kept_days} days, "
                f"{item.bytes} bytes{held})",
                file=out,
            )
        removed = {k: v for k, v in report.held_rows_removed.items() if v}
        if removed:
            what = "would remove" if args.dry_run else "removed"
            print(f"{what} held rows whose hold ended: {removed}", file=out)
        print(f"{len(report.dropped)} partitions, {report.bytes} bytes", file=out)
    for path in report_files:
        print(f"{'would delete' if args.dry_run else 'deleted'} {path}", file=out)
    kafka = config.sinks.kafka
    if args.dry_run and kafka.enabled:
        from sipcdr.privacy.plan import kafka_retention_ms  # noqa: PLC0415

        wanted = kafka_retention_ms(
            config.retention, kafka.topic_cdrs, kafka.topic_fraud, kafka.topic_sip
        )
        for topic, ms in wanted.items():
            print(f"kafka topic {topic}: retention.ms={ms}", file=out)
    return EXIT_OK


async def _hold_add(config: Config, args: argparse.Namespace, operator: str, out: TextIO) -> int:
    from sipcdr.privacy.database import connected  # noqa: PLC0415
    from sipcdr.privacy.holds import add_hold  # noqa: PLC0415
    from sipcdr.privacy.plan import HoldRefused  # noqa: PLC0415

    kind, subject = (
        ("number", args.number)
        if args.number
        else ("trunk", args.trunk)
        if args.trunk
        else ("call_id", args.call_id)
    )
    tables = [item.strip() for item in args.tables.split(",") if item.strip()]
    async with connected(config) as conn:
        try:
            hold_id = await add_hold(
                conn,
                kind=kind,
                subject=subject,
                reason=args.reason,
                starts_at=args.starts,
                expires_at=args.until,
                tables=tables,
                signaling_max_days=config.privacy.signaling_hold_max_days,
                operator=operator,
            )
        except HoldRefused as exc:
            raise Refused(str(exc)) from None
    print(f"hold {hold_id} placed", file=out)
    return EXIT_OK


async def _hold_list(config: Config, args: argparse.Namespace, operator: str, out: TextIO) -> int:
    from sipcdr.privacy.database import connected  # noqa: PLC0415
    from sipcdr.privacy.holds import list_holds  # noqa: PLC0415

    async with connected(config) as conn:
        holds = await list_holds(conn, include_ended=args.all)
    if args.json:
        print(_json(holds), file=out)
        return EXIT_OK
    for hold in holds:
        state = "released" if hold["released_at"] else "in force"
        print(
            f"{hold['hold_id']}\t{hold['kind']} {hold['subject']}\t{','.join(hold['tables'])}\t"
            f"{hold['starts_at']:%Y-%m-%d} .. {hold['expires_at']:%Y-%m-%d}\t{state}\t"
            f"{hold['created_by']}: {hold['reason']}",
            file=out,
        )
    return EXIT_OK


async def _hold_release(
    config: Config, args: argparse.Namespace, operator: str, out: TextIO
) -> int:
    from sipcdr.privacy.database import connected  # noqa: PLC0415
    from sipcdr.privacy.holds import release_hold  # noqa: PLC0415

    async with connected(config) as conn:
        if not await release_hold(conn, args.hold_id, operator):
            raise ValueError(f"no hold {args.hold_id} in force")
    print(f"hold {args.hold_id} released; its rows go at the next retention run", file=out)
    return EXIT_OK


async def _audit_verify(
    config: Config, args: argparse.Namespace, operator: str, out: TextIO
) -> int:
    from sipcdr.privacy.audit import verify  # noqa: PLC0415
    from sipcdr.privacy.database import connected  # noqa: PLC0415

    async with connected(config) as conn:
        verdict = await verify(conn)
    if verdict.intact:
        print(f"audit log intact: {verdict.rows} rows, head {verdict.head}", file=out)
        return EXIT_OK
    raise Refused(f"audit log broken at row {verdict.broken_id}: {verdict.reason}")


def _number(text: str) -> str:
    from sipcdr.privacy.matching import normalize_number  # noqa: PLC0415

    return normalize_number(text)


async def _subject_export(
    config: Config, args: argparse.Namespace, operator: str, out: TextIO
) -> int:
    from sipcdr.privacy.bundle import CsvZipBundle, JsonBundle  # noqa: PLC0415
    from sipcdr.privacy.database import connected  # noqa: PLC0415
    from sipcdr.privacy.subjects import export_jsonl, export_postgres, open_output  # noqa: PLC0415

    number = _number(args.number)
    if args.format == "csv" and args.out is None:
        raise ValueError("--format csv writes a zip: name it with --out FILE")
    if not config.sinks.postgres.enabled and not config.sinks.jsonl.enabled:
        raise ValueError("no sink stores records: PostgreSQL and JSONL are both disabled")
    stream = open_output(args.out) if args.out is not None else sys.stdout.buffer
    try:
        make = CsvZipBundle if args.format == "csv" else JsonBundle
        bundle = make(stream, number, datetime.now(UTC))
        if config.sinks.postgres.enabled:
            async with connected(config) as conn:
                counts = await export_postgres(conn, number, bundle, operator)
        else:
            counts = export_jsonl(Path(config.sinks.jsonl.path), number, bundle)
    finally:
        if args.out is not None:
            stream.close()
    if args.out is not None:
        print(f"exported {counts} to {args.out}", file=out)
    return EXIT_OK


async def _subject_erase(
    config: Config, args: argparse.Namespace, operator: str, out: TextIO
) -> int:
    from sipcdr.privacy.database import connected  # noqa: PLC0415
    from sipcdr.privacy.pseudonym import load_key  # noqa: PLC0415
    from sipcdr.privacy.subjects import erase  # noqa: PLC0415

    number = _number(args.number)
    key = load_key(config.privacy.pseudonym_key_file)
    async with connected(config) as conn:
        report = await erase(
            conn,
            number,
            key,
            statutory_cdr_days=config.privacy.statutory_cdr_days,
            operator=operator,
        )
    print(f"erased: {report.done}; pseudonym {report.pseudonym}", file=out)
    if report.complete:
        return EXIT_OK
    raise Refused(f"left in place: {report.refused}: {'; '.join(report.reasons)}")


async def _subject_restrict(
    config: Config, args: argparse.Namespace, operator: str, out: TextIO
) -> int:
    from sipcdr.privacy.database import connected  # noqa: PLC0415
    from sipcdr.privacy.subjects import restrict  # noqa: PLC0415

    lift = args.privacy_action == "unrestrict"
    async with connected(config) as conn:
        counts = await restrict(conn, _number(args.number), operator, lift=lift)
    print(f"{'unrestricted' if lift else 'restricted'}: rows {counts}", file=out)
    return EXIT_OK


Handler = Callable[["Config", argparse.Namespace, str, TextIO], Coroutine[Any, Any, int]]


_HANDLERS: dict[tuple[str, str], Handler] = {
    ("retention", "run"): _retention_run,
    ("hold", "add"): _hold_add,
    ("hold", "list"): _hold_list,
    ("hold", "release"): _hold_release,
    ("audit", "verify"): _audit_verify,
    ("subject", "export"): _subject_export,
    ("subject", "erase"): _subject_erase,
    ("subject", "restrict"): _subject_restrict,
    ("subject", "unrestrict"): _subject_restrict,
}


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str, option=orjson.OPT_INDENT_2).decode()
