"""Link-layer frames to transport payloads: the ``Decapsulator``, with one entry point
per link type (Ethernet, Linux cooked v1/v2, raw IP, BSD loopback), and the layers
inside Ethernet: VLAN and QinQ tags, PPPoE sessions (RFC 2516) and MPLS label stacks
(RFC 3032), then IP.

The decapsulator is made of the layer classes of ``ip``, ``tunnels`` and ``sctp``.
Each layer works on the frame as captured plus an offset and an end, so the only copy
made is the final payload slice. Each link type has its own entry point
(``Decapsulator.link_decoder``) so a reader picks it once per capture instead of
dispatching per frame.
"""

from __future__ import annotations

import struct
from typing import Final

from sipcdr.decode.base import MAX_DEPTH, DecapStats, FrameDecoder, Segment
from sipcdr.decode.ip import Fragments, IpLayer
from sipcdr.decode.sctp import SctpLayer
from sipcdr.decode.tunnels import TunnelLayer

__all__ = [
    "ETHERTYPES_READ",
    "LINKTYPES",
    "LINKTYPE_ETHERNET",
    "LINKTYPE_IPV4",
    "LINKTYPE_IPV6",
    "LINKTYPE_LINUX_SLL",
    "LINKTYPE_LINUX_SLL2",
    "LINKTYPE_LOOP",
    "LINKTYPE_NULL",
    "LINKTYPE_RAW",
    "Decapsulator",
]

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
# 802.1Q, 802.1ad, and the pre-standard QinQ outer tags still seen on older switches.
_ETH_VLAN: Final = frozenset({0x8100, 0x88A8, 0x9100, 0x9200})
_ETH_PPPOE_SESSION: Final = 0x8864
_ETH_MPLS: Final = frozenset({0x8847, 0x8848})  # unicast, multicast
# The Ethernet types read here (the rest is counted as non_ip).
ETHERTYPES_READ: Final = frozenset(
    {_ETH_IPV4, _ETH_IPV6, _ETH_PPPOE_SESSION, *_ETH_MPLS, *_ETH_VLAN}
)
_ETHERTYPE_FIRST_BYTES: Final = frozenset(etype >> 8 for etype in ETHERTYPES_READ)
# PPP protocol numbers; compressed to one byte they keep their value.
_PPP_IPV4: Final = 0x0021
_PPP_IPV6: Final = 0x0057
# Segment routing stacks run to a dozen labels; a stack without an end must stop.
_MAX_LABELS: Final = 16

# DLT_NULL/DLT_LOOP AF_INET6 differs by the capturing OS: Linux 10, Net/OpenBSD 24,
# FreeBSD 28, macOS 30. AF_INET is 2 everywhere.
_BSD_AF_INET6: Final = frozenset({10, 24, 28, 30})

_u16: Final = struct.Struct("!H").unpack_from
_u32: Final = struct.Struct("!I").unpack_from
_u32_le: Final = struct.Struct("<I").unpack_from

_NONE: Final[tuple[Segment, ...]] = ()


