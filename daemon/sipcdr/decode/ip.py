"""IPv4 and IPv6 (extension headers, fragment reassembly), IP-in-IP, and the transport
headers inside: UDP and TCP become ``Segment`` records, SCTP and GRE go to their layers,
and UDP sent to a tunnel's port (``tunnels.UDP_TUNNEL_PORTS``) to the tunnel layer.

Checksums are not verified: captures taken on a sending host carry the placeholder
checksums of offloading NICs, and a monitoring tap should report what was on the wire
anyway. (The MPLS payload guess in ``link`` reads the IPv4 header checksum, only to
tell a packet from a frame that reads as both: a labelled packet has passed the router
that pushed the labels, which keeps that checksum valid.)
"""

from __future__ import annotations

import struct
from typing import Final

from mypy_extensions import trait

from sipcdr.decode.base import (
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    MAX_DEPTH,
    DecapStats,
    Layers,
    Segment,
)
from sipcdr.decode.tunnels import UDP_TUNNEL_PORTS

__all__ = ["IPV6_EXTENSION_HEADERS", "MAX_DATAGRAM", "Fragments", "IpLayer"]

_IPPROTO_IPIP: Final = 4
_IPPROTO_IPV6: Final = 41
_IPPROTO_GRE: Final = 47
_IPPROTO_FRAGMENT: Final = 44
_IPPROTO_AH: Final = 51
# IPv6 extension headers whose length is (hdr_ext_len + 1) * 8: hop-by-hop, routing,
# destination options, mobility, HIP, shim6.
_IPV6_EXT_8: Final = frozenset({0, 43, 60, 135, 139, 140})
# The IPv6 extension headers read through to the transport header, the fragment header
# aside (the capture filter passes packets that carry them whole).
IPV6_EXTENSION_HEADERS: Final = frozenset({*_IPV6_EXT_8, _IPPROTO_AH})

MAX_DATAGRAM: Final = 65535

_u16: Final = struct.Struct("!H").unpack_from
_u32: Final = struct.Struct("!I").unpack_from
# version/IHL, [TOS], total length, identification, flags/fragment offset, [TTL],
# protocol, [checksum], source, destination: the whole fixed header in one call.
_ipv4_hdr: Final = struct.Struct("!BxHHHxB2x4s4s").unpack_from
# version/class/flow, payload length, next header
_ipv6_hdr: Final = struct.Struct("!IHB").unpack_from
_udp_hdr: Final = struct.Struct("!HHH").unpack_from
# ports, sequence number, [ack], data offset + flags
_tcp_hdr: Final = struct.Struct("!HHI4xH").unpack_from

# Building the tuple directly skips the generated __new__ and its keyword handling.
_new: Final = tuple.__new__
_NONE: Final[tuple[Segment, ...]] = ()


class _Pending:
    __slots__ = ("first_ts", "held", "next_header", "parts", "total")

    def __init__(self, first_ts: float) -> None:
        self.first_ts = first_ts
        self.parts: list[tuple[int, bytes]] = []
        self.held = 0
        self.total = -1
        self.next_header = -1


