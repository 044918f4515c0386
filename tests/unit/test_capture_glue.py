"""The steps between receiving a datagram and the stages: the SIP/UDP listener (the
allow-list's verdict, the counter, the `Packet`) and the pipeline's per-message and
per-CDR steps (counts, the order of hooks, stages and sinks, faults counted by name)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest
from sipcalls import Call, CdrCollector, answered_call_messages
from sipcdr import hepencode
from sipcdr.capture import listeners
from sipcdr.capture.hints import HintedSipUdpProtocol, ListenerHint
from sipcdr.capture.listeners import (
    AllowList,
    HepGate,
    HepUdpProtocol,
    ListenerStats,
    SipUdpProtocol,
    handle_hep,
)
from sipcdr.clock import FakeClock
from sipcdr.dialog import Correlator, DialogLimits
from sipcdr.model import Cdr, Packet
from sipcdr.pipeline import Pipeline
from sipcdr.sip import SipMessage
from sipcdr.stages import PartsFailed

LOCAL = ("127.0.0.1", 5060)
ALLOW = AllowList([ipaddress.ip_network("127.0.0.0/8")])


class Recording:
    """Hooks, stages and sinks that write what they saw, in order, to one list."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.packets: list[Packet] = []

    def signaling(self, packet: Packet, msg: SipMessage) -> None:
        self.packets.append(packet)
        self.events.append(f"signaling {msg.method or msg.cseq_method}")

    def journal(self, packet: Packet) -> None:
        self.events.append("journal")

    def decided(self, cdrs: Sequence[Cdr], at: float | None) -> None:
        self.events.append(f"decided {len(cdrs)} {at}")


class Stage:
    def __init__(self, name: str, log: list[str], fail: Exception | None = None) -> None:
        self.name = name
        self.log = log
        self.fail = fail

    def on_cdr(self, cdr: Cdr) -> Cdr:
        self.log.append(f"stage {self.name}")
        if self.fail is not None:
            raise self.fail
        return cdr


class Sink(CdrCollector):
    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        super().__init__()
        self.name = name
        self.log = log
        self.fail = fail

    def write(self, cdr: Cdr) -> None:
        self.log.append(f"sink {self.name}")
        if self.fail:
            raise OSError("refused")
        super().write(cdr)


def _listener(pipeline: Pipeline, stats: ListenerStats) -> SipUdpProtocol:
    return SipUdpProtocol(pipeline, ALLOW, LOCAL, stats, FakeClock(wall_start=1_700_000_000.5))


def test_the_listener_builds_the_packet_of_the_datagram_and_counts_it() -> None:
    seen = Recording()
    pipeline = Pipeline(Correlator(), (), signaling=seen.signaling)
    stats = ListenerStats()
    invite = answered_call_messages(Call("glue-1@x"))[0]
    protocol = _listener(pipeline, stats)
    protocol.datagram_received(invite, ("127.0.0.1", 40000))
    # Any address object is taken by its text, as the allow-list checks it.
    protocol.datagram_received(invite, (ipaddress.ip_address("127.0.0.2"), "no port"))
    assert stats.received == {"sip_udp": 2}
    assert stats.dropped == {}
    first, second = seen.packets
    assert type(first) is Packet
    assert first == Packet(
        1_700_000_000.5,
        "127.0.0.1",
        40000,
        "127.0.0.1",
        5060,
        "udp",
        invite,
        "sip_udp:127.0.0.1:5060",
    )
    assert first.src_ip == "127.0.0.1" and first.capture_node == "sip_udp:127.0.0.1:5060"
    assert type(second.src_ip) is str and second.src_ip == "127.0.0.2"
    assert second.src_port == 0


def test_a_source_outside_the_allow_list_is_dropped_and_counted_every_time() -> None:
    seen = Recording()
    pipeline = Pipeline(Correlator(), (), signaling=seen.signaling)
    stats = ListenerStats()
    invite = answered_call_messages(Call("glue-2@x"))[0]
    protocol = _listener(pipeline, stats)
    for _ in range(3):  # the first checks the networks, the others the remembered verdict
        protocol.datagram_received(invite, ("192.0.2.1", 5060))
    assert stats.dropped == {("sip_udp", "not_allowed"): 3}
    assert stats.received == {}
    assert seen.packets == [] and pipeline.stats.messages == {}
    assert ALLOW.verdicts["192.0.2.1"] is False


def test_the_hinted_listener_counts_hep_and_processes_the_same_packets() -> None:
    hint = ListenerHint("SIP/UDP", "127.0.0.1:5060", "HEP packets", "capture.hep_udp")
    seen = Recording()
    pipeline = Pipeline(Correlator(), (), signaling=seen.signaling)
    stats = ListenerStats()
    protocol = HintedSipUdpProtocol(
        pipeline, ALLOW, LOCAL, hint, stats, FakeClock(wall_start=1_700_000_000.5)
    )
    messages = answered_call_messages(Call("glue-3@x"))
    for data in (b"HEP3" + bytes(20), b"\x01\x10", b"", *messages, b"H"):
        protocol.datagram_received(data, ("127.0.0.1", 40000))
    assert hint.seen == 2
    assert stats.received == {"sip_udp": len(messages) + 4}
    assert [p.payload for p in seen.packets] == messages
    assert sum(pipeline.stats.parse_errors.values()) == 4
    assert pipeline.cdrs_written == 1


