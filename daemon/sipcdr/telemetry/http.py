"""The metrics endpoint: /metrics (Prometheus text), /healthz (process up), /readyz
(listeners bound and sinks started). A few lines of HTTP/1.0 on asyncio, so the
daemon needs no web framework and no thread for it.

A request whose line or headers are longer than a scraper ever sends is answered 414
or 431 and closed, one whose headers do not end within `READ_TIMEOUT_S` 408; nothing a
client sends ends in a traceback in the daemon's log. At most `MAX_CONNECTIONS` are
open at once (each holds a file descriptor for up to `READ_TIMEOUT_S` plus a linger),
and at most `MAX_PER_SOURCE` from one address, so a flood of connections cannot use up
the descriptors the listeners and the spool need. When the cap is reached, a new
connection takes the place of the oldest one that has not finished its request: a
scraper sends its request at once, so clients that keep connections open without
asking (from any number of addresses) cannot keep Prometheus out. Refusals and those
closes are counted. `stop` closes the open ones."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Final

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from sipcdr.clock import SYSTEM_CLOCK, Clock

# A scrape is "GET /metrics HTTP/1.1" with perhaps a few parameters.
MAX_REQUEST_LINE_BYTES: Final = 4096
# A scraper's headers (Accept, User-Agent, an Authorization) take a few hundred bytes.
MAX_HEADER_BYTES: Final = 16 * 1024
MAX_HEADER_LINES: Final = 100
# RFC 9112 2.2: empty lines before the request line are ignored (a client's stray CRLF
# after an earlier request); more than a few is no HTTP client.
MAX_LEADING_EMPTY_LINES: Final = 4
# A scraper sends its request at once; a client that says nothing is closed.
READ_TIMEOUT_S: Final = 5.0
# A scraper reads the answer (a few hundred KiB at most) as it comes; one that does not
# would hold its connection for good.
WRITE_TIMEOUT_S: Final = 5.0
# Prometheus scrapes one at a time, and a few people may curl at once: far more than
# enough, and small next to the daemon's file limit.
MAX_CONNECTIONS: Final = 32
# Prometheus (and a person with curl) needs one or two at a time.
MAX_PER_SOURCE: Final = 8
# After a refusal, what the client still sends is read and dropped (at most this long
# and this much) before closing: closing on unread input resets the connection, and
# the client may then lose the answer.
_LINGER_S: Final = 1.0
_LINGER_BYTES: Final = 1024 * 1024


class _Refused(Exception):
    """A request answered with an error status, without being served."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


class MetricsServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        ready: Callable[[], bool],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._clock = clock  # the read, write and linger deadlines
        self._registry = registry
        self._host = host
        self._port = port
        self._ready = ready
        # Connections closed on arrival (MAX_PER_SOURCE, or MAX_CONNECTIONS all
        # serving), or closed unserved to make room for a new one.
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        # Those still reading their request, oldest first: the ones a new one replaces.
        self._reading: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._evicted: set[asyncio.Task[None]] = set()  # cancelled, not yet ended
        self._per_source: dict[str, int] = {}
        self._log = structlog.get_logger("sipcdr.metrics")

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._handlers)

    async def start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._handle, self._host, self._port, limit=MAX_HEADER_BYTES
            )

    async def stop(self) -> None:
        """Idempotent: stop listening, then close the connections still open (a client
        halfway through its request) and wait for their handlers to end."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        handlers = list(self._handlers.items())
        for task, writer in handlers:
            writer.transport.abort()
            task.cancel()
        if handlers:
            await asyncio.wait([task for task, _writer in handlers])
        await server.wait_closed()

    async def flush(self) -> None:
        """Nothing buffered: every answer is written before its connection closes."""

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if peer else ""
        if task is None or not self._admit(source):
            self.refused += 1
            writer.transport.abort()
            return
        self._handlers[task] = writer
        self._reading[task] = writer
        self._per_source[source] = self._per_source.get(source, 0) + 1
        try:
            await self._serve(reader, writer, task)
        except asyncio.CancelledError:
            # `stop`, the loop's shutdown, or room made for a newer connection. The
            # task must not end cancelled: asyncio (3.11) reads a connection handler's
            # exception when it ends, and a cancelled task's raises there and is logged
            # as a traceback.
            pass
        finally:
            del self._handlers[task]
            self._reading.pop(task, None)
            self._evicted.discard(task)
            left = self._per_source[source] - 1
            if left:
                self._per_source[source] = left
            else:
                del self._per_source[source]
            writer.close()

    def _admit(self, source: str) -> bool:
        if self._per_source.get(source, 0) >= MAX_PER_SOURCE:
            return False
        if len(self._handlers) - len(self._evicted) < MAX_CONNECTIONS:
            return True
        if not self._reading:
            return False  # every connection is being answered: they end within seconds
        oldest, writer = next(iter(self._reading.items()))
        del self._reading[oldest]
        self._evicted.add(oldest)
        self.refused += 1
        writer.transport.abort()
        oldest.cancel()
        return True

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, task: asyncio.Task[None]
    ) -> None:
        began = False
        try:
            try:
                async with self._clock.timeout(READ_TIMEOUT_S):
                    first = await reader.readexactly(1)
                    began = True
                    path = await _read_request(reader, first)
                self._reading.pop(task, None)
            except _Refused as refused:
                self._reading.pop(task, None)
                await _send(
                    self._clock,
                    writer,
                    refused.status,
                    "text/plain",
                    f"{refused.status}\n".encode(),
                )
                await _linger(self._clock, reader, writer)
                return
            except TimeoutError:
                if began:  # a request that never ended; a silent client gets no answer
                    await _send(self._clock, writer, "408 Request Timeout", "text/plain", b"408\n")
                return
            status, ctype, body = self._answer(path)
            await _send(self._clock, writer, status, ctype, body)
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            pass  # the client went away, said nothing or does not read: nothing to do
        except Exception as exc:
            # One line, not a traceback per request: a failing collector is a bug to
            # report, and the next scrape tries again.
            self._log.warning("metrics_request_failed", error=repr(exc)[:300])

    def _answer(self, path: bytes) -> tuple[str, str, bytes]:
        if path == b"/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == b"/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == b"/readyz":
            if self._ready():
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", b"starting\n"
        return "404 Not Found", "text/plain", b"not found\n"


async def _read_request(reader: asyncio.StreamReader, first: bytes) -> bytes:
    """The path of the request whose first byte is `first`, once its line and headers
    are read; `_Refused` when either is too long or the line is no request."""
    line = first if first == b"\n" else first + await _read_line(reader, first)
    for _ in range(MAX_LEADING_EMPTY_LINES):
        if line not in (b"\r\n", b"\n"):
            break
        line = await _read_line(reader)
    if len(line) > MAX_REQUEST_LINE_BYTES:
        raise _Refused("414 URI Too Long")
    parts = line.split()
    if len(parts) < 2:
        raise _Refused("400 Bad Request")
    if len(parts) >= 3 and line.endswith(b"\n"):  # HTTP/1.x: headers follow
        await _skip_headers(reader)
    return parts[1].split(b"?", 1)[0]


async def _read_line(reader: asyncio.StreamReader, before: bytes = b"") -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise _Refused("414 URI Too Long") from None
    except asyncio.IncompleteReadError as exc:
        if not (before + exc.partial).strip():
            raise
        return exc.partial  # a client that closed its side after the request line


async def _skip_headers(reader: asyncio.StreamReader) -> None:
    total = 0
    for _ in range(MAX_HEADER_LINES + 1):
        try:
            header = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise _Refused("431 Request Header Fields Too Large") from None
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                raise
            return  # closed after the headers without the empty line
        if header in (b"\r\n", b"\n"):
            return
        total += len(header)
        if total > MAX_HEADER_BYTES:
            raise _Refused("431 Request Header Fields Too Large")
    raise _Refused("431 Request Header Fields Too Large")


async def _send(
    clock: Clock, writer: asyncio.StreamWriter, status: str, ctype: str, body: bytes
) -> None:
    head = (
        f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)
    async with clock.timeout(WRITE_TIMEOUT_S):
        await writer.drain()


async def _linger(clock: Clock, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, RuntimeError):
        writer.write_eof()
    with contextlib.suppress(TimeoutError, OSError):
        async with clock.timeout(_LINGER_S):
            dropped = 0
            while dropped < _LINGER_BYTES:
                chunk = await reader.read(64 * 1024)
                if not chunk:
                    return
                dropped += len(chunk)
