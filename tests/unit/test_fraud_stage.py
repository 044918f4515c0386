"""The fraud stage in the pipeline: messages reach the monitor with their source's
trunk, closed calls leave with their fraud_flags, alerts go to the alert writer and
through the spool to JSONL when it is the only sink; a monitor error costs a check,
never a call."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from decimal import Decimal
from ipaddress import ip_network
from pathlib import Path

import orjson
import pytest
from sipcalls import CALLER_ADDR, Call, CdrCollector, answered_call_messages, packet
from sipcdr.config import TrunkConfig
from sipcdr.dialog import Correlator
from sipcdr.enrich.trunks import TrunkLookup, trunk_resolver
from sipcdr.fraud import FraudMonitor, FraudSettings
from sipcdr.fraud.settings import (
    AUTH_FAILURES,
    SCANNER,
    MoneyThreshold,
    ScannerSettings,
    SpendVelocitySettings,
    Threshold,
)
from sipcdr.fraud.stage import FraudStage
from sipcdr.fraud.tap import MessageTap
from sipcdr.hotpath import load_interpreted
from sipcdr.model import Cdr, FraudAlert, Packet, Trunk
from sipcdr.pipeline import Pipeline
from sipcdr.sinks.base import KIND_ALERT, KIND_CDR, STREAM_RECORDS
from sipcdr.sinks.jsonl import JsonlSink
from sipcdr.sinks.outputs import SpoolAlertWriter, SpoolCdrWriter
from sipcdr.sip import parse
from sipcdr.spool import Spool

T0 = 1_700_000_000.0
SCANNER_UA = "User-Agent: friendly-scanner"


class AlertCollector:
    def __init__(self, refuse: bool = False) -> None:
        self.alerts: list[FraudAlert] = []
        self.refuse = refuse

    def write_alert(self, alert: FraudAlert) -> bool:
        if self.refuse:
            return False
        self.alerts.append(alert)
        return True


def scan_options(call_id: str, user: str) -> bytes:
    """An svmap-style OPTIONS: out of dialog, a scanning tool's User-Agent."""
    call = Call(call_id=call_id, callee=user)
    request = call.request("OPTIONS").decode()
    return request.replace("User-Agent: TestUA/1.0", SCANNER_UA).encode()


def cancelled_call(call: Call, user_agent: str | None = None) -> list[bytes]:
    invite = call.request("INVITE")
    if user_agent is not None:
        invite = invite.replace(b"User-Agent: TestUA/1.0", user_agent.encode())
    return [
        invite,
        call.response(180, "Ringing"),
        call.request("CANCEL"),
        call.response(200, "OK", method="CANCEL"),
        call.response(487, "Request Terminated"),
    ]


def pipeline_with(stage: FraudStage) -> tuple[Pipeline, CdrCollector]:
    collector = CdrCollector()
    pipeline = Pipeline(Correlator(), [collector], (stage,), (stage,))
    return pipeline, collector


def test_a_scan_raises_one_alert_while_it_runs_and_flags_the_calls_it_made() -> None:
    alerts = AlertCollector()
    stage = FraudStage(FraudSettings(), alerts)
    pipeline, collector = pipeline_with(stage)
    for n in range(20):
        pipeline.process(packet(T0 + n * 0.01, scan_options(f"scan-{n}", f"{100 + n}")))
    # One incident, raised at the first request, before any call closed.
    assert [(a.detector, a.subject, a.revision) for a in alerts.alerts] == [
        (SCANNER, CALLER_ADDR[0], 0)
    ]
    assert stage.stats.alerts_written == 1
    assert stage.monitor.stats.alerts == {(SCANNER, "warning"): 1}

    call = Call(call_id="probe-call@192.0.2.10", callee="+4930999")
    for offset, data in enumerate(cancelled_call(call, SCANNER_UA)):
        pipeline.process(packet(T0 + 1 + offset * 0.1, data))
    [cdr] = collector.cdrs
    assert cdr.fraud_flags == (SCANNER,)


