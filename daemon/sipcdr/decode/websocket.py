"""SIP over WebSocket (RFC 7118) on a reassembled TCP stream: the HTTP Upgrade
handshake that starts it, RFC 6455 frames (masked or not, fragmented messages,
control frames) and permessage-deflate (RFC 7692).

One SIP message per text or binary WebSocket message. This is the part of
``TcpReassembler`` that reads a stream once its handshake has been seen.
"""

from __future__ import annotations

import re
import struct
import zlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Final

from sipcdr.decode.startline import KEEPALIVE, sip_offset
from sipcdr.model import TRANSPORT_WS

if TYPE_CHECKING:
    from sipcdr.decode.tcp import Message, Stream, TcpStats

__all__ = ["HTTP_START", "MAX_HANDSHAKE", "UPGRADE_WEBSOCKET", "WebSocketFraming"]

HTTP_START: Final = re.compile(rb"GET [^ \r\n]+ HTTP/1\.[01]\r?\n|HTTP/1\.[01] 101[ \r\n]")
UPGRADE_WEBSOCKET: Final = re.compile(rb"\nupgrade[ \t]*:[ \t]*websocket", re.I)
# No real HTTP handshake is this long; past it a stream is not SIP there.
MAX_HANDSHAKE: Final = 16384

_u16: Final = struct.Struct("!H").unpack_from
_u64: Final = struct.Struct("!Q").unpack_from

_DEFLATE_TAIL: Final = b"\x00\x00\xff\xff"


def _unmask(data: bytes, key: bytes) -> bytes:
    # One big-integer XOR runs in C; a Python loop over the bytes would not.
    size = len(data)
    if not size:
        return data
    pad = (key * ((size >> 2) + 1))[:size]
    return (int.from_bytes(data, "little") ^ int.from_bytes(pad, "little")).to_bytes(size, "little")


class WebSocketFraming(ABC):
    """WebSocket framing for ``TcpReassembler``, which owns the counters, the buffer
    limit and the stream state."""

    __slots__ = ()

    stats: TcpStats
    max_buffer: int

    @abstractmethod
    def _lose_sync(self, stream: Stream) -> None:
        """Drop what the stream holds and search for a SIP start line again."""

    def _frame_ws(
        self,
        stream: Stream,
        data: bytes | bytearray,
        pos: int,
        out: list[Message] | None,
    ) -> tuple[int, list[Message] | None]:
        # RFC 6455 section 5.2: FIN/RSV/opcode, MASK/length (7, 16 or 64 bit), mask key.
        stats = self.stats
        size = len(data)
        while size - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = _u16(data, pos + 2)[0]
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = _u64(data, pos + 2)[0]
                head = 10
            if b1 & 0x80:
                head += 4
            if length > self.max_buffer:
                stats.overflows += 1
                stats.skipped_bytes += size - pos
                self._lose_sync(stream)
                return size, out
            end = pos + head + length
            if end > size:
                break
            chunk = bytes(data[pos + head : end])
            if b1 & 0x80:
                chunk = _unmask(chunk, bytes(data[pos + head - 4 : pos + head]))
            pos = end
            opcode = b0 & 0x0F
            if opcode >= 8:
                stats.ws_control += 1
                continue
            if opcode:
                stream.ws_parts = [chunk]
                stream.ws_size = len(chunk)
                stream.ws_compressed = bool(b0 & 0x40)
            elif stream.ws_parts is None:
                # Continuation of a message that began before the capture did.
                continue
            else:
                stream.ws_parts.append(chunk)
                stream.ws_size += len(chunk)
                if stream.ws_size > self.max_buffer:
                    stats.overflows += 1
                    stream.ws_parts = None
                    continue
            if not b0 & 0x80:
                continue
            parts = stream.ws_parts
            stream.ws_parts = None
            message = parts[0] if len(parts) == 1 else b"".join(parts)
            if stream.ws_compressed:
                inflated = self._inflate(stream, message)
                if inflated is None:
                    continue
                message = inflated
            offset = sip_offset(message)
            if offset >= 0:
                if out is None:
                    out = []
                out.append((message[offset:] if offset else message, TRANSPORT_WS))
                stats.messages += 1
                stats.ws_messages += 1
            elif offset == KEEPALIVE:
                stats.keepalives += 1
            else:
                stats.ws_non_sip += 1
        return pos, out

    def _inflate(self, stream: Stream, message: bytes) -> bytes | None:
        # permessage-deflate (RFC 7692): raw deflate, the sender's trailing empty block
        # stripped. One inflater per direction keeps the shared window that context
        # takeover relies on, and is harmless when the peers negotiated it off.
        inflater = stream.inflater
        if inflater is None:
            inflater = stream.inflater = zlib.decompressobj(-15)
        try:
            inflated = inflater.decompress(message + _DEFLATE_TAIL, self.max_buffer + 1)
        except zlib.error:
            self.stats.ws_bad_deflate += 1
            stream.inflater = None
            return None
        if len(inflated) > self.max_buffer or inflater.unconsumed_tail:
            self.stats.overflows += 1
            stream.inflater = None
            return None
        if inflater.eof:
            stream.inflater = None
        return inflated
