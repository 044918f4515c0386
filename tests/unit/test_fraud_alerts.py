"""Alerts: one incident is one alert, updated at a bounded pace, with an id that does
not change; the record validates against schemas/fraud_alert.v1.schema.json."""

from __future__ import annotations

import itertools
import json
from decimal import Decimal
from pathlib import Path

import jsonschema
from sipcdr.fraud import FraudMonitor, FraudSettings
from sipcdr.fraud.incidents import FraudStats, Incidents
from sipcdr.fraud.settings import SCANNER, ScannerSettings, Threshold
from sipcdr.model import FraudAlert, alert_id
from trafficgen import CORE_IP, Timeline, make_call, request

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "schemas" / "fraud_alert.v1.schema.json").read_text()
)
T0 = 1_700_000_000.0
CDR_ID = "9b2f6a4c-1d3e-5f70-8a9b-0c1d2e3f4a5b"


def _incidents(**changes: float) -> tuple[Incidents, FraudStats]:
    stats = FraudStats()
    options: dict[str, float] = {
        "cooldown_s": 1800,
        "update_interval_s": 60,
        "max_new_per_minute": 100,
        "example_calls": 3,
        **changes,
    }
    return Incidents(
        stats,
        cooldown_s=options["cooldown_s"],
        update_interval_s=options["update_interval_s"],
        max_new_per_minute=int(options["max_new_per_minute"]),
        example_calls=int(options["example_calls"]),
    ), stats


def _report(
    incidents: Incidents,
    out: list[FraudAlert],
    now: float,
    observed: int,
    subject: str = "192.0.2.1",
    call_id: str | None = None,
) -> None:
    incidents.report(
        out, "cps_burst", "source_ip", subject, observed, (10, 50), 10, now, call_id=call_id
    )


def test_the_record_of_a_count_and_of_money_validate_against_the_schema() -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    count = FraudAlert(
        alert_id=alert_id("scanner", "source_ip", "192.0.2.1", T0),
        detector="scanner",
        subject="192.0.2.1",
        subject_kind="source_ip",
        severity="warning",
        window_s=300,
        observed=1,
        threshold=1,
        raised_at=T0,
        first_seen=T0,
        last_seen=T0,
        call_ids=("a@b",),
        details={"user_agent": "friendly-scanner"},
    )
    money = FraudAlert(
        alert_id=alert_id("spend_velocity", "trunk", "pbx", T0),
        detector="spend_velocity",
        subject="pbx",
        subject_kind="trunk",
        severity="critical",
        window_s=3600,
        observed=Decimal("5012.5"),
        threshold=Decimal("4999.99"),
        raised_at=T0,
        first_seen=T0 - 3000,
        last_seen=T0 + 60,
        cdr_ids=(CDR_ID,),
        call_ids=("c@d",),
        details={"currency": "EUR"},
        revision=3,
    )
    for alert in (count, money):
        errors = [e.message for e in validator.iter_errors(alert.to_record())]
        assert errors == []
        assert set(alert.to_record()) == set(SCHEMA["properties"])  # never absent
    record = money.to_record()
    assert (record["count"], record["threshold"]) == (5012, 5000)  # whole units, limit up
    assert (record["observed"], record["threshold_value"]) == ("5012.5", "4999.99")
    assert record["first_seen"] == "2023-11-14T21:23:20.000000Z"


def test_the_extended_schema_still_takes_a_record_without_the_new_fields() -> None:
    # v1 grows additively: what was written before the new fields stays valid.
    record = {
        "alert_id": alert_id("wangiri", "caller", "4940111222", T0),
        "raised_at": "2026-11-23T14:40:45.123456Z",
        "detector": "wangiri",
        "subject": "4940111222",
        "severity": "critical",
        "window_s": 300,
        "count": 51,
        "threshold": 50,
        "cdr_ids": [CDR_ID],
        "details": {},
        "schema_version": 1,
    }
    assert list(jsonschema.Draft202012Validator(SCHEMA).iter_errors(record)) == []


