"""Frames to SIP ``Packet`` records: ``SipExtractor`` runs each frame of one capture
source (a file, an interface) through the ``Decapsulator`` and the ``TcpReassembler``
and keeps what is SIP.

SIP is recognised by content, never by port: a UDP datagram or SCTP DATA chunk is SIP
when it starts (after any CRLF keepalive bytes) with a request line or a status line,
and TCP streams are framed wherever a start line appears (see ``tcp``). A UDP datagram
that starts with ``HEP3``, or that has a plausible HEPv1/v2 header, is unwrapped with
``sipcdr.hep.decode``: its SIP payload is yielded with the addresses, ports, time and
capture id that the HEP agent recorded; other HEP payload types (RTCP, logs) are
counted. The SIP itself is not parsed here.
"""

from __future__ import annotations

from typing import Final

from sipcdr import hep
from sipcdr.decode.base import DecapStats, ip_text
from sipcdr.decode.link import Decapsulator
from sipcdr.decode.prefilter import DECODE, MAYBE_SIGNALLING, media_layers
from sipcdr.decode.startline import KEEPALIVE, sip_offset
from sipcdr.decode.tcp import TcpReassembler, TcpStats
from sipcdr.model import TRANSPORT_SCTP, TRANSPORT_UDP, Packet

__all__ = ["CaptureStats", "SipExtractor"]

_HEP3: Final = b"HEP3"
_HEP_SIP: Final = 1
# HEPv1/v2 have no magic: version 1 or 2, then a header length, an address family
# (AF_INET, or AF_INET6 as Linux/FreeBSD/macOS number it) and an IP protocol. All four
# must fit before a datagram is offered to the decoder.
_HEP2_LENGTHS: Final = frozenset({16, 28, 40, 52})
_HEP2_FAMILIES: Final = frozenset({2, 10, 28, 30})

_new: Final = tuple.__new__
_NONE: Final[tuple[Packet, ...]] = ()


class CaptureStats:
    """What a capture held besides the SIP that was yielded. Counters only grow.

    ``decap`` and ``tcp`` hold the per-layer detail; the properties here are the
    summary a log line or metrics exporter wants.
    """

    __slots__ = (
        "bad_time",
        "decap",
        "hep_clock_skew",
        "hep_errors",
        "hep_non_sip",
        "hep_packets",
        "keepalives",
        "non_sip_payloads",
        "sip_messages",
        "tcp",
        "truncated_at",
        "truncated_file",
        "unknown_interface",
        "unsupported_link",
    )

    def __init__(self) -> None:
        self.decap = DecapStats()
        self.tcp = TcpStats()
        self.sip_messages = 0  # Packets yielded
        self.hep_packets = 0  # HEP packets decoded (SIP or not)
        self.hep_non_sip = 0  # decoded HEP packets whose payload type is not SIP
        self.hep_errors: dict[str, int] = {}  # HepError reason -> count
        self.hep_clock_skew = 0  # HEP times replaced by the frame's (max_hep_skew_s)
        self.non_sip_payloads = 0  # UDP/SCTP payloads that are neither SIP nor HEP
        self.keepalives = 0  # CRLF-only UDP/SCTP/HEP payloads
        self.truncated_file = False  # set by a file reader: the file ended inside a record
        self.truncated_at = -1  # set with it: the file offset where that record begins
        # pcapng packet blocks naming an interface no Interface Description Block
        # described, and those of an interface whose link type is not read.
        self.unknown_interface = 0
        self.unsupported_link = 0
        # pcapng packet blocks whose time falls before 1970 or after 9999.
        self.bad_time = 0

    @property
    def frames_read(self) -> int:
        return self.decap.frames

    @property
    def non_ip(self) -> int:
        return self.decap.non_ip

    @property
    def fragments_reassembled(self) -> int:
        return self.decap.reassembled

    @property
    def tcp_segments(self) -> int:
        return self.decap.tcp

    def as_dict(self) -> dict[str, int]:
        """Flat view, layer counters prefixed, for logs and tests."""
        flat = {
            "sip_messages": self.sip_messages,
            "hep_packets": self.hep_packets,
            "hep_non_sip": self.hep_non_sip,
            "hep_clock_skew": self.hep_clock_skew,
            "non_sip_payloads": self.non_sip_payloads,
            "keepalives": self.keepalives,
            "truncated_file": int(self.truncated_file),
            "unknown_interface": self.unknown_interface,
            "unsupported_link": self.unsupported_link,
            "bad_time": self.bad_time,
        }
        flat.update({f"hep_error_{k}": v for k, v in self.hep_errors.items()})
        flat.update({f"decap_{k}": v for k, v in self.decap.as_dict().items()})
        flat.update({f"tcp_{k}": v for k, v in self.tcp.as_dict().items()})
        return flat