class Decapsulator(TunnelLayer, SctpLayer, IpLayer):
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
        self._frags = Fragments(
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
        if etype == _ETH_PPPOE_SESSION:
            return self._pppoe(ts, buf, off, end, depth)
        if etype in _ETH_MPLS:
            return self._mpls(ts, buf, off, end, depth)
        self.stats.non_ip += 1
        return _NONE

    def _pppoe(self, ts: float, buf: bytes, off: int, end: int, depth: int) -> tuple[Segment, ...]:
        # RFC 2516 section 4: version and type (1, 1), code (0 in the session stage),
        # session id, length of the PPP frame that follows: its protocol field
        # (RFC 1661 section 2), then the packet.
        stats = self.stats
        if end - off < 8:
            stats.truncated += 1
            return _NONE
        if buf[off] != 0x11 or buf[off + 1]:
            stats.malformed += 1
            return _NONE
        stop = off + 6 + _u16(buf, off + 4)[0]
        if stop > end:
            stats.truncated += 1
            return _NONE
        if stop < off + 8:
            stats.malformed += 1  # too short for a protocol field and a packet
            return _NONE
        if depth >= MAX_DEPTH:
            stats.too_deep += 1
            return _NONE
        stats.pppoe += 1
        protocol = buf[off + 6]
        pos = off + 7
        # A compressed protocol field (RFC 1661 section 6.5) is one odd byte.
        if not protocol & 1:
            protocol = protocol << 8 | buf[pos]
            pos += 1
        if protocol == _PPP_IPV4:
            return self._ipv4(ts, buf, pos, stop, depth + 1)
        if protocol == _PPP_IPV6:
            return self._ipv6(ts, buf, pos, stop, depth + 1)
        # LCP, IPCP, authentication: the session's control traffic.
        stats.non_ip += 1
        return _NONE

    def _mpls(self, ts: float, buf: bytes, off: int, end: int, depth: int) -> tuple[Segment, ...]:
        # RFC 3032 section 2.1: 4-byte label stack entries (label, traffic class, S
        # bit, TTL) down to the one with S set. The payload's type is not written
        # anywhere; its first nibble hints at it (RFC 4385 section 2): 4 and 6 are IP,
        # 1 the associated channel (OAM), 0 a pseudowire control word, anything else
        # an Ethernet pseudowire (RFC 4448) without one. A destination MAC address
        # can start with any nibble, so each hint is checked against reading the
        # payload as an Ethernet frame (``_looks_like_ethernet``), and a reading that
        # holds up wins; when both do, IPv4 needs a valid header checksum and IPv6 a
        # payload length that ends exactly where the MPLS payload does.
        stats = self.stats
        if depth >= MAX_DEPTH:
            stats.too_deep += 1
            return _NONE
        for _ in range(_MAX_LABELS):
            if end - off < 4:
                stats.truncated += 1
                return _NONE
            bottom = buf[off + 2] & 1
            off += 4
            if bottom:
                break
        else:
            stats.too_deep += 1
            return _NONE
        if off >= end:
            stats.truncated += 1
            return _NONE
        stats.mpls += 1
        depth += 1
        nibble = buf[off] >> 4
        if nibble in (4, 6):
            # Where a frame has its type an IP packet has part of its source address,
            # rarely a type a frame names: IP pays a lookup of one byte here.
            if (
                end - off < 15
                or buf[off + 12] not in _ETHERTYPE_FIRST_BYTES
                or not _looks_like_ethernet(buf, off, end)
            ):
                if nibble == 4:
                    return self._ipv4(ts, buf, off, end, depth)
                return self._ipv6(ts, buf, off, end, depth)
            if nibble == 4 and _ipv4_header_holds(buf, off, end):
                return self._ipv4(ts, buf, off, end, depth)
            if nibble == 6 and end - off >= 40 and _u16(buf, off + 4)[0] + 40 == end - off:
                return self._ipv6(ts, buf, off, end, depth)
            return self._ethernet(ts, buf, off, end, depth)
        if nibble == 0 and _looks_like_ethernet(buf, off + 4, end):
            return self._ethernet(ts, buf, off + 4, end, depth)
        # The associated channel carries OAM, never SIP: a frame that reads as Ethernet
        # is taken for one, since misreading OAM costs nothing and misreading a frame
        # loses what it carries.
        if nibble == 1 and not _looks_like_ethernet(buf, off, end):
            stats.unsupported_tunnel += 1
            return _NONE
        return self._ethernet(ts, buf, off, end, depth)


def _looks_like_ethernet(buf: bytes, off: int, end: int) -> bool:
    """Whether an Ethernet header at ``off`` names a type read here and the header
    behind it agrees (IP version and header length, PPPoE version, a VLAN tag's inner
    type): what an MPLS payload must show to be taken for an Ethernet frame."""
    if end - off < 15:
        return False
    etype = _u16(buf, off + 12)[0]
    first = buf[off + 14]
    if etype == _ETH_IPV4:
        return first >> 4 == 4 and first & 0x0F >= 5
    if etype == _ETH_IPV6:
        return first >> 4 == 6
    if etype == _ETH_PPPOE_SESSION:
        return first == 0x11
    if etype in _ETH_VLAN:
        return end - off >= 18 and _u16(buf, off + 16)[0] in ETHERTYPES_READ
    return etype in _ETH_MPLS


def _ipv4_header_holds(buf: bytes, off: int, end: int) -> bool:
    """An IPv4 header at ``off`` with consistent lengths and a valid checksum: what an
    MPLS payload starting with 4 must show when it also reads as an Ethernet frame."""
    ihl = (buf[off] & 0x0F) << 2
    if ihl < 20 or end - off < ihl:
        return False
    total = _u16(buf, off + 2)[0]
    if not ihl <= total <= end - off:
        return False
    checksum: int = sum(struct.unpack_from(f"!{ihl >> 1}H", buf, off))
    while checksum > 0xFFFF:
        checksum = (checksum & 0xFFFF) + (checksum >> 16)
    return checksum == 0xFFFF
