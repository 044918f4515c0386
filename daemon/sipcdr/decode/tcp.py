"""SIP over TCP: per-direction stream reassembly and message framing.

``TcpReassembler.feed`` takes the TCP ``Segment`` records that the ``Decapsulator``
produces and returns the complete SIP messages they finish. Each direction of a
connection is its own byte stream (RFC 3261 section 18.3 frames by Content-Length, and
each side sends independently). Pure code: capture timestamps are the only clock, and
everything dropped or skipped is counted in ``TcpStats``.

Framing: a message is a start line, headers up to the blank line, then Content-Length
bytes of body. A stream joined mid-message (the capture started during a call, or bytes
were lost) is resynchronised by searching for the next SIP start line at a line start;
the bytes passed over are counted. A WebSocket stream (RFC 7118) is recognised by its
HTTP Upgrade handshake and then framed by WebSocket frames (``websocket``), one SIP
message per text/binary message.

Buffers are bounded: out-of-order data, a message still incomplete, and a WebSocket
message each stop at ``max_buffer`` bytes, after which the data is dropped, counted,
and the stream resynchronises. Streams are released on FIN or RST, after
``idle_timeout`` seconds of capture time without data, or oldest-first when
``max_streams`` are open.
"""

from __future__ import annotations

import re
import zlib
from typing import Final

from sipcdr.decode.base import TCP_FIN, TCP_RST, TCP_SYN, Segment
from sipcdr.decode.startline import MAX_START_LINE, find_start, match_start
from sipcdr.decode.websocket import (
    HTTP_START,
    MAX_HANDSHAKE,
    UPGRADE_WEBSOCKET,
    WebSocketFraming,
)
from sipcdr.model import TRANSPORT_TCP

__all__ = ["TCP_COUNTERS", "Message", "Stream", "TcpReassembler", "TcpStats"]

_CONTENT_LENGTH: Final = re.compile(rb"\n(?:content-length|l)[ \t]*:[ \t]*([^\r\n]*)", re.I)

_MASK: Final = 0xFFFFFFFF
_HALF: Final = 0x80000000
_WRAP: Final = 0x100000000

_MODE_SIP: Final = 0
_MODE_WS: Final = 1

_CR_LF: Final = (13, 10)

Message = tuple[bytes, str]
_NONE: Final[tuple[Message, ...]] = ()


# The names of the TcpStats counters, in the order as_dict lists them.
TCP_COUNTERS: Final = (
    "bad_content_length",
    "duplicates",
    "evicted",
    "expired",
    "gap_bytes",
    "gaps",
    "incomplete",
    "keepalives",
    "messages",
    "missing_content_length",
    "out_of_order",
    "overflows",
    "overlaps",
    "released",
    "resyncs",
    "segments",
    "skipped_bytes",
    "streams",
    "ws_bad_deflate",
    "ws_control",
    "ws_messages",
    "ws_non_sip",
    "ws_upgrades",
)


class TcpStats:
    """Counters, only ever incremented."""

    __slots__ = TCP_COUNTERS

    def __init__(self) -> None:
        self.segments = 0  # every segment offered, pure ACKs included
        self.streams = 0  # stream directions opened
        self.released = 0  # closed by FIN or RST
        self.expired = 0  # idle past the timeout
        self.evicted = 0  # dropped because max_streams were open
        self.incomplete = 0  # released holding part of a message
        self.duplicates = 0  # segments with nothing new (retransmissions, keepalive probes)
        self.overlaps = 0  # segments partly retransmitted: the new tail was kept
        self.out_of_order = 0  # segments held until the gap before them filled
        self.gaps = 0  # gaps given up on (bytes never captured)
        self.gap_bytes = 0  # sequence space in those gaps
        self.resyncs = 0  # start lines found after skipping bytes or a gap
        self.skipped_bytes = 0  # bytes passed over while looking for a start line
        self.overflows = 0  # buffers dropped for growing past max_buffer
        self.keepalives = 0  # CRLF keepalives (RFC 5626) between messages
        self.bad_content_length = 0  # framed as if Content-Length were 0
        self.missing_content_length = 0  # likewise
        self.messages = 0  # SIP messages framed, WebSocket ones included
        self.ws_upgrades = 0  # HTTP Upgrade handshakes to WebSocket seen
        self.ws_messages = 0  # SIP messages that came in WebSocket frames
        self.ws_non_sip = 0  # WebSocket messages that were not SIP
        self.ws_control = 0  # ping, pong and close frames
        self.ws_bad_deflate = 0  # permessage-deflate messages that failed to inflate

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in TCP_COUNTERS}


