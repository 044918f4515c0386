"""`sipcdr import` into PostgreSQL (signaling kept, the default): its delivery in a
process of its own against delivery in the import's process, same capture, same run.

The capture is the SIP-only kind of `import_captures.py` (a public sample's calls
repeated). Each import writes into a database of its own, freshly migrated, on one
PostgreSQL server (an embedded one under a temporary folder unless --dsn names one),
with CDRs to PostgreSQL only. The contenders alternate, the order turning each round;
figures are wall time and the processor time of the import and its delivery process
(PostgreSQL's own not in it), medians of the rounds, and frames per second.

    python benchmarks/import_postgres.py [--rounds 3] [--frames 400000] [--dsn postgresql://...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from import_captures import KINDS, SAMPLES, build, timed
from postgres import drop_database, fresh_database
from sipcdr.storage.embedded import EmbeddedPostgres

CONTENDERS = {"one process": "0", "delivery apart": "1"}


def import_once(capture: Path, dsn: str, processes: str, workdir: Path) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIPCDR_")}
    env.update(
        SIPCDR_SINKS__POSTGRES__DSN=dsn,
        SIPCDR_SINKS__JSONL__PATH="",
        SIPCDR_SPOOL__DELIVERY_PROCESSES=processes,
        SIPCDR_STATE__DIR=str(workdir / "var"),
    )
    command = [sys.executable, "-m", "sipcdr.cli", "import", str(capture)]
    return timed(command, workdir, env)


async def run(args: argparse.Namespace) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="sipcdr-import-pg-"))
    embedded: EmbeddedPostgres | None = None
    server_dsn = args.dsn
    if not server_dsn:
        embedded = EmbeddedPostgres(scratch / "pg")
        server_dsn = await embedded.start()
    _label, sample, _frames = KINDS[0]
    capture = scratch / "capture.pcap"
    frames = build(SAMPLES / sample, args.frames, capture)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in CONTENDERS}
    try:
        for round_ in range(args.rounds):
            order = list(CONTENDERS.items())
            if round_ % 2:
                order.reverse()
            for name, processes in order:
                dsn = await fresh_database(server_dsn)
                workdir = scratch / f"{round_}-{processes}"
                workdir.mkdir()
                try:
                    runs[name].append(
                        await asyncio.to_thread(import_once, capture, dsn, processes, workdir)
                    )
                finally:
                    await drop_database(server_dsn, dsn)
    finally:
        if embedded is not None:
            await embedded.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    med = statistics.median
    base_wall = med(wall for wall, _cpu in runs["one process"])
    print(
        f"sipcdr import of {frames:,} SIP frames into PostgreSQL (signaling kept), "
        f"medians of {args.rounds} rounds ({'embedded server' if embedded else 'given server'})"
    )
    for name in CONTENDERS:
        wall = med(w for w, _c in runs[name])
        cpu = med(c for _w, c in runs[name])
        print(
            f"  {name:<16}{frames / wall:>10,.0f} frames/s  wall {wall:6.2f} s  "
            f"cpu {cpu:6.2f} s  {base_wall / wall:5.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=400_000)
    parser.add_argument("--dsn", default="", help="a server to use instead of an embedded one")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
