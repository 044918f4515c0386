"""Command-line parsing only: each subcommand hands its arguments to the module that owns it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sipcdr import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sipcdr",
        description="Passive SIP capture: dialogs into rated CDRs for Kafka and PostgreSQL.",
    )
    parser.add_argument("--version", action="version", version=f"sipcdr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the capture daemon")
    run.add_argument("-c", "--config", metavar="FILE", help="TOML configuration file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    parser.error(f"'{args.command}' is not available in this build yet")
    return 2  # pragma: no cover - parser.error exits


if __name__ == "__main__":
    sys.exit(main())