def test_ordinary_calls_pass_unflagged_and_raise_nothing() -> None:
    """Answered calls from one caller to scattered numbers, one at a time."""
    alerts = AlertCollector()
    pipeline, collector = pipeline_with(FraudStage(FraudSettings(), alerts))
    for n in range(30):
        call = Call(call_id=f"call-{n}@192.0.2.10", callee=f"+4930333{n * 37:04d}")  # not a run
        for offset, data in enumerate(answered_call_messages(call)):
            pipeline.process(packet(T0 + n * 20 + offset, data))
    assert len(collector.cdrs) == 30
    assert [cdr.fraud_flags for cdr in collector.cdrs if cdr.fraud_flags] == []
    assert alerts.alerts == []


def test_the_trunk_of_a_source_is_looked_up_once_and_given_to_the_monitor() -> None:
    lookups: list[str] = []
    trunk = Trunk("carrier-a", "49", "0", None)

    def resolve(source: str) -> Trunk | None:
        lookups.append(source)
        return trunk if source == CALLER_ADDR[0] else None

    # Run from source: a compiled stage's monitor cannot be replaced by a spy.
    modules = load_interpreted()
    stage = modules["sipcdr.fraud.stage"].FraudStage(
        FraudSettings(), AlertCollector(), TrunkLookup(resolve)
    )
    seen: list[str | None] = []
    real = stage.monitor

    class Spy:
        """The monitor, with the trunk each message is given noted."""

        def on_message(self, msg: object, pkt: Packet, now: float, name: str | None) -> object:
            seen.append(name)
            return real.on_message(msg, pkt, now, name)

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

    stage.monitor = Spy()
    pipeline = modules["sipcdr.pipeline"].Pipeline(
        modules["sipcdr.dialog.correlator"].Correlator(), [CdrCollector()], (stage,), (stage,)
    )
    call = Call()
    for offset, data in enumerate(cancelled_call(call)):
        pipeline.process(packet(T0 + offset, data))
    # Requests carry their source's trunk; final responses none (the monitor judges
    # them by their call's, or looks up the requester's itself); the 180, which the
    # monitor ignores, is not handed to it.
    assert seen == ["carrier-a", "carrier-a", None, None]
    assert lookups == [CALLER_ADDR[0]]
    assert stage.trunk_name("203.0.113.99") is None


def test_the_stage_uses_the_configured_trunk_lookup() -> None:
    trunks = (TrunkConfig("carrier-a", (ip_network("192.0.2.0/24"),), country_code="49"),)
    stage = FraudStage(FraudSettings(), AlertCollector(), trunk_resolver(trunks))
    assert stage.trunk_name("192.0.2.77") == "carrier-a"
    assert stage.trunk_name("198.51.100.7") is None


def test_the_cost_a_rating_stage_set_counts_towards_spend() -> None:
    settings = FraudSettings(
        spend_velocity=SpendVelocitySettings(
            per_trunk=MoneyThreshold(Decimal(10), Decimal(100), 3600)
        )
    )
    alerts = AlertCollector()
    stage = FraudStage(settings, alerts, rating=True)
    base = Cdr(
        cdr_id="9b2f6a4c-1d3e-5f70-8a9b-0c1d2e3f4a5b",
        call_id="c1",
        caller="4940111",
        callee="4930222",
        from_uri="sip:a@x",
        to_uri="sip:b@x",
        request_uri="sip:b@x",
        src_ip="192.0.2.1",
        src_port=5060,
        dst_ip="198.51.100.1",
        dst_port=5060,
        trunk="carrier-a",
        start_time=T0,
        ring_time=T0 + 1,
        answer_time=T0 + 2,
        end_time=T0 + 600,
        pdd_ms=1000,
        disposition="answered",
        sip_code=200,
        sip_reason=None,
        q850_cause=None,
        hangup_by="caller",
        end_reason="bye",
        user_agent=None,
        capture_node="test",
        rated=True,
        cost=Decimal("6.5"),
        currency="EUR",
        fraud_flags=("earlier_stage",),
    )
    first = stage.on_cdr(base)
    assert first is base  # nothing to add: the same record goes on
    second = stage.on_cdr(dataclasses.replace(base, call_id="c2", end_time=T0 + 700))
    assert second.fraud_flags == ("earlier_stage", "spend_velocity")
    assert [a.detector for a in alerts.alerts] == ["spend_velocity"]
    assert alerts.alerts[0].observed == Decimal(13)


