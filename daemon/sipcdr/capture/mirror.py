"""Cloud traffic mirroring over VXLAN.

A cloud mirror session (AWS VPC Traffic Mirroring, and the appliances that copy it)
sends each mirrored frame as a VXLAN datagram to UDP 4789: an 8-byte VXLAN header,
then the Ethernet frame as it was on the wire. `VxlanUdpProtocol` takes those
datagrams from the allowed sources, and hands the frame to a `SipExtractor` (the same
decoding a capture file gets: VLANs, fragments, TCP reassembly, inner tunnels). Each
VXLAN network identifier (VNI) gets its own extractor, and names the capture node of
its SIP: `vxlan:<VNI>`, so a mirror session per SBC or per site, each with its VNI,
shows in the CDRs as where the call was seen.

What a mirror session mostly sends is media and other traffic; the extractors count
it, and the metrics exporter reads those counts as the listener's drops at each scrape
(`VxlanUdpProtocol.decoded_drops`): nothing is counted per datagram here but the
datagram itself.
"""

from __future__ import annotations

import asyncio
from typing import Final

from sipcdr.capture.listeners import AllowList, ListenerStats
from sipcdr.clock import SYSTEM_CLOCK, Clock
from sipcdr.decode.extract import CaptureStats, SipExtractor
from sipcdr.pipeline import Pipeline

__all__ = ["LINKTYPE_ETHERNET", "MAX_VNIS", "VxlanUdpProtocol"]

LINKTYPE_ETHERNET: Final = 1
_VXLAN_HEADER: Final = 8
_VXLAN_VNI_FLAG: Final = 0x08  # the I flag: the VNI field is valid (RFC 7348)
# A mirror target serves a handful of sessions; each VNI holds fragment and TCP state,
# so a sender spraying VNIs must not grow memory without bound.
MAX_VNIS: Final = 256
# Extractor counters exported as the listener's drops, by drop reason.
_DROP_COUNTERS: Final = (
    ("non_ip", "non_ip"),
    ("non_sip_payloads", "not_sip"),
    ("unsupported_tunnel", "unsupported_tunnel"),
    ("malformed", "malformed"),
    ("truncated", "truncated"),
)


class VxlanUdpProtocol(asyncio.DatagramProtocol):
    """Mirrored frames in VXLAN: endpoints are the inner packet's, the time is the
    receive time (a mirror copy carries none of its own)."""

    SOURCE = "vxlan_udp"

    def __init__(
        self,
        pipeline: Pipeline,
        allow: AllowList,
        stats: ListenerStats,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._pipeline = pipeline
        self._allow = allow
        self._stats = stats
        self._now = clock.time
        self._extractors: dict[int, SipExtractor] = {}

    def extractor(self, vni: int) -> SipExtractor | None:
        extractor = self._extractors.get(vni)
        if extractor is None:
            if len(self._extractors) >= MAX_VNIS:
                return None
            extractor = SipExtractor(LINKTYPE_ETHERNET, f"vxlan:{vni}", CaptureStats())
            self._extractors[vni] = extractor
        return extractor

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        stats = self._stats
        if not self._allow.permits(str(addr[0])):
            stats.drop(self.SOURCE, "not_allowed")
            return
        stats.count_received(self.SOURCE)
        if len(data) <= _VXLAN_HEADER or not data[0] & _VXLAN_VNI_FLAG:
            stats.drop(self.SOURCE, "bad_vxlan")
            return
        extractor = self.extractor(int.from_bytes(data[4:7], "big"))
        if extractor is None:
            stats.drop(self.SOURCE, "too_many_vnis")
            return
        process = self._pipeline.process
        for packet in extractor.feed(self._now(), data[_VXLAN_HEADER:]):
            process(packet)

    def decoded_drops(self) -> dict[str, int]:
        """What the extractors found that was not SIP, by drop reason: running totals,
        read by the metrics exporter."""
        totals = dict.fromkeys((name for name, _reason in _DROP_COUNTERS), 0)
        for extractor in self._extractors.values():
            stats = extractor.stats
            totals["non_sip_payloads"] += stats.non_sip_payloads
            decap = stats.decap
            for name in ("non_ip", "unsupported_tunnel", "malformed", "truncated"):
                totals[name] += getattr(decap, name)
        return {reason: totals[name] for name, reason in _DROP_COUNTERS}

    def decoder_stats(self) -> list[CaptureStats]:
        """Each VNI's decoder counts (fragments, TCP reassembly, HEP errors, ...), read
        by the metrics exporter and summed over VNIs there."""
        return [extractor.stats for extractor in self._extractors.values()]

    def connection_lost(self, exc: Exception | None) -> None:
        for extractor in self._extractors.values():
            extractor.close()
