"""The fraud stage as the daemon runs it: built from the config (or not at all), the
learnt baselines saved privately and loaded by the next start, the monitor's counts
exported to Prometheus as deltas."""

from __future__ import annotations

import stat
from ipaddress import ip_network
from pathlib import Path

from sipcalls import CALLER_ADDR, Call, packet
from sipcdr.antifraud import BASELINES_FILE, SAVE_INTERVAL_S, DaemonFraud
from sipcdr.clock import FakeClock
from sipcdr.config import Config, FraudConfig, StateConfig, TrunkConfig
from sipcdr.fraud import FraudSettings, TrunkSettings
from sipcdr.fraud.settings import CONCURRENT_CALLS, INTERNATIONAL_SURGE
from sipcdr.model import FraudAlert
from sipcdr.private import private_dir
from sipcdr.sip import parse
from sipcdr.telemetry.metrics import Metrics, Sources
from structlog.testing import capture_logs

T0 = 1_700_000_000.0
SCAN = (
    Call(call_id="scan-1", callee="100")
    .request("OPTIONS")
    .replace(b"User-Agent: TestUA/1.0", b"User-Agent: friendly-scanner")
)


class Alerts:
    def __init__(self) -> None:
        self.alerts: list[FraudAlert] = []

    def write_alert(self, alert: FraudAlert) -> bool:
        self.alerts.append(alert)
        return True


def config(tmp_path: Path, settings: FraudSettings | None = None) -> Config:
    state = private_dir(tmp_path / "state")
    trunk = TrunkConfig("pbx", (ip_network("192.0.2.0/24"),), country_code="49")
    # As load_config builds it: the trunk's numbering in the fraud settings too.
    settings = settings or FraudSettings(trunks={"pbx": TrunkSettings(country_code="49")})
    return Config(trunks=(trunk,), fraud=FraudConfig(settings), state=StateConfig(dir=state))


def test_nothing_is_built_when_switched_off_or_without_a_spool(tmp_path: Path) -> None:
    assert DaemonFraud.build(config(tmp_path, FraudSettings(enabled=False)), Alerts()) is None
    assert DaemonFraud.build(config(tmp_path), None) is None


def test_learnt_baselines_are_saved_privately_and_loaded_by_the_next_start(tmp_path: Path) -> None:
    first = DaemonFraud.build(config(tmp_path), Alerts())
    assert first is not None
    monitor = first.stage.monitor
    monitor.international_surge.baseline(0.3).restore({"pbx": [5.0] * 24}, T0)
    first.save()
    saved = tmp_path / "state" / BASELINES_FILE
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert not saved.with_name(saved.name + ".new").exists()

    second = DaemonFraud.build(config(tmp_path), Alerts())
    assert second is not None
    snapshot = second.stage.monitor.snapshot()
    assert snapshot == monitor.snapshot()
    assert b'"pbx"' in snapshot
    assert INTERNATIONAL_SURGE in snapshot.decode()
    assert CONCURRENT_CALLS in snapshot.decode()


def test_an_unreadable_save_costs_the_learning_not_the_start(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    (tmp_path / "state" / BASELINES_FILE).write_bytes(b"not json")
    (tmp_path / "state" / BASELINES_FILE).chmod(0o600)
    fraud = DaemonFraud.build(cfg, Alerts())
    assert fraud is not None
    assert fraud.stage.monitor.international_surge.baselines == {}


def test_counts_are_exported_with_detector_labels_only(tmp_path: Path) -> None:
    alerts = Alerts()
    fraud = DaemonFraud.build(config(tmp_path), alerts)
    assert fraud is not None
    metrics = Metrics(lambda: Sources(fraud=fraud.stage))
    fraud.stage.on_message(packet(T0, SCAN), parse(SCAN))
    value = metrics.registry.get_sample_value
    assert value("sipcdr_fraud_alerts_total", {"detector": "scanner", "severity": "warning"}) == 1
    labels = {"detector": "scanner", "severity": "warning"}
    assert value("sipcdr_fraud_alerts_total", labels) == 1
    # The address is held twice: by the User-Agent count and by the probing count.
    assert value("sipcdr_fraud_subjects_tracked", {"detector": "scanner"}) == 2
    fraud.stage.stats.errors["message"] = 2  # as a detector fault would count it
    with capture_logs() as logs:
        fraud.log_failures()
        fraud.log_failures()  # nothing new: said once
    assert [(e["event"], e["times"]) for e in logs] == [("fraud_check_failed", 2)]
    assert value("sipcdr_fraud_errors_total", {"step": "message"}) == 2
    exported = "\n".join(
        f"{sample.labels}" for family in metrics.registry.collect() for sample in family.samples
    )
    assert CALLER_ADDR[0] not in exported  # no address in any label
    assert [a.subject for a in alerts.alerts] == [CALLER_ADDR[0]]


def test_the_baselines_are_saved_each_save_interval_of_the_daemons_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    fraud = DaemonFraud.build(config(tmp_path), Alerts(), clock)
    assert fraud is not None
    saved = tmp_path / "state" / BASELINES_FILE
    clock.advance(SAVE_INTERVAL_S - 1)
    fraud.tick(clock.time())
    assert not saved.exists()
    clock.advance(1)
    fraud.tick(clock.time())
    assert saved.exists()
    saved.unlink()
    clock.advance(SAVE_INTERVAL_S - 1)
    fraud.tick(clock.time())
    assert not saved.exists()  # the interval counts from the last save
