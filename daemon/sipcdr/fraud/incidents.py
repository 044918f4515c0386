"""One incident, one alert: the cooldown per (detector, subject) and the pace of updates.

A detector reports every event that finds its subject over a threshold. The first
report opens an incident and its alert goes out at once; later reports update it
(observed peak, last seen, examples) and the update goes out at most once per
`update_interval_s`, or at once when it escalates to critical. An incident closes
after `cooldown_s` without a report; what it gained since its last record goes out
then. Past `max_new_per_minute` new incidents of one detector within a minute, the
rest are muted: tracked and counted in `stats.suppressed`, never sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Final

from sipcdr.fraud.settings import SEVERITY_CRITICAL, SEVERITY_WARNING
from sipcdr.fraud.windows import evict_oldest
from sipcdr.model import FraudAlert, alert_id

_MAX_TALLY_KEYS: Final = 20  # per details map: the biggest contributors, not an inventory
_MAX_INCIDENTS: Final = 10_000  # open at once; beyond it the one idle longest is forgotten

Key = tuple[str, str, str]  # (detector, subject kind, subject)


class FraudStats:
    """Running totals the adapter turns into metrics. Plain ints: only ever added to."""

    __slots__ = (
        "alerts",
        "calls_evicted",
        "evicted",
        "inactive",
        "incidents_evicted",
        "suppressed",
        "tracked",
        "updates",
    )

    def __init__(self) -> None:
        self.alerts: dict[tuple[str, str], int] = {}  # (detector, severity): raised
        self.updates = 0  # records that updated an alert already raised
        self.suppressed: dict[str, int] = {}  # detector: incidents muted by the rate limit
        self.evicted: dict[str, int] = {}  # detector: subjects evicted at a cap
        self.incidents_evicted = 0  # open incidents forgotten at the incident cap
        self.calls_evicted = 0  # calls forgotten before their CDR, at max_tracked_calls
        self.tracked: dict[str, int] = {}  # detector: subjects held (refreshed by expire)
        self.inactive: dict[str, str] = {}  # detector: why it cannot run


class Incident:
    __slots__ = (
        "alert_id",
        "call_ids",
        "cdr_ids",
        "details",
        "detector",
        "emitted_at",
        "first_seen",
        "last_seen",
        "muted",
        "observed",
        "raised_at",
        "revision",
        "severity",
        "subject",
        "subject_kind",
        "threshold",
        "window_s",
    )

    alert_id: str
    detector: str
    subject_kind: str
    subject: str
    severity: str
    window_s: int
    observed: int | Decimal
    threshold: int | Decimal
    raised_at: float
    first_seen: float
    last_seen: float
    emitted_at: float  # when its last record went out
    call_ids: list[str]
    cdr_ids: list[str]
    details: dict[str, object]
    revision: int
    muted: bool  # over the new-incident rate: tracked, never sent

    def alert(self) -> FraudAlert:
        return FraudAlert(
            alert_id=self.alert_id,
            detector=self.detector,
            subject=self.subject,
            subject_kind=self.subject_kind,
            severity=self.severity,
            window_s=self.window_s,
            observed=self.observed,
            threshold=self.threshold,
            raised_at=self.raised_at,
            first_seen=self.first_seen,
            last_seen=self.last_seen,
            call_ids=tuple(self.call_ids),
            cdr_ids=tuple(self.cdr_ids),
            details=_copy(self.details),
            revision=self.revision,
        )


class Incidents:
    __slots__ = (
        "_dirty",
        "_minute",
        "_open",
        "_started",
        "cooldown_s",
        "example_calls",
        "max_new_per_minute",
        "stats",
        "update_interval_s",
    )

    def __init__(
        self,
        stats: FraudStats,
        *,
        cooldown_s: float,
        update_interval_s: float,
        max_new_per_minute: int,
        example_calls: int,
    ) -> None:
        self.stats = stats
        self.cooldown_s = cooldown_s
        self.update_interval_s = update_interval_s
        self.max_new_per_minute = max_new_per_minute
        self.example_calls = example_calls
        self._open: dict[Key, Incident] = {}  # least recently reported first
        self._dirty: dict[Key, Incident] = {}  # changed since their last record
        self._minute = -1
        self._started: dict[str, int] = {}  # detector: incidents opened this minute

    def __len__(self) -> int:
        return len(self._open)

    def report(
        self,
        out: list[FraudAlert],
        detector: str,
        kind: str,
        subject: str,
        observed: int | Decimal,
        limits: tuple[int | Decimal, int | Decimal],
        window_s: int,
        now: float,
        *,
        first_seen: float | None = None,
        call_id: str | None = None,
        cdr_id: str | None = None,
        tally: tuple[str, str] | None = None,
        details: Mapping[str, object] | None = None,
    ) -> None:
        """`subject` is at `observed`, at or over `limits` (warning, critical) at `now`.
        Appends to `out` the record this makes due, if any."""
        key = (detector, kind, subject)
        incident = self._open.pop(key, None)
        severity = SEVERITY_CRITICAL if observed >= limits[1] else SEVERITY_WARNING
        if incident is not None and now - incident.last_seen > self.cooldown_s:
            self._close(incident, key, out)  # its successor is a new incident
            incident = None
        if incident is None:
            incident = self._open_incident(detector, kind, subject, severity, now)
            incident.observed = observed
            incident.threshold = limits[0]
            incident.window_s = window_s
            incident.first_seen = min(first_seen, now) if first_seen is not None else now
            _add_example(incident, call_id, cdr_id, self.example_calls)
            _merge_details(incident, tally, details)
            if not incident.muted:
                out.append(incident.alert())
        else:
            incident.last_seen = max(incident.last_seen, now)
            incident.observed = max(incident.observed, observed)
            _add_example(incident, call_id, cdr_id, self.example_calls)
            _merge_details(incident, tally, details)
            if severity == SEVERITY_CRITICAL and incident.severity == SEVERITY_WARNING:
                incident.severity = SEVERITY_CRITICAL
                incident.threshold = limits[1]
                if not incident.muted:
                    self._count(detector, SEVERITY_CRITICAL)
                    self._emit(incident, key, now, out)
            elif not incident.muted:
                self._dirty[key] = incident
        self._open[key] = incident
        if len(self._open) > _MAX_INCIDENTS:
            for oldest, _incident in evict_oldest(self._open, _MAX_INCIDENTS):
                self._dirty.pop(oldest, None)
                self.stats.incidents_evicted += 1

    def is_open(self, detector: str, kind: str, subject: str, now: float) -> bool:
        incident = self._open.get((detector, kind, subject))
        return incident is not None and now - incident.last_seen <= self.cooldown_s

    def tick(self, now: float, out: list[FraudAlert]) -> None:
        """Send updates that are due; close incidents quiet for longer than the cooldown."""
        # Called once a second of capture time, which a sparse capture's import reaches
        # every other message: nothing is copied or allocated while nothing is open.
        if self._dirty:
            due = now - self.update_interval_s
            for key, incident in list(self._dirty.items()):
                if incident.emitted_at <= due:
                    self._emit(incident, key, now, out)
        if not self._open:
            return
        horizon = now - self.cooldown_s
        closed: list[tuple[Key, Incident]] = []
        for key, incident in self._open.items():
            if incident.last_seen >= horizon:
                break  # least recently reported first: the rest are active
            closed.append((key, incident))
        for key, incident in closed:
            del self._open[key]
            self._close(incident, key, out)

    def _open_incident(
        self, detector: str, kind: str, subject: str, severity: str, now: float
    ) -> Incident:
        minute = int(now // 60)
        if minute != self._minute:
            self._minute = minute
            self._started.clear()
        started = self._started[detector] = self._started.get(detector, 0) + 1
        incident = Incident()
        incident.alert_id = alert_id(detector, kind, subject, now)
        incident.detector = detector
        incident.subject_kind = kind
        incident.subject = subject
        incident.severity = severity
        incident.raised_at = incident.last_seen = incident.emitted_at = now
        incident.call_ids = []
        incident.cdr_ids = []
        incident.details = {}
        incident.revision = 0
        incident.muted = started > self.max_new_per_minute
        if incident.muted:
            suppressed = self.stats.suppressed
            suppressed[detector] = suppressed.get(detector, 0) + 1
        else:
            self._count(detector, severity)
        return incident

    def _emit(self, incident: Incident, key: Key, now: float, out: list[FraudAlert]) -> None:
        incident.revision += 1
        incident.emitted_at = now
        self._dirty.pop(key, None)
        self.stats.updates += 1
        out.append(incident.alert())

    def _close(self, incident: Incident, key: Key, out: list[FraudAlert]) -> None:
        if key in self._dirty:
            self._emit(incident, key, incident.last_seen, out)

    def _count(self, detector: str, severity: str) -> None:
        alerts = self.stats.alerts
        alerts[(detector, severity)] = alerts.get((detector, severity), 0) + 1


def _add_example(incident: Incident, call_id: str | None, cdr_id: str | None, limit: int) -> None:
    if call_id is not None and len(incident.call_ids) < limit and call_id not in incident.call_ids:
        incident.call_ids.append(call_id)
    if cdr_id is not None and len(incident.cdr_ids) < limit and cdr_id not in incident.cdr_ids:
        incident.cdr_ids.append(cdr_id)


def _merge_details(
    incident: Incident, tally: tuple[str, str] | None, details: Mapping[str, object] | None
) -> None:
    if details:
        incident.details.update(details)
    if tally is not None:
        name, item = tally
        counts = incident.details.get(name)
        if not isinstance(counts, dict):
            counts = incident.details[name] = {}
        if item in counts or len(counts) < _MAX_TALLY_KEYS:
            counts[item] = counts.get(item, 0) + 1


def _copy(details: dict[str, object]) -> dict[str, object]:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in details.items()}
