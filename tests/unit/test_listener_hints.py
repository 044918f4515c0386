"""The hint a listener gives when it receives the other listener's protocol: counted on
the hot path, logged by the tick at most once per interval."""

from __future__ import annotations

import time

from sipcalls import Call, answered_call_messages
from sipcdr import hepencode
from sipcdr.capture.hints import (
    HINT_INTERVAL_S,
    HintedHepUdpProtocol,
    HintedSipUdpProtocol,
    ListenerHint,
)
from sipcdr.capture.listeners import AllowList, HepGate, ListenerStats
from sipcdr.config import DEFAULT_ALLOW
from sipcdr.dialog import Correlator, DialogLimits
from sipcdr.pipeline import Pipeline

INVITE = answered_call_messages(Call("hint@x"))[0]
HEP_INVITE = hepencode.encode(
    src_ip="192.0.2.10",
    dst_ip="203.0.113.20",
    src_port=5060,
    dst_port=5060,
    timestamp=time.time(),
    payload=INVITE,
)


def pipeline() -> Pipeline:
    return Pipeline(Correlator(DialogLimits(), egress=True), ())


def test_a_hint_is_due_once_per_interval_and_only_after_new_arrivals() -> None:
    hint = ListenerHint("SIP/UDP", "127.0.0.1:5060", "HEP packets", "capture.hep_udp")
    assert hint.due(100.0) is None  # nothing arrived
    hint.seen += 3
    fields = hint.due(100.0)
    assert fields == {
        "listener": "SIP/UDP 127.0.0.1:5060",
        "datagrams": 3,
        "hint": (
            "HEP packets are arriving on the SIP/UDP listener 127.0.0.1:5060; "
            "configure them on capture.hep_udp"
        ),
    }
    hint.seen += 5
    assert hint.due(100.0 + HINT_INTERVAL_S - 1) is None
    later = hint.due(100.0 + HINT_INTERVAL_S)
    assert later is not None and later["datagrams"] == 5


def test_the_sip_listener_counts_hep_and_still_handles_sip() -> None:
    line = pipeline()
    hint = ListenerHint("SIP/UDP", "127.0.0.1:5060", "HEP packets", "capture.hep_udp")
    protocol = HintedSipUdpProtocol(
        line, AllowList(DEFAULT_ALLOW), ("127.0.0.1", 5060), hint, ListenerStats()
    )
    protocol.datagram_received(HEP_INVITE, ("127.0.0.1", 40000))
    protocol.datagram_received(b"\x02\x10\x02\x11" + bytes(40), ("127.0.0.1", 40000))  # HEPv2
    protocol.datagram_received(INVITE, ("127.0.0.1", 40000))
    assert hint.seen == 2
    assert line.correlator.open_dialogs == 1


def test_the_hep_listener_counts_plain_sip_and_still_handles_hep() -> None:
    line = pipeline()
    hint = ListenerHint("HEP/UDP", "127.0.0.1:9060", "plain SIP packets", "capture.sip_udp")
    stats = ListenerStats()
    protocol = HintedHepUdpProtocol(line, AllowList(DEFAULT_ALLOW), HepGate({}), hint, stats)
    protocol.datagram_received(INVITE, ("127.0.0.1", 40000))
    protocol.datagram_received(b"\x80\x00" + bytes(170), ("127.0.0.1", 40000))  # RTP: not SIP
    protocol.datagram_received(HEP_INVITE, ("127.0.0.1", 40000))
    assert hint.seen == 1
    assert line.correlator.open_dialogs == 1
    assert stats.dropped == {("hep_udp", "bad_hep"): 2}
