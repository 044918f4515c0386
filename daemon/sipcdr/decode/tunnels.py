"""Tunnels carried in IP: GRE (RFC 2784, key and sequence number of RFC 2890) with
transparent Ethernet bridging, ERSPAN types I, II and III, or MPLS inside; and tunnels
carried in UDP, recognised by destination port (``UDP_TUNNEL_PORTS``): GTP-U (3GPP
TS 29.281), VXLAN (RFC 7348), GENEVE (RFC 8926) and TZSP.

A datagram sent to a UDP tunnel's port that does not start like that tunnel's header is
left as an ordinary datagram: a SIP endpoint may use one of those ports (37008 is in
Linux's ephemeral range). Once its start says it is the tunnel, a header that is cut
short or contradicts itself is counted (``truncated``, ``malformed``) and dropped.

IP-in-IP (protocols 4 and 41) needs no header of its own and is unwrapped in ``ip``;
PPPoE and MPLS are recognised by Ethernet type in ``link``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Final

from mypy_extensions import trait

from sipcdr.decode.base import MAX_DEPTH, Layers, Segment

__all__ = ["HIGH_START_TUNNEL_PORTS", "UDP_TUNNEL_PORTS", "TunnelLayer"]

_ETH_IPV4: Final = 0x0800
_ETH_IPV6: Final = 0x86DD
_ETH_BRIDGED: Final = 0x6558  # transparent Ethernet bridging (GRE carrying Ethernet)
_ETH_ERSPAN2: Final = 0x88BE
_ETH_ERSPAN3: Final = 0x22EB
_ETH_MPLS: Final = frozenset({0x8847, 0x8848})

# Tunnels in UDP, named as their DecapStats counters. ``_udp_tunnel`` compares them by
# identity: the table below holds these very objects.
_GTPU: Final = "gtpu"
_VXLAN: Final = "vxlan"
_GENEVE: Final = "geneve"
_TZSP: Final = "tzsp"
# UDP destination port -> the tunnel read there: the IANA ports of GTP-U, VXLAN and
# GENEVE; 8472, the VXLAN port Linux uses when none is given (it predates IANA's, and
# flannel keeps it); TZSP's 37008, not registered, what senders use. ``ip`` looks up
# every UDP datagram's port here: one lookup is all a datagram to any other port pays.
UDP_TUNNEL_PORTS: Final[Mapping[int, str]] = {
    2152: _GTPU,
    4789: _VXLAN,
    8472: _VXLAN,
    6081: _GENEVE,
    37008: _TZSP,
}
# Ports of the tunnels whose header may start with a byte of 0x80 or more, as media
# does (VXLAN: flag bits other than I are ignored on receipt, and VXLAN-GBP sets 0x80):
# a capture filter that drops media by its first byte must let these through by port.
HIGH_START_TUNNEL_PORTS: Final = frozenset(
    port for port, tunnel in UDP_TUNNEL_PORTS.items() if tunnel == _VXLAN
)

_GENEVE_TYPES: Final = frozenset({_ETH_BRIDGED, _ETH_IPV4, _ETH_IPV6, *_ETH_MPLS})
_GTPU_G_PDU: Final = 255  # the message type that carries a user packet (T-PDU)
# Extension headers read before a chain is called malformed: 3GPP defines about a
# dozen types and a packet carries one to three; the cap bounds what a sender can make
# the decoder walk.
_GTPU_MAX_EXTENSIONS: Final = 32
# TZSP message types: received, to transmit (both carry a packet), configuration,
# keepalive, port opener; 2 is reserved. Encapsulations: Ethernet, Token Ring, SLIP,
# PPP, FDDI, raw IP, and three kinds of 802.11 (Wireshark's packet-tzsp.c).
_TZSP_TYPES: Final = frozenset({0, 1, 3, 4, 5})
_TZSP_ENCAPSULATIONS: Final = frozenset({1, 2, 3, 4, 5, 7, 18, 119, 127})
# Every first 4 bytes of a TZSP header: version 1, a type, an encapsulation (one set
# lookup of a slice is the cheapest test of all three).
_TZSP_STARTS: Final = frozenset(
    struct.pack("!BBH", 1, kind, encapsulation)
    for kind in _TZSP_TYPES
    for encapsulation in _TZSP_ENCAPSULATIONS
)
_TZSP_ETHERNET: Final = 1
_TZSP_RAW_IP: Final = 7
_TZSP_READ: Final = (_TZSP_ETHERNET, _TZSP_RAW_IP)
# Tags read before the END tag (a run of PADDING counting as one) before a header is
# called malformed: about a dozen types exist, each sent once at most.
_TZSP_MAX_TAGS: Final = 32

_u16: Final = struct.Struct("!H").unpack_from
_u16_at_2: Final = struct.Struct("!2xH").unpack_from
_ports: Final = struct.Struct("!HH").unpack_from

_NONE: Final[tuple[Segment, ...]] = ()


@trait
class TunnelLayer(Layers):
    """The tunnel layer of the ``Decapsulator``: each tunnel hands its inner packet or
    frame back to the IP or Ethernet layer at the depth the caller has counted."""

    __slots__ = ()

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
        if ptype in _ETH_MPLS:
            return self._ethertype(ts, buf, ptype, pos, end, depth)
        self.stats.unsupported_tunnel += 1
        return _NONE

    def _udp_tunnel(
        self, ts: float, buf: bytes, dport: int, off: int, end: int, depth: int
    ) -> tuple[Segment, ...] | None:
        if off >= end:
            return None
        first = buf[off]
        tunnel = UDP_TUNNEL_PORTS[dport]
        if tunnel is _GTPU:
            # Version 1 and protocol type GTP (not GTP'): 0x30-0x3F whatever the spare
            # and E, S, PN bits, which as text is a digit or one of ":;<=>?", never
            # the start of SIP or HEP.
            if first & 0xF0 != 0x30:
                return None
            decode = self._gtpu
        elif tunnel is _VXLAN:
            # The I flag; the other bits are reserved and ignored on receipt (RFC 7348
            # section 5; VXLAN-GBP's G is 0x80). What SIP, HEP and keepalives start
            # with is never read so: letters have 0x40, CR and LF are excluded, and
            # HEPv1/v2's 1 and 2 lack the I flag.
            if not first & 0x08 or first & 0x40 or first in (0x0A, 0x0D):
                return None
            decode = self._vxlan
        elif tunnel is _GENEVE:
            # Version 0 in the top two bits, below every letter (but not below CR and
            # LF), and a protocol type that is read here.
            if first >= 0x40 or end - off < 4 or _u16_at_2(buf, off)[0] not in _GENEVE_TYPES:
                return None
            decode = self._geneve
        elif tunnel is _TZSP:
            # Version 1, a message type and an encapsulation that exist: a STUN reply
            # (0x0101, then its length) or HEPv1 (1, then a header length) sent to
            # this port stays an ordinary datagram.
            if first != 1 or end - off < 4 or buf[off : off + 4] not in _TZSP_STARTS:
                return None
            decode = self._tzsp
        else:
            return None
        if depth >= MAX_DEPTH:
            self.stats.too_deep += 1
            return _NONE
        return decode(ts, buf, off, end, depth + 1)

    def _gtpu(self, ts: float, buf: bytes, off: int, end: int, depth: int) -> tuple[Segment, ...]:
        # 3GPP TS 29.281 section 5.1: flags (version, PT, E, S, PN), message type, length
        # of what follows the first 8 bytes, TEID; then, if E, S or PN is set, sequence
        # number, N-PDU number and the first extension header type.
        stats = self.stats
        if end - off < 8:
            stats.truncated += 1
            return _NONE
        if buf[off + 1] != _GTPU_G_PDU:
            # Echo, Error Indication, End Marker: path management, no user packet.
            stats.other_protocol += 1
            return _NONE
        stop = off + 8 + _u16_at_2(buf, off)[0]
        if stop > end:
            stats.truncated += 1
            return _NONE
        pos = off + 8
        flags = buf[off]
        if flags & 0x07:
            pos += 4
            if pos > stop:
                stats.truncated += 1
                return _NONE
        # The next extension header type is only meaningful with E set: with S or PN
        # alone the sender may leave anything there (section 5.1).
        if flags & 0x04:
            next_type = buf[pos - 1]
            # Section 5.2: each extension header is a length in 4-byte units (its own
            # length and next-type bytes included), content, and the next type. Real
            # chains hold one to three; a longer one is a sender making work.
            count = 0
            while next_type:
                count += 1
                if count > _GTPU_MAX_EXTENSIONS:
                    stats.malformed += 1
                    return _NONE
                if pos >= stop:
                    stats.truncated += 1
                    return _NONE
                units = buf[pos]
                if not units:
                    stats.malformed += 1
                    return _NONE
                pos += units << 2
                if pos > stop:
                    stats.truncated += 1
                    return _NONE
                next_type = buf[pos - 1]
        stats.gtpu += 1
        return self._ip(ts, buf, pos, stop, depth)

    def _vxlan(self, ts: float, buf: bytes, off: int, end: int, depth: int) -> tuple[Segment, ...]:
        # RFC 7348 section 5: flags (I), 24 reserved bits, VNI, 8 reserved bits; then an
        # Ethernet frame.
        if end - off < 8:
            self.stats.truncated += 1
            return _NONE
        self.stats.vxlan += 1
        return self._ethernet(ts, buf, off + 8, end, depth)

    def _geneve(self, ts: float, buf: bytes, off: int, end: int, depth: int) -> tuple[Segment, ...]:
        # RFC 8926 section 3.4: version and options length (4-byte units), O and C flags,
        # protocol type (an Ethernet type), VNI, reserved; then the options.
        if end - off < 8:
            self.stats.truncated += 1
            return _NONE
        pos = off + 8 + ((buf[off] & 0x3F) << 2)
        if pos > end:
            self.stats.truncated += 1
            return _NONE
        self.stats.geneve += 1
        ptype = _u16_at_2(buf, off)[0]
        if ptype == _ETH_BRIDGED:
            return self._ethernet(ts, buf, pos, end, depth)
        # IPv4 and IPv6 (what cloud load balancers tunnel), MPLS.
        return self._ethertype(ts, buf, ptype, pos, end, depth)

    def _tzsp(self, ts: float, buf: bytes, off: int, end: int, depth: int) -> tuple[Segment, ...]:
        # TZSP (TaZmen Sniffer Protocol, as Wireshark's packet-tzsp.c reads it; no RFC):
        # version 1, type, encapsulation (the caller has checked these 4 bytes); then
        # tags up to the END tag, each a type and, except PADDING (0) and END (1), a
        # length and that many bytes.
        stats = self.stats
        if buf[off + 1] > 1:
            # Configuration, keepalive and port-opener messages carry no packet.
            stats.other_protocol += 1
            return _NONE
        encapsulation = _u16_at_2(buf, off)[0]
        if encapsulation not in _TZSP_READ:
            # 802.11 radio captures and the rest: link layers this decoder does not read.
            stats.unsupported_tunnel += 1
            return _NONE
        pos = off + 4
        tags = 0
        while True:
            if pos >= end:
                stats.truncated += 1
                return _NONE
            tag = buf[pos]
            if tag == 1:
                pos += 1
                break
            tags += 1
            if tags > _TZSP_MAX_TAGS:
                stats.malformed += 1
                return _NONE
            if tag:
                if pos + 1 >= end:
                    stats.truncated += 1
                    return _NONE
                pos += 2 + buf[pos + 1]
            else:
                # PADDING is one byte each; a run of it is skipped in one step.
                pos += 1
                if pos < end and not buf[pos]:
                    pos = end - len(buf[pos:end].lstrip(b"\x00"))
        stats.tzsp += 1
        if encapsulation == _TZSP_ETHERNET:
            return self._ethernet(ts, buf, pos, end, depth)
        return self._ip(ts, buf, pos, end, depth)
