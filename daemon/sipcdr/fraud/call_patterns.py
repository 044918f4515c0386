"""The detectors of patterns across calls: sequential dialing, an international
surge against the trunk's normal, concurrent calls, wangiri callbacks, spend velocity
(`detectors` describes what every detector shares)."""

from __future__ import annotations

import math
from decimal import Decimal

from sipcdr.fraud.detectors import (
    _MICROS,
    Detector,
    _Counting,
    _windows,
)
from sipcdr.fraud.incidents import Incidents
from sipcdr.fraud.settings import (
    CONCURRENT_CALLS,
    INTERNATIONAL_SURGE,
    SEQUENTIAL_DIALING,
    SPEND_VELOCITY,
    SUBJECT_CALLER,
    SUBJECT_TRUNK,
    WANGIRI,
    ConcurrentCallsSettings,
    InternationalSurgeSettings,
    SequentialDialingSettings,
    SpendVelocitySettings,
    WangiriSettings,
)
from sipcdr.fraud.windows import (
    DistinctCounter,
    Gauge,
    RunTracker,
    SeasonalBaseline,
    WindowCounter,
)
from sipcdr.model import Cdr, FraudAlert


class SequentialDialing(Detector):
    """Runs of consecutive callee numbers from one caller or one trunk."""

    id = SEQUENTIAL_DIALING

    def __init__(self, incidents: Incidents, cap: int) -> None:
        super().__init__(incidents, cap)
        self.trackers: dict[int, RunTracker] = {}  # by max_gap_s
        # The settings record last used, and its tracker (see CpsBurst._bind).
        self._bound: SequentialDialingSettings | None = None
        self._tracker = RunTracker(1, 1)
        # ... and its warnings: the records are not compiled, so reading a field is a
        # lookup by name; these are read on every call.
        self._caller_warning = self._trunk_warning = 0

    def on_invite(
        self,
        out: list[FraudAlert],
        s: SequentialDialingSettings,
        caller: str | None,
        trunk: str | None,
        callee: str,
        call_id: str,
        now: float,
    ) -> bool:
        if s is not self._bound:
            tracker = self.trackers.get(s.max_gap_s)
            if tracker is None:
                # Two entries per call for the gap: twice the cap holds a cap of callers.
                tracker = self.trackers[s.max_gap_s] = RunTracker(s.max_gap_s, 2 * self.cap)
            self._bound, self._tracker = s, tracker
            self._caller_warning = s.per_caller.warning
            self._trunk_warning = s.per_trunk.warning
        tracker = self._tracker
        number = int(callee)
        caller_run, trunk_run = tracker.add(caller or "", trunk or "", number, now)
        hit = False
        if caller is not None and caller_run >= self._caller_warning:
            hit = self._report(out, s, SUBJECT_CALLER, caller, caller_run, number, call_id, now)
        if trunk is not None and trunk_run >= self._trunk_warning:
            hit = self._report(out, s, SUBJECT_TRUNK, trunk, trunk_run, number, call_id, now) or hit
        return hit

    def _report(
        self,
        out: list[FraudAlert],
        s: SequentialDialingSettings,
        kind: str,
        subject: str,
        run: int,
        number: int,
        call_id: str,
        now: float,
    ) -> bool:
        limit = s.per_caller if kind == SUBJECT_CALLER else s.per_trunk
        self.incidents.report(
            out,
            self.id,
            kind,
            subject,
            run,
            (limit.warning, limit.critical),
            s.max_gap_s,
            now,
            call_id=call_id,
            details={"last_number": str(number)},
        )
        return True

    def tracked(self) -> int:
        return sum(len(t) for t in self.trackers.values())

    def evicted(self) -> int:
        return sum(t.evicted for t in self.trackers.values())

    def expire(self, now: float) -> None:
        for tracker in self.trackers.values():
            tracker.expire(now)


