"""HEP over TCP and TLS in-process, on the default loop and on uvloop: framing however
the bytes arrive, the connection caps and deadlines, and every TLS handshake outcome
counted by its reason. (tests/integration/test_hep_network.py runs the same against
`sipcdr run`.)"""

from __future__ import annotations

import _ssl
import asyncio
import bisect
import contextlib
import ctypes
import dataclasses
import functools
import ipaddress
import itertools
import random
import re
import resource
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import uvloop
from sipcalls import Call, CdrCollector, answered_call_messages
from sipcdr import hepencode
from sipcdr.capture import hepstream
from sipcdr.capture.hepstream import (
    MAX_REJECTED_FRAMES,
    SOURCE_TCP,
    SOURCE_TLS,
    SWEEP_MIN_INTERVAL_S,
    WRITE_BACKLOG_BYTES,
    HepStreamServer,
    StreamLimits,
)
from sipcdr.capture.listeners import AllowList, HepGate
from sipcdr.capture.tls import HANDSHAKE_FAILURES, handshake_failure, server_context
from sipcdr.clock import SYSTEM_CLOCK, Clock, FakeClock
from sipcdr.config import DEFAULT_ALLOW, CaptureConfig
from sipcdr.dialog import Correlator, DialogLimits
from sipcdr.limits import FD_HEADROOM, raise_file_limit, stream_limits
from sipcdr.pipeline import Pipeline
from sipcdr.telemetry.metrics import Metrics
from tlscerts import Pki, make_pki

T = TypeVar("T")
LIMITS = StreamLimits(
    max_connections=50,
    max_per_source=50,
    idle_timeout_s=60.0,
    frame_timeout_s=60.0,
    max_buffer_bytes=65535,
)


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Awaitable[T]], T]:
    """Runs a test body on the loop named by the parameter: the daemon runs on uvloop,
    `import` and embedding code on the default loop."""

    def runner(body: Awaitable[T]) -> T:
        async def main() -> T:
            return await body

        if request.param == "uvloop":
            return uvloop.run(main())
        return asyncio.run(main())

    return runner


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def frame(payload: bytes, key: str | None = None) -> bytes:
    return hepencode.encode(
        src_ip="192.0.2.10", dst_ip="203.0.113.20", src_port=5060, dst_port=5060,
        timestamp=time.time(), payload=payload, capture_id=2001, auth_key=key,
    )  # fmt: skip


def call_frames(call_id: str) -> bytes:
    return b"".join(frame(data) for data in answered_call_messages(Call(call_id)))


