"""HEP over TCP and over TLS: HEPv3 frames on a stream, from agents that keep a
connection open.

A stream listener is exposed to whoever may connect, so every resource a connection
can hold is bounded: the number of connections (in total and per source address),
how long a connection may stay silent, how long a started frame or TLS handshake may
take to finish (slowloris), and how many bytes of an unfinished frame are buffered.
Over TLS the daemon also writes (handshakes, session tickets, answers to the agent's
KeyUpdates): what the agent leaves unread is bounded too. Each refusal and each forced
close is counted by a fixed reason.

Connections are `asyncio.Protocol`s without a task or a StreamReader each: an idle
connection costs a transport and one small object. Frames are decoded inside
`data_received`, as datagrams are in the UDP listeners, so nothing queues behind a
connection. Timeouts are enforced by one sweep over the open connections a few times
per timeout rather than a timer per connection, which would be re-armed on every read.

TLS runs through `ssl.SSLObject` over memory BIOs inside the same protocol instead
of the loop's own TLS transport: that is the only way to see why a handshake failed
(the loops' transports drop the reason), and it behaves the same on uvloop and on the
default loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, cast

from sipcdr.capture.listeners import AllowList, HepGate, ListenerStats, handle_hep
from sipcdr.capture.tls import handshake_failure
from sipcdr.clock import SYSTEM_CLOCK, Clock
from sipcdr.pipeline import Pipeline

SOURCE_TCP: Final = "hep_tcp"
SOURCE_TLS: Final = "hep_tls"
# Every agent reconnecting at once after a restart is queued by the kernel instead of
# waiting out SYN retries (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG: Final = 1024
# The sweep runs at least this often, and at least four times per timeout, so a
# connection is closed within a quarter of its timeout past the deadline.
SWEEP_MAX_INTERVAL_S: Final = 1.0
# ... and at most this often: a tiny timeout (the config refuses under 0.1 s, limits
# built in code may not) must not turn the sweep into a busy loop.
SWEEP_MIN_INTERVAL_S: Final = 0.025
# An agent makes the daemon write a handshake, a few session tickets and the odd
# KeyUpdate answer, which the kernel's socket buffer takes whole. Bytes piling up in
# the transport beyond this mean the agent does not read: the connection is closed as
# `write_backlog`, since a KeyUpdate request costs the agent 30 bytes and makes the
# daemon queue an answer, without end.
WRITE_BACKLOG_BYTES: Final = 64 * 1024
# One TLS record holds at most 16 KiB of plaintext; this takes several per read call.
_TLS_READ_BYTES: Final = 65536
_HEADER: Final = 6  # "HEP3" and the 16-bit total length
_MAGIC: Final = b"HEP3"
_TLS_RECORD_HEADER: Final = 5  # content type, version, 16-bit length
# Frames in a row the daemon rejects (not HEP, a wrong agent key) before the
# connection is closed as `rejected_frames`: a wrong key is not a transient error, and
# a connection that sends nothing the daemon takes must not hold a slot an agent needs.
MAX_REJECTED_FRAMES: Final = 8


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """The bounds on what connections may hold; `[capture] hep_tcp_*` (their defaults
    and reasons are in config/schema.py). `max_buffer_bytes` is also the largest frame taken:
    a longer one is skipped and counted as `oversize`."""

    max_connections: int
    max_per_source: int
    idle_timeout_s: float
    frame_timeout_s: float
    max_buffer_bytes: int


class HepStreamServer:
    """HEP/TCP and HEP/TLS listeners sharing one set of limits: the file limit is the
    process's, so TCP and TLS connections count against the same caps."""

    def __init__(
        self,
        pipeline: Pipeline,
        allow: AllowList,
        gate: HepGate,
        limits: StreamLimits,
        *,
        tcp: Iterable[tuple[str, int]] = (),
        tls: Iterable[tuple[str, int]] = (),
        tls_context: ssl.SSLContext | None = None,
        stats: ListenerStats | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.pipeline = pipeline
        # Frames received and dropped, with the daemon's other listeners.
        self.stats = stats or ListenerStats()
        self.clock = clock
        self.allow = allow
        self.gate = gate
        self.limits = limits
        self._tcp = tuple(tcp)
        self._tls = tuple(tls)
        if self._tls and tls_context is None:
            raise ValueError("HEP/TLS listeners need a TLS context")
        self._tls_context = tls_context
        self.bound: dict[str, list[tuple[str, int]]] = {SOURCE_TCP: [], SOURCE_TLS: []}
        # Counted here, read by the telemetry exporter when it is scraped.
        self.refused: dict[tuple[str, str], int] = {}  # (source, reason)
        self.closed: dict[tuple[str, str], int] = {}  # (source, reason)
        self.handshake_failures: dict[str, int] = {}  # reason
        self.open: dict[str, int] = {SOURCE_TCP: 0, SOURCE_TLS: 0}
        self._connections: set[_Connection] = set()
        self._per_source: dict[str, int] = {}
        self._servers: list[asyncio.Server] = []
        self.sweeper: asyncio.Task[None] | None = None
        self._started = False
        self._stopped = False

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        loop = asyncio.get_running_loop()
        for source, endpoints, context in (
            (SOURCE_TCP, self._tcp, None),
            (SOURCE_TLS, self._tls, self._tls_context),
        ):
            for host, port in endpoints:
                server = await loop.create_server(
                    functools.partial(_Connection, self, source, context),
                    host,
                    port,
                    backlog=LISTEN_BACKLOG,
                )
                self._servers.append(server)
                for sock in server.sockets:
                    self.bound[source].append(tuple(sock.getsockname()[:2]))
        if self._servers:
            self.sweeper = asyncio.create_task(self._sweep(), name="sipcdr-hep-stream-sweep")

    def close(self) -> None:
        """Stop accepting and drop every connection (an unfinished frame is counted as
        `truncated`). Idempotent; `stop` also waits for the listeners to close."""
        self._stopped = True
        for server in self._servers:
            server.close()
        for connection in list(self._connections):
            connection.shut_down()
        if self.sweeper is not None:
            self.sweeper.cancel()

    async def stop(self) -> None:
        self.close()
        for server in self._servers:
            await server.wait_closed()
        # Let the aborted transports report connection_lost, which does the counting.
        await asyncio.sleep(0)

    def flush(self) -> None:
        """Nothing to flush: complete frames are processed as they arrive, and a
        partial one cannot be."""

    async def __aenter__(self) -> HepStreamServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- connection accounting -----------------------------------------------------

    def admit(self, connection: _Connection) -> bool:
        ip = connection.ip
        limits = self.limits
        if not ip:
            # Reset by the agent before the loop took it (uvloop then has no peer
            # address): nothing was read, and there is no source to hold it against.
            reason = "gone"
        elif not self.allow.permits(ip):
            reason = "not_allowed"
        elif self._stopped:
            reason = "max_connections"  # stopping: the cap is now zero
        elif len(self._connections) >= limits.max_connections:
            reason = "max_connections"
        elif self._per_source.get(ip, 0) >= limits.max_per_source:
            reason = "max_per_source"
        else:
            self._connections.add(connection)
            self._per_source[ip] = self._per_source.get(ip, 0) + 1
            self.open[connection.source] += 1
            return True
        key = (connection.source, reason)
        self.refused[key] = self.refused.get(key, 0) + 1
        return False

    def release(self, connection: _Connection) -> None:
        if connection not in self._connections:
            return
        self._connections.discard(connection)
        self.open[connection.source] -= 1
        left = self._per_source[connection.ip] - 1
        if left:
            self._per_source[connection.ip] = left
        else:
            del self._per_source[connection.ip]

    def count_closed(self, source: str, reason: str) -> None:
        key = (source, reason)
        self.closed[key] = self.closed.get(key, 0) + 1

    def count_handshake_failure(self, reason: str) -> None:
        self.handshake_failures[reason] = self.handshake_failures.get(reason, 0) + 1

    # -- timeouts ----------------------------------------------------------------------

    async def _sweep(self) -> None:
        limits = self.limits
        interval = max(
            SWEEP_MIN_INTERVAL_S,
            min(SWEEP_MAX_INTERVAL_S, limits.idle_timeout_s / 4, limits.frame_timeout_s / 4),
        )
        while True:
            await self.clock.sleep(interval)
            self.expire(self.clock.monotonic())

    def expire(self, now: float) -> None:
        """Close connections past a deadline: a frame or handshake started more than
        frame_timeout_s ago, or nothing received for idle_timeout_s."""
        frame_deadline = now - self.limits.frame_timeout_s
        idle_deadline = now - self.limits.idle_timeout_s
        for connection in list(self._connections):
            started = connection.started
            if started:
                if started < frame_deadline:
                    connection.time_out("frame_timeout")
            elif connection.last_active < idle_deadline:
                connection.time_out("idle_timeout")


_LINGER_RESET: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close with a reset


def _reset(transport: asyncio.Transport) -> None:
    """Close with a TCP reset. A plain close sends a FIN when every byte has been
    read, which an agent cannot tell from a clean end: its frames would seem taken."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class _Connection(asyncio.Protocol):
    """One agent connection: admission, optional TLS, HEPv3 framing, deadlines."""

    __slots__ = (
        "_bio_in",
        "_bio_out",
        "_context",
        "_ended",
        "_need",
        "_pending",
        "_record_head",
        "_record_left",
        "_rejected",
        "_server",
        "_skip",
        "_tls",
        "handshaking",
        "ip",
        "last_active",
        "source",
        "started",
        "transport",
    )

    def __init__(self, server: HepStreamServer, source: str, context: ssl.SSLContext | None):
        self._server = server
        self.source = source
        self._context = context
        self.ip = ""
        self._pending = bytearray()  # the start of an unfinished frame
        self._need = _HEADER  # bytes _pending must reach before it is worth parsing
        self._skip = 0  # bytes still to discard of an oversize frame
        self.started = 0.0  # monotonic time the unfinished frame or handshake began; 0: none
        # When the connection last brought an agent's frame (or opened, or finished its
        # handshake): bytes the daemon rejects do not keep it alive.
        self.last_active = 0.0
        self._rejected = 0  # frames rejected since the last one taken
        self.handshaking = False
        self._ended = False  # the reason this connection ends has been counted
        self._tls: ssl.SSLObject | None = None
        self._bio_in: ssl.MemoryBIO | None = None
        self._bio_out: ssl.MemoryBIO | None = None
        # Where the TLS records end in the ciphertext: OpenSSL takes in the start of a
        # record without a sign outside, so this is how a stalled record is seen.
        self._record_left = 0  # bytes of the current record still to come
        self._record_head = b""  # the start of a record header split across reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if peer else ""
        if not self._server.admit(self):
            self._ended = True
            _reset(self.transport)
            return
        now = self._server.clock.monotonic()
        self.last_active = now
        if self._context is not None:
            self._bio_in = ssl.MemoryBIO()
            self._bio_out = ssl.MemoryBIO()
            self._tls = self._context.wrap_bio(self._bio_in, self._bio_out, server_side=True)
            self.handshaking = True
            self.started = now
            self.transport.set_write_buffer_limits(high=WRITE_BACKLOG_BYTES)

    def connection_lost(self, exc: Exception | None) -> None:
        server = self._server
        if not self._ended:
            self._ended = True
            if self.handshaking:
                server.count_handshake_failure("eof")
            elif self._pending or self._skip:
                server.stats.drop(self.source, "truncated")
        server.release(self)
        self._tls = self._bio_in = self._bio_out = None

    def eof_received(self) -> bool:
        # The agent is done sending and every complete frame has been read: close our
        # side too, over TLS with a close_notify, so the agent can tell a clean end
        # from a rejection (with TLS 1.3 a refused client certificate only shows then).
        tls = self._tls
        if tls is not None and not self.handshaking and not self._ended:
            with contextlib.suppress(ssl.SSLError):
                tls.unwrap()
            self._send_tls()
        return False

    def pause_writing(self) -> None:
        """The transport holds more than WRITE_BACKLOG_BYTES the agent has not read:
        close rather than buffer on. Only TLS connections write, so only they get
        here; there is no resume_writing, since nothing is left to resume."""
        if self._ended:
            _reset(self.transport)  # a refused handshake's alert the agent does not read
            return
        self._close_for("write_backlog")

    def _linger(self, now: float) -> None:
        """Send the alert OpenSSL queued (it tells the agent why it was refused), then
        half-close and discard what the agent still sends until it closes too, or
        until the frame deadline. Closing at once would answer the agent's next bytes
        with a reset, which can destroy the alert before the agent reads it."""
        out = self._bio_out
        if out is None or not out.pending:
            # No alert to deliver (bytes that were not TLS at all get none): a reset
            # tells a plain sender that its frames were not taken.
            _reset(self.transport)
            return
        self._send_tls()
        self.started = now
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()

    def time_out(self, reason: str) -> None:
        if self._ended:
            _reset(self.transport)  # the end of a refused handshake's linger
            return
        self._ended = True
        if self.handshaking:
            self._server.count_handshake_failure("timeout")
        else:
            self._server.count_closed(self.source, reason)
        _reset(self.transport)

    def shut_down(self) -> None:
        if self.handshaking:
            self._ended = True  # not a failed handshake: the daemon is stopping
        _reset(self.transport)

    def _close_for(self, reason: str) -> None:
        self._ended = True
        self._server.count_closed(self.source, reason)
        _reset(self.transport)

    def data_received(self, data: bytes) -> None:
        now = self._server.clock.monotonic()
        tls = self._tls
        if tls is None:
            if not self._ended:
                self._frames(data, now)
            return
        if self._ended:
            return  # lingering after a refused handshake: nothing more is read
        assert self._bio_in is not None
        self._bio_in.write(data)
        self._follow_records(data)
        if self.handshaking:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                self._send_tls()
                return
            except ssl.SSLError as exc:
                self._ended = True
                self._server.count_handshake_failure(handshake_failure(exc))
                self._linger(now)
                return
            self.handshaking = False
            self.started = 0.0
            self.last_active = now  # the idle deadline runs from the handshake's end
        while not self._ended:
            try:
                plain = tls.read(_TLS_READ_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError:
                self._close_for("tls_error")
                return
            if not plain:
                # close_notify (an SSLObject reads it as b""): answer it, so the agent
                # knows every frame before it was read.
                with contextlib.suppress(ssl.SSLError):
                    tls.unwrap()
                self._send_tls()
                self.transport.close()
                return
            self._frames(plain, now)
        if self._ended:
            return  # closed for what a record held (bad framing, a TLS error)
        if self._record_left or self._record_head:
            # A record begun and not ended: bytes trickled into it reach no frame, so
            # the frame deadline runs from here.
            if not self.started:
                self.started = now
        elif not self._pending and not self._skip:
            self.started = 0.0  # the record ended without a frame in it (a KeyUpdate)
        self._send_tls()

    def _follow_records(self, data: bytes) -> None:
        """Advance over the TLS record boundaries in `data`: one header read per
        record, so a few steps per read."""
        size = len(data)
        offset = self._record_left
        head = self._record_head
        while offset < size:
            if head or size - offset < _TLS_RECORD_HEADER:
                piece = data[offset : offset + _TLS_RECORD_HEADER - len(head)]
                head += piece
                offset += len(piece)
                if len(head) < _TLS_RECORD_HEADER:
                    break
                length = (head[3] << 8) | head[4]
                head = b""
            else:
                length = (data[offset + 3] << 8) | data[offset + 4]
                offset += _TLS_RECORD_HEADER
            offset += length
        self._record_head = head
        self._record_left = offset - size if offset > size else 0

    def _send_tls(self) -> None:
        out = self._bio_out
        if out is not None and out.pending and not self.transport.is_closing():
            self.transport.write(out.read())

    def _reject(self) -> bool:
        """Count a rejected frame; True when that closed the connection."""
        self._rejected += 1
        if self._rejected < MAX_REJECTED_FRAMES:
            return False
        self._close_for("rejected_frames")
        return True

    def _frames(self, data: bytes, now: float) -> None:
        """Cut HEPv3 frames out of the stream and hand each to the pipeline. Bytes are
        copied at most twice per frame however they trickle in, so a slow sender
        cannot make this quadratic."""
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                if not self._skip:
                    self.started = 0.0  # the skipped frame ended with this read
                return
            data = data[self._skip :]
            self._skip = 0
            self.started = 0.0
        pending = self._pending
        continuing = bool(pending)
        if continuing:
            pending += data
            if len(pending) < self._need:
                return
            data = bytes(pending)
            pending.clear()
        server = self._server
        pipeline = server.pipeline
        stats = server.stats
        clock = server.clock
        source = self.source
        limit = server.limits.max_buffer_bytes
        size = len(data)
        offset = 0
        need = _HEADER
        while size - offset >= _HEADER:
            if not data.startswith(_MAGIC, offset):
                stats.drop(source, "bad_hep")
                self._close_for("bad_framing")  # lost framing: nothing after this is a frame
                return
            length = (data[offset + 4] << 8) | data[offset + 5]
            if length < _HEADER:
                stats.drop(source, "bad_hep")
                self._close_for("bad_framing")
                return
            end = offset + length
            if length > limit:
                stats.drop(source, "oversize")
                if end > size:
                    self._skip = end - size
                    if not continuing or not self.started:
                        self.started = now
                    return
                offset = end
                continuing = False
                continue
            if end > size:
                need = length
                break
            stats.count_received(source)
            frame = data if length == size else data[offset:end]
            if handle_hep(pipeline, server.gate, stats, source, frame, clock):
                self._rejected = 0
                self.last_active = now
            elif self._reject():
                return
            offset = end
            continuing = False
        if offset < size:
            pending += memoryview(data)[offset:]
            self._need = need
            if not continuing or not self.started:
                self.started = now
        else:
            self._need = _HEADER
            self.started = 0.0