class InternationalSurge(_Counting):
    """A trunk's international calls over the last hour against its own normal."""

    id = INTERNATIONAL_SURGE

    def __init__(self, incidents: Incidents, cap: int) -> None:
        super().__init__(incidents, cap)
        self.per_trunk = self._table()
        self.baselines: dict[float, SeasonalBaseline] = {}

    def baseline(self, alpha: float) -> SeasonalBaseline:
        baseline = self.baselines.get(alpha)
        if baseline is None:
            baseline = self.baselines[alpha] = SeasonalBaseline(alpha, self.cap, peak=False)
        return baseline

    def on_international(
        self,
        out: list[FraudAlert],
        s: InternationalSurgeSettings,
        trunk: str,
        call_id: str,
        now: float,
    ) -> bool:
        counter = _windows(self.per_trunk, s.window_s, self.cap)
        count = counter.add(trunk, now)
        expected = self.baseline(s.baseline.alpha).update(trunk, now, 1.0)
        if expected is None:
            return False  # this hour of the day is still being learnt
        if count < s.baseline.floor or count < expected * s.baseline.factor:
            return False
        warning, critical = s.baseline.limits(expected)
        if count < warning:
            return False
        self.incidents.report(
            out,
            self.id,
            SUBJECT_TRUNK,
            trunk,
            count,
            (warning, critical),
            s.window_s,
            now,
            first_seen=counter.first_seen(trunk),
            call_id=call_id,
            details={"baseline": round(expected, 1)},
        )
        return True

    def tracked(self) -> int:
        return super().tracked() + sum(len(b) for b in self.baselines.values())

    def evicted(self) -> int:
        return super().evicted() + sum(b.evicted for b in self.baselines.values())

    def expire(self, now: float) -> None:
        super().expire(now)
        for baseline in self.baselines.values():
            baseline.roll(now)


class ConcurrentCalls(Detector):
    """Answered calls in progress per caller (a fixed limit) and per trunk (against
    the trunk's own busiest level at this hour on previous days)."""

    id = CONCURRENT_CALLS

    def __init__(self, incidents: Incidents, cap: int) -> None:
        super().__init__(incidents, cap)
        self.per_caller = Gauge()
        self.per_trunk = Gauge()
        self.peaks: dict[float, SeasonalBaseline] = {}
        # The settings record last used, and its trunks' peaks (see CpsBurst._bind).
        self._bound: ConcurrentCallsSettings | None = None
        self._peak = SeasonalBaseline(1.0, 1, peak=True)
        # The record whose limits are at hand below (its peaks are bound only with a
        # trunk: binding makes them, and they are in the snapshot).
        self._limits: ConcurrentCallsSettings | None = None
        self._caller_warning = self._trunk_floor = 0
        self._trunk_factor = 0.0

    def peak(self, alpha: float) -> SeasonalBaseline:
        peak = self.peaks.get(alpha)
        if peak is None:
            peak = self.peaks[alpha] = SeasonalBaseline(alpha, self.cap, peak=True)
        return peak

    def answered(
        self,
        out: list[FraudAlert],
        s: ConcurrentCallsSettings,
        trunk: str | None,
        caller: str | None,
        call_id: str,
        now: float,
    ) -> bool:
        hit = False
        if s is not self._limits:
            self._limits = s
            self._caller_warning = s.per_caller.warning
            self._trunk_floor = s.per_trunk.floor
            self._trunk_factor = float(s.per_trunk.factor)
        if caller is not None:
            levels = self.per_caller.levels
            level = levels[caller] = levels.get(caller, 0) + 1
            if level >= self._caller_warning:
                limit = s.per_caller
                self.incidents.report(
                    out,
                    self.id,
                    SUBJECT_CALLER,
                    caller,
                    level,
                    (limit.warning, limit.critical),
                    1,
                    now,
                    call_id=call_id,
                )
                hit = True
        if trunk is not None:
            levels = self.per_trunk.levels
            level = levels[trunk] = levels.get(trunk, 0) + 1
            if s is not self._bound:
                self._bound, self._peak = s, self.peak(s.per_trunk.alpha)
            expected = self._peak.update(trunk, now, float(level))
            # Below the floor or the factor there is nothing to work out.
            if (
                expected is not None
                and level >= self._trunk_floor
                and level >= expected * self._trunk_factor
            ):
                warning, critical = s.per_trunk.limits(expected)
                if level >= warning:
                    self.incidents.report(
                        out,
                        self.id,
                        SUBJECT_TRUNK,
                        trunk,
                        level,
                        (warning, critical),
                        1,
                        now,
                        call_id=call_id,
                        details={"baseline": round(expected, 1)},
                    )
                    hit = True
        return hit

    def ended(self, trunk: str | None, caller: str | None) -> None:
        if caller is not None:
            self.per_caller.down(caller)
        if trunk is not None:
            self.per_trunk.down(trunk)

    def tracked(self) -> int:
        return len(self.per_caller) + len(self.per_trunk)

    def evicted(self) -> int:
        return sum(p.evicted for p in self.peaks.values())

    def expire(self, now: float) -> None:
        for peak in self.peaks.values():
            peak.roll(now, self.per_trunk.levels)