def test_a_monitor_error_costs_the_check_not_the_call_and_is_counted() -> None:
    # Run from source: a compiled stage's monitor cannot be replaced.
    modules = load_interpreted()
    stage = modules["sipcdr.fraud.stage"].FraudStage(FraudSettings(), AlertCollector())

    class Broken:
        def on_message(self, *_args: object) -> None:
            raise RuntimeError("bug")

        on_cdr = expire = on_message

    stage.monitor = Broken()
    collector = CdrCollector()
    pipeline = modules["sipcdr.pipeline"].Pipeline(
        modules["sipcdr.dialog.correlator"].Correlator(), [collector], (stage,), (stage,)
    )
    for offset, data in enumerate(cancelled_call(Call())):
        pipeline.process(packet(T0 + offset, data))
    stage.tick(T0 + 10)
    assert len(collector.cdrs) == 1
    assert collector.cdrs[0].fraud_flags == ()
    # Every message handed to the monitor: all but the 180.
    assert stage.stats.errors == {"message": 4, "cdr": 1, "tick": 1}


def test_alerts_the_writer_refuses_are_counted() -> None:
    stage = FraudStage(FraudSettings(), AlertCollector(refuse=True))
    pipeline, _ = pipeline_with(stage)
    pipeline.process(packet(T0, scan_options("scan-1", "100")))
    assert (stage.stats.alerts_written, stage.stats.alerts_refused) == (0, 1)


def test_a_stage_that_raises_into_the_pipeline_is_counted_as_a_drop() -> None:
    class Broken:
        name = "broken"

        def on_message(self, packet: Packet, msg: object) -> None:
            raise RuntimeError("bug")

        def on_cdr(self, cdr: Cdr) -> Cdr:
            raise RuntimeError("bug")

    collector = CdrCollector()
    pipeline = Pipeline(Correlator(), [collector], (Broken(),), (Broken(),))
    for offset, data in enumerate(cancelled_call(Call())):
        pipeline.process(packet(T0 + offset, data))
    assert len(collector.cdrs) == 1
    assert pipeline.stats.internal_errors == {"broken": 6}


def test_a_raising_message_stage_does_not_keep_the_next_one_from_its_messages() -> None:
    class Broken:
        name = "broken"

        def on_message(self, packet: Packet, msg: object) -> None:
            raise RuntimeError("bug")

    class Counting:
        name = "counting"

        def __init__(self) -> None:
            self.seen = 0

        def on_message(self, packet: Packet, msg: object) -> None:
            self.seen += 1

    counting = Counting()
    collector = CdrCollector()
    pipeline = Pipeline(Correlator(), [collector], (), (Broken(), counting))
    messages = cancelled_call(Call())
    for offset, data in enumerate(messages):
        pipeline.process(packet(T0 + offset, data))
    assert counting.seen == len(messages)
    assert len(collector.cdrs) == 1
    assert pipeline.stats.internal_errors == {"broken": len(messages)}


