"""`hep.to_packet`, the one HEP to Packet conversion: the listeners and the capture
extractor give the same Packet for the same HEP, and the clock-skew rule touches HEP
only."""

from __future__ import annotations

import encaps
import pytest
from sipcalls import Call
from sipcdr import hep, hepencode
from sipcdr.capture.listeners import hep_to_packet
from sipcdr.decode.extract import SipExtractor
from sipcdr.model import Packet

LINKTYPE_ETHERNET = 1
T0 = 1_790_000_000.25
INVITE = Call("adapter-1").request("INVITE")


def datagram(timestamp: float, node: str | None = "edge-1", protocol: int = 6) -> bytes:
    return hepencode.encode(
        src_ip="192.0.2.10", dst_ip="203.0.113.20", src_port=5070, dst_port=5080,
        timestamp=timestamp, payload=INVITE, capture_id=77, node_name=node,
        ip_protocol=protocol,
    )  # fmt: skip


def frame(payload: bytes) -> bytes:
    ip = encaps.ipv4(encaps.udp(payload, 40000, 9060), "198.51.100.7", "198.51.100.8")
    return encaps.eth(ip, encaps.ETH_IPV4)


@pytest.mark.parametrize(("node", "expected"), [("edge-1", "edge-1"), (None, "77")])
def test_listener_and_capture_give_the_same_packet(node: str | None, expected: str) -> None:
    data = datagram(T0, node)
    extractor = SipExtractor(LINKTYPE_ETHERNET, "file.pcap")
    (captured,) = extractor.feed(T0 + 0.5, frame(data))
    assert captured == Packet(T0, "192.0.2.10", 5070, "203.0.113.20", 5080, "tcp", INVITE, expected)
    listened = hep_to_packet(hep.decode(data))
    # The listener's receive time is now; the agent's time was T0, long ago: replaced.
    assert listened._replace(timestamp=T0) == captured


def test_agent_time_is_kept_within_the_skew_and_replaced_beyond_it() -> None:
    decoded = hep.decode(datagram(T0))
    near = hep.to_packet(decoded, INVITE, T0 + 29.0, hep.MAX_CLOCK_SKEW_S)
    far = hep.to_packet(decoded, INVITE, T0 + 31.0, hep.MAX_CLOCK_SKEW_S)
    unguarded = hep.to_packet(decoded, INVITE, T0 + 3600.0)
    assert (near.timestamp, far.timestamp, unguarded.timestamp) == (T0, T0 + 31.0, T0)
    assert (hep.skew_replaced(decoded, near), hep.skew_replaced(decoded, far)) == (False, True)


def test_a_live_capture_guards_hep_times_only() -> None:
    """Live (max_hep_skew_s set), a frame's own time stands for this host's clock: a
    skewed HEP time is replaced and counted, plain SIP keeps the frame's time."""
    live = SipExtractor(LINKTYPE_ETHERNET, "eth0", max_hep_skew_s=hep.MAX_CLOCK_SKEW_S)
    received = T0 + 3600.0
    (skewed,) = live.feed(received, frame(datagram(T0)))
    (fresh,) = live.feed(received, frame(datagram(received - 1.0)))
    ip = encaps.ipv4(encaps.udp(INVITE, 5060, 5060), "192.0.2.10", "203.0.113.20")
    (plain,) = live.feed(received, encaps.eth(ip, encaps.ETH_IPV4))
    assert (skewed.timestamp, fresh.timestamp, plain.timestamp) == (
        received,
        received - 1.0,
        received,
    )
    assert live.stats.hep_clock_skew == 1
    imported = SipExtractor(LINKTYPE_ETHERNET, "file.pcap")
    (kept,) = imported.feed(received, frame(datagram(T0)))
    assert kept.timestamp == T0
    assert imported.stats.hep_clock_skew == 0
