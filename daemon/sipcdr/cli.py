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
    rep.add_argument("--capture-id", type=int, default=0, help="HEP capture id to send")
    rep.add_argument(
        "--original-times",
        action="store_true",
        help="HEP: stamp the capture's times instead of the send time",
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
    from sipcdr.importer import DELIVERY_TIMEOUT_S, import_files  # noqa: PLC0415

    try:
        summary = import_files(
            config,
            args.files,
            args.summary_json,
            delivery_timeout_s=args.delivery_timeout or DELIVERY_TIMEOUT_S,
        )
    except OSError as exc:  # a spool, a file or a folder the import cannot use
        print(f"sipcdr: import: {exc}", file=sys.stderr)
        return 1
    print(
        f"{summary['sip_messages']} SIP messages, {summary['cdrs_written']} CDRs "
        f"({summary['cdrs_by_disposition']})"
    )
    failed = {
        name: summary[name]
        for name in ("aborted", "undelivered", "spool_refused")
        if summary.get(name)
    }
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
    return 1 if summary.get("file_errors") or failed else 0


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
    from sipcdr.capture.tls import TlsSetupError  # noqa: PLC0415
    from sipcdr.replay import client_context, replay  # noqa: PLC0415

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
    rate = None if args.rate in (None, "max") else float(args.rate)
    try:
        context = client_context(args.ca, args.cert, args.key) if transport == "tls" else None
    except TlsSetupError as exc:
        print(f"sipcdr: replay: {exc}", file=sys.stderr)
        return 2
    try:
        result = replay(
            args.file,
            _host_port(args.to),
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
        )
    except OSError as exc:  # ssl.SSLError included: a refused certificate, a dead port
        print(f"sipcdr: replay: {exc}", file=sys.stderr)
        return 1
    print(f"sent {result.sent} messages in {result.seconds:.2f} s ({result.skipped} skipped)")
    return 0


def _db_migrate(config: Config) -> int:
    import asyncio  # noqa: PLC0415

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
        applied = asyncio.run(migrate_configured(config.sinks.postgres.dsn, Path(config.state.dir)))
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
