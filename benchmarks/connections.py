"""Memory held per HEP/TCP connection: sipcdr's stream listener against the design it
replaced, a task with a StreamReader per connection.

Each contender runs on uvloop in a fresh process. The benchmark opens N connections
to it, half of them idle and half with a frame started and never finished (100 bytes
of an announced 65535: what a slowloris agent leaves buffered), waits until the
server holds all of them, and reads the server's VmRSS before and after. Figures are
medians of several rounds; the ratio is against the baseline measured in the same run.

    (a) sipcdr      `HepStreamServer`: an asyncio.Protocol per connection, frames cut
                    in data_received, deadlines by one sweep
    (b) streams     `asyncio.start_server` with a handler coroutine per connection that
                    awaits `readexactly` for the header and then the frame

    python benchmarks/connections.py [--connections 2000] [--rounds 3]
    python benchmarks/connections.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import uvloop
from sipcdr.capture.hepstream import HepStreamServer, StreamLimits
from sipcdr.capture.listeners import AllowList, HepGate
from sipcdr.config import DEFAULT_ALLOW
from sipcdr.dialog import Correlator, DialogLimits
from sipcdr.pipeline import Pipeline

CONTENDERS = ("sipcdr", "streams")
_REPORT_INTERVAL_S = 0.1
_SLOW_FRAME = b"HEP3\xff\xff" + b"\x00" * 100


async def _serve_sipcdr() -> None:
    pipeline = Pipeline(Correlator(DialogLimits(), lambda _ip: None), ())
    # Limits far beyond the run, so nothing is refused or timed out while measuring.
    limits = StreamLimits(1_000_000, 1_000_000, 3600.0, 3600.0, 65535)
    server = HepStreamServer(
        pipeline, AllowList(DEFAULT_ALLOW), HepGate({}), limits, tcp=[("127.0.0.1", 0)]
    )
    await server.start()
    await _report(server.bound["hep_tcp"][0][1], lambda: server.connections)


async def _serve_streams() -> None:
    open_now = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now
        open_now += 1
        try:
            while True:
                header = await reader.readexactly(6)
                await reader.readexactly(int.from_bytes(header[4:6], "big") - 6)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            open_now -= 1
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    await _report(server.sockets[0].getsockname()[1], lambda: open_now)


async def _report(port: int, connections: Callable[[], int]) -> None:
    print(f"port {port}", flush=True)
    while True:
        print(f"open {connections()}", flush=True)
        await asyncio.sleep(_REPORT_INTERVAL_S)


def _vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _measure(contender: str, count: int) -> float:
    """KiB of server RSS per connection held."""
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", contender],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    sockets: list[socket.socket] = []
    try:
        port = int(server.stdout.readline().split()[1])
        server.stdout.readline()
        time.sleep(0.5)  # imports settled
        before = _vm_rss_kib(server.pid)
        for index in range(count):
            sock = socket.create_connection(
                ("127.0.0.1", port), source_address=(f"127.0.0.{2 + index % 200}", 0)
            )
            if index % 2:
                sock.sendall(_SLOW_FRAME)
            sockets.append(sock)
        while int(server.stdout.readline().split()[1]) < count:
            pass
        time.sleep(2 * _REPORT_INTERVAL_S)
        return (_vm_rss_kib(server.pid) - before) / count
    finally:
        for sock in sockets:
            sock.close()
        server.kill()
        server.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="200 connections, 1 round")
    parser.add_argument("--serve", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(_serve_sipcdr() if args.serve == "sipcdr" else _serve_streams())
        return 0
    count, rounds = (200, 1) if args.quick else (args.connections, args.rounds)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 100), hard))
    results = {
        contender: statistics.median(_measure(contender, count) for _ in range(rounds))
        for contender in CONTENDERS
    }
    print(f"{count} HEP/TCP connections (half idle, half with a started frame), uvloop:")
    for contender, kib in results.items():
        ratio = kib / results["streams"] if results["streams"] > 0 else float("nan")
        print(f"  {contender:8s} {kib:6.2f} KiB server RSS per connection  ({ratio:.2f}x streams)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
