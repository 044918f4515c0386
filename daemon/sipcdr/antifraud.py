"""The fraud stage as the daemon runs it: built from the config once the spool for its
alerts is open, its learnt baselines kept across restarts, its counts exported.

The baselines (each trunk's normal per hour of the day) are saved in the state
directory at a stop and every `SAVE_INTERVAL_S`, and loaded at start, so a restart
does not begin another day of learning; a crash costs at most that interval of it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Final, Protocol

import structlog

from sipcdr.config import Config
from sipcdr.enrich.trunks import trunk_resolver
from sipcdr.fraud.stage import AlertWriter, FraudStage
from sipcdr.private import read_private, write_private
from sipcdr.telemetry.metrics import Metrics

BASELINES_FILE: Final = "fraud-baselines.json"
SAVE_INTERVAL_S: Final = 600.0


class _Incrementable(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class DaemonFraud:
    """A `FraudStage` with what the daemon adds around it; `stage` goes in the chain."""

    def __init__(self, stage: FraudStage, state_dir: Path) -> None:
        self.stage = stage
        self.path = state_dir / BASELINES_FILE
        self.log = structlog.get_logger("sipcdr.fraud")
        self._saved_at = time.monotonic()
        self._exported: dict[tuple[str, ...], int] = {}

    @classmethod
    def build(cls, config: Config, alerts: AlertWriter | None) -> DaemonFraud | None:
        """None when `[fraud] enabled = false` or no sink keeps records (no spool)."""
        settings = config.fraud.settings
        if not settings.enabled or alerts is None:
            return None
        stage = FraudStage(
            settings, alerts, trunk_resolver(config.trunks), rating=bool(config.rating.decks)
        )
        fraud = cls(stage, Path(config.state.dir))
        for detector, reason in stage.monitor.stats.inactive.items():
            fraud.log.info("fraud_detector_inactive", detector=detector, reason=reason)
        fraud.restore()
        return fraud

    def restore(self) -> None:
        try:
            saved = read_private(self.path)
            if saved is not None:
                restored = self.stage.monitor.restore(saved, time.time())
                self.log.info("fraud_baselines_restored", baselines=restored)
        except (OSError, ValueError) as exc:
            # Costs a day of learning, nothing else: the detectors start afresh.
            self.log.warning("fraud_baselines_not_restored", file=str(self.path), error=str(exc))

    def save(self) -> None:
        """Replace the last save whole: a crash mid-write leaves the one before."""
        self._saved_at = time.monotonic()
        partial = self.path.with_name(self.path.name + ".new")
        write_private(partial, self.stage.monitor.snapshot())
        os.replace(partial, self.path)

    def tick(self, now: float) -> None:
        self.stage.tick(now)
        if time.monotonic() - self._saved_at >= SAVE_INTERVAL_S:
            self.save()

    def export_metrics(self, metrics: Metrics) -> None:
        """The monitor's running totals into Prometheus, as deltas."""
        stats = self.stage.monitor.stats
        series: list[tuple[tuple[str, ...], _Incrementable, int]] = [
            (("alerts", d, s), metrics.fraud_alerts.labels(d, s), n)
            for (d, s), n in stats.alerts.items()
        ]
        series += [
            (("suppressed", d), metrics.fraud_alerts_suppressed.labels(d), n)
            for d, n in stats.suppressed.items()
        ]
        series += [
            (("evicted", d), metrics.fraud_subjects_evicted.labels(d), n)
            for d, n in stats.evicted.items()
        ]
        series += [
            (("errors", step), metrics.fraud_errors.labels(step), n)
            for step, n in self.stage.stats.errors.items()
        ]
        exported = self._exported
        for key, counter, total in series:
            delta = total - exported.get(key, 0)
            if delta > 0:
                exported[key] = total
                counter.inc(delta)
                if key[0] == "errors":
                    # A bug: said once a tick at most, never per message.
                    self.log.error("fraud_check_failed", step=key[1], times=delta, total=total)
        for detector, held in stats.tracked.items():
            metrics.fraud_subjects_tracked.labels(detector).set(held)
