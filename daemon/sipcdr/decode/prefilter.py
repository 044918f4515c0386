"""Frames that carry no SIP, recognised on the raw bytes before they are decoded.

Media is most of what a capture link carries: RTP and T.38 datagrams, often inside a
mirroring tunnel (ERSPAN, GRE). Decoding such a frame layer by layer builds a
``Segment`` only for ``SipExtractor`` to drop it by its first payload byte. Here the
same headers are walked in place, with no copy and no record: when the frame is a UDP
datagram whose payload cannot start SIP or HEP, ``media_layers`` says how many
tunnels it went through, and the caller counts what full decoding would have counted
(the frame, each tunnel, the datagram, a payload that is not SIP) and moves on.

Every check the decoding layers make on the way is made here too, and anything this
walk does not follow (fragments, TCP, SCTP, extension headers, MPLS, PPPoE, tunnels in
UDP, a header that is cut short or contradicts itself) is left to full decoding
(``DECODE``), so both give the same packets and counters; tests compare them frame by
frame on every capture and on mutated frames.
"""

from __future__ import annotations

from typing import Final

from sipcdr.decode.base import IPPROTO_UDP, MAX_DEPTH
from sipcdr.decode.tunnels import UDP_TUNNEL_PORTS

__all__ = ["DECODE", "MAYBE_SIGNALLING", "media_layers"]

# Not (certainly) media: decode the frame in full.
DECODE: Final = -1

# First bytes of a UDP or SCTP payload worth a closer look: letters (SIP, and "H" for
# HEP3), CR and LF (SIP after keepalive bytes), 1 and 2 (HEPv1/v2). RTP (0x80 and up),
# RTCP, T.38 (UDPTL), STUN and DNS start with something else.
MAYBE_SIGNALLING: Final = bytes(
    1 if (65 <= b <= 90 or 97 <= b <= 122 or b in (1, 2, 10, 13)) else 0 for b in range(256)
)

_ETH_IPV4: Final = 0x0800
_ETH_IPV6: Final = 0x86DD
# Tuples, which compiled code tests by comparisons rather than a hash look-up.
_ETH_VLAN: Final = (0x8100, 0x88A8, 0x9100, 0x9200)
_ETH_BRIDGED: Final = 0x6558
_ETH_ERSPAN2: Final = 0x88BE
_ETH_ERSPAN3: Final = 0x22EB
_IPPROTO_IPIP: Final = 4
_IPPROTO_IPV6: Final = 41
_IPPROTO_GRE: Final = 47

# Link types whose frames are walked here (tcpdump.org/linktypes.html), by where the
# first header starts: Ethernet; Linux cooked v1 and v2 (an Ethernet type field);
# raw IP in its several numberings.
_ETHERNET: Final = 1
_SLL: Final = 113
_SLL2: Final = 276
_RAW: Final = (12, 14, 101, 228, 229)


def media_layers(linktype: int, buf: bytes, off: int, end: int) -> int:
    """The number of IP-level tunnels (IP-in-IP, GRE, ERSPAN) around a UDP datagram
    whose payload cannot be SIP or HEP, for the frame ``buf[off:end]``; ``DECODE`` for
    any other frame."""
    if linktype == _ETHERNET:
        # Untagged IPv4 straight to the IP layer: a call less per frame.
        if end - off >= 34 and buf[off + 12] == 8 and not buf[off + 13]:
            return _ipv4(buf, off + 14, end, 0)
        return _ethernet(buf, off, end, 0)
    if linktype == _SLL:
        if end - off < 16:
            return DECODE
        return _ethertype(buf, (buf[off + 14] << 8) | buf[off + 15], off + 16, end, 0)
    if linktype == _SLL2:
        if end - off < 20:
            return DECODE
        return _ethertype(buf, (buf[off] << 8) | buf[off + 1], off + 20, end, 0)
    if linktype in _RAW:
        return _ip(buf, off, end, 0)
    return DECODE


def _ethernet(buf: bytes, off: int, end: int, depth: int) -> int:
    if end - off < 14:
        return DECODE
    return _ethertype(buf, (buf[off + 12] << 8) | buf[off + 13], off + 14, end, depth)


def _ethertype(buf: bytes, etype: int, off: int, end: int, depth: int) -> int:
    while etype in _ETH_VLAN:
        if end - off < 4:
            return DECODE
        etype = (buf[off + 2] << 8) | buf[off + 3]
        off += 4
    if etype == _ETH_IPV4:
        return _ipv4(buf, off, end, depth)
    if etype == _ETH_IPV6:
        return _ipv6(buf, off, end, depth)
    return DECODE