class Wangiri(Detector):
    """One caller ringing many distinct numbers and hanging up before an answer."""

    id = WANGIRI

    def __init__(self, incidents: Incidents, cap: int) -> None:
        super().__init__(incidents, cap)
        self.callees: dict[int, DistinctCounter] = {}

    def on_cdr(self, out: list[FraudAlert], s: WangiriSettings, cdr: Cdr, now: float) -> bool:
        caller, callee = cdr.caller, cdr.callee
        if caller is None or callee is None:
            return False
        threshold = s.per_caller
        counter = self.callees.get(threshold.window_s)
        if counter is None:
            counter = self.callees[threshold.window_s] = DistinctCounter(
                threshold.window_s, self.cap, max_values=threshold.critical
            )
        distinct = counter.add(caller, callee, now)
        if distinct < threshold.warning:
            return False
        self.incidents.report(
            out,
            self.id,
            SUBJECT_CALLER,
            caller,
            distinct,
            (threshold.warning, threshold.critical),
            threshold.window_s,
            now,
            first_seen=cdr.start_time,
            call_id=cdr.call_id,
            cdr_id=cdr.cdr_id,
        )
        return True

    def tracked(self) -> int:
        return sum(len(c) for c in self.callees.values())

    def evicted(self) -> int:
        return sum(c.evicted for c in self.callees.values())

    def expire(self, now: float) -> None:
        for counter in self.callees.values():
            counter.expire(now)


class SpendVelocity(_Counting):
    """Rated cost per trunk over the last hour."""

    id = SPEND_VELOCITY

    def __init__(self, incidents: Incidents, cap: int) -> None:
        super().__init__(incidents, cap)
        self.per_trunk = self._table()
        # The settings record last used, its counter and its warning in whole
        # millionths (see CpsBurst._bind): no Decimal arithmetic per CDR below it.
        self._bound: SpendVelocitySettings | None = None
        self._counter = WindowCounter(1, 1, 1)
        self._warning_micros = 0

    def on_cost(
        self,
        out: list[FraudAlert],
        s: SpendVelocitySettings,
        trunk: str,
        cost: Decimal,
        cdr: Cdr,
        now: float,
    ) -> bool:
        micros = int(cost * _MICROS)
        if micros <= 0:
            return False
        limit = s.per_trunk
        if s is not self._bound:
            self._bound = s
            self._counter = _windows(self.per_trunk, limit.window_s, self.cap)
            # A whole total is below the warning exactly when below its ceiling.
            self._warning_micros = math.ceil(limit.warning * _MICROS)
        counter = self._counter
        total = counter.add(trunk, now, micros)
        if total < self._warning_micros:
            return False
        details: dict[str, object] = {"currency": cdr.currency} if cdr.currency else {}
        self.incidents.report(
            out,
            self.id,
            SUBJECT_TRUNK,
            trunk,
            Decimal(total).scaleb(-6),
            (limit.warning, limit.critical),
            limit.window_s,
            now,
            first_seen=counter.first_seen(trunk),
            call_id=cdr.call_id,
            cdr_id=cdr.cdr_id,
            details=details,
        )
        return True
