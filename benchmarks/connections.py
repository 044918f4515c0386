"""Memory held per HEP/TCP and HEP/TLS connection: sipcdr's stream listener against the
design it replaced, a task with a StreamReader per connection, and what TLS adds.

Each contender runs on uvloop in a fresh process. The benchmark opens N connections
to it, half of them idle and half with a frame started and never finished (100 bytes
of an announced 65535: what a slowloris agent leaves buffered), waits until the
server holds all of them, and reads the server's VmRSS before and after. Figures are
medians of several rounds; the ratio is against the baseline measured in the same run.

    (a) sipcdr      `HepStreamServer`: an asyncio.Protocol per connection, frames cut
                    in data_received, deadlines by one sweep
    (b) streams     `asyncio.start_server` with a handler coroutine per connection that
                    awaits `readexactly` for the header and then the frame
    (c) TLS hello   (a) over TLS, every agent stalled after its ClientHello: the daemon
                    has answered and holds the handshake's state (a handshake flood)
    (d) TLS idle    (a) over TLS, every handshake done and the agent silent
    (e) mTLS idle   (d) with `tls_client_ca` set: every agent presented a certificate

(c), (d) and (e) are the figures to size `hep_tcp_max_connections` by when agents use TLS;
their ratio is against (a), the same listener over TCP.

    python benchmarks/connections.py [--connections 2000] [--rounds 3]
    python benchmarks/connections.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import uvloop
from sipcdr.capture.hepstream import HepStreamServer, StreamLimits
from sipcdr.capture.listeners import AllowList, HepGate
from sipcdr.capture.tls import server_context
from sipcdr.config import DEFAULT_ALLOW
from sipcdr.dialog import Correlator, DialogLimits
from sipcdr.pipeline import Pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))  # the test PKI
from tlscerts import Pki, make_pki

SERVERS = ("sipcdr", "streams", "sipcdr-tls", "sipcdr-mtls")
# (label, server, what each agent does)
CONTENDERS = (
    ("sipcdr", "sipcdr", "tcp"),
    ("streams", "streams", "tcp"),
    ("TLS hello", "sipcdr-tls", "hello"),
    ("TLS idle", "sipcdr-tls", "idle"),
    ("mTLS idle", "sipcdr-mtls", "idle"),
)
_REPORT_INTERVAL_S = 0.1
_SLOW_FRAME = b"HEP3\xff\xff" + b"\x00" * 100


async def _serve_sipcdr(pki: Path | None, client_certificates: bool) -> None:
    pipeline = Pipeline(Correlator(DialogLimits(), egress=True), ())
    # Limits far beyond the run, so nothing is refused or timed out while measuring.
    limits = StreamLimits(1_000_000, 1_000_000, 3600.0, 3600.0, 65535)
    endpoint = [("127.0.0.1", 0)]
    if pki is None:
        server = HepStreamServer(
            pipeline, AllowList(DEFAULT_ALLOW), HepGate({}), limits, tcp=endpoint
        )
    else:
        client_ca = pki / "ca.crt" if client_certificates else None
        context = server_context(pki / "server.crt", pki / "server.key", client_ca)
        server = HepStreamServer(
            pipeline,
            AllowList(DEFAULT_ALLOW),
            HepGate({}),
            limits,
            tls=endpoint,
            tls_context=context,
        )
    await server.start()
    port = server.bound["hep_tcp" if pki is None else "hep_tls"][0][1]
    await _report(port, lambda: server.connections)


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


def _client_hello(context: ssl.SSLContext) -> bytes:
    """The first flight of a TLS agent, without a socket behind it."""
    agent = context.wrap_bio(
        ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="127.0.0.1"
    )
    with contextlib.suppress(ssl.SSLWantReadError):
        agent.do_handshake()
    return outgoing.read()


def _measure(server_kind: str, agents: str, count: int, pki: Pki) -> float:
    """KiB of server RSS per connection held."""
    command = [sys.executable, __file__, "--serve", server_kind]
    if server_kind.endswith("tls"):
        command += ["--pki", str(pki.ca.parent)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.agent_cert), str(pki.agent_key))  # when asked for
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
            if agents == "hello":
                sock.sendall(_client_hello(context))
            elif agents == "idle":
                sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
            elif index % 2:
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
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    parser.add_argument("--pki", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            serving = (
                _serve_streams()
                if args.serve == "streams"
                else _serve_sipcdr(args.pki, args.serve == "sipcdr-mtls")
            )
            uvloop.run(serving)
        return 0
    count, rounds = (200, 1) if args.quick else (args.connections, args.rounds)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 100), hard))
    with tempfile.TemporaryDirectory() as folder:
        pki = make_pki(Path(folder))
        results = {
            label: statistics.median(_measure(server, agents, count, pki) for _ in range(rounds))
            for label, server, agents in CONTENDERS
        }

    def ratio(label: str, baseline: str) -> str:
        return (
            f"{results[label] / results[baseline]:.2f}x {baseline}"
            if results[baseline] > 0
            else "n/a"
        )

    print(f"{count} HEP/TCP connections (half idle, half with a started frame), uvloop:")
    for label in ("sipcdr", "streams"):
        kib = results[label]
        print(f"  {label:9s} {kib:6.2f} KiB server RSS per connection  ({ratio(label, 'streams')})")
    print(f"{count} HEP/TLS connections, uvloop:")
    for label in ("TLS hello", "TLS idle", "mTLS idle"):
        kib = results[label]
        print(f"  {label:9s} {kib:6.2f} KiB server RSS per connection  ({ratio(label, 'sipcdr')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
