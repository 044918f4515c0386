"""The fraud stage: the monitor in the engine's chain (`sipcdr.stages`).

A message stage (each parsed message, before the correlator: `tap`, compiled with
the detectors, is what the engine runs), a CDR stage (each closed
call, after rating: `fraud_flags` set from the detectors that counted it) and a timed
stage (incident updates and closes, once a second). Every alert the monitor produces
goes to the alert writer the stage is built with, which puts it in the spool for the
sinks. The monitor is pure; this adds the source-to-trunk lookup (the engine's, shared
with the enrich stage) and the counts of what it handed on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from sipcdr.fraud.monitor import FraudMonitor
from sipcdr.fraud.settings import FraudSettings
from sipcdr.fraud.tap import MessageTap
from sipcdr.model import Cdr, FraudAlert, Packet, Trunk, replace_cdr
from sipcdr.sip import SipMessage


class AlertWriter(Protocol):
    """Where alerts go: the spool's records stream in the daemon and in an import."""

    def write_alert(self, alert: FraudAlert) -> bool:
        """Whether the alert was taken (on disk, or held for it); False is counted by
        the writer's spool with its reason."""
        ...


class FraudStageStats:
    """Plain totals for the metrics exporter; see `FraudStage.stats`."""

    __slots__ = ("alerts_refused", "alerts_written", "errors")

    def __init__(self) -> None:
        self.alerts_written = 0  # alert records (new and updated) handed to the writer
        self.alerts_refused = 0  # ... that the writer refused (a full spool)
        self.errors: dict[str, int] = {}  # by step (message, cdr, tick): a bug, counted


class FraudStage:
    """`MessageStage`, `CdrStage` and `TimedStage` of the engine for the fraud monitor.

    Never raises into the chain: a monitor error costs that message's or CDR's check,
    counted in `stats.errors`, and the CDR goes on unchanged."""

    name = "fraud"

    def __init__(
        self,
        settings: FraudSettings,
        alerts: AlertWriter,
        trunk_of: Callable[[str], Trunk | None] | None = None,
        *,
        rating: bool = False,
    ) -> None:
        """`trunk_of` the trunk lookup (the engine's `sipcdr.enrich.trunks.TrunkLookup`,
        shared with the enrich stage, which remembers each address's trunk);
        `rating`: a rate deck is loaded, so CDRs carry a cost (spend_velocity)."""
        self.alerts = alerts
        self.stats = FraudStageStats()
        self._trunk_of = trunk_of
        self.monitor = FraudMonitor(settings, rating=rating, trunk_of=self.trunk_name)

    @property
    def monitor(self) -> FraudMonitor:
        return self._monitor

    @monitor.setter
    def monitor(self, monitor: FraudMonitor) -> None:
        # The tap holds the monitor it hands messages to: a monitor put in its place
        # gets a tap of its own. Only a FraudMonitor: compiled, the stage and the tap
        # call it directly, unchecked (a test's stand-in runs the stage from source).
        self._monitor = monitor
        self.tap = MessageTap(monitor, self._trunk_of, self._write, self._error)

    def trunk_name(self, source: str) -> str | None:
        trunk_of = self._trunk_of
        trunk = None if trunk_of is None else trunk_of(source)
        return None if trunk is None else trunk.name

    def on_message(self, packet: Packet, msg: SipMessage) -> None:
        """What the engine runs is `tap` itself, compiled; this is the same step."""
        self.tap.on_message(packet, msg)

    def on_cdr(self, cdr: Cdr) -> Cdr:
        try:
            # The attribute, not the property: a call less for each CDR.
            flags, alerts = self._monitor.on_cdr(cdr, cdr.cost)
        except Exception:
            self._error("cdr")
            return cdr
        if alerts:
            self._write(alerts)
        if flags:
            merged = tuple(dict.fromkeys((*cdr.fraud_flags, *flags)))
            return replace_cdr(cdr, fraud_flags=merged)
        return cdr

    def tick(self, now: float) -> None:
        try:
            alerts = self._monitor.expire(now)  # the attribute, as in on_cdr
        except Exception:
            self._error("tick")
            return
        if alerts:
            self._write(alerts)

    def _write(self, alerts: Sequence[FraudAlert]) -> None:
        stats = self.stats
        for alert in alerts:
            try:
                taken = self.alerts.write_alert(alert)
            except Exception:
                self._error("write")
                continue
            if taken:
                stats.alerts_written += 1
            else:
                stats.alerts_refused += 1

    def _error(self, step: str) -> None:
        errors = self.stats.errors
        errors[step] = errors.get(step, 0) + 1
