"""Tunnels carried as an IP payload: GRE (RFC 2784, key and sequence number of
RFC 2890), transparent Ethernet bridging over GRE, and ERSPAN types I, II and III.

IP-in-IP (protocols 4 and 41) needs no header of its own and is unwrapped in ``ip``.
"""

from __future__ import annotations

import struct
from typing import Final

from sipcdr.decode.base import Layers, Segment

__all__ = ["TunnelLayer"]

_ETH_IPV4: Final = 0x0800
_ETH_IPV6: Final = 0x86DD
_ETH_BRIDGED: Final = 0x6558  # transparent Ethernet bridging (GRE carrying Ethernet)
_ETH_ERSPAN2: Final = 0x88BE
_ETH_ERSPAN3: Final = 0x22EB

_u16: Final = struct.Struct("!H").unpack_from
_ports: Final = struct.Struct("!HH").unpack_from

_NONE: Final[tuple[Segment, ...]] = ()


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
        self.stats.unsupported_tunnel += 1
        return _NONE
