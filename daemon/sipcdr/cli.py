"""Command-line parsing only: each subcommand hands a Config and its arguments to the
module that owns the work."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sipcdr import __version__
from sipcdr.privacy import commands as privacy_commands

if TYPE_CHECKING:
    from sipcdr.config import Config

# More senders than cores only compete with each other and with the daemon they load.
MAX_REPLAY_WORKERS = 64


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sipcdr",
        description="Passive SIP capture: dialogs into rated CDRs for Kafka and PostgreSQL.",
    )
    parser.add_argument("--version", action="version", version=f"sipcdr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the capture daemon")
    run.add_argument("-c", "--config", type=Path, metavar="FILE", help="TOML configuration")

    imp = sub.add_parser("import", help="run pcap/pcapng files through the pipeline offline")
    imp.add_argument("files", type=Path, nargs="+", metavar="FILE")
    imp.add_argument("-c", "--config", type=Path, metavar="FILE", help="TOML configuration")
    imp.add_argument("--summary-json", type=Path, metavar="PATH", help="write a summary here")
    imp.add_argument(
        "--delivery-timeout",
        type=float,
        default=None,
        metavar="S",
        help="give up when the sinks take nothing for S seconds (default 600)",
    )

    rep = sub.add_parser("replay", help="send the SIP of a capture to a running daemon")
    rep.add_argument("file", type=Path, metavar="FILE")
    rep.add_argument("--to", required=True, metavar="HOST:PORT", help="listener to send to")
    rep.add_argument("--hep", action="store_true", help="wrap each message in HEPv3")
    rep.add_argument(
        "--rate",
        type=_rate,
        metavar="N",
        help="messages per second, or 'max' for as fast as possible (default: capture pace)",
    )
    rep.add_argument("--loop", type=int, default=1, metavar="K", help="passes, new Call-IDs each")
    rep.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="sender processes sharing the loops and the rate (with --rate; default 1)",
    )
    rep.add_argument("--capture-id", type=int, default=0, help="HEP capture id to send")
    rep.add_argument(
        "--max-gap",
        type=_gap,
        default=1.0,
        metavar="S",
        help="at the capture's pace, shorten longer silences to S seconds (default 1)",
    )
    rep.add_argument(
        "--original-times",
        action="store_true",
        help=(
            "HEP: stamp the capture's times instead of the send time (a daemon replaces "
            "times more than 30 s off its clock with the receive time)"
        ),
    )
    rep.add_argument("--auth-key", help="HEP agent key to send")
    stream = rep.add_mutually_exclusive_group()
    stream.add_argument("--tcp", action="store_true", help="HEP over TCP (a hep_tcp listener)")
    stream.add_argument("--tls", action="store_true", help="HEP over TLS (a hep_tls listener)")
    rep.add_argument(
        "--ca", type=Path, metavar="FILE", help="TLS: CA that signed the daemon's cert"
    )
    rep.add_argument("--cert", type=Path, metavar="FILE", help="TLS: client certificate to present")
    rep.add_argument("--key", type=Path, metavar="FILE", help="TLS: private key of --cert")
    rep.add_argument(
        "--server-name", metavar="NAME", help="TLS: name in the daemon's cert (default: --to host)"
    )

    db = sub.add_parser("db", help="PostgreSQL schema operations")
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    mig = db_sub.add_parser("migrate", help="apply pending schema migrations")
    mig.add_argument("-c", "--config", type=Path, metavar="FILE", help="TOML configuration")

    rates = sub.add_parser("rates", help="rate deck operations")
    rates_sub = rates.add_subparsers(dest="rates_command", metavar="ACTION", required=True)
    check = rates_sub.add_parser(
        "check",
        help="check a rate deck (CSV, see schemas/rate_deck.md); exit 1 on any error",
    )
    check.add_argument("file", type=Path, metavar="FILE")
    check.add_argument("--json", action="store_true", help="print the report as JSON")

    privacy_commands.register(sub)
    return parser


def _rate(text: str) -> str:
    if text == "max":
        return text
    try:
        if 0.001 <= float(text) <= 10_000_000:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"wants a rate from 0.001 to 10000000, or 'max': {text!r}")


def _workers(text: str) -> int:
    if text.isdigit() and 1 <= int(text) <= MAX_REPLAY_WORKERS:
        return int(text)
    raise argparse.ArgumentTypeError(f"wants 1 to {MAX_REPLAY_WORKERS} processes: {text!r}")


def _gap(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"wants seconds from 0 to 86400: {text!r}")
    return value


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SystemExit(f"sipcdr: --to wants HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _command(args)
    except KeyboardInterrupt as exc:
        # Ctrl-C, or SIGTERM (`command_loop`): the command stopped where it was, its
        # clean-up done; `run` stops cleanly on its own.
        from sipcdr.command_loop import Terminated  # noqa: PLC0415

        again = (
            "; run it again to import every file whole (records are deduplicated by id)"
            if args.command == "import"
            else ""
        )
        how, status = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
        action = getattr(args, "db_command", None) or getattr(args, "privacy_action", None)
        command = f"{args.command} {action}" if action else args.command
        print(f"sipcdr: {command}: {how}{again}", file=sys.stderr)
        return status


def _command(args: argparse.Namespace) -> int:

    if args.command == "rates":
        # A deck check needs no configuration: it runs anywhere a deck is edited.
        from sipcdr.rates import run_check  # noqa: PLC0415

        return run_check(args.file, args.json, time.time(), sys.stdout)

    from sipcdr.config import ConfigError, load_config  # noqa: PLC0415 - keep --help fast
    from sipcdr.telemetry.logs import configure  # noqa: PLC0415

    configure()
    if args.command == "replay":
        return _replay(args)

    try:
        config = load_config(args.config, os.environ)
    except (ConfigError, OSError) as exc:
        print(f"sipcdr: configuration: {exc}", file=sys.stderr)
        return 2
    from sipcdr.private import restrict_umask  # noqa: PLC0415

    # run, import and db migrate write personal data (CDRs, spools, the database).
    restrict_umask()
    files: list[Path] = []
    if args.command == "import":
        # Files that cannot be captures are named now, before any sink is started; the
        # others are imported, and the run fails at the end for the ones named here.
        checked = _check_import_arguments(args)
        if isinstance(checked, int):
            return checked
        files = checked
    refused = _refused_paths(config, args.command)
    if refused:
        print(f"sipcdr: {refused}", file=sys.stderr)
        return 2
    if args.command == "run":
        from sipcdr.app import run  # noqa: PLC0415

        return run(config)
    if args.command == "db":
        return _db_migrate(config)
    if args.command in privacy_commands.COMMANDS:
        return privacy_commands.main(config, args)
    return _import(config, args, files)


def _check_import_arguments(args: argparse.Namespace) -> list[Path] | int:
    """The files that look like captures, each other one named on stderr; an exit
    code when nothing can be imported (no such file, or --summary-json unusable)."""
    from sipcdr.capture.pcapfile import CaptureFileError, check_capture  # noqa: PLC0415

    summary_json: Path | None = args.summary_json
    if summary_json is not None:
        folder = summary_json.parent
        if summary_json.is_dir() or not folder.is_dir():
            where = str(summary_json if summary_json.is_dir() else folder)
            problem = "is a directory" if summary_json.is_dir() else "is not an existing folder"
            print(
                f"sipcdr: import: --summary-json {summary_json}: {where} {problem}", file=sys.stderr
            )
            return 2
    files: list[Path] = []
    for path in args.files:
        try:
            check_capture(path)
        except CaptureFileError as exc:
            print(f"sipcdr: import: {exc}", file=sys.stderr)
        else:
            files.append(path)
    return files or 1


# Allocations between the cycle collector's youngest passes during an import (the
# interpreter's default is 700).
_IMPORT_GC_THRESHOLD = 50_000


def _import(config: Config, args: argparse.Namespace, files: list[Path]) -> int:
    import gc  # noqa: PLC0415

    from sipcdr.importer import DELIVERY_TIMEOUT_S, NO_SIP, import_files  # noqa: PLC0415
    from sipcdr.privacy.import_list import RestrictionsUnavailable  # noqa: PLC0415

    # An import allocates a packet, a message and their strings per frame, freed by
    # reference counting; the cycle collector's passes, over everything loaded at the
    # start too, cost a few per cent of it. The start's objects are left out of them
    # and the passes come less often, for the import only (`main` may be called in a
    # process that goes on).
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(_IMPORT_GC_THRESHOLD, 20, 20)
    summary_json: Path | None = args.summary_json
    try:
        summary = import_files(
            config,
            files,
            summary_json,
            delivery_timeout_s=args.delivery_timeout or DELIVERY_TIMEOUT_S,
        )
    except OSError as exc:  # a spool, a file or a folder the import cannot use
        where = f" {exc.filename}" if exc.filename else ""
        print(f"sipcdr: import:{where} {exc.strerror or exc}", file=sys.stderr)
        return 1
    except RestrictionsUnavailable as exc:
        print(f"sipcdr: import: {exc}", file=sys.stderr)
        return 1
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()
    file_errors = summary.get("file_errors")
    if isinstance(file_errors, dict):
        for message in file_errors.values():
            print(f"sipcdr: import: {message}", file=sys.stderr)
    warnings = summary.get("file_warnings")
    no_sip = False
    if isinstance(warnings, dict):
        for message in warnings.values():
            no_sip = no_sip or NO_SIP in message
            print(f"sipcdr: import: warning: {message}", file=sys.stderr)
    encapsulations = summary.get("encapsulations")
    layers = ""
    if isinstance(encapsulations, dict) and any(encapsulations.values()):
        counted = ", ".join(f"{name} {n}" for name, n in encapsulations.items() if n)
        layers = f"; frames decapsulated: {counted}"
    print(
        f"{summary['sip_messages']} SIP messages, {summary['cdrs_written']} CDRs "
        f"({summary['cdrs_by_disposition']}){layers}"
    )
    failed = {
        name: summary[name]
        for name in ("aborted", "undelivered", "spool_refused")
        if summary.get(name)
    }
    faults = {
        name: summary[name]
        for name in ("internal_errors", "cdr_write_failures")
        if summary.get(name)
    }
    if faults:
        # A fault in sipcdr itself cost messages or CDRs: the log has the first few.
        print(f"sipcdr: import: internal errors lost data: {faults}", file=sys.stderr)
    if failed:
        # Records refused by the spool were refused for want of disk space; the rest
        # waited for sinks (or a disk) that took nothing.
        remedy = (
            "free space under state.dir"
            if "spool_refused" in failed
            else "make sure the sinks are reachable"
        )
        print(
            f"not delivered: {failed}; {remedy} and run the import again "
            "(records are deduplicated by id)",
            file=sys.stderr,
        )
    # A truncated file is only warned about: its records up to the cut were imported,
    # and importing it again would find the same cut.
    refused = len(files) < len(args.files)
    return 1 if refused or summary.get("file_errors") or no_sip or failed or faults else 0


def _refused_paths(config: Config, command: str) -> str | None:
    """Why the state folder or the JSONL file cannot hold personal data, before any is
    written (see sipcdr.private); None when they can."""
    from sipcdr.private import PrivatePathError, check_file_location, prepare_state_dir  # noqa: PLC0415
    from sipcdr.sinks.jsonl import CONFIG_KEY as JSONL_KEY  # noqa: PLC0415
    from sipcdr.storage.embedded import EMBEDDED_DATA_SUBDIR  # noqa: PLC0415

    sinks = config.sinks
    if command in ("db", *privacy_commands.COMMANDS) and not sinks.postgres.embedded:
        return None  # migrating a server elsewhere writes nothing here
    key = "state.dir"
    try:
        prepare_state_dir(Path(config.state.dir), leave=(EMBEDDED_DATA_SUBDIR,))
        if command != "db" and sinks.jsonl.enabled:
            key = JSONL_KEY
            check_file_location(Path(sinks.jsonl.path), key=JSONL_KEY)
    except PrivatePathError as exc:
        return str(exc)
    except OSError as exc:  # e.g. a folder on the way it may not enter
        return f"{key}: {exc.filename or ''}: {exc.strerror or exc}"
    return None


def _replay(args: argparse.Namespace) -> int:
    from sipcdr.capture.pcapfile import CaptureFileError, iter_packets  # noqa: PLC0415
    from sipcdr.capture.tls import TlsSetupError  # noqa: PLC0415
    from sipcdr.replay import client_context, clock_guard_note, replay, resolve  # noqa: PLC0415

    transport = "tls" if args.tls else "tcp" if args.tcp else "udp"
    if transport != "udp" and not args.hep:
        print(f"sipcdr: replay: --{transport} carries HEP frames: add --hep", file=sys.stderr)
        return 2
    tls_options = [name for name in ("ca", "cert", "key", "server_name") if getattr(args, name)]
    if tls_options and transport != "tls":
        used = ", ".join("--" + name.replace("_", "-") for name in tls_options)
        print(f"sipcdr: replay: {used} only apply with --tls", file=sys.stderr)
        return 2
    if args.key and not args.cert:
        print("sipcdr: replay: --key needs --cert", file=sys.stderr)
        return 2
    if args.original_times and not args.hep:
        print("sipcdr: replay: --original-times stamps HEP frames: add --hep", file=sys.stderr)
        return 2
    if args.workers > 1 and args.rate is None:
        print("sipcdr: replay: --workers needs --rate (N or max)", file=sys.stderr)
        return 2
    target = _host_port(args.to)
    try:
        packets = list(iter_packets(args.file))
    except CaptureFileError as exc:
        print(f"sipcdr: replay: {exc}", file=sys.stderr)
        return 1
    if not packets:
        print(f"sipcdr: replay: {args.file}: no SIP found to send", file=sys.stderr)
        return 1
    try:
        resolve(target, transport != "udp")
    except OSError as exc:
        print(f"sipcdr: replay: {exc}", file=sys.stderr)
        return 1
    if args.original_times:
        note = clock_guard_note(packets, time.time())
        if note is not None:
            print(f"sipcdr: replay: note: {note}", file=sys.stderr)
    pace = (
        "as fast as possible"
        if args.rate == "max"
        else f"{args.rate} messages/s"
        if args.rate
        else f"at the capture's pace, silences over {args.max_gap:g} s shortened"
    )
    print(
        f"replaying {len(packets) * args.loop} messages from {args.file} to {args.to} {pace}",
        file=sys.stderr,
        flush=True,
    )
    rate = None if args.rate in (None, "max") else float(args.rate)
    try:
        context = client_context(args.ca, args.cert, args.key) if transport == "tls" else None
    except TlsSetupError as exc:
        print(f"sipcdr: replay: {exc}", file=sys.stderr)
        return 2
    try:
        result = replay(
            args.file,
            target,
            as_hep=args.hep,
            rate=rate,
            loops=args.loop,
            original_pace=args.rate is None,
            capture_id=args.capture_id,
            auth_key=args.auth_key,
            original_times=args.original_times,
            transport=transport,
            tls=context,
            server_name=args.server_name,
            max_gap_s=args.max_gap,
            progress=_replay_progress,
            packets=packets,
            workers=args.workers,
        )
    except OSError as exc:  # ssl.SSLError included: a refused certificate, a dead port
        print(f"sipcdr: replay: {exc}", file=sys.stderr)
        return 1
    per_s = result.sent / result.seconds if result.seconds > 0 else 0.0
    print(
        f"sent {result.sent} messages in {result.seconds:.2f} s, {per_s:,.0f}/s "
        f"({result.skipped} skipped)"
    )
    return 0


def _replay_progress(sent: int, total: int) -> None:
    end = "\r" if sys.stderr.isatty() else "\n"
    print(f"sent {sent} of {total} messages", end=end, file=sys.stderr, flush=True)


def _db_migrate(config: Config) -> int:
    from sipcdr.command_loop import run_command  # noqa: PLC0415
    from sipcdr.storage.embedded import EmbeddedPostgresError  # noqa: PLC0415
    from sipcdr.storage.migrations import (  # noqa: PLC0415
        DatabaseUnavailable,
        MigrationError,
        migrate_configured,
    )

    if not config.sinks.postgres.enabled:
        print(
            "sipcdr: db migrate: PostgreSQL is disabled (sinks.postgres.dsn is empty)",
            file=sys.stderr,
        )
        return 2
    try:
        applied = run_command(migrate_configured(config.sinks.postgres.dsn, Path(config.state.dir)))
    except (DatabaseUnavailable, MigrationError, EmbeddedPostgresError, OSError) as exc:
        print(f"sipcdr: db migrate: {exc}", file=sys.stderr)
        return 1
    for name in applied:
        print(f"applied {name}")
    if not applied:
        print("schema is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