def test_an_incident_is_one_alert_updated_with_its_id_kept() -> None:
    incidents, stats = _incidents()
    out: list[FraudAlert] = []
    for i in range(600):  # ten minutes over the threshold, a report a second
        _report(incidents, out, T0 + i, 10 + i // 60, call_id=f"c{i}")
        incidents.tick(T0 + i, out)
    assert out[0].revision == 0
    assert len({a.alert_id for a in out}) == 1
    assert [a.revision for a in out] == list(range(len(out)))
    assert 9 <= len(out) <= 11  # one record a minute, not one per report
    assert out[-1].observed == 19
    assert out[-1].call_ids == ("c0", "c1", "c2")  # a few examples, not all
    assert stats.alerts == {("cps_burst", "warning"): 1}
    assert stats.updates == len(out) - 1


def test_the_same_input_gives_the_same_alert_ids() -> None:
    ids = []
    for _ in range(2):
        incidents, _stats = _incidents()
        out: list[FraudAlert] = []
        _report(incidents, out, T0, 12)
        ids.append(out[0].alert_id)
    assert ids[0] == ids[1] == alert_id("cps_burst", "source_ip", "192.0.2.1", T0)


def test_escalation_to_critical_goes_out_at_once() -> None:
    incidents, stats = _incidents()
    out: list[FraudAlert] = []
    _report(incidents, out, T0, 10)
    _report(incidents, out, T0 + 1, 60)
    assert [(a.severity, a.revision, a.threshold) for a in out] == [
        ("warning", 0, 10),
        ("critical", 1, 50),
    ]
    assert stats.alerts == {("cps_burst", "warning"): 1, ("cps_burst", "critical"): 1}


def test_a_pause_shorter_than_the_cooldown_is_the_same_incident() -> None:
    incidents, _stats = _incidents()
    out: list[FraudAlert] = []
    _report(incidents, out, T0, 10)
    _report(incidents, out, T0 + 1799, 11)
    _report(incidents, out, T0 + 1799 + 1801, 12)
    first, later = out[0], out[-1]
    assert later.alert_id != first.alert_id
    assert [a.alert_id for a in out].count(first.alert_id) == 2  # raised, then closed with news
    assert out[1].last_seen == T0 + 1799


def test_a_closed_incident_sends_what_it_gained_since_its_last_record() -> None:
    incidents, _stats = _incidents()
    out: list[FraudAlert] = []
    _report(incidents, out, T0, 10)
    _report(incidents, out, T0 + 5, 15)
    incidents.tick(T0 + 10, out)
    assert len(out) == 1  # the update is not due yet
    incidents.tick(T0 + 5 + 1801, out)
    assert [(a.revision, a.observed, a.last_seen) for a in out] == [(0, 10, T0), (1, 15, T0 + 5)]
    assert len(incidents) == 0


def test_past_the_new_alert_rate_the_rest_are_counted_not_sent() -> None:
    incidents, stats = _incidents(max_new_per_minute=100)
    out: list[FraudAlert] = []
    for i in range(150):
        _report(incidents, out, T0 + i * 0.1, 10, subject=f"192.0.2.{i}")
    assert len(out) == 100
    assert stats.suppressed == {"cps_burst": 50}
    _report(incidents, out, T0 + 120, 10, subject="198.51.100.1")  # the next minute
    assert len(out) == 101


def test_a_botnet_sweep_is_bounded_end_to_end() -> None:
    timeline = Timeline()
    for i in range(2000):
        source = f"10.{i // 250}.{i % 250}.1"
        msg = request("OPTIONS", f"s{i}", caller="x", callee="100", user_agent="friendly-scanner")
        timeline.add_message(T0 + i * 0.01, msg, source, CORE_IP)
    monitor = FraudMonitor(
        FraudSettings(scanner=ScannerSettings(per_source=Threshold(1, 100, 300)))
    )
    timeline.run(monitor, lambda _address: None)
    assert len(timeline.alerts) == 100
    assert monitor.stats.suppressed == {SCANNER: 1900}


def test_expire_sends_due_updates_while_the_attack_runs() -> None:
    timeline = Timeline()
    for i in range(300):
        call = make_call(
            f"p{i}",
            T0 + i * 2,
            source="10.0.0.1",
            trunk=None,
            caller="4930111",
            callee=f"37190{i * 7919 % 10**6:06d}",
            talk=30,
        )
        timeline.add_call(call)
    monitor = FraudMonitor()
    timeline.run(monitor, lambda _address: None)
    revisions = [a for a in timeline.alerts if a.subject == "10.0.0.1"]
    # Ten minutes of attack: raised, escalated once, then updated about once a minute.
    assert 10 <= len(revisions) <= 13
    assert len({a.alert_id for a in revisions}) == 1
    paced = [a for a in revisions if a.severity == revisions[-1].severity][1:]
    assert all(b.last_seen - a.last_seen >= 55 for a, b in itertools.pairwise(paced))
