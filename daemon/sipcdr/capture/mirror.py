"""Cloud traffic mirroring over VXLAN.

A cloud mirror session (AWS VPC Traffic Mirroring, and the appliances that copy it)
sends each mirrored frame as a VXLAN datagram to UDP 4789: an 8-byte VXLAN header,
then the Ethernet frame as it was on the wire. `VxlanUdpProtocol` takes those
datagrams from the allowed sources, and hands the frame to a `SipExtractor` (the same
decoding a capture file gets: VLANs, fragments, TCP reassembly, inner tunnels). Each
VXLAN network identifier (VNI) gets its own extractor, and names the capture node of
its SIP: `vxlan:<VNI>`, so a mirror session per SBC or per site, each with its VNI,
shows in the CDRs as where the call was seen.

What a mirror session mostly sends is media and other traffic; the extractor counts
it, and the daemon's tick moves the counts into the listener's drop counters in one
batch (`VxlanUdpProtocol.take_counts`): nothing is counted per datagram here but the
datagram itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Final

from sipcdr.capture.listeners import AllowList
from sipcdr.decode.extract import CaptureStats, SipExtractor
from sipcdr.pipeline import Pipeline

__all__ = ["LINKTYPE_ETHERNET", "MAX_VNIS", "VxlanUdpProtocol", "add_drops"]

LINKTYPE_ETHERNET: Final = 1
_VXLAN_HEADER: Final = 8
_VXLAN_VNI_FLAG: Final = 0x08  # the I flag: the VNI field is valid (RFC 7348)
# A mirror target serves a handful of sessions; each VNI holds fragment and TCP state,
# so a sender spraying VNIs must not grow memory without bound.
MAX_VNIS: Final = 256
# Extractor counters moved into the listener's drops, by drop reason.
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

    def __init__(self, pipeline: Pipeline, allow: AllowList) -> None:
        self._pipeline = pipeline
        self._allow = allow
        self._extractors: dict[int, SipExtractor] = {}
        self._exported: dict[str, int] = {}

    def extractor(self, vni: int) -> SipExtractor | None:
        extractor = self._extractors.get(vni)
        if extractor is None:
            if len(self._extractors) >= MAX_VNIS:
                return None
            extractor = SipExtractor(LINKTYPE_ETHERNET, f"vxlan:{vni}", CaptureStats())
            self._extractors[vni] = extractor
        return extractor

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        pipeline = self._pipeline
        if not self._allow.permits(str(addr[0])):
            pipeline.drop(self.SOURCE, "not_allowed")
            return
        pipeline.count_received(self.SOURCE)
        if len(data) <= _VXLAN_HEADER or not data[0] & _VXLAN_VNI_FLAG:
            pipeline.drop(self.SOURCE, "bad_vxlan")
            return
        extractor = self.extractor(int.from_bytes(data[4:7], "big"))
        if extractor is None:
            pipeline.drop(self.SOURCE, "too_many_vnis")
            return
        for packet in extractor.feed(time.time(), data[_VXLAN_HEADER:]):
            pipeline.process(packet)

    def take_counts(self) -> dict[str, int]:
        """What the extractors found that was not SIP since the last call, by drop
        reason: for the tick to add to the listener's drops."""
        totals = dict.fromkeys((name for name, _reason in _DROP_COUNTERS), 0)
        for extractor in self._extractors.values():
            stats = extractor.stats
            totals["non_sip_payloads"] += stats.non_sip_payloads
            decap = stats.decap
            for name in ("non_ip", "unsupported_tunnel", "malformed", "truncated"):
                totals[name] += getattr(decap, name)
        counts: dict[str, int] = {}
        for name, reason in _DROP_COUNTERS:
            delta = totals[name] - self._exported.get(name, 0)
            if delta > 0:
                self._exported[name] = totals[name]
                counts[reason] = delta
        return counts

    def connection_lost(self, exc: Exception | None) -> None:
        for extractor in self._extractors.values():
            extractor.close()


def add_drops(protocols: Iterable[VxlanUdpProtocol], drops: dict[tuple[str, str], int]) -> None:
    """What the VXLAN listeners decoded that was not SIP, into the pipeline's drops."""
    for protocol in protocols:
        for reason, count in protocol.take_counts().items():
            key = (VxlanUdpProtocol.SOURCE, reason)
            drops[key] = drops.get(key, 0) + count