def test_every_message_passes_signaling_then_correlation_then_journal_then_the_cdr_path() -> None:
    seen = Recording()
    log = seen.events
    sinks = (Sink("a", log), Sink("b", log))
    pipeline = Pipeline(
        Correlator(),
        sinks,
        (Stage("first", log), Stage("second", log)),
        signaling=seen.signaling,
        journal=seen.journal,
        decided=seen.decided,
    )
    for data in answered_call_messages(Call("glue-4@x")):
        pipeline.process(Packet(1.0, "192.0.2.10", 5060, "203.0.113.20", 5060, "udp", data, "t"))
    # Each message's signaling record first; the journal after correlation, for the
    # messages that changed the call (not the ACK), and before the CDR the BYE closes
    # goes through the stages, then the sinks, in their order.
    assert log == [
        *("signaling INVITE", "journal") * 3,
        "signaling ACK",
        "signaling BYE",
        "journal",
        "stage first",
        "stage second",
        "sink a",
        "sink b",
        "signaling BYE",
    ]
    assert pipeline.stats.messages == {
        ("INVITE", "request"): 1,
        ("INVITE", "response"): 2,
        ("ACK", "request"): 1,
        ("BYE", "request"): 1,
        ("BYE", "response"): 1,
    }
    assert pipeline.cdrs_written == 1


def test_a_call_evicted_for_a_new_one_is_decided_before_its_message_is_journaled() -> None:
    seen = Recording()
    sink = Sink("a", seen.events)
    correlator = Correlator(DialogLimits(max_open_dialogs=1))
    pipeline = Pipeline(correlator, (sink,), journal=seen.journal, decided=seen.decided)
    for n in (1, 2):
        invite = answered_call_messages(Call(f"glue-5-{n}@x"))[0]
        pipeline.process(
            Packet(float(n), "192.0.2.10", 5060, "203.0.113.20", 5060, "udp", invite, "t")
        )
    assert seen.events == ["journal", "decided 1 None", "journal", "sink a"]
    assert [cdr.call_id for cdr in sink.cdrs] == ["glue-5-1@x"]


def test_stage_and_sink_faults_are_counted_by_name_and_cost_nothing_else() -> None:
    log: list[str] = []
    kept = Sink("kept", log)

    class Partial:
        name = "enrich+rate"

        def on_cdr(self, cdr: Cdr) -> Cdr:
            log.append("stage partial")
            raise PartsFailed(cdr, [("rate", ValueError("no deck"))])

    pipeline = Pipeline(
        Correlator(),
        (Sink("broken", log, fail=True), kept),
        (Partial(), Stage("fraud", log, fail=RuntimeError("bug")), Stage("last", log)),
    )
    for data in answered_call_messages(Call("glue-6@x")):
        pipeline.process(Packet(1.0, "192.0.2.10", 5060, "203.0.113.20", 5060, "udp", data, "t"))
    assert log == ["stage partial", "stage fraud", "stage last", "sink broken", "sink kept"]
    assert pipeline.stats.internal_errors == {"rate": 1, "fraud": 1}
    assert pipeline.stats.cdr_write_failures == {"broken": 1}
    assert len(kept.cdrs) == 1
    assert pipeline.cdrs_written == 0  # one sink lost it