class Stream:
    __slots__ = (
        "buf",
        "inflater",
        "last_ts",
        "mode",
        "next_seq",
        "pending",
        "pending_bytes",
        "synced",
        "want",
        "ws_compressed",
        "ws_parts",
        "ws_size",
    )

    def __init__(self, next_seq: int, synced: bool, ts: float) -> None:
        self.next_seq = next_seq
        # True when the next byte is known to start a message (the SYN was seen, or a
        # start line was found); False means search for one first.
        self.synced = synced
        self.last_ts = ts
        self.buf = bytearray()
        self.pending: dict[int, bytes] | None = None
        self.pending_bytes = 0
        # Bytes the buffer must hold before the message at its start is complete;
        # saves re-reading the headers for every segment of a long message.
        self.want = 0
        self.mode = _MODE_SIP
        self.ws_parts: list[bytes] | None = None
        self.ws_size = 0
        self.ws_compressed = False
        self.inflater: zlib._Decompress | None = None


class TcpReassembler(WebSocketFraming):
    """Reassembles TCP streams, one per (src, dst, sport, dport) direction, into SIP
    messages.

    ``feed`` returns ``(message, transport)`` pairs: transport is ``"tcp"`` for SIP
    framed on the stream and ``"ws"`` for SIP carried in WebSocket frames. The messages
    are those the segment completed, so its timestamp is theirs.
    """

    __slots__ = (
        "_next_sweep",
        "_streams",
        "idle_timeout",
        "max_buffer",
        "max_pending_segments",
        "max_streams",
        "stats",
    )

    def __init__(
        self,
        stats: TcpStats | None = None,
        *,
        max_buffer: int = 1 << 20,
        max_pending_segments: int = 64,
        idle_timeout: float = 300.0,
        max_streams: int = 65536,
    ) -> None:
        self.stats = stats if stats is not None else TcpStats()
        self.max_buffer = max_buffer
        self.max_pending_segments = max_pending_segments
        self.idle_timeout = idle_timeout
        self.max_streams = max_streams
        self._streams: dict[tuple[object, ...], Stream] = {}
        self._next_sweep = float("-inf")

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def feed(self, seg: Segment) -> tuple[Message, ...] | list[Message]:
        stats = self.stats
        stats.segments += 1
        flags = seg.flags
        payload = seg.payload
        if not payload and not flags & (TCP_SYN | TCP_FIN | TCP_RST):
            return _NONE
        ts = seg.timestamp
        if ts >= self._next_sweep:
            self.expire(ts)
        # (src_addr, dst_addr, src_port, dst_port), sliced in C.
        key = seg[1:5]
        streams = self._streams
        stream = streams.get(key)
        if flags & TCP_RST:
            if stream is not None:
                self._release(key, stream)
                stats.released += 1
            return _NONE
        seq = seg.seq
        if flags & TCP_SYN:
            seq = (seq + 1) & _MASK
            if stream is None or stream.next_seq != seq:
                if stream is not None:
                    # The same ports reused for a new connection.
                    self._release(key, stream)
                stream = self._open(key, seq, True, ts)
        elif stream is None:
            if not payload:
                return _NONE
            # Joined mid-connection: nothing says this byte starts a message.
            stream = self._open(key, seq, False, ts)
        stream.last_ts = ts
        out: tuple[Message, ...] | list[Message] = _NONE
        if payload:
            data = self._in_order(stream, seq, payload)
            if data is not None:
                out = self._frame(stream, data)
        if flags & TCP_FIN and stream.pending is None:
            self._release(key, stream)
            stats.released += 1
        return out

    def expire(self, now: float) -> None:
        """Release streams idle for longer than the timeout at capture time ``now``."""
        limit = now - self.idle_timeout
        streams = self._streams
        for key, stream in list(streams.items()):
            if stream.last_ts < limit:
                self._release(key, stream)
                self.stats.expired += 1
        self._next_sweep = now + min(self.idle_timeout, 60.0) / 4

    def close(self) -> None:
        """End of input: release every stream, counting partial messages."""
        for key, stream in list(self._streams.items()):
            self._release(key, stream)

    # -- stream state --------------------------------------------------------------------

    def _open(self, key: tuple[object, ...], next_seq: int, synced: bool, ts: float) -> Stream:
        streams = self._streams
        if len(streams) >= self.max_streams:
            oldest = next(iter(streams))
            self._release(oldest, streams[oldest])
            self.stats.evicted += 1
        stream = streams[key] = Stream(next_seq, synced, ts)
        self.stats.streams += 1
        return stream

    def _release(self, key: tuple[object, ...], stream: Stream) -> None:
        del self._streams[key]
        if stream.buf.strip(b"\r\n") or stream.pending or stream.ws_parts:
            self.stats.incomplete += 1

    def _in_order(self, stream: Stream, seq: int, payload: bytes) -> bytes | bytearray | None:
        """Place ``payload``; return the stream's new in-order data, or None if none."""
        stats = self.stats
        delta = (seq - stream.next_seq) & _MASK
        if delta:
            if delta & _HALF:
                behind = _WRAP - delta
                if behind >= len(payload):
                    stats.duplicates += 1
                    return None
                stats.overlaps += 1
                payload = payload[behind:]
            else:
                pending = stream.pending
                if pending is None:
                    pending = stream.pending = {}
                held = pending.get(seq)
                if held is None or len(held) < len(payload):
                    pending[seq] = payload
                    stream.pending_bytes += len(payload) - (len(held) if held else 0)
                stats.out_of_order += 1
                if (
                    len(pending) <= self.max_pending_segments
                    and stream.pending_bytes <= self.max_buffer
                ):
                    return None
                # The gap is not going to fill (the capture lost it): carry on after it.
                base = stream.next_seq
                first = min(pending, key=lambda s: (s - base) & _MASK)
                stats.gaps += 1
                stats.gap_bytes += (first - base) & _MASK
                self._lose_sync(stream)
                stream.next_seq = first
                payload = pending.pop(first)
                stream.pending_bytes -= len(payload)
        buf = stream.buf
        stream.next_seq = (stream.next_seq + len(payload)) & _MASK
        if not buf and not stream.pending:
            # The usual case: nothing held, so frame the segment itself without a copy.
            return payload
        buf += payload
        pending = stream.pending
        while pending:
            nxt = pending.pop(stream.next_seq, None)
            if nxt is None:
                # Held segments that now overlap what arrived (resegmented
                # retransmissions): keep their new tails, drop the rest.
                base = stream.next_seq
                stale = [s for s in pending if (s - base) & _HALF]
                if not stale:
                    break
                for s in stale:
                    old = pending.pop(s)
                    stream.pending_bytes -= len(old)
                    behind = (base - s) & _MASK
                    if behind < len(old):
                        tail = old[behind:]
                        held = pending.get(base)
                        if held is None or len(held) < len(tail):
                            pending[base] = tail
                            stream.pending_bytes += len(tail) - (len(held) if held else 0)
                continue
            stream.pending_bytes -= len(nxt)
            buf += nxt
            stream.next_seq = (stream.next_seq + len(nxt)) & _MASK
        if not pending:
            stream.pending = None
            stream.pending_bytes = 0
        return buf

    def _lose_sync(self, stream: Stream) -> None:
        self.stats.skipped_bytes += len(stream.buf)
        stream.buf.clear()
        stream.want = 0
        stream.synced = False
        # WebSocket framing cannot be recovered mid-stream; the server's unmasked frames
        # still carry SIP text the start-line search can find.
        stream.mode = _MODE_SIP
        stream.ws_parts = None
        stream.ws_size = 0

    # -- framing ------------------------------------------------------------------------

    def _frame(
        self, stream: Stream, data: bytes | bytearray
    ) -> tuple[Message, ...] | list[Message]:
        size = len(data)
        if size < stream.want:
            return _NONE
        stream.want = 0
        stats = self.stats
        out: list[Message] | None = None
        pos = 0
        while pos < size:
            if stream.mode == _MODE_WS:
                pos, out = self._frame_ws(stream, data, pos, out)
                break
            if not stream.synced:
                start = find_start(data, pos)
                if start < 0:
                    # Keep the last, unfinished line: it may be a start line's beginning,
                    # unless it holds bytes no start line has (TLS and other binary).
                    keep = max(data.rfind(b"\n", pos) + 1, pos, size - MAX_START_LINE)
                    if keep < size and not _printable(data, keep):
                        keep = size
                    stats.skipped_bytes += keep - pos
                    pos = keep
                    break
                stats.skipped_bytes += start - pos
                stats.resyncs += 1
                pos = start
                stream.synced = True
            first = data[pos]
            if first in _CR_LF:
                pos += 1
                while pos < size and data[pos] in _CR_LF:
                    pos += 1
                stats.keepalives += 1
                continue
            line_end = data.find(b"\n", pos)
            if line_end < 0:
                if size - pos > MAX_START_LINE:
                    stream.synced = False
                    continue
                break
            if match_start(data, pos, line_end + 1) is None:
                if HTTP_START.match(data, pos, line_end + 1) is not None:
                    head_end, body = _header_end(data, pos)
                    if head_end < 0:
                        if size - pos > MAX_HANDSHAKE:
                            stream.synced = False
                            continue
                        break
                    if UPGRADE_WEBSOCKET.search(data, pos, head_end) is not None:
                        stats.ws_upgrades += 1
                        stream.mode = _MODE_WS
                        pos = body
                        continue
                # Not SIP here (HTTP, TLS, another protocol, or a body we joined in).
                stream.synced = False
                continue
            head_end, body = _header_end(data, pos)
            if head_end < 0:
                break
            match = _CONTENT_LENGTH.search(data, pos, head_end)
            length = 0
            if match is None:
                stats.missing_content_length += 1
            else:
                value = match.group(1).strip()
                if value.isdigit():
                    length = int(value)
                else:
                    stats.bad_content_length += 1
            if length > self.max_buffer:
                stats.overflows += 1
                stats.skipped_bytes += body - pos
                pos = body
                stream.synced = False
                continue
            end = body + length
            if end > size:
                stream.want = end - pos
                break
            message = bytes(data[pos:end])
            if out is None:
                out = []
            out.append((message, TRANSPORT_TCP))
            stats.messages += 1
            pos = end
        buf = stream.buf
        if data is buf:
            if pos:
                del buf[:pos]
        elif pos < size:
            buf += data[pos:]
        if len(buf) > self.max_buffer:
            stats.overflows += 1
            self._lose_sync(stream)
        return out if out is not None else _NONE


_NOT_PRINTABLE: Final = re.compile(rb"[^\t\r\x20-\x7e]")


def _printable(data: bytes | bytearray, pos: int) -> bool:
    return _NOT_PRINTABLE.search(data, pos) is None


def _header_end(data: bytes | bytearray, pos: int) -> tuple[int, int]:
    """(end of the header block, start of the body), or (-1, -1) if not there yet.

    The blank line is CRLF CRLF; a bare-LF one is accepted too when it comes first,
    since some senders use LF line ends and the parser reads them.
    """
    crlf = data.find(b"\r\n\r\n", pos)
    lf = data.find(b"\n\n", pos, crlf if crlf >= 0 else len(data))
    if lf >= 0:
        return lf, lf + 2
    if crlf >= 0:
        return crlf, crlf + 4
    return -1, -1
