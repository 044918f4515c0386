"""The engine: one chain, built whole from a Config and the writers it is handed, the
same for the daemon, an import and a topic replay."""

from __future__ import annotations

import ipaddress

from sipcalls import CALLER_ADDR, Call, CdrCollector, answered_call_messages, packet
from sipcdr.config import Config
from sipcdr.config.schema import TrunkConfig
from sipcdr.engine import Destinations, build_engine, correlate_events
from sipcdr.model import FraudAlert
from sipcdr.sip import parse
from sipcdr.sipevent import event_of

T0 = 1_700_000_000.0
TRUNKS = (
    TrunkConfig(
        "carrier-a",
        (ipaddress.ip_network(f"{CALLER_ADDR[0]}/32"),),
        country_code="49",
        national_prefix="0",
    ),
)


class Alerts:
    def __init__(self) -> None:
        self.alerts: list[FraudAlert] = []

    def write_alert(self, alert: FraudAlert) -> bool:
        self.alerts.append(alert)
        return True


def test_the_chain_is_enrich_rate_fraud_with_fraud_on_messages() -> None:
    engine = build_engine(Config(), Destinations([CdrCollector()], alerts=Alerts()))
    pipeline = engine.pipeline
    # Enrich and rate run as one stage, in one copy of the CDR.
    assert [stage.name for stage in pipeline.stages] == ["enrich+rate", "fraud"]
    assert [stage.name for stage in pipeline.message_stages] == ["fraud"]
    assert [stage.name for stage in engine.timed] == ["fraud"]


def test_without_a_writer_for_alerts_the_chain_has_no_fraud_stage() -> None:
    engine = build_engine(Config(), Destinations([CdrCollector()]))
    assert [stage.name for stage in engine.pipeline.stages] == ["enrich+rate"]
    assert engine.pipeline.message_stages == () and engine.timed == ()


def test_a_call_through_the_engine_comes_out_enriched_and_counted() -> None:
    collector = CdrCollector()
    engine = build_engine(Config(trunks=TRUNKS), Destinations([collector], alerts=Alerts()))
    call = Call(callee="0301234567")
    for offset, data in enumerate(answered_call_messages(call)):
        engine.process(packet(T0 + offset, data))
    (cdr,) = collector.cdrs
    assert (cdr.trunk, cdr.callee, cdr.egress_ip) == ("carrier-a", "49301234567", None)
    assert engine.enrich.stats.kpis["carrier-a"].answered == 1


def test_the_tick_closes_due_calls_through_the_stages() -> None:
    collector = CdrCollector()
    engine = build_engine(Config(trunks=TRUNKS), Destinations([collector]))
    engine.process(packet(T0, Call().request("INVITE")))
    engine.tick(T0 + 3600.0)  # far past the ring timeout
    (cdr,) = collector.cdrs
    assert cdr.trunk == "carrier-a"


def test_sip_events_feed_the_same_chain() -> None:
    messages = answered_call_messages(Call(callee="0301234567"))
    events = [
        event_of(packet(T0 + offset, data), parse(data)) for offset, data in enumerate(messages)
    ]
    replayed, direct = CdrCollector(), CdrCollector()
    correlate_events(Config(trunks=TRUNKS), events, Destinations([replayed]))
    engine = build_engine(Config(trunks=TRUNKS), Destinations([direct]))
    for offset, data in enumerate(messages):
        engine.process(packet(T0 + offset, data))
    assert [c.to_record() for c in replayed.cdrs] == [c.to_record() for c in direct.cdrs]
    assert replayed.cdrs[0].callee == "49301234567"