class Fragments:
    """IPv4 and IPv6 fragment reassembly, bounded in entries, pieces and capture time.

    Keys are (src, dst, id, protocol) for IPv4 and (src, dst, id) for IPv6 (RFC 791,
    RFC 8200). Overlapping pieces are written in arrival order, so a later copy wins:
    there is no host stack to protect here (RFC 5722 drops such IPv6 datagrams for
    that reason), and dropping them would hide what was on the wire.
    """

    __slots__ = ("max_datagrams", "max_pieces", "stats", "table", "timeout")

    def __init__(
        self, stats: DecapStats, max_datagrams: int, max_pieces: int, timeout: float
    ) -> None:
        self.stats = stats
        self.max_datagrams = max_datagrams
        self.max_pieces = max_pieces
        self.timeout = timeout
        # Insertion order is arrival order of first pieces, so the oldest is first.
        self.table: dict[tuple[object, ...], _Pending] = {}

    def expire(self, now: float) -> None:
        table = self.table
        limit = now - self.timeout
        while table:
            key = next(iter(table))
            if table[key].first_ts >= limit:
                break
            del table[key]
            self.stats.frag_expired += 1

    def add(
        self,
        key: tuple[object, ...],
        ts: float,
        offset: int,
        more: int,
        data: bytes,
        next_header: int,
    ) -> tuple[bytes, int] | None:
        stats = self.stats
        stats.fragments += 1
        table = self.table
        if table:
            self.expire(ts)
        pending = table.get(key)
        if pending is None:
            if len(table) >= self.max_datagrams:
                del table[next(iter(table))]
                stats.frag_evicted += 1
            pending = table[key] = _Pending(ts)
        end = offset + len(data)
        if end > MAX_DATAGRAM or len(pending.parts) >= self.max_pieces:
            del table[key]
            stats.frag_dropped += 1
            return None
        if not more:
            if pending.total >= 0 and pending.total != end:
                del table[key]
                stats.frag_dropped += 1
                return None
            pending.total = end
        if offset == 0:
            pending.next_header = next_header
        pending.parts.append((offset, data))
        pending.held += len(data)
        total = pending.total
        if total < 0 or pending.held < total:
            return None
        ordered = sorted(pending.parts, key=_first)
        covered = 0
        overlap = False
        for start, piece in ordered:
            if start > covered:
                return None
            if start < covered:
                overlap = True
            covered = max(covered, start + len(piece))
        if covered != total:
            # A piece reaches past the one that claimed to be last.
            del table[key]
            stats.frag_dropped += 1
            return None
        del table[key]
        stats.reassembled += 1
        if not overlap:
            return b"".join([piece for _start, piece in ordered]), pending.next_header
        whole = bytearray(total)
        for start, piece in pending.parts:
            whole[start : start + len(piece)] = piece
        return bytes(whole), pending.next_header


def _first(item: tuple[int, bytes]) -> int:
    return item[0]


