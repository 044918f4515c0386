"""Link-layer frames to transport payloads: Ethernet/SLL/raw/loopback, VLAN, IPv4/IPv6
(extension headers, fragment reassembly), IP-in-IP, GRE, ERSPAN, then UDP, TCP and SCTP.

Pure code over bytes and capture timestamps: no I/O, no clock, no logging. What is
dropped is counted in a ``DecapStats`` the caller reads. Each layer works on the frame
as captured plus an offset and an end, so the only copy made is the final payload slice.

Checksums are not verified anywhere: captures taken on a sending host carry the
placeholder checksums of offloading NICs, and a monitoring tap should report what was
on the wire anyway.

Each link type has its own entry point (``Decapsulator.link_decoder``) so a reader picks
it once per capture instead of dispatching per frame.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Final, NamedTuple

__all__ = [
    "IPPROTO_SCTP",
    "IPPROTO_TCP",
    "IPPROTO_UDP",
    "LINKTYPES",
    "TCP_ACK",
    "TCP_FIN",
    "TCP_PSH",
    "TCP_RST",
    "TCP_SYN",
    "DecapStats",
    "Decapsulator",
    "Segment",
    "ip_text",
]

IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17
IPPROTO_SCTP: Final = 132

TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
TCP_PSH: Final = 0x08
TCP_ACK: Final = 0x10

_TRANSPORT_NAME: Final = {IPPROTO_UDP: "udp", IPPROTO_TCP: "tcp", IPPROTO_SCTP: "sctp"}

# Link-layer header types (tcpdump.org/linktypes.html). 12 and 14 are the platform
# DLT_RAW values that some writers store instead of LINKTYPE_RAW (101).
LINKTYPE_NULL: Final = 0
LINKTYPE_ETHERNET: Final = 1
LINKTYPE_RAW: Final = 101
LINKTYPE_LOOP: Final = 108
LINKTYPE_LINUX_SLL: Final = 113
LINKTYPE_LINUX_SLL2: Final = 276
LINKTYPE_IPV4: Final = 228
LINKTYPE_IPV6: Final = 229
LINKTYPES: Final = frozenset({0, 1, 12, 14, 101, 108, 113, 228, 229, 276})

_ETH_IPV4: Final = 0x0800
_ETH_IPV6: Final = 0x86DD
_ETH_BRIDGED: Final = 0x6558  # transparent Ethernet bridging (GRE carrying Ethernet)
_ETH_ERSPAN2: Final = 0x88BE
_ETH_ERSPAN3: Final = 0x22EB
# 802.1Q, 802.1ad, and the pre-standard QinQ outer tags still seen on older switches.
_ETH_VLAN: Final = frozenset({0x8100, 0x88A8, 0x9100, 0x9200})

# DLT_NULL/DLT_LOOP AF_INET6 differs by the capturing OS: Linux 10, Net/OpenBSD 24,
# FreeBSD 28, macOS 30. AF_INET is 2 everywhere.
_BSD_AF_INET6: Final = frozenset({10, 24, 28, 30})

_IPPROTO_IPIP: Final = 4
_IPPROTO_IPV6: Final = 41
_IPPROTO_GRE: Final = 47
_IPPROTO_FRAGMENT: Final = 44
_IPPROTO_AH: Final = 51
# IPv6 extension headers whose length is (hdr_ext_len + 1) * 8: hop-by-hop, routing,
# destination options, mobility, HIP, shim6.
_IPV6_EXT_8: Final = frozenset({0, 43, 60, 135, 139, 140})

# Tunnels inside tunnels: nothing legitimate nests this deep, and a crafted packet
# must not cost unbounded recursion.
_MAX_DEPTH: Final = 8
_MAX_DATAGRAM: Final = 65535

_u16: Final = struct.Struct("!H").unpack_from
_u32: Final = struct.Struct("!I").unpack_from
_u32_le: Final = struct.Struct("<I").unpack_from
# version/IHL, [TOS], total length, identification, flags/fragment offset, [TTL],
# protocol, [checksum], source, destination: the whole fixed header in one call.
_ipv4_hdr: Final = struct.Struct("!BxHHHxB2x4s4s").unpack_from
# version/class/flow, payload length, next header
_ipv6_hdr: Final = struct.Struct("!IHB").unpack_from
_udp_hdr: Final = struct.Struct("!HHH").unpack_from
# ports, sequence number, [ack], data offset + flags
_tcp_hdr: Final = struct.Struct("!HHI4xH").unpack_from
_sctp_chunk: Final = struct.Struct("!BBH").unpack_from
_ports: Final = struct.Struct("!HH").unpack_from

_ntop: Final = socket.inet_ntop
_AF_INET6: Final = socket.AF_INET6
_DEC: Final = tuple(str(i) for i in range(256))


def ip_text(raw: bytes) -> str:
    """Presentation form of a 4- or 16-byte address."""
    if len(raw) == 4:
        # An f-string over a table beats socket.inet_ntoa by about half.
        return f"{_DEC[raw[0]]}.{_DEC[raw[1]]}.{_DEC[raw[2]]}.{_DEC[raw[3]]}"
    return _ntop(_AF_INET6, raw)


class Segment(NamedTuple):
    """One transport payload: a UDP datagram, a TCP segment or an SCTP DATA chunk.

    Addresses stay raw (4 or 16 bytes) because most segments on a SIP capture link are
    media that is never looked at again; ``src_ip``/``dst_ip`` format them on demand.
    ``seq`` and ``flags`` are the TCP sequence number and flag bits (0 otherwise).
    """

    timestamp: float
    src_addr: bytes
    dst_addr: bytes
    src_port: int
    dst_port: int
    proto: int
    payload: bytes
    seq: int
    flags: int

    @property
    def src_ip(self) -> str:
        return ip_text(self.src_addr)

    @property
    def dst_ip(self) -> str:
        return ip_text(self.dst_addr)

    @property
    def transport(self) -> str:
        return _TRANSPORT_NAME[self.proto]


# Building the tuple directly skips the generated __new__ and its keyword handling.
_new: Final = tuple.__new__
_NONE: Final[tuple[Segment, ...]] = ()

FrameDecoder = Callable[[float, bytes], tuple[Segment, ...]]


class DecapStats:
    """Counters, only ever incremented. ``frames`` counts every frame offered."""

    __slots__ = (
        "frag_dropped",
        "frag_evicted",
        "frag_expired",
        "fragments",
        "frames",
        "malformed",
        "non_ip",
        "other_protocol",
        "reassembled",
        "sctp",
        "sctp_dropped",
        "sctp_pieces",
        "sctp_reassembled",
        "tcp",
        "too_deep",
        "truncated",
        "tunnelled",
        "udp",
        "unsupported_tunnel",
    )

    def __init__(self) -> None:
        self.frames = 0
        self.non_ip = 0  # ARP, LLDP, STP, unknown ethertypes and address families
        self.truncated = 0  # captured bytes end before a header or the IP length says
        self.malformed = 0  # header fields that contradict each other
        self.other_protocol = 0  # ICMP, ESP, OSPF, ...: IP, but nothing we read
        self.tunnelled = 0  # IP-in-IP, GRE and ERSPAN layers removed
        self.unsupported_tunnel = 0  # GRE version 1, routing, unknown payload types
        self.too_deep = 0
        self.fragments = 0  # IPv4/IPv6 fragments seen
        self.reassembled = 0  # datagrams completed from fragments
        self.frag_expired = 0  # incomplete datagrams dropped by the timeout (or at close)
        self.frag_evicted = 0  # incomplete datagrams dropped because the table was full
        self.frag_dropped = 0  # oversized, too many pieces, or inconsistent lengths
        self.udp = 0
        self.tcp = 0
        self.sctp = 0  # user messages delivered from DATA chunks
        self.sctp_pieces = 0  # DATA chunks holding part of a user message
        self.sctp_reassembled = 0  # user messages completed from pieces
        self.sctp_dropped = 0  # pieces expired, evicted, oversized, or I-DATA pieces

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in DecapStats.__slots__}


class _Pending:
    __slots__ = ("first_ts", "held", "next_header", "parts", "total")

    def __init__(self, first_ts: float) -> None:
        self.first_ts = first_ts
        self.parts: list[tuple[int, bytes]] = []
        self.held = 0
        self.total = -1
        self.next_header = -1


class _Fragments:
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
        if end > _MAX_DATAGRAM or len(pending.parts) >= self.max_pieces:
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


class Decapsulator:
    """Frames in, transport payloads out. The only state kept is what reassembly of
    IP fragments and of SCTP message pieces needs.

    ``frag_timeout`` is in capture time (seconds between frame timestamps), so a file
    replayed at any speed reassembles as it did live. Linux waits 30 s (ipfrag_time).
    """

    __slots__ = ("_frags", "_sctp_pieces", "stats")

    def __init__(
        self,
        stats: DecapStats | None = None,
        *,
        max_fragmented_datagrams: int = 1024,
        max_fragments_per_datagram: int = 128,
        frag_timeout: float = 30.0,
    ) -> None:
        self.stats = stats if stats is not None else DecapStats()
        self._frags = _Fragments(
            self.stats, max_fragmented_datagrams, max_fragments_per_datagram, frag_timeout
        )
        # (src, dst, sport, dport, tsn) -> (ts, flags, data): SCTP message pieces,
        # bounded by the same count and timeout as IP fragments.
        self._sctp_pieces: dict[tuple[object, ...], tuple[float, int, bytes]] = {}

    # -- entry points ------------------------------------------------------------------

    def link_decoder(self, linktype: int) -> FrameDecoder:
        """The per-frame function for a capture's link type; ValueError if unsupported."""
        decoders: dict[int, FrameDecoder] = {
            LINKTYPE_ETHERNET: self.ethernet_frame,
            LINKTYPE_LINUX_SLL: self.sll_frame,
            LINKTYPE_LINUX_SLL2: self.sll2_frame,
            LINKTYPE_RAW: self.raw_frame,
            12: self.raw_frame,
            14: self.raw_frame,
            LINKTYPE_IPV4: self.raw_frame,
            LINKTYPE_IPV6: self.raw_frame,
            LINKTYPE_NULL: self.null_frame,
            LINKTYPE_LOOP: self.loop_frame,
        }
        try:
            return decoders[linktype]
        except KeyError:
            raise ValueError(f"unsupported link type {linktype}") from None

    def decode(self, linktype: int, ts: float, frame: bytes) -> tuple[Segment, ...]:
        """Decode one frame; prefer ``link_decoder`` in a loop."""
        return self.link_decoder(linktype)(ts, frame)

    def expire(self, now: float) -> None:
        """Drop fragments and SCTP pieces older than the timeout at capture time ``now``;
        input calls this itself, a live reader may call it when traffic is idle."""
        self._frags.expire(now)
        self._expire_sctp(now, 0)

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

    def close(self) -> None:
        """End of input: datagrams still missing pieces will never complete."""
        self.stats.frag_expired += len(self._frags.table)
        self._frags.table.clear()
        self.stats.sctp_dropped += len(self._sctp_pieces)
        self._sctp_pieces.clear()

    @property
    def pending_datagrams(self) -> int:
        return len(self._frags.table)

    def ethernet_frame(self, ts: float, frame: bytes) -> tuple[Segment, ...]:
        self.stats.frames += 1
        end = len(frame)
        # Untagged IPv4 goes straight to the IP layer.
        if end >= 34 and frame[12] == 8 and frame[13] == 0:
            return self._ipv4(ts, frame, 14, end, 0)
        return self._ethernet(ts, frame, 0, end, 0)

    def sll_frame(self, ts: float, frame: bytes) -> tuple[Segment, ...]:
        # packet type, ARPHRD type, address length, 8 address bytes, protocol
        self.stats.frames += 1
        if len(frame) < 16:
            self.stats.truncated += 1
            return _NONE
        return self._ethertype(ts, frame, _u16(frame, 14)[0], 16, len(frame), 0)

    def sll2_frame(self, ts: float, frame: bytes) -> tuple[Segment, ...]:
        # protocol, reserved, interface index, ARPHRD type, packet type, address
        # length, 8 address bytes
        self.stats.frames += 1
        if len(frame) < 20:
            self.stats.truncated += 1
            return _NONE
        return self._ethertype(ts, frame, _u16(frame, 0)[0], 20, len(frame), 0)

    def raw_frame(self, ts: float, frame: bytes) -> tuple[Segment, ...]:
        self.stats.frames += 1
        return self._ip(ts, frame, 0, len(frame), 0)

    def null_frame(self, ts: float, frame: bytes) -> tuple[Segment, ...]:
        # DLT_NULL stores the family in the capturing host's byte order.
        self.stats.frames += 1
        if len(frame) < 4:
            self.stats.truncated += 1
            return _NONE
        # Families are small numbers, so the reading in the wrong order is the larger.
        return self._loopback(ts, frame, min(_u32_le(frame, 0)[0], _u32(frame, 0)[0]))

    def loop_frame(self, ts: float, frame: bytes) -> tuple[Segment, ...]:
        # DLT_LOOP (OpenBSD) is DLT_NULL with the family in network byte order.
        self.stats.frames += 1
        if len(frame) < 4:
            self.stats.truncated += 1
            return _NONE
        return self._loopback(ts, frame, _u32(frame, 0)[0])

    # -- layers --------------------------------------------------------------------------

    def _loopback(self, ts: float, frame: bytes, family: int) -> tuple[Segment, ...]:
        if family == 2:
            return self._ipv4(ts, frame, 4, len(frame), 0)
        if family in _BSD_AF_INET6:
            return self._ipv6(ts, frame, 4, len(frame), 0)
        self.stats.non_ip += 1
        return _NONE

    def _ethernet(
        self, ts: float, buf: bytes, off: int, end: int, depth: int
    ) -> tuple[Segment, ...]:
        if end - off < 14:
            self.stats.truncated += 1
            return _NONE
        return self._ethertype(ts, buf, _u16(buf, off + 12)[0], off + 14, end, depth)

    def _ethertype(
        self, ts: float, buf: bytes, etype: int, off: int, end: int, depth: int
    ) -> tuple[Segment, ...]:
        if etype == _ETH_IPV4:
            return self._ipv4(ts, buf, off, end, depth)
        # Stacked tags (QinQ) are just repeated 4-byte TCI + inner type pairs.
        while etype in _ETH_VLAN:
            if end - off < 4:
                self.stats.truncated += 1
                return _NONE
            etype = _u16(buf, off + 2)[0]
            off += 4
        if etype == _ETH_IPV4:
            return self._ipv4(ts, buf, off, end, depth)
        if etype == _ETH_IPV6:
            return self._ipv6(ts, buf, off, end, depth)
        self.stats.non_ip += 1
        return _NONE

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
            if depth >= _MAX_DEPTH:
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
        if size > _MAX_DATAGRAM:
            stats.sctp_dropped += len(parts)
            return None
        stats.sctp_reassembled += 1
        return b"".join(parts)

    def _gre(self, ts: float, buf: bytes, off: int, end: int, depth: int) -> tuple[Segment, ...]:
        if end - off < 4:
            self.stats.truncated += 1
            return _NONE
        flags, ptype = _ports(buf, off)
        # Version 1 is PPTP's enhanced GRE (PPP inside); source routing (RFC 1701 R bit)
        # is obsolete. Neither carries SIP worth the code.
        if flags & 0x0007 or flags & 0x4000:
            self.stats.unsupported_tunnel += 1
            return _NONE
        pos = off + 4
        if flags & 0x8000:  # checksum + reserved
            pos += 4
        if flags & 0x2000:  # key
            pos += 4
        sequenced = flags & 0x1000
        if sequenced:
            pos += 4
        if pos > end:
            self.stats.truncated += 1
            return _NONE
        if ptype == _ETH_IPV4:
            return self._ipv4(ts, buf, pos, end, depth)
        if ptype == _ETH_IPV6:
            return self._ipv6(ts, buf, pos, end, depth)
        if ptype == _ETH_BRIDGED:
            return self._ethernet(ts, buf, pos, end, depth)
        if ptype == _ETH_ERSPAN2:
            # Type I has no ERSPAN header and no GRE sequence number; type II has both
            # (version 1 in the top nibble of the 8-byte header).
            if not sequenced:
                return self._ethernet(ts, buf, pos, end, depth)
            if end - pos < 8:
                self.stats.truncated += 1
                return _NONE
            if buf[pos] >> 4 != 1:
                self.stats.unsupported_tunnel += 1
                return _NONE
            return self._ethernet(ts, buf, pos + 8, end, depth)
        if ptype == _ETH_ERSPAN3:
            # 12 bytes: ver/VLAN, COS/BSO/T/session, timestamp, SGT, then
            # P(1) FT(5) HwID(6) D(1) Gra(2) O(1); O adds an 8-byte platform subheader.
            if end - pos < 12:
                self.stats.truncated += 1
                return _NONE
            if buf[pos] >> 4 != 2:
                self.stats.unsupported_tunnel += 1
                return _NONE
            word = _u16(buf, pos + 10)[0]
            inner = pos + (20 if word & 1 else 12)
            frame_type = (word >> 10) & 0x1F
            if inner > end:
                self.stats.truncated += 1
                return _NONE
            if frame_type == 0:
                return self._ethernet(ts, buf, inner, end, depth)
            if frame_type == 2:
                return self._ip(ts, buf, inner, end, depth)
            self.stats.unsupported_tunnel += 1
            return _NONE
        self.stats.unsupported_tunnel += 1
        return _NONE