def _ip(buf: bytes, off: int, end: int, depth: int) -> int:
    version = buf[off] >> 4 if off < end else 0
    if version == 4:
        return _ipv4(buf, off, end, depth)
    if version == 6:
        return _ipv6(buf, off, end, depth)
    return DECODE


def _ipv4(buf: bytes, off: int, end: int, depth: int) -> int:
    if end - off < 20:
        return DECODE
    vihl = buf[off]
    ihl = (vihl & 0x0F) << 2
    total = (buf[off + 2] << 8) | buf[off + 3]
    if vihl >> 4 != 4 or ihl < 20 or (total and total < ihl):
        return DECODE
    if total:
        if off + total > end:
            return DECODE
        end = off + total
    start = off + ihl
    # A fragment (more fragments, or an offset) waits for reassembly.
    if start > end or buf[off + 6] & 0x3F or buf[off + 7]:
        return DECODE
    if buf[off + 9] == IPPROTO_UDP and end - start >= 8:
        # Inline copy of the UDP case in _transport: most frames, a call less each.
        if ((buf[start + 2] << 8) | buf[start + 3]) in UDP_TUNNEL_PORTS:
            return DECODE
        ulen = (buf[start + 4] << 8) | buf[start + 5]
        stop = start + ulen if 8 <= ulen <= end - start else end
        return DECODE if start + 8 < stop and MAYBE_SIGNALLING[buf[start + 8]] else 0
    return _transport(buf, buf[off + 9], start, end, depth)


def _ipv6(buf: bytes, off: int, end: int, depth: int) -> int:
    if end - off < 40 or buf[off] >> 4 != 6:
        return DECODE
    length = (buf[off + 4] << 8) | buf[off + 5]
    if length:
        if off + 40 + length > end:
            return DECODE
        end = off + 40 + length
    # Extension headers (and the fragment header) are for full decoding.
    return _transport(buf, buf[off + 6], off + 40, end, depth)


def _transport(buf: bytes, proto: int, off: int, end: int, depth: int) -> int:
    if proto == IPPROTO_UDP:
        if end - off < 8:
            return DECODE
        dport = (buf[off + 2] << 8) | buf[off + 3]
        if dport in UDP_TUNNEL_PORTS:
            return DECODE
        ulen = (buf[off + 4] << 8) | buf[off + 5]
        stop = off + ulen if 8 <= ulen <= end - off else end
        first = buf[off + 8] if off + 8 < stop else 0
        return DECODE if MAYBE_SIGNALLING[first] else 0
    if proto not in (_IPPROTO_GRE, _IPPROTO_IPIP, _IPPROTO_IPV6) or depth >= MAX_DEPTH:
        return DECODE
    if proto == _IPPROTO_GRE:
        inner = _gre(buf, off, end, depth + 1)
    elif proto == _IPPROTO_IPIP:
        inner = _ipv4(buf, off, end, depth + 1)
    else:
        inner = _ipv6(buf, off, end, depth + 1)
    return DECODE if inner == DECODE else inner + 1


def _gre(buf: bytes, off: int, end: int, depth: int) -> int:
    # The walk of TunnelLayer._gre: version 0 without routing, the optional fields, then
    # IP, bridged Ethernet or ERSPAN I, II and III.
    if end - off < 4:
        return DECODE
    flags = (buf[off] << 8) | buf[off + 1]
    ptype = (buf[off + 2] << 8) | buf[off + 3]
    if flags & 0x4007:
        return DECODE
    pos = off + 4
    if flags & 0x8000:
        pos += 4
    if flags & 0x2000:
        pos += 4
    sequenced = flags & 0x1000
    if sequenced:
        pos += 4
    if pos > end:
        return DECODE
    if ptype == _ETH_IPV4:
        return _ipv4(buf, pos, end, depth)
    if ptype == _ETH_IPV6:
        return _ipv6(buf, pos, end, depth)
    if ptype == _ETH_BRIDGED:
        return _ethernet(buf, pos, end, depth)
    if ptype == _ETH_ERSPAN2:
        if not sequenced:
            return _ethernet(buf, pos, end, depth)
        if end - pos < 8 or buf[pos] >> 4 != 1:
            return DECODE
        return _ethernet(buf, pos + 8, end, depth)
    if ptype == _ETH_ERSPAN3:
        if end - pos < 12 or buf[pos] >> 4 != 2:
            return DECODE
        word = (buf[pos + 10] << 8) | buf[pos + 11]
        inner = pos + (20 if word & 1 else 12)
        if inner > end:
            return DECODE
        frame_type = (word >> 10) & 0x1F
        if frame_type == 0:
            return _ethernet(buf, inner, end, depth)
        if frame_type == 2:
            return _ip(buf, inner, end, depth)
    return DECODE
