"""The fraud stage as the daemon runs it: built from the config once the spool for its
alerts is open, its learnt baselines kept across restarts, its counts exported.

The baselines (each trunk's normal per hour of the day) are saved in the state
directory at a stop and every `SAVE_INTERVAL_S`, and loaded at start, so a restart
does not begin another day of learning; a crash costs at most that interval of it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import structlog

from sipcdr.clock import SYSTEM_CLOCK, Clock
from sipcdr.config import Config
from sipcdr.enrich.trunks import TrunkLookup
from sipcdr.fraud.stage import AlertWriter, FraudStage
from sipcdr.private import read_private, write_private

BASELINES_FILE: Final = "fraud-baselines.json"
SAVE_INTERVAL_S: Final = 600.0


def fraud_stage(
    config: Config, alerts: AlertWriter | None, trunks: TrunkLookup | None = None
) -> FraudStage | None:
    """The fraud stage of `config`, fresh (no learnt baselines): an import's. None when
    `[fraud] enabled = false` or nothing takes its alerts (no sink keeps records).
    `trunks`: the engine's lookup, shared with the enrich stage."""
    settings = config.fraud.settings
    if not settings.enabled or alerts is None:
        return None
    return FraudStage(
        settings,
        alerts,
        TrunkLookup.of(config.trunks) if trunks is None else trunks,
        rating=bool(config.rating.decks),
    )


class DaemonFraud:
    """A `FraudStage` with what the daemon adds around it: `stage` goes in the chain,
    and this is the timed stage the engine ticks (the stage's tick, then a save when
    due)."""

    name = "fraud"

    def __init__(self, stage: FraudStage, state_dir: Path, clock: Clock = SYSTEM_CLOCK) -> None:
        self.stage = stage
        self._clock = clock
        self.path = state_dir / BASELINES_FILE
        self.log = structlog.get_logger("sipcdr.fraud")
        self._saved_at = clock.monotonic()
        self._logged: dict[str, int] = {}  # detector faults already logged, by step

    @classmethod
    def build(
        cls,
        config: Config,
        alerts: AlertWriter | None,
        clock: Clock = SYSTEM_CLOCK,
        trunks: TrunkLookup | None = None,
    ) -> DaemonFraud | None:
        """None when `[fraud] enabled = false` or no sink keeps records (no spool)."""
        stage = fraud_stage(config, alerts, trunks)
        if stage is None:
            return None
        fraud = cls(stage, Path(config.state.dir), clock)
        for detector, reason in stage.monitor.stats.inactive.items():
            fraud.log.info("fraud_detector_inactive", detector=detector, reason=reason)
        fraud.restore()
        return fraud

    def restore(self) -> None:
        try:
            saved = read_private(self.path)
            if saved is not None:
                restored = self.stage.monitor.restore(saved, self._clock.time())
                self.log.info("fraud_baselines_restored", baselines=restored)
        except (OSError, ValueError) as exc:
            # Costs a day of learning, nothing else: the detectors start afresh.
            self.log.warning("fraud_baselines_not_restored", file=str(self.path), error=str(exc))

    def save(self) -> None:
        """Replace the last save whole: a crash mid-write leaves the one before."""
        self._saved_at = self._clock.monotonic()
        partial = self.path.with_name(self.path.name + ".new")
        write_private(partial, self.stage.monitor.snapshot())
        os.replace(partial, self.path)

    def tick(self, now: float) -> None:
        self.stage.tick(now)
        if self._clock.monotonic() - self._saved_at >= SAVE_INTERVAL_S:
            self.save()

    def log_failures(self) -> None:
        """A detector fault: said once a tick at most, never per message (the counts
        themselves are exported from the stage's stats)."""
        for step, total in dict(self.stage.stats.errors).items():
            logged = self._logged.get(step, 0)
            if total > logged:
                self._logged[step] = total
                self.log.error("fraud_check_failed", step=step, times=total - logged, total=total)