@pytest.mark.parametrize("only_sink", [True, False])
def test_alerts_reach_the_jsonl_file_only_when_it_is_the_only_sink(
    tmp_path: Path, only_sink: bool
) -> None:
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o700)
    spool = Spool(directory / STREAM_RECORDS, ("jsonl",))
    spool.open()
    stage = FraudStage(
        FraudSettings(scanner=ScannerSettings(per_source=Threshold(1, 100, 300))),
        SpoolAlertWriter(spool),
    )
    collector = SpoolCdrWriter(spool)
    pipeline = Pipeline(Correlator(), [collector], (stage,), (stage,))
    pipeline.process(packet(T0, scan_options("scan-1", "100")))
    for offset, data in enumerate(cancelled_call(Call())):
        pipeline.process(packet(T0 + 1 + offset, data))
    records = spool.reader("jsonl").read(100, 1 << 20)
    assert [r.kind for r in records] == [KIND_ALERT, KIND_CDR]
    assert records[0].key == CALLER_ADDR[0].encode()
    assert orjson.loads(records[0].value)["detector"] == SCANNER

    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    sink = JsonlSink(out / "cdrs.jsonl", alerts=only_sink)

    async def deliver() -> None:
        await sink.start()
        await sink.deliver(STREAM_RECORDS, records)
        await sink.stop()

    asyncio.run(deliver())
    spool.close()
    lines = [json.loads(line) for line in (out / "cdrs.jsonl").read_text().splitlines()]
    kinds = ["alert" if "alert_id" in line else "cdr" for line in lines]
    assert kinds == (["alert", "cdr"] if only_sink else ["cdr"])


def test_the_tap_leaves_the_monitor_nothing_it_would_have_judged() -> None:
    """The tap skips provisional responses and requests inside a dialog: what every
    detector then finds must be what the monitor finds when handed every message.
    Scans by OPTIONS and REGISTER, challenged REGISTERs and INVITEs (401, 407, 403),
    OPTIONS inside a dialog and answered calls, from several sources."""
    flows: list[tuple[bytes, bool]] = []
    for n in range(70):
        scan = Call(call_id=f"scan-{n}", callee=f"{200 + n}")
        flows.append((scan_options(f"opt-{n}", f"{100 + n}"), True))
        flows.append((scan.request("REGISTER", extra=[SCANNER_UA]), True))
        flows.append((scan.response(401, "Unauthorized", method="REGISTER"), False))
        # The credentials sent with the second REGISTER are refused too: a failure.
        flows.append((scan.request("REGISTER", 2, "z9hG4bK-reg-2"), True))
        flows.append((scan.response(401, "Unauthorized", 2, "REGISTER", "z9hG4bK-reg-2"), False))
        invite = Call(call_id=f"auth-{n}", callee=f"+4930555{n:04d}")
        flows.append((invite.request("INVITE"), True))
        flows.append((invite.response(100, "Trying", to_tag=None), False))
        flows.append((invite.response((407, 403)[n % 2], "Denied"), False))
        call = Call(call_id=f"call-{n}", callee=f"+4930333{n * 37:04d}")
        messages = answered_call_messages(call)
        flows += [(data, data.startswith((b"INVITE", b"ACK", b"BYE"))) for data in messages[:4]]
        flows.append((call.request("OPTIONS", 3, "z9hG4bK-opt", to_tag="callee-tag"), True))
        flows += [(data, not data.startswith(b"SIP/2.0")) for data in messages[4:]]

    def run(tapped: bool) -> tuple[list[tuple[str, str, int]], object]:
        monitor = FraudMonitor(FraudSettings())
        found: list[FraudAlert] = []
        tap = MessageTap(monitor, None, found.extend, lambda step: None)
        for index, (data, request) in enumerate(flows):
            # Requests from two sources to one server, responses back to them.
            requester, server = (f"198.51.100.{index // 9 % 2 + 1}", 5060), CALLER_ADDR
            src, dst = (requester, server) if request else (server, requester)
            captured = packet(T0 + index * 0.01, data, src, dst)
            if tapped:
                tap.on_message(captured, parse(data))
            else:
                found += monitor.on_message(parse(data), captured, captured.timestamp, None)
        found += monitor.expire(T0 + 3600)
        counts = (monitor.stats.alerts, monitor.stats.tracked, monitor.tracked_calls)
        return [(a.detector, a.subject, a.revision) for a in found], counts

    alerts, counts = run(tapped=True)
    assert {detector for detector, _, _ in alerts} >= {SCANNER, AUTH_FAILURES}
    assert (alerts, counts) == run(tapped=False)
