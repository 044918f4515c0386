"""What the frame decoding layers share: the ``Segment`` record they produce, the
``DecapStats`` they count in, and ``Layers``, the calls one layer module makes into
another (a tunnel hands its inner packet back to the IP or Ethernet layer).

The ``Decapsulator`` (``link``) is one class made of the layer classes (``ip``,
``tunnels``, ``sctp``), so a call from one layer to the next stays a plain method call
on the hot path.
"""

from __future__ import annotations

import socket
from abc import abstractmethod
from collections.abc import Callable
from typing import Final, NamedTuple

from mypy_extensions import trait

__all__ = [
    "DECAP_COUNTERS",
    "IPPROTO_SCTP",
    "IPPROTO_TCP",
    "IPPROTO_UDP",
    "MAX_DEPTH",
    "TCP_ACK",
    "TCP_FIN",
    "TCP_PSH",
    "TCP_RST",
    "TCP_SYN",
    "DecapStats",
    "FrameDecoder",
    "Layers",
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

# Encapsulations inside encapsulations: nothing legitimate nests this deep, and a
# crafted packet must not cost unbounded recursion.
MAX_DEPTH: Final = 8

_TRANSPORT_NAME: Final = {IPPROTO_UDP: "udp", IPPROTO_TCP: "tcp", IPPROTO_SCTP: "sctp"}

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


FrameDecoder = Callable[[float, bytes], tuple[Segment, ...]]


# The names of the DecapStats counters, in the order as_dict lists them.
DECAP_COUNTERS: Final = (
    "frag_dropped",
    "frag_evicted",
    "frag_expired",
    "fragments",
    "frames",
    "geneve",
    "gtpu",
    "malformed",
    "mpls",
    "non_ip",
    "other_protocol",
    "pppoe",
    "reassembled",
    "sctp",
    "sctp_dropped",
    "sctp_pieces",
    "sctp_reassembled",
    "tcp",
    "too_deep",
    "truncated",
    "tunnelled",
    "tzsp",
    "udp",
    "unsupported_tunnel",
    "vxlan",
)


class DecapStats:
    """Counters, only ever incremented. ``frames`` counts every frame offered."""

    __slots__ = DECAP_COUNTERS

    def __init__(self) -> None:
        self.frames = 0
        self.non_ip = 0  # ARP, LLDP, STP, unknown ethertypes and address families
        self.truncated = 0  # captured bytes end before a header or the IP length says
        self.malformed = 0  # header fields that contradict each other
        self.other_protocol = 0  # ICMP, ESP, GTP-U echo, ...: nothing we read
        self.tunnelled = 0  # IP-in-IP, GRE and ERSPAN layers removed
        # Layers removed, one counter per encapsulation (MPLS: per label stack).
        self.pppoe = 0
        self.mpls = 0
        self.gtpu = 0
        self.vxlan = 0
        self.geneve = 0
        self.tzsp = 0
        # GRE version 1 or routing, unknown payload types of any encapsulation, MPLS
        # channel traffic
        self.unsupported_tunnel = 0
        self.too_deep = 0  # nested past MAX_DEPTH, or an MPLS label stack past its limit
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
        return {name: getattr(self, name) for name in DECAP_COUNTERS}


@trait
class Layers:
    """The entry points a layer calls in another layer's module. Each takes the frame
    as captured (or a reassembled datagram), the offset where its header starts, the
    end of the bytes that belong to it, and the tunnel depth so far."""

    __slots__ = ()

    stats: DecapStats

    @abstractmethod
    def _ethernet(
        self, ts: float, buf: bytes, off: int, end: int, depth: int
    ) -> tuple[Segment, ...]: ...

    @abstractmethod
    def _ip(self, ts: float, buf: bytes, off: int, end: int, depth: int) -> tuple[Segment, ...]:
        """IPv4 or IPv6, told apart by the version nibble."""

    @abstractmethod
    def _ipv4(
        self, ts: float, buf: bytes, off: int, end: int, depth: int
    ) -> tuple[Segment, ...]: ...

    @abstractmethod
    def _ipv6(
        self, ts: float, buf: bytes, off: int, end: int, depth: int
    ) -> tuple[Segment, ...]: ...

    @abstractmethod
    def _ethertype(
        self, ts: float, buf: bytes, etype: int, off: int, end: int, depth: int
    ) -> tuple[Segment, ...]:
        """What follows an Ethernet type field (or a tunnel's equivalent of one)."""

    @abstractmethod
    def _gre(self, ts: float, buf: bytes, off: int, end: int, depth: int) -> tuple[Segment, ...]:
        """GRE and ERSPAN: the IP payload of protocol 47."""

    @abstractmethod
    def _udp_tunnel(
        self, ts: float, buf: bytes, dport: int, off: int, end: int, depth: int
    ) -> tuple[Segment, ...] | None:
        """The UDP payload from ``off`` to ``end``, sent to the port of a UDP tunnel.
        None when it does not start like that tunnel's header: it is then an ordinary
        datagram (SIP from a port that happens to be a tunnel's, say)."""

    @abstractmethod
    def _sctp(
        self, ts: float, buf: bytes, src: bytes, dst: bytes, off: int, end: int
    ) -> tuple[Segment, ...]:
        """SCTP DATA chunks of one packet, pieces of user messages reassembled."""