@trait
class IpLayer(Layers):
    """The IP and transport layers of the ``Decapsulator``."""

    __slots__ = ()

    _frags: Fragments

    def _ip(self, ts: float, buf: bytes, off: int, end: int, depth: int) -> tuple[Segment, ...]:
        version = buf[off] >> 4 if off < end else 0
        if version == 4:
            return self._ipv4(ts, buf, off, end, depth)
        if version == 6:
            return self._ipv6(ts, buf, off, end, depth)
        self.stats.non_ip += 1
        return _NONE

    def _ipv4(self, ts: float, buf: bytes, off: int, end: int, depth: int) -> tuple[Segment, ...]:
        if end - off < 20:
            self.stats.truncated += 1
            return _NONE
        vihl, total, ident, frag, proto, src, dst = _ipv4_hdr(buf, off)
        ihl = (vihl & 0x0F) << 2
        if vihl >> 4 != 4 or ihl < 20 or (total and total < ihl):
            self.stats.malformed += 1
            return _NONE
        # A zero total length is what TCP segmentation offload leaves in captures
        # taken on the sending host: the frame itself is the datagram then.
        if total:
            if off + total > end:
                self.stats.truncated += 1
                return _NONE
            end = off + total
        start = off + ihl
        if start > end:
            self.stats.truncated += 1
            return _NONE
        if proto == IPPROTO_UDP and not frag & 0x3FFF and end - start >= 8:
            # Inline copy of the UDP case in _transport: media makes up most frames
            # on a signalling link, so this path skips a call per frame.
            sport, dport, ulen = _udp_hdr(buf, start)
            stop = start + ulen if 8 <= ulen <= end - start else end
            if dport in UDP_TUNNEL_PORTS:
                inner = self._udp_tunnel(ts, buf, dport, start + 8, stop, depth)
                if inner is not None:
                    return inner
            self.stats.udp += 1
            return (_new(Segment, (ts, src, dst, sport, dport, 17, buf[start + 8 : stop], 0, 0)),)
        if frag & 0x3FFF:
            whole = self._frags.add(
                (src, dst, ident, proto),
                ts,
                (frag & 0x1FFF) << 3,
                frag & 0x2000,
                buf[start:end],
                proto,
            )
            if whole is None:
                return _NONE
            data = whole[0]
            return self._transport(ts, data, src, dst, proto, 0, len(data), depth)
        return self._transport(ts, buf, src, dst, proto, start, end, depth)

    def _ipv6(self, ts: float, buf: bytes, off: int, end: int, depth: int) -> tuple[Segment, ...]:
        if end - off < 40:
            self.stats.truncated += 1
            return _NONE
        vcf, plen, nh = _ipv6_hdr(buf, off)
        if vcf >> 28 != 6:
            self.stats.malformed += 1
            return _NONE
        # Zero payload length: a jumbogram, or offload again; the frame bounds it.
        if plen:
            if off + 40 + plen > end:
                self.stats.truncated += 1
                return _NONE
            end = off + 40 + plen
        return self._ipv6_chain(
            ts, buf, buf[off + 8 : off + 24], buf[off + 24 : off + 40], nh, off + 40, end, depth
        )

    def _ipv6_chain(
        self,
        ts: float,
        buf: bytes,
        src: bytes,
        dst: bytes,
        nh: int,
        pos: int,
        end: int,
        depth: int,
    ) -> tuple[Segment, ...]:
        while True:
            if nh in _IPV6_EXT_8:
                if end - pos < 8:
                    self.stats.truncated += 1
                    return _NONE
                nh, pos = buf[pos], pos + ((buf[pos + 1] + 1) << 3)
            elif nh == _IPPROTO_AH:
                if end - pos < 8:
                    self.stats.truncated += 1
                    return _NONE
                nh, pos = buf[pos], pos + ((buf[pos + 1] + 2) << 2)
            elif nh == _IPPROTO_FRAGMENT:
                if end - pos < 8:
                    self.stats.truncated += 1
                    return _NONE
                inner = buf[pos]
                offset_flags = _u16(buf, pos + 2)[0]
                ident = _u32(buf, pos + 4)[0]
                pos += 8
                if not offset_flags & 0xFFF9:
                    # Atomic fragment (offset 0, no more): RFC 6946 says process as is.
                    nh = inner
                    continue
                whole = self._frags.add(
                    (src, dst, ident),
                    ts,
                    offset_flags & 0xFFF8,
                    offset_flags & 1,
                    buf[pos:end],
                    inner,
                )
                if whole is None:
                    return _NONE
                # Headers after the fragment header belong to the fragmentable part.
                data, nh = whole
                return self._ipv6_chain(ts, data, src, dst, nh, 0, len(data), depth)
            else:
                break
        if pos > end:
            self.stats.truncated += 1
            return _NONE
        return self._transport(ts, buf, src, dst, nh, pos, end, depth)

    def _transport(
        self,
        ts: float,
        buf: bytes,
        src: bytes,
        dst: bytes,
        proto: int,
        off: int,
        end: int,
        depth: int,
    ) -> tuple[Segment, ...]:
        if proto == IPPROTO_UDP:
            if end - off < 8:
                self.stats.truncated += 1
                return _NONE
            sport, dport, ulen = _udp_hdr(buf, off)
            # Zero is a jumbogram or offload; a length past the IP payload is a
            # malformed header, and the IP payload is the better bound either way.
            stop = off + ulen if 8 <= ulen <= end - off else end
            if dport in UDP_TUNNEL_PORTS:
                inner = self._udp_tunnel(ts, buf, dport, off + 8, stop, depth)
                if inner is not None:
                    return inner
            self.stats.udp += 1
            return (_new(Segment, (ts, src, dst, sport, dport, 17, buf[off + 8 : stop], 0, 0)),)
        if proto == IPPROTO_TCP:
            if end - off < 20:
                self.stats.truncated += 1
                return _NONE
            sport, dport, seq, doff_flags = _tcp_hdr(buf, off)
            doff = (doff_flags >> 12) << 2
            if doff < 20 or off + doff > end:
                self.stats.malformed += 1
                return _NONE
            self.stats.tcp += 1
            return (
                _new(
                    Segment,
                    (ts, src, dst, sport, dport, 6, buf[off + doff : end], seq, doff_flags & 0x3F),
                ),
            )
        if proto == IPPROTO_SCTP:
            return self._sctp(ts, buf, src, dst, off, end)
        if proto in (_IPPROTO_IPIP, _IPPROTO_IPV6, _IPPROTO_GRE):
            if depth >= MAX_DEPTH:
                self.stats.too_deep += 1
                return _NONE
            self.stats.tunnelled += 1
            if proto == _IPPROTO_IPIP:
                return self._ipv4(ts, buf, off, end, depth + 1)
            if proto == _IPPROTO_IPV6:
                return self._ipv6(ts, buf, off, end, depth + 1)
            return self._gre(ts, buf, off, end, depth + 1)
        self.stats.other_protocol += 1
        return _NONE
