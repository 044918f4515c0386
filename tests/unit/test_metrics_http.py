"""The metrics endpoint in-process: its connection cap, its read and write deadlines,
what it takes before a request line, and a stop with clients halfway through."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Iterable

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from sipcdr.clock import FakeClock
from sipcdr.telemetry import http
from sipcdr.telemetry.http import MAX_CONNECTIONS, MAX_PER_SOURCE, MetricsServer
from sipcdr.telemetry.metrics import Metrics, Sources


class _Big:
    """A collector whose exposition is larger than any socket buffers."""

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily("sipcdr_test_big", "padding", labels=["n"])
        for n in range(100_000):
            family.add_metric([f"{n:064d}"], n)
        yield family


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def server(registry: CollectorRegistry) -> AsyncIterator[MetricsServer]:
    async with MetricsServer(registry, "127.0.0.1", 0, lambda: True) as started:
        yield started


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def _exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def _closed_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 1.0) == b""
    except ConnectionResetError:
        return True  # or reset: either way, at once
    finally:
        writer.close()


async def _open(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def test_connections_beyond_the_per_source_cap_are_closed_at_once_and_counted(
    server: MetricsServer,
) -> None:
    idle = [await _open(server.port, "127.0.0.2") for _ in range(MAX_PER_SOURCE)]
    try:
        await _until(lambda: server.connections == MAX_PER_SOURCE)
        assert await _closed_at_once(*await _open(server.port, "127.0.0.2"))
        assert server.refused == 1
        exported = Metrics(lambda: Sources(metrics_server=server)).registry
        assert exported.get_sample_value("sipcdr_metrics_connections_refused_total") == 1
        assert server.connections == MAX_PER_SOURCE
        # Another address (Prometheus) is served meanwhile.
        answer = await _exchange(server.port, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 200 OK")
    finally:
        for _reader, idle_writer in idle:
            idle_writer.close()
    await _until(lambda: server.connections == 0)


async def test_clients_that_hold_every_slot_unasked_cannot_keep_a_scraper_out(
    server: MetricsServer,
) -> None:
    """The cap full of connections that never finish a request, from several addresses
    (recycled just under the read timeout, they would hold it for good): a scraper's
    connection takes the place of the oldest, and is answered."""
    sources = [f"127.0.0.{n}" for n in range(2, 2 + MAX_CONNECTIONS // MAX_PER_SOURCE)]
    idle = [await _open(server.port, source) for source in sources for _ in range(MAX_PER_SOURCE)]
    try:
        await _until(lambda: server.connections == MAX_CONNECTIONS)
        idle[-1][1].write(b"GET /healthz")  # begun, never ended: still not being answered
        await idle[-1][1].drain()
        answer = await _exchange(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 200 OK")
        assert server.refused == 1
        assert await _closed_at_once(*idle[0])  # the oldest made room
        assert server.connections == MAX_CONNECTIONS - 1
    finally:
        for _reader, idle_writer in idle:
            idle_writer.close()
    await _until(lambda: server.connections == 0)


async def test_a_client_that_does_not_read_the_answer_is_closed_after_the_write_timeout() -> None:
    clock = FakeClock()
    registry = CollectorRegistry()
    registry.register(_Big())
    async with MetricsServer(registry, "127.0.0.1", 0, lambda: True, clock=clock) as server:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
            sock.send(b"GET /metrics HTTP/1.1\r\n\r\n")
            await _until(lambda: server.connections == 1)
            # The read deadline, then the write deadline once the answer is being
            # written: the client never reads it.
            await _until(lambda: clock.deadlines == 2)
            await asyncio.sleep(0.05)
            assert server.connections == 1
            clock.advance(http.WRITE_TIMEOUT_S - 0.01)
            await asyncio.sleep(0.05)
            assert server.connections == 1
            clock.advance(0.01)
            await _until(lambda: server.connections == 0)


async def test_a_leading_empty_line_is_ignored(server: MetricsServer) -> None:
    for request in (
        b"\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\nGET /healthz HTTP/1.1\r\n\r\n",
        b"\r\n\r\nGET /healthz\r\n",
    ):
        assert (await _exchange(server.port, request)).startswith(b"HTTP/1.0 200 OK"), request
    only_empty = b"\r\n" * 10
    assert (await _exchange(server.port, only_empty)).startswith(b"HTTP/1.0 400")


async def test_headers_that_never_end_get_408_and_silence_gets_nothing() -> None:
    clock = FakeClock()
    async with MetricsServer(CollectorRegistry(), "127.0.0.1", 0, lambda: True, clock=clock) as (
        server
    ):
        answers = []
        for request in (b"GET /metrics HTTP/1.1\r\nHost: x\r\n", b""):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(request)
            await _until(lambda: server.connections == 1)
            await asyncio.sleep(0.05)  # the request's bytes are in
            clock.advance(http.READ_TIMEOUT_S - 0.01)
            await asyncio.sleep(0.05)
            assert server.connections == 1  # still waiting for the rest
            clock.advance(0.01)
            answers.append(await asyncio.wait_for(reader.read(), 5))
            writer.close()
            await _until(lambda: server.connections == 0)
    assert answers[0].startswith(b"HTTP/1.0 408 Request Timeout")
    assert answers[1] == b""  # a client that said nothing gets no answer


async def test_stop_closes_connections_halfway_through_their_requests() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    server = MetricsServer(CollectorRegistry(), "127.0.0.1", 0, lambda: True)
    await server.start()
    clients = []
    for half in (b"GET /metrics HTTP/1.1\r\n", b"GET /met", b""):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(half)
        clients.append((reader, writer))
    await _until(lambda: server.connections == 3)
    await asyncio.wait_for(server.stop(), 2.0)
    await server.stop()  # idempotent
    assert server.connections == 0
    for reader, writer in clients:
        assert await asyncio.wait_for(reader.read(), 1.0) == b""
        writer.close()
    await asyncio.sleep(0.05)  # any callback of the ended handlers has run
    assert errors == []
