"""SCTP (RFC 9260): the DATA and I-DATA chunks of a packet, and user messages that
were split over several DATA chunks put back together.

SIP is recognised by content later, so the payload protocol identifier (0 or whatever
the sender chose) is not checked.
"""

from __future__ import annotations

import struct
from typing import Final

from mypy_extensions import trait

from sipcdr.decode.base import Layers, Segment
from sipcdr.decode.ip import MAX_DATAGRAM, Fragments

__all__ = ["SctpLayer"]

_u32: Final = struct.Struct("!I").unpack_from
_sctp_chunk: Final = struct.Struct("!BBH").unpack_from
_ports: Final = struct.Struct("!HH").unpack_from

_new: Final = tuple.__new__
_NONE: Final[tuple[Segment, ...]] = ()


@trait
class SctpLayer(Layers):
    """The SCTP layer of the ``Decapsulator``. Pieces of user messages are bounded by
    the same count and capture-time timeout as IP fragments."""

    __slots__ = ()

    _frags: Fragments
    # (src, dst, sport, dport, tsn) -> (ts, flags, data)
    _sctp_pieces: dict[tuple[object, ...], tuple[float, int, bytes]]

    def _expire_sctp(self, now: float, room: int) -> None:
        pieces = self._sctp_pieces
        limit = now - self._frags.timeout
        cap = self._frags.max_datagrams - room
        while pieces:
            oldest = next(iter(pieces))
            if pieces[oldest][0] >= limit and len(pieces) <= cap:
                break
            del pieces[oldest]
            self.stats.sctp_dropped += 1

    def _sctp(
        self, ts: float, buf: bytes, src: bytes, dst: bytes, off: int, end: int
    ) -> tuple[Segment, ...]:
        # Common header: ports, verification tag, checksum; then 4-byte-aligned chunks.
        if end - off < 12:
            self.stats.truncated += 1
            return _NONE
        sport, dport = _ports(buf, off)
        found: list[Segment] = []
        pos = off + 12
        while end - pos >= 4:
            ctype, cflags, clen = _sctp_chunk(buf, pos)
            if clen < 4 or pos + clen > end:
                self.stats.malformed += 1
                break
            # DATA: TSN, stream id, stream seq, PPID (16-byte header). I-DATA (RFC 8260):
            # TSN, stream id, reserved, message id, PPID/FSN (20 bytes). SIP is recognised
            # by content later, so the PPID (0 or whatever the sender chose) is not checked.
            if ctype in (0, 64):
                head = 16 if ctype == 0 else 20
                if clen < head:
                    self.stats.malformed += 1
                else:
                    message: bytes | None = buf[pos + head : pos + clen]
                    if cflags & 0x03 != 0x03:
                        if ctype == 0:
                            message = self._sctp_piece(
                                (src, dst, sport, dport),
                                ts,
                                _u32(buf, pos + 4)[0],
                                cflags,
                                buf[pos + head : pos + clen],
                            )
                        else:
                            # I-DATA pieces are ordered by FSN, not TSN; not reassembled.
                            self.stats.sctp_dropped += 1
                            message = None
                    if message is not None:
                        self.stats.sctp += 1
                        found.append(
                            _new(Segment, (ts, src, dst, sport, dport, 132, message, 0, 0))
                        )
            pos += (clen + 3) & ~3
        return tuple(found)

    def _sctp_piece(
        self, assoc: tuple[object, ...], ts: float, tsn: int, cflags: int, data: bytes
    ) -> bytes | None:
        """Hold one piece of a fragmented user message; return the message when whole.

        RFC 9260 section 6.9: the pieces of one message have consecutive TSNs, the
        first flagged B and the last E, whether or not the message is ordered.
        """
        stats = self.stats
        stats.sctp_pieces += 1
        pieces = self._sctp_pieces
        if pieces:
            self._expire_sctp(ts, 1)
        pieces[(*assoc, tsn)] = (ts, cflags, data)
        # Walks are capped like IP fragment counts so a flood of middle pieces costs
        # bounded work per chunk.
        steps = self._frags.max_pieces
        first = tsn
        while not pieces[(*assoc, first)][1] & 0x02:
            first = (first - 1) & 0xFFFFFFFF
            steps -= 1
            if not steps or (*assoc, first) not in pieces:
                return None
        last = tsn
        while not pieces[(*assoc, last)][1] & 0x01:
            last = (last + 1) & 0xFFFFFFFF
            steps -= 1
            if not steps or (*assoc, last) not in pieces:
                return None
        parts = []
        size = 0
        at = first
        while True:
            part = pieces.pop((*assoc, at))[2]
            parts.append(part)
            size += len(part)
            if at == last:
                break
            at = (at + 1) & 0xFFFFFFFF
        if size > MAX_DATAGRAM:
            stats.sctp_dropped += len(parts)
            return None
        stats.sctp_reassembled += 1
        return b"".join(parts)