class SipExtractor:
    """Frames of one link type in, SIP ``Packet`` records out.

    Holds the fragment and TCP stream state, so one extractor serves one capture
    source. Call ``close`` at the end of input to release that state (incomplete
    datagrams and streams are counted then).
    """

    __slots__ = (
        "_decap",
        "_decode",
        "_linktype",
        "_max_hep_skew_s",
        "_prefilter",
        "_tcp",
        "capture_node",
        "stats",
    )

    def __init__(
        self,
        linktype: int,
        capture_node: str,
        stats: CaptureStats | None = None,
        *,
        decapsulator: Decapsulator | None = None,
        reassembler: TcpReassembler | None = None,
        prefilter: bool = True,
        max_hep_skew_s: float = 0.0,
    ) -> None:
        """``prefilter=False`` decodes every frame in full: the reference the pre-filter
        (``prefilter``, which skips media unread) is tested against. A live capture sets
        ``max_hep_skew_s`` (``hep.to_packet``): HEP whose agent clock is further than
        that from the frame's time gets the frame's; a file keeps the agent's."""
        self.stats = stats if stats is not None else CaptureStats()
        self.capture_node = capture_node
        self._decap = decapsulator if decapsulator is not None else Decapsulator(self.stats.decap)
        self._tcp = reassembler if reassembler is not None else TcpReassembler(self.stats.tcp)
        # ValueError for a link type the decapsulator does not read.
        self._decode = self._decap.link_decoder(linktype)
        self._linktype = linktype
        self._prefilter = prefilter
        self._max_hep_skew_s = max_hep_skew_s

    def sibling(self, linktype: int) -> SipExtractor:
        """An extractor for another interface of the same capture (pcapng): frames of
        ``linktype`` in, into the same fragment and TCP stream state and counters.
        ValueError for a link type the decapsulator does not read."""
        return SipExtractor(
            linktype,
            self.capture_node,
            self.stats,
            decapsulator=self._decap,
            reassembler=self._tcp,
            prefilter=self._prefilter,
            max_hep_skew_s=self._max_hep_skew_s,
        )

    def feed(self, ts: float, frame: bytes) -> tuple[Packet, ...] | list[Packet]:
        """The SIP messages that this frame completes (usually none or one)."""
        if self.skip_media(frame, 0, len(frame)):
            return _NONE
        return self.decode(ts, frame)

    def skip_media(self, buf: bytes, start: int, stop: int) -> bool:
        """True when the frame ``buf[start:stop]`` is certainly media: then it is
        counted as decoding would count it, and needs nothing more. Lets a reader that
        holds many frames in one buffer copy out only those it must ``decode``."""
        if not self._prefilter:
            return False
        layers = media_layers(self._linktype, buf, start, stop)
        if layers == DECODE:
            return False
        decap = self._decap.stats
        decap.frames += 1
        decap.tunnelled += layers
        decap.udp += 1
        self.stats.non_sip_payloads += 1
        return True

    def decode(self, ts: float, frame: bytes) -> tuple[Packet, ...] | list[Packet]:
        """``feed`` without the pre-filter: for a frame ``skip_media`` did not take."""
        segments = self._decode(ts, frame)
        if not segments:
            return _NONE
        out: list[Packet] | None = None
        stats = self.stats
        node = self.capture_node
        for seg in segments:
            proto = seg.proto
            if proto == 6:
                messages = self._tcp.feed(seg)
                if not messages:
                    continue
                src = ip_text(seg.src_addr)
                dst = ip_text(seg.dst_addr)
                if out is None:
                    out = []
                for payload, transport in messages:
                    out.append(
                        _new(
                            Packet,
                            (ts, src, seg.src_port, dst, seg.dst_port, transport, payload, node),
                        )
                    )
                stats.sip_messages += len(messages)
                continue
            payload = seg.payload
            # The first byte settles most media packets without a call: SIP starts with
            # a letter or CR/LF, HEP3 with "H", HEPv1/v2 with 1 or 2.
            first = payload[0] if payload else 0
            if not MAYBE_SIGNALLING[first]:
                stats.non_sip_payloads += 1
                continue
            offset = sip_offset(payload)
            if offset < 0:
                if offset == KEEPALIVE:
                    stats.keepalives += 1
                    continue
                if proto == 17:
                    if (first == 72 and payload[:4] == _HEP3) or (
                        first in (1, 2)
                        and len(payload) > 16
                        and payload[1] in _HEP2_LENGTHS
                        and payload[2] in _HEP2_FAMILIES
                    ):
                        packet = self._hep(ts, payload)
                        if packet is not None:
                            if out is None:
                                out = []
                            out.append(packet)
                        continue
                stats.non_sip_payloads += 1
                continue
            if offset:
                payload = payload[offset:]
            if out is None:
                out = []
            out.append(
                _new(
                    Packet,
                    (
                        ts,
                        ip_text(seg.src_addr),
                        seg.src_port,
                        ip_text(seg.dst_addr),
                        seg.dst_port,
                        TRANSPORT_UDP if proto == 17 else TRANSPORT_SCTP,
                        payload,
                        node,
                    ),
                )
            )
            stats.sip_messages += 1
        return out if out is not None else _NONE

    def _hep(self, ts: float, payload: bytes) -> Packet | None:
        stats = self.stats
        legacy = payload[0] != 72
        try:
            packet = hep.decode(payload)
        except hep.HepError as exc:
            if legacy:
                # The header only looked like HEPv1/v2; it is some other protocol.
                stats.non_sip_payloads += 1
            else:
                stats.hep_errors[exc.reason] = stats.hep_errors.get(exc.reason, 0) + 1
            return None
        inner = packet.payload
        offset = sip_offset(inner)
        if legacy and offset < 0:
            stats.non_sip_payloads += 1
            return None
        stats.hep_packets += 1
        if packet.proto_type != _HEP_SIP:
            stats.hep_non_sip += 1
            return None
        if offset == KEEPALIVE:
            stats.keepalives += 1
            return None
        if offset > 0:
            inner = inner[offset:]
        stats.sip_messages += 1
        # HEPv1 has no timestamp; the capture's own is the next best.
        out = hep.to_packet(packet, inner, ts, self._max_hep_skew_s)
        if self._max_hep_skew_s > 0.0 and hep.skew_replaced(packet, out):
            stats.hep_clock_skew += 1
        return out

    def close(self) -> None:
        self._decap.close()
        self._tcp.close()