class Harness:
    def __init__(
        self,
        limits: StreamLimits = LIMITS,
        *,
        allow: AllowList | None = None,
        tls: ssl.SSLContext | None = None,
        clock: Clock = SYSTEM_CLOCK,
        gate: HepGate | None = None,
    ) -> None:
        self.clock = clock
        self.sink = CdrCollector()
        self.pipeline = Pipeline(Correlator(DialogLimits(), egress=True), (self.sink,))
        self.server = HepStreamServer(
            self.pipeline,
            allow or AllowList(DEFAULT_ALLOW),
            gate or HepGate({}),
            limits,
            tcp=[("127.0.0.1", 0)],
            tls=[("127.0.0.1", 0)] if tls else [],
            tls_context=tls,
            clock=clock,
        )

    async def __aenter__(self) -> Harness:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()

    def endpoint(self, source: str = SOURCE_TCP) -> tuple[str, int]:
        host, port = self.server.bound[source][0]
        return host, port

    async def connect(
        self, source: str = SOURCE_TCP, local: str = "127.0.0.1"
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(*self.endpoint(source), local_addr=(local, 0))

    @property
    def call_ids(self) -> set[str]:
        return {cdr.call_id for cdr in self.sink.cdrs}


async def settle(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


# -- framing --------------------------------------------------------------------------------


def test_frames_arrive_whole_however_the_stream_is_cut(run: Any) -> None:
    async def body() -> None:
        async with Harness() as h:
            data = call_frames("bytewise@x") + call_frames("chunked@x") + call_frames("whole@x")
            first, second = len(call_frames("bytewise@x")), 2 * len(call_frames("chunked@x"))
            _, writer = await h.connect()
            for index in range(first):  # one byte at a time, the worst case for a parser
                writer.write(data[index : index + 1])
                await writer.drain()
                if index % 97 == 0:
                    await asyncio.sleep(0)
            for start in range(first, second, 1000):
                writer.write(data[start : min(start + 1000, second)])
                await asyncio.sleep(0)
            writer.write(data[second:])  # three calls' frames in one write
            await writer.drain()
            await settle(lambda: len(h.call_ids) == 3)
            assert h.call_ids == {"bytewise@x", "chunked@x", "whole@x"}
            assert h.server.stats.received == {SOURCE_TCP: 18}
            assert h.server.stats.dropped == {}
            writer.close()

    run(body())


def test_an_oversize_frame_is_skipped_and_the_stream_goes_on(run: Any) -> None:
    async def body() -> None:
        limits = StreamLimits(50, 50, 60.0, 60.0, max_buffer_bytes=2048)
        async with Harness(limits) as h:
            big = frame(Call("big@x").request("OPTIONS") + b"x" * 4000)
            assert len(big) > 2048
            _, writer = await h.connect()
            writer.write(big[:100])  # the skip spans writes
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(big[100:] + call_frames("after@x"))
            await writer.drain()
            await settle(lambda: h.call_ids == {"after@x"})
            assert h.server.stats.dropped == {(SOURCE_TCP, "oversize"): 1}
            assert h.server.open[SOURCE_TCP] == 1
            writer.close()

    run(body())


def test_a_skipped_frame_ending_with_a_read_leaves_no_deadline(run: Any) -> None:
    """The rest of an oversize frame arriving as one read ends the skip: the agent may
    then be silent for longer than the frame deadline without being cut off."""

    async def body() -> None:
        limits = StreamLimits(50, 50, 60.0, frame_timeout_s=5.0, max_buffer_bytes=2048)
        clock = FakeClock()
        async with Harness(limits, clock=clock) as h:
            big = frame(Call("big@x").request("OPTIONS") + b"x" * 4000)
            _, writer = await h.connect()
            writer.write(big[:100])
            await writer.drain()
            await settle(lambda: h.server.stats.dropped == {(SOURCE_TCP, "oversize"): 1})
            (connection,) = h.server._connections
            assert connection.started  # the skip has a deadline
            writer.write(big[100:])  # ends where the frame ends
            await writer.drain()
            await settle(lambda: not connection._skip)
            await clock.run_for(5.1, step=0.5)  # a quiet agent, with the sweep running
            assert h.server.closed == {}
            writer.write(call_frames("after@x"))
            await settle(lambda: h.call_ids == {"after@x"})
            writer.close()

    run(body())


class FakeTransport:
    """What `_Connection` needs of a transport when it only cuts frames."""

    def __init__(self) -> None:
        self.aborted = False

    def get_extra_info(self, name: str) -> None:
        return None

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


def test_framing_matches_a_model_for_random_streams_cut_anywhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Differential check of the framer: random streams of frames, some oversize, cut
    at random points, against where the frames are known to begin and end. After every
    read the frame deadline must run exactly while a frame is unfinished, from the
    read in which that frame began."""
    taken: list[bytes] = []

    def take(_p: object, _g: object, _st: object, _s: object, data: bytes, _c: object) -> bool:
        taken.append(data)
        return True  # an agent's frame: the framing is what is checked here

    monkeypatch.setattr(hepstream, "handle_hep", take)
    rng = random.Random(4475)
    for trial in range(1000):
        limit = rng.choice([1024, 2048, 65535])
        sizes = [
            rng.choice([6, 7, 50, 1023, 1024, 1025, 2048, 2049, 5000, 65535, rng.randint(6, 65535)])
            for _ in range(rng.randint(0, 20))
        ]
        frames = [b"HEP3" + struct.pack("!H", n) + rng.randbytes(n - 6) for n in sizes]
        stream = b"".join(frames)
        starts = list(itertools.accumulate([0, *sizes]))  # frame i spans starts[i]..starts[i+1]
        inner = range(1, len(stream))
        cuts = sorted(rng.sample(inner, min(len(inner), rng.randint(0, 40))))
        pipeline = Pipeline(Correlator(DialogLimits(), egress=True), ())
        limits = dataclasses.replace(LIMITS, max_buffer_bytes=limit)
        server = HepStreamServer(pipeline, AllowList(DEFAULT_ALLOW), HepGate({}), limits)
        connection = hepstream._Connection(server, SOURCE_TCP, None)
        connection.transport = FakeTransport()  # type: ignore[assignment]
        taken.clear()
        read_times: list[tuple[int, float]] = []  # (first byte, time) of each read
        previous = 0
        for cut in [*cuts, len(stream)] if stream else []:  # one read per piece
            now = 1.0 + len(read_times)
            read_times.append((previous, now))
            connection._frames(stream[previous:cut], now)
            previous = cut
            index = bisect.bisect_right(starts, cut) - 1  # the frame `cut` falls in
            if index < len(sizes) and starts[index] < cut:
                began = starts[index]
                expected = next(t for first, t in reversed(read_times) if first <= began)
            else:
                expected = 0.0
            assert connection.started == expected, (trial, cut)
        assert taken == [f for f in frames if len(f) <= limit], trial
        oversize = sum(1 for n in sizes if n > limit)
        assert server.stats.dropped == ({(SOURCE_TCP, "oversize"): oversize} if oversize else {})
        assert server.closed == {}
        assert not connection._pending and not connection._skip


def test_lost_framing_closes_the_connection_and_counts(run: Any) -> None:
    async def body() -> None:
        async with Harness() as h:
            reader, writer = await h.connect()
            invite = frame(Call("ok@x").request("INVITE"))
            writer.write(invite + b"GARBAGE" + invite)
            assert await closed_by_peer(reader)
            await settle(lambda: h.server.open[SOURCE_TCP] == 0)
            assert h.server.closed == {(SOURCE_TCP, "bad_framing"): 1}
            assert h.server.stats.dropped == {(SOURCE_TCP, "bad_hep"): 1}
            assert h.server.stats.received == {SOURCE_TCP: 1}  # what came before it counts
            writer.close()

    run(body())


def test_a_frame_cut_off_by_the_agent_is_counted(run: Any) -> None:
    async def body() -> None:
        async with Harness() as h:
            _, writer = await h.connect()
            writer.write(call_frames("cut@x")[:-10])
            await writer.drain()
            writer.close()
            await settle(lambda: h.server.open[SOURCE_TCP] == 0)
            assert h.server.stats.dropped == {(SOURCE_TCP, "truncated"): 1}
            assert h.server.stats.received == {SOURCE_TCP: 5}

    run(body())


# -- caps and deadlines ------------------------------------------------------------------


def test_connections_beyond_the_caps_are_refused_by_reason(run: Any) -> None:
    async def body() -> None:
        limits = StreamLimits(5, 2, 60.0, 60.0, 65535)
        allow = AllowList([ipaddress.ip_network("127.0.0.0/29")])
        async with Harness(limits, allow=allow) as h:
            kept = [await h.connect(local="127.0.0.2") for _ in range(2)]
            refused = [await h.connect(local="127.0.0.2")]  # third from one source
            kept += [await h.connect(local=f"127.0.0.{n}") for n in (3, 3, 4)]
            refused.append(await h.connect(local="127.0.0.5"))  # sixth in total
            refused.append(await h.connect(local="127.0.0.9"))  # outside 127.0.0.0/29
            for reader, _ in refused:
                assert await closed_by_peer(reader)
            assert h.server.refused == {
                (SOURCE_TCP, "max_per_source"): 1,
                (SOURCE_TCP, "max_connections"): 1,
                (SOURCE_TCP, "not_allowed"): 1,
            }
            assert h.server.open[SOURCE_TCP] == h.server.connections == 5
            # A closed connection frees its slot for the next one.
            kept.pop()[1].close()
            await settle(lambda: h.server.connections == 4)
            reader, writer = await h.connect(local="127.0.0.5")
            writer.write(call_frames("late@x"))
            await settle(lambda: h.call_ids == {"late@x"})
            for _, other in [*kept, *refused, (reader, writer)]:
                other.close()

    run(body())


def test_a_connection_reset_before_it_is_taken_is_counted_as_gone(run: Any) -> None:
    """Connected and reset by the agent while the loop has not yet taken it: uvloop
    then has no peer address for it, which is not a source outside the allow-list.
    (The default loop keeps the address accept() returned: the connection is taken and
    ends at once, refused for nothing.)"""

    async def body() -> None:
        async with Harness() as h:
            # Blocking calls without yielding: the kernel completes the handshake and
            # takes the reset before the loop accepts.
            with socket.create_connection(h.endpoint(), timeout=5) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            _, writer = await h.connect()  # accepted after the reset one
            writer.write(call_frames("next@x"))
            await settle(lambda: h.call_ids == {"next@x"})
            uvloop_running = isinstance(asyncio.get_running_loop(), uvloop.Loop)
            assert h.server.refused == ({(SOURCE_TCP, "gone"): 1} if uvloop_running else {})
            assert h.server.connections == 1
            writer.close()

    run(body())


def test_idle_and_stalled_connections_are_closed_by_reason(run: Any) -> None:
    """Deadlines driven through `expire` with a clock moved ahead, not by sleeping."""

    async def body() -> None:
        limits = StreamLimits(50, 50, idle_timeout_s=30.0, frame_timeout_s=5.0,
                              max_buffer_bytes=65535)  # fmt: skip
        clock = FakeClock()
        async with Harness(limits, clock=clock) as h:
            idle_reader, idle = await h.connect()
            slow_reader, slow = await h.connect()
            _, busy = await h.connect()
            await settle(lambda: h.server.connections == 3)
            slow.write(b"HEP3\xff\xff" + b"\x00" * 20)  # a frame started, never finished
            await slow.drain()
            await settle(lambda: sum(1 for c in h.server._connections if c.started) == 1)
            now = clock.monotonic()  # idle connected, slow's frame started, at this
            clock.advance(4.9)
            h.server.expire(clock.monotonic())
            assert h.server.connections == 3
            busy.write(call_frames("busy@x")[:50])  # a frame started 4.9 s after `now`
            await busy.drain()
            await settle(lambda: sum(1 for c in h.server._connections if c.started) == 2)
            clock.advance(0.2)
            h.server.expire(clock.monotonic())  # slow's frame is overdue, busy's is not
            assert await closed_by_peer(slow_reader)
            assert h.server.connections == 2
            busy.write(call_frames("busy@x")[50:])
            await settle(lambda: h.call_ids == {"busy@x"})
            clock.advance(now + 30.1 - clock.monotonic())
            h.server.expire(clock.monotonic())  # idle has been silent since `now`
            assert await closed_by_peer(idle_reader)
            assert h.server.closed == {
                (SOURCE_TCP, "frame_timeout"): 1,
                (SOURCE_TCP, "idle_timeout"): 1,
            }
            assert h.server.connections == 1
            for writer in (idle, slow, busy):
                writer.close()

    run(body())


def taken_at(server: HepStreamServer, now: float) -> bool:
    return any(c.last_active == now for c in server._connections)


def test_only_an_agents_frames_keep_a_connection_from_its_idle_deadline(run: Any) -> None:
    """Frames the daemon rejects (a wrong key, no chunk at all) are bytes, not an agent
    at work: the idle deadline runs on from the last frame taken."""

    async def body() -> None:
        limits = StreamLimits(50, 50, idle_timeout_s=30.0, frame_timeout_s=5.0,
                              max_buffer_bytes=65535)  # fmt: skip
        clock = FakeClock()
        gate = HepGate({2001: "s3cret"})
        async with Harness(limits, clock=clock, gate=gate) as h:
            squat_reader, squatter = await h.connect()
            agent_reader, agent = await h.connect()
            await settle(lambda: h.server.connections == 2)
            for _ in range(4):  # fewer than MAX_REJECTED_FRAMES, 10 s apart
                clock.advance(10.0)
                squatter.write(frame(b"OPTIONS sip:x SIP/2.0\r\n\r\n", "wrong"))
                agent.write(frame(b"OPTIONS sip:x SIP/2.0\r\n\r\n", "s3cret"))
                await asyncio.gather(squatter.drain(), agent.drain())
                now = clock.monotonic()
                # The agent's frame taken (the sweep may close the squatter meanwhile).
                await settle(functools.partial(taken_at, h.server, now))
                h.server.expire(now)
            assert await closed_by_peer(squat_reader)
            assert h.server.closed == {(SOURCE_TCP, "idle_timeout"): 1}
            assert h.server.connections == 1
            agent.close()
            squatter.close()
            del agent_reader

    run(body())


def test_a_run_of_rejected_frames_closes_the_connection(run: Any) -> None:
    async def body() -> None:
        gate = HepGate({2001: "s3cret"})
        async with Harness(gate=gate) as h:
            wrong_reader, wrong = await h.connect()
            empty_reader, empty = await h.connect()
            wrong.write(frame(b"OPTIONS sip:x SIP/2.0\r\n\r\n", "wrong") * MAX_REJECTED_FRAMES)
            empty.write(b"HEP3\x00\x06" * MAX_REJECTED_FRAMES)
            assert await closed_by_peer(wrong_reader)
            assert await closed_by_peer(empty_reader)
            assert h.server.closed == {(SOURCE_TCP, "rejected_frames"): 2}
            # One frame taken in between starts the count again.
            _, agent = await h.connect()
            good = frame(b"OPTIONS sip:x SIP/2.0\r\n\r\n", "s3cret")
            bad = b"HEP3\x00\x06" * (MAX_REJECTED_FRAMES - 1)
            agent.write((bad + good) * 3)
            await agent.drain()
            await settle(
                lambda: h.server.stats.received.get(SOURCE_TCP, 0) >= 16 + 3 * MAX_REJECTED_FRAMES
            )
            assert h.server.connections == 1
            assert h.server.closed == {(SOURCE_TCP, "rejected_frames"): 2}
            for writer in (wrong, empty, agent):
                writer.close()

    run(body())


def test_the_sweep_enforces_the_deadlines_by_itself(run: Any) -> None:
    async def body() -> None:
        limits = StreamLimits(50, 50, idle_timeout_s=0.4, frame_timeout_s=0.2,
                              max_buffer_bytes=65535)  # fmt: skip
        clock = FakeClock()
        async with Harness(limits, clock=clock) as h:
            idle_reader, idle = await h.connect()
            slow_reader, slow = await h.connect()
            slow.write(b"HEP3")
            await slow.drain()
            await settle(lambda: any(c.started for c in h.server._connections))
            await clock.run_for(0.3, step=0.05)  # the sweep, every 0.05 s (a quarter)
            assert h.server.closed == {(SOURCE_TCP, "frame_timeout"): 1}
            assert await closed_by_peer(slow_reader)
            await clock.run_for(0.15, step=0.05)
            assert await closed_by_peer(idle_reader)
            assert h.server.closed == {
                (SOURCE_TCP, "frame_timeout"): 1,
                (SOURCE_TCP, "idle_timeout"): 1,
            }
            idle.close()
            slow.close()

    run(body())


def test_the_sweep_does_not_spin_under_a_tiny_timeout(run: Any) -> None:
    """The config refuses deadlines under 0.1 s; limits built without it must still
    not turn the sweep into a busy loop."""

    async def body() -> None:
        limits = StreamLimits(50, 50, idle_timeout_s=1e-5, frame_timeout_s=1e-5,
                              max_buffer_bytes=65535)  # fmt: skip
        clock = FakeClock()
        async with Harness(limits, clock=clock) as h:
            sweeps: list[float] = []
            h.server.expire = sweeps.append  # type: ignore[method-assign, assignment]
            await clock.run_for(0.3, step=SWEEP_MIN_INTERVAL_S / 5)
        # Every SWEEP_MIN_INTERVAL_S, not at every turn of the event loop.
        assert round(0.3 / SWEEP_MIN_INTERVAL_S) - 1 <= len(sweeps) <= 0.3 / SWEEP_MIN_INTERVAL_S

    run(body())


# -- TLS --------------------------------------------------------------------------------


def agent_context(pki: Pki, *, cert: bool = True, rogue: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if rogue:
        context.load_cert_chain(str(pki.rogue_cert), str(pki.rogue_key))
    elif cert:
        context.load_cert_chain(str(pki.agent_cert), str(pki.agent_key))
    return context


def blocking_agent(endpoint: tuple[str, int], context: ssl.SSLContext, data: bytes) -> str | None:
    """A TLS agent as `sipcdr replay --tls` is one: send, half-close, read until the
    daemon's close_notify. Returns the error it met, or None."""
    try:
        with (
            socket.create_connection(endpoint, timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
        ):
            sock.sendall(data)
            socket.socket.shutdown(sock, socket.SHUT_WR)
            while sock.recv(4096):
                pass
    except (OSError, ssl.SSLError) as exc:
        return str(exc)
    return None


def test_tls_handshakes_good_and_bad_are_counted_by_reason(run: Any, pki: Pki) -> None:
    context = server_context(pki.server_cert, pki.server_key, pki.ca)

    async def body() -> None:
        limits = StreamLimits(50, 50, idle_timeout_s=60.0, frame_timeout_s=0.3,
                              max_buffer_bytes=65535)  # fmt: skip
        async with Harness(limits, tls=context) as h:
            endpoint = h.endpoint(SOURCE_TLS)

            async def agent(context: ssl.SSLContext, data: bytes) -> str | None:
                return await asyncio.to_thread(blocking_agent, endpoint, context, data)

            assert await agent(agent_context(pki), call_frames("tls@x")) is None
            assert h.call_ids == {"tls@x"}  # confirmed by the daemon's close_notify
            failures: dict[str, int] = {}

            async def expect(reason: str) -> None:
                failures[reason] = failures.get(reason, 0) + 1
                await settle(lambda: h.server.handshake_failures == failures)

            error = await agent(agent_context(pki, cert=False), call_frames("nocert@x"))
            assert error is not None and "certificate required" in error
            await expect("no_client_cert")
            error = await agent(agent_context(pki, rogue=True), call_frames("rogue@x"))
            assert error is not None and "unknown ca" in error
            await expect("unknown_ca")
            distrustful = ssl.create_default_context(cafile=str(pki.other_ca))
            distrustful.load_cert_chain(str(pki.agent_cert), str(pki.agent_key))
            assert await agent(distrustful, call_frames("distrust@x"))
            await expect("agent_alert")
            reader, writer = await h.connect(SOURCE_TLS)  # plain HEP on the TLS port
            writer.write(call_frames("plain@x"))
            assert await closed_by_peer(reader)
            await expect("not_tls")
            stalled_reader, stalled = await h.connect(SOURCE_TLS)  # says nothing at all
            assert await closed_by_peer(stalled_reader)
            await expect("timeout")
            _, gone = await h.connect(SOURCE_TLS)
            gone.close()
            await expect("eof")
            assert h.call_ids == {"tls@x"}
            assert h.server.open == {SOURCE_TCP: 0, SOURCE_TLS: 0}
            assert h.server.closed == {}
            writer.close()
            stalled.close()
            # Everything above left the listener as it was.
            assert await agent(agent_context(pki), call_frames("again@x")) is None
            assert h.call_ids == {"tls@x", "again@x"}

    run(body())


def test_tls_without_a_client_ca_takes_any_agent(run: Any, pki: Pki) -> None:
    context = server_context(pki.server_cert, pki.server_key, None)

    async def body() -> None:
        async with Harness(tls=context) as h:
            endpoint = h.endpoint(SOURCE_TLS)
            error = await asyncio.to_thread(
                blocking_agent, endpoint, agent_context(pki, cert=False), call_frames("anon@x")
            )
            assert error is None
            assert h.call_ids == {"anon@x"}

    run(body())


def test_bytes_trickled_into_an_unfinished_tls_record_meet_the_frame_deadline(
    run: Any, pki: Pki
) -> None:
    """OpenSSL takes in the start of a record and waits for the rest without a sign:
    an agent trickling a record must still meet the frame deadline."""
    context = server_context(pki.server_cert, pki.server_key, None)

    async def body() -> None:
        limits = StreamLimits(50, 50, idle_timeout_s=60.0, frame_timeout_s=5.0,
                              max_buffer_bytes=65535)  # fmt: skip
        clock = FakeClock()
        async with Harness(limits, tls=context, clock=clock) as h:
            endpoint = h.endpoint(SOURCE_TLS)

            def open_agent() -> ssl.SSLSocket:
                raw = socket.create_connection(endpoint, timeout=5)
                return agent_context(pki).wrap_socket(raw, server_hostname="127.0.0.1")

            with await asyncio.to_thread(open_agent) as agent:
                agent.sendall(call_frames("whole@x"))
                await settle(lambda: h.call_ids == {"whole@x"})
                clock.advance(5.1)
                h.server.expire(clock.monotonic())  # whole records: nothing is due
                assert h.server.closed == {}
                # Past TLS, straight onto the socket: a record header announcing 16 KiB,
                # then one byte of it.
                socket.socket.sendall(agent, b"\x17\x03\x03\x40\x00" + b"\x00")

                (connection,) = h.server._connections
                await settle(lambda: connection.started > 0)  # the record has begun
                clock.advance(4.9)
                h.server.expire(clock.monotonic())
                assert h.server.closed == {}
                clock.advance(0.2)
                h.server.expire(clock.monotonic())
                assert h.server.closed == {(SOURCE_TLS, "frame_timeout"): 1}

    run(body())


def test_tls_record_ends_are_followed_however_the_stream_is_cut() -> None:
    """The record follower against a model: after every read, a record is unfinished
    exactly when the read ended inside one (its header included)."""
    rng = random.Random(8446)
    server = HepStreamServer(
        Pipeline(Correlator(DialogLimits(), egress=True), ()),
        AllowList(DEFAULT_ALLOW),
        HepGate({}),
        LIMITS,
    )
    for _ in range(300):
        lengths = [rng.choice([0, 1, 5, 100, 16401, rng.randint(0, 18432)]) for _ in range(8)]
        records = [b"\x17\x03\x03" + struct.pack("!H", n) + bytes(n) for n in lengths]
        stream = b"".join(records)
        ends = set(itertools.accumulate(len(record) for record in records))
        connection = hepstream._Connection(server, SOURCE_TLS, None)
        previous = 0
        for cut in [*sorted(rng.sample(range(1, len(stream)), 12)), len(stream)]:
            connection._follow_records(stream[previous:cut])
            previous = cut
            unfinished = bool(connection._record_left or connection._record_head)
            assert unfinished == (cut not in ends), (lengths, cut)


def _libssl() -> ctypes.CDLL:
    """OpenSSL's own functions, reached through the module that links it, so they are
    the very library Python's sockets run on."""
    library = ctypes.CDLL(_ssl.__file__)
    library.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
    library.SSL_do_handshake.argtypes = [ctypes.c_void_p]
    library.SSL_write.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    library.SSL_get_fd.argtypes = [ctypes.c_void_p]
    return library


SSL_KEY_UPDATE_REQUESTED = 1  # openssl/ssl.h: the peer must answer with a KeyUpdate


def key_update_flood(endpoint: tuple[str, int], context: ssl.SSLContext, limit: int) -> int:
    """A TLS 1.3 agent that asks for KeyUpdates and never reads the answers, until the
    daemon closes the connection or `limit` requests are sent. Python has no KeyUpdate
    call: OpenSSL's is called on the SSL object behind the socket. Returns how many
    requests were sent."""
    library = _libssl()
    keepalive = frame(Call("keepalive@x").request("OPTIONS"))
    with socket.socket() as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills soon
        raw.connect(endpoint)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            assert sock.version() == "TLSv1.3"
            # CPython's _ssl socket object: its header, its socket's weakref, its SSL*.
            offset = 3 * ctypes.sizeof(ctypes.c_void_p)
            inner = sock._sslobj  # type: ignore[attr-defined]
            ssl_object = ctypes.c_void_p.from_address(id(inner) + offset).value
            assert library.SSL_get_fd(ssl_object) == sock.fileno(), "not the SSL object"
            sent = 0
            while sent < limit:
                # OpenSSL allows 32 KeyUpdates in a row; application data resets that.
                for _ in range(30):
                    library.SSL_key_update(ssl_object, SSL_KEY_UPDATE_REQUESTED)
                    if library.SSL_do_handshake(ssl_object) != 1:
                        return sent
                    sent += 1
                if library.SSL_write(ssl_object, keepalive, len(keepalive)) <= 0:
                    return sent
            return sent


def test_an_agent_that_does_not_read_cannot_make_the_daemon_buffer(run: Any, pki: Pki) -> None:
    context = server_context(pki.server_cert, pki.server_key, None)

    async def body() -> None:
        async with Harness(tls=context) as h:
            # A small socket buffer on the daemon's side (accepted connections inherit
            # the listener's), so the backlog builds after kilobytes, not megabytes.
            for listener in h.server._servers:
                for sock in listener.sockets:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            sent = await asyncio.to_thread(
                key_update_flood, h.endpoint(SOURCE_TLS), agent_context(pki), 100_000
            )
            await settle(lambda: h.server.open[SOURCE_TLS] == 0)
            assert h.server.closed == {(SOURCE_TLS, "write_backlog"): 1}
            # Each answer is a 27-byte record: the daemon answered what 64 KiB and the
            # socket buffers hold, not the hundred thousand requests it was offered.
            assert WRITE_BACKLOG_BYTES // 27 < sent < 20_000
            assert 0 < h.server.stats.received[SOURCE_TLS] <= sent // 30
            assert h.server.handshake_failures == {}

    run(body())


def server_handshake(
    server: ssl.SSLContext, agent: ssl.SSLContext | None, sent: bytes = b"", eof: bool = False
) -> str | None:
    """A handshake in memory between the daemon's context and an agent's (or the bytes
    `sent` by something that is no TLS agent, then `eof`): the reason the daemon's side
    failed, as the listener counts it, or None when it succeeded."""
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    daemon = server.wrap_bio(server_in, server_out, server_side=True)
    agent_in, agent_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = None
    if agent is not None:
        client = agent.wrap_bio(agent_in, agent_out, server_hostname="127.0.0.1")
    server_in.write(sent)
    if eof:
        server_in.write_eof()
    for _ in range(10):
        if client is not None:
            with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLError):
                client.do_handshake()  # an agent that fails sends its alert all the same
            server_in.write(agent_out.read())
        try:
            daemon.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            return handshake_failure(exc)
        else:
            return None
        agent_in.write(server_out.read())
    raise AssertionError("the handshake neither finished nor failed")


def documented_reasons(metric: str) -> set[str]:
    """The reasons a metric's help text lists, in its parentheses."""
    (family,) = [m for m in Metrics().registry.collect() if m.name == metric]
    listed = re.search(r"\(([^)]*)\)", family.documentation)
    assert listed is not None
    return set(listed[1].split(", "))


def test_every_handshake_failure_is_classified_into_the_documented_reasons(pki: Pki) -> None:
    documented = documented_reasons("sipcdr_hep_tls_handshake_failures")
    assert documented == set(HANDSHAKE_FAILURES)
    requiring = server_context(pki.server_cert, pki.server_key, pki.ca)
    anyone = server_context(pki.server_cert, pki.server_key, None)
    server_as_agent = ssl.create_default_context(cafile=str(pki.ca))
    server_as_agent.load_cert_chain(str(pki.server_cert), str(pki.server_key))  # no clientAuth
    distrustful = ssl.create_default_context(cafile=str(pki.other_ca))
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)
    cases = {
        "accepted": server_handshake(requiring, agent_context(pki)),
        "accepted without a client CA": server_handshake(anyone, agent_context(pki, cert=False)),
        "no_client_cert": server_handshake(requiring, agent_context(pki, cert=False)),
        "unknown_ca": server_handshake(requiring, agent_context(pki, rogue=True)),
        "bad_client_cert": server_handshake(requiring, server_as_agent),
        "agent_alert": server_handshake(anyone, distrustful),
        "not_tls (HEP)": server_handshake(anyone, None, call_frames("plain@x")),
        "not_tls (HTTP)": server_handshake(anyone, None, b"GET / HTTP/1.1\r\n\r\n"),
        "not_tls (zeros)": server_handshake(anyone, None, bytes(40)),
        "eof": server_handshake(anyone, None, hello, eof=True),
    }
    assert cases == {
        "accepted": None,
        "accepted without a client CA": None,
        "no_client_cert": "no_client_cert",
        "unknown_ca": "unknown_ca",
        "bad_client_cert": "bad_client_cert",
        "agent_alert": "agent_alert",
        "not_tls (HEP)": "not_tls",
        "not_tls (HTTP)": "not_tls",
        "not_tls (zeros)": "not_tls",
        "eof": "eof",
    }
    # Whatever a scanner sends first, bare or in a TLS handshake record, the reason is
    # one the metric documents.
    rng = random.Random(5246)
    seen = set()
    for _ in range(300):
        garbage = rng.randbytes(rng.randint(1, 300))
        if rng.random() < 0.5:
            garbage = b"\x16\x03\x01" + struct.pack("!H", len(garbage)) + garbage
        seen.add(server_handshake(anyone, None, garbage, eof=True))
    assert seen <= documented
    assert len(seen) > 2, seen  # more than not_tls and eof were met
    assert handshake_failure(ValueError("not from OpenSSL")) == "other"


# -- the file limit ---------------------------------------------------------------------


def test_the_soft_file_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
        assert raise_file_limit() == (hard, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_connection_cap_is_lowered_to_what_the_file_limit_holds() -> None:
    capture = CaptureConfig()  # 1024 connections by default
    assert stream_limits(capture, 65536).max_connections == 1024
    assert stream_limits(capture, 1024).max_connections == 1024 - FD_HEADROOM
    assert stream_limits(capture, 200).max_connections == 50
    limits = stream_limits(dataclasses.replace(capture, hep_tcp_max_per_source=3), 4096)
    assert (limits.max_per_source, limits.idle_timeout_s, limits.max_buffer_bytes) == (
        3,
        capture.hep_tcp_idle_timeout_s,
        capture.hep_tcp_max_buffer_bytes,
    )
