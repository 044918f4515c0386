"""Network listeners: plain SIP over UDP and HEP over UDP; the source allow-list and
HEP agent keys they share with the stream listeners (`hepstream`: HEP over TCP/TLS).

Each datagram is handled inside the event loop's callback (see `pipeline` for why
there is no queue behind it). The receive path was chosen by benchmark
(benchmarks/receive.py): uvloop's `DatagramProtocol` hands over each datagram without
the per-datagram future asyncio-dgram creates, and without the default loop's fresh
256 KiB read buffer per datagram.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol

from sipcdr import hep
from sipcdr.clock import SYSTEM_CLOCK, Clock
from sipcdr.decode.startline import sip_offset
from sipcdr.model import TRANSPORT_UDP, Packet
from sipcdr.pipeline import Pipeline

MAX_DATAGRAM = 65535
MAX_CLOCK_SKEW_S = hep.MAX_CLOCK_SKEW_S
_SIP = 1  # HEP protocol type of a SIP payload
_IP_CACHE_LIMIT = 65536  # distinct sources remembered by an allow-list before it starts over
_SIP_UDP: Final = "sip_udp"
_HEP_UDP: Final = "hep_udp"
# Bound once: called for every datagram.
_decode_hep: Final = hep.decode
_hep_packet: Final = hep.to_packet
_skew_replaced: Final = hep.skew_replaced
_HEP3: Final = b"HEP3"
_new_packet: Final = tuple.__new__

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ListenerStats:
    """What the daemon's listeners count, shared by all of them (the capture layer's
    own counters; the pipeline counts what happens after). Only ever added to."""

    __slots__ = ("dropped", "received", "timestamps_replaced")

    def __init__(self) -> None:
        self.received: dict[str, int] = {}  # by listener kind
        self.dropped: dict[tuple[str, str], int] = {}  # by (listener kind, reason)
        # Agent capture times off by more than MAX_CLOCK_SKEW_S, replaced by the
        # receive time.
        self.timestamps_replaced = 0

    def count_received(self, source: str) -> None:
        received = self.received
        received[source] = received.get(source, 0) + 1

    def drop(self, source: str, reason: str) -> None:
        """Count input refused before parsing; every drop has a reason."""
        key = (source, reason)
        self.dropped[key] = self.dropped.get(key, 0) + 1


class AllowList:
    """Source-address check with a per-address cache: carriers send from a handful of
    SBCs, so after the first datagram each check is one dict lookup."""

    __slots__ = ("_cache", "_networks")

    def __init__(self, networks: Iterable[Network]) -> None:
        self._networks = tuple(networks)
        self._cache: dict[str, bool] = {}

    @property
    def verdicts(self) -> Mapping[str, bool]:
        """The verdicts remembered so far, by address (one dict for the list's life):
        a listener reads a known source's here without a call."""
        return self._cache

    def permits(self, ip: str) -> bool:
        verdict = self._cache.get(ip)
        if verdict is None:
            if len(self._cache) >= _IP_CACHE_LIMIT:
                self._cache.clear()  # a spoofed-source flood must not grow memory
            try:
                address = ipaddress.ip_address(ip.split("%", 1)[0])
            except ValueError:
                verdict = False
            else:
                if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                    address = address.ipv4_mapped
                verdict = any(address in network for network in self._networks)
            self._cache[ip] = verdict
        return verdict


class HepGate:
    """HEP agent authentication: with keys configured, a packet must carry the key of
    its capture id; otherwise it is dropped and counted per capture id."""

    __slots__ = ("_keys", "rejected")

    def __init__(self, keys: Mapping[int, str]) -> None:
        self._keys = dict(keys)
        self.rejected: dict[str, int] = {}  # capture id label -> count

    @property
    def keyed(self) -> bool:
        """Whether any packet can be refused: agent keys are configured."""
        return bool(self._keys)

    def admits(self, packet: hep.HepPacket) -> bool:
        if not self._keys:
            return True
        expected = self._keys.get(packet.capture_id)
        if expected is not None and packet.auth_key == expected:
            return True
        # Unconfigured ids share one label: a forged id must not create new series.
        label = str(packet.capture_id) if expected is not None else "unknown"
        self.rejected[label] = self.rejected.get(label, 0) + 1
        return False


def hep_to_packet(
    decoded: hep.HepPacket, stats: ListenerStats | None = None, clock: Clock = SYSTEM_CLOCK
) -> Packet:
    """`hep.to_packet` on receipt: the agent's time unless its clock is off (counted)."""
    packet = hep.to_packet(decoded, decoded.payload, clock.time(), MAX_CLOCK_SKEW_S)
    if stats is not None and hep.skew_replaced(decoded, packet):
        stats.timestamps_replaced += 1
    return packet


class Seen(Protocol):
    """What a listener's hint counts (`capture.hints.ListenerHint`)."""

    seen: int


class SipUdpProtocol(asyncio.DatagramProtocol):
    """Plain SIP copies: the original endpoints are the datagram's own.

    Every datagram passes here, so the steps are written out in one frame: the
    allow-list's remembered verdict, the counter and the `Packet` are read and built
    in place rather than through a method call each. With a `hint`, datagrams that
    look like HEP are counted for it (`capture.hints`)."""

    __slots__ = (
        "_allow",
        "_hint",
        "_local_ip",
        "_local_port",
        "_node",
        "_now",
        "_pipeline",
        "_process",
        "_received",
        "_stats",
        "_verdicts",
    )

    SOURCE = "sip_udp"

    def __init__(
        self,
        pipeline: Pipeline,
        allow: AllowList,
        local: tuple[str, int],
        stats: ListenerStats,
        clock: Clock = SYSTEM_CLOCK,
        hint: Seen | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._process = pipeline.process
        self._allow = allow
        self._verdicts = allow.verdicts
        self._stats = stats
        self._received = stats.received
        self._hint = hint
        # The receive time is the capture time of a plain copy.
        self._now = clock.time
        self._local_ip, self._local_port = local
        self._node = f"sip_udp:{local[0]}:{local[1]}"

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        hint = self._hint
        if hint is not None and data:
            first = data[0]
            # HEPv3 starts "HEP3", HEPv1/v2 with their version byte; SIP with a letter.
            if (first == 72 and data.startswith(_HEP3)) or first in (1, 2):
                hint.seen += 1
        ip = addr[0]  # a str from the loop; anything else is looked up as its str
        # A source seen before is one look-up in the allow-list's remembered verdicts.
        if self._verdicts.get(ip) is not True:
            ip = str(ip)
            if not self._allow.permits(ip):
                self._stats.drop(_SIP_UDP, "not_allowed")
                return
        received = self._received
        received[_SIP_UDP] = received.get(_SIP_UDP, 0) + 1
        port = addr[1]
        # tuple.__new__ as NamedTuple._make does, without the generated __new__'s frame.
        self._process(
            _new_packet(
                Packet,
                (
                    self._now(),
                    ip,
                    port if isinstance(port, int) else 0,
                    self._local_ip,
                    self._local_port,
                    TRANSPORT_UDP,
                    data,
                    self._node,
                ),
            )
        )


class HepUdpProtocol(asyncio.DatagramProtocol):
    """HEP from proxies, SBCs and agents: endpoints and time come from the HEP chunks.

    Every datagram passes here, so the steps are written out in one frame, as in
    `SipUdpProtocol`: the allow-list's remembered verdict, the counter, the decode, the
    agent key only when keys are configured, and the `Packet`. `handle_hep` is the same
    work for the stream listeners. With a `hint`, datagrams that look like plain SIP
    are counted for it (`capture.hints`)."""

    __slots__ = (
        "_allow",
        "_gate",
        "_hint",
        "_keyed",
        "_now",
        "_pipeline",
        "_process",
        "_received",
        "_stats",
        "_verdicts",
    )

    SOURCE = "hep_udp"

    def __init__(
        self,
        pipeline: Pipeline,
        allow: AllowList,
        gate: HepGate,
        stats: ListenerStats,
        clock: Clock = SYSTEM_CLOCK,
        hint: Seen | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._process = pipeline.process
        self._allow = allow
        self._verdicts = allow.verdicts
        self._gate = gate
        self._keyed = gate.keyed
        self._stats = stats
        self._received = stats.received
        self._now = clock.time
        self._hint = hint

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        hint = self._hint
        if hint is not None and not data.startswith(_HEP3) and sip_offset(data) >= 0:
            hint.seen += 1
        ip = addr[0]  # a str from the loop; anything else is looked up as its str
        if self._verdicts.get(ip) is not True:
            if not self._allow.permits(str(ip)):
                self._stats.drop(_HEP_UDP, "not_allowed")
                return
        received = self._received
        received[_HEP_UDP] = received.get(_HEP_UDP, 0) + 1
        try:
            decoded = _decode_hep(data)
        except hep.HepError:
            self._stats.drop(_HEP_UDP, "bad_hep")
            return
        if self._keyed and not self._gate.admits(decoded):
            self._stats.drop(_HEP_UDP, "bad_key")
            return
        if decoded.proto_type != _SIP:
            self._stats.drop(_HEP_UDP, "not_sip")
            return
        packet = _hep_packet(decoded, decoded.payload, self._now(), MAX_CLOCK_SKEW_S)
        if _skew_replaced(decoded, packet):
            self._stats.timestamps_replaced += 1
        self._process(packet)


def handle_hep(
    pipeline: Pipeline,
    gate: HepGate,
    stats: ListenerStats,
    source: str,
    data: bytes,
    clock: Clock = SYSTEM_CLOCK,
) -> bool:
    """Whether the frame came from an agent: a HEP frame the agent keys admit (SIP or
    not). A stream connection lives on such frames only (capture.hepstream)."""
    try:
        decoded = hep.decode(data)
    except hep.HepError:
        stats.drop(source, "bad_hep")
        return False
    if not gate.admits(decoded):
        stats.drop(source, "bad_key")
        return False
    if decoded.proto_type != _SIP:
        stats.drop(source, "not_sip")
        return True
    pipeline.process(hep_to_packet(decoded, stats, clock))
    return True


def udp_socket(host: str, port: int, rcvbuf_bytes: int) -> socket.socket:
    """A bound UDP socket with the receive buffer asked for (forced past rmem_max when
    running as root, since that buffer is the only queue in front of the parser)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        # Python does not export SO_RCVBUFFORCE; 33 is its value on Linux (socket(7)).
        force = getattr(socket, "SO_RCVBUFFORCE", 33 if sys.platform == "linux" else None)
        try:
            if force is None:
                raise PermissionError
            sock.setsockopt(socket.SOL_SOCKET, force, rcvbuf_bytes)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def udp_drops(sock: socket.socket) -> int | None:
    """Datagrams the kernel dropped on this socket because its buffer was full
    (the `drops` column of /proc/net/udp{,6}); None where the kernel does not say."""
    try:
        inode = os.fstat(sock.fileno()).st_ino
    except OSError:
        return None
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) >= 13 and fields[9] == str(inode):
                return int(fields[-1])
    return None