def test_a_refused_source_stays_refused_when_the_remembered_verdicts_start_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The listener reads the verdicts dict it was given: the allow-list empties that
    same dict when it is full, so a source refused before is judged again, never let
    through by a verdict left over."""
    monkeypatch.setattr(listeners, "_IP_CACHE_LIMIT", 2)
    allow = AllowList([ipaddress.ip_network("127.0.0.0/8")])
    seen = Recording()
    pipeline = Pipeline(Correlator(), (), signaling=seen.signaling)
    stats = ListenerStats()
    protocol = SipUdpProtocol(pipeline, allow, LOCAL, stats, FakeClock())
    options = b"OPTIONS sip:x SIP/2.0\r\nCall-ID: o@x\r\nCSeq: 1 OPTIONS\r\n\r\n"
    sources = ["127.0.0.1", "192.0.2.1", "127.0.0.2", "192.0.2.2", "127.0.0.3"]
    for _ in range(3):
        for source in sources:
            protocol.datagram_received(options, (source, 5060))
            assert len(allow.verdicts) <= 2
    assert stats.received == {"sip_udp": 9}
    assert stats.dropped == {("sip_udp", "not_allowed"): 6}
    assert [p.src_ip for p in seen.packets] == [s for s in sources if s.startswith("127.")] * 3


@pytest.mark.parametrize(
    ("source", "allowed"),
    [
        ("::ffff:127.0.0.9", True),  # IPv4-mapped: judged as the IPv4 address
        ("::ffff:192.0.2.9", False),
        ("::ffff:7f00:9", True),  # the same mapping, written in hex
        ("fe80::1%eth0", False),  # a zone, outside the list
        ("127.0.0.9%eth0", True),  # a zone is not part of the address
        ("not an address", False),
        ("", False),
    ],
)
def test_sources_are_judged_as_their_address_on_the_first_datagram_and_after(
    source: str, allowed: bool
) -> None:
    allow = AllowList([ipaddress.ip_network("127.0.0.0/8")])
    seen = Recording()
    pipeline = Pipeline(Correlator(), (), signaling=seen.signaling)
    stats = ListenerStats()
    protocol = SipUdpProtocol(pipeline, allow, LOCAL, stats, FakeClock())
    options = b"OPTIONS sip:x SIP/2.0\r\nCall-ID: o@x\r\nCSeq: 1 OPTIONS\r\n\r\n"
    for _ in range(2):  # the first judged by the networks, the second by its verdict
        protocol.datagram_received(options, (source, 5060, 0, 0))
    if allowed:
        assert stats.received == {"sip_udp": 2} and stats.dropped == {}
        assert [p.src_ip for p in seen.packets] == [source, source]
    else:
        assert stats.dropped == {("sip_udp", "not_allowed"): 2} and stats.received == {}
        assert seen.packets == []
    assert allow.verdicts == {source: allowed}


class _Taken:
    """A pipeline's `process`, keeping what it was handed."""

    def __init__(self) -> None:
        self.packets: list[Packet] = []

    def process(self, packet: Packet) -> None:
        self.packets.append(packet)


@pytest.mark.parametrize("keys", [{}, {2001: "secret"}])
def test_the_hep_listener_does_what_handle_hep_does_in_one_frame(keys: dict[int, str]) -> None:
    """The HEP/UDP listener writes `handle_hep`'s steps out in its one frame; the stream
    listeners keep calling `handle_hep`. Both must hand the pipeline the same packets
    and count the same drops: agent keys right, wrong and missing, a payload that is
    not SIP, damaged frames, an agent clock far off, a source not allowed."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    now = clock.time()
    invite = Call("hep-listener@x").request("INVITE")

    def frame(**changes: object) -> bytes:
        fields: dict[str, object] = {
            "src_ip": "192.0.2.10",
            "dst_ip": "203.0.113.20",
            "src_port": 5060,
            "dst_port": 5060,
            "timestamp": now,
            "payload": invite,
            "capture_id": 2001,
            "auth_key": "secret",
        }
        fields.update(changes)
        return hepencode.encode(**fields)  # type: ignore[arg-type]

    datagrams = [
        (frame(), "127.0.0.1"),
        (frame(auth_key="wrong"), "127.0.0.1"),
        (frame(auth_key=None), "127.0.0.1"),
        (frame(capture_id=9), "127.0.0.1"),
        (frame(proto_type=5, payload=b"rtcp"), "127.0.0.1"),
        (frame(timestamp=now - 3600.0), "127.0.0.1"),  # the agent's clock an hour off
        (frame(node_name="edge-1", src_ip="2001:db8::1", dst_ip="2001:db8::2"), "127.0.0.1"),
        (b"\x00garbage", "127.0.0.1"),
        (frame()[:-5], "127.0.0.1"),
        (frame(), "198.51.100.7"),  # not in the allow-list
    ]
    allow = AllowList([ipaddress.ip_network("127.0.0.0/8")])
    listener_stats, stream_stats = ListenerStats(), ListenerStats()
    by_listener, by_stream = _Taken(), _Taken()
    listener_gate, stream_gate = HepGate(keys), HepGate(keys)
    protocol = HepUdpProtocol(
        by_listener,  # type: ignore[arg-type]
        allow,
        listener_gate,
        listener_stats,
        clock,
    )
    for data, source in datagrams:
        protocol.datagram_received(data, (source, 40000))
        if allow.permits(source):
            stream_stats.count_received("hep_udp")
            handle_hep(by_stream, stream_gate, stream_stats, "hep_udp", data, clock)  # type: ignore[arg-type]
        else:
            stream_stats.drop("hep_udp", "not_allowed")
    assert by_listener.packets == by_stream.packets
    assert len(by_listener.packets) == (3 if keys else 6)
    assert listener_stats.received == stream_stats.received == {"hep_udp": 9}
    assert listener_stats.dropped == stream_stats.dropped
    assert listener_stats.dropped[("hep_udp", "not_allowed")] == 1
    assert listener_stats.dropped[("hep_udp", "not_sip")] == 1
    assert listener_stats.dropped[("hep_udp", "bad_hep")] == 2
    assert listener_stats.dropped.get(("hep_udp", "bad_key"), 0) == (3 if keys else 0)
    assert listener_stats.timestamps_replaced == stream_stats.timestamps_replaced == 1
    assert listener_gate.rejected == stream_gate.rejected
