"""The detectors of one source, trunk or number over a threshold (call bursts,
scanners, authentication failures, risky and invalid destinations), and what every
detector shares; `call_patterns` holds the detectors of patterns across calls.

Each owns its counters and decides when its subject is over a threshold; `Incidents`
turns that into alerts. A method returns True when the call or request it was given
counted towards an alert, so the monitor can flag the call.

Counters are kept per window length (a trunk may override a window), created on first
use; each is capped at `cap` subjects.
"""

from __future__ import annotations

from typing import Final

from sipcdr.fraud.incidents import Incidents
from sipcdr.fraud.numbering import VERDICT_UNASSIGNED_CODE
from sipcdr.fraud.settings import (
    AUTH_FAILURES,
    CPS_BURST,
    HIGH_RISK_DESTINATION,
    INVALID_DESTINATION,
    SCANNER,
    SUBJECT_PREFIX,
    SUBJECT_SOURCE_IP,
    SUBJECT_TRUNK,
    AuthFailuresSettings,
    CpsBurstSettings,
    HighRiskDestinationSettings,
    InvalidDestinationSettings,
    ScannerSettings,
    Threshold,
)
from sipcdr.fraud.windows import (
    DistinctCounter,
    WindowCounter,
    evict_oldest,
)
from sipcdr.model import FraudAlert

SLICES: Final = 10  # per window: counts are exact to a tenth of the window
_MICROS: Final = 1_000_000  # money is summed in millionths, exactly, as integers
_AGENT_CACHE_LIMIT: Final = 4096  # distinct User-Agent strings whose verdict is remembered
# A 401/407 is remembered this long for the retry that tells a wrong password from the
# normal challenge; the dialog layer waits as long for an auth retry.
CHALLENGE_MEMORY_S: Final = 120.0


def _windows(table: dict[int, WindowCounter], window_s: int, cap: int) -> WindowCounter:
    counter = table.get(window_s)
    if counter is None:
        counter = table[window_s] = WindowCounter(window_s, SLICES, cap)
    return counter


class Detector:
    """What every detector shares: its id, the incidents, the subject cap."""

    id = ""

    def __init__(self, incidents: Incidents, cap: int) -> None:
        self.incidents = incidents
        self.cap = cap

    def tracked(self) -> int:
        raise NotImplementedError

    def evicted(self) -> int:
        raise NotImplementedError

    def expire(self, now: float) -> None:
        raise NotImplementedError


class _Counting(Detector):
    """A detector made of window counters only."""

    def __init__(self, incidents: Incidents, cap: int) -> None:
        super().__init__(incidents, cap)
        self.counters: list[dict[int, WindowCounter]] = []

    def _table(self) -> dict[int, WindowCounter]:
        table: dict[int, WindowCounter] = {}
        self.counters.append(table)
        return table

    def tracked(self) -> int:
        return sum(len(c) for table in self.counters for c in table.values())

    def evicted(self) -> int:
        return sum(c.evicted for table in self.counters for c in table.values())

    def expire(self, now: float) -> None:
        for table in self.counters:
            for counter in table.values():
                counter.expire(now)

    def _count(
        self,
        out: list[FraudAlert],
        table: dict[int, WindowCounter],
        threshold: Threshold,
        kind: str,
        subject: str,
        now: float,
        call_id: str | None,
        cdr_id: str | None = None,
        tally: tuple[str, str] | None = None,
        details: dict[str, object] | None = None,
        *,
        counted: bool = False,
    ) -> bool:
        """Count one event of `subject` (unless the caller has: `counted`) and report
        it when the total is at or over the threshold."""
        counter = _windows(table, threshold.window_s, self.cap)
        count = counter.get(subject) if counted else counter.add(subject, now)
        if count < threshold.warning:
            return False
        self.incidents.report(
            out,
            self.id,
            kind,
            subject,
            count,
            (threshold.warning, threshold.critical),
            threshold.window_s,
            now,
            first_seen=counter.first_seen(subject),
            call_id=call_id,
            cdr_id=cdr_id,
            tally=tally,
            details=details,
        )
        return True


class CpsBurst(_Counting):
    """New INVITEs per second, per source address and per trunk."""

    id = CPS_BURST

    def __init__(self, incidents: Incidents, cap: int) -> None:
        super().__init__(incidents, cap)
        self.per_source = self._table()
        self.per_trunk = self._table()
        # The settings record last used and what follows from it: every trunk without
        # an override shares one record, so this is worked out once, not per call.
        self._bound: CpsBurstSettings | None = None
        self._apart = False  # a trunk's addresses are counted apart as well
        self._source_counter = self._trunk_counter = WindowCounter(1, 1, 1)
        self._source_warning = self._trunk_warning = 0

    def _bind(self, s: CpsBurstSettings) -> None:
        self._bound = s
        self._apart = _below(s.per_source, s.per_trunk)
        self._source_counter = _windows(self.per_source, s.per_source.window_s, self.cap)
        self._trunk_counter = _windows(self.per_trunk, s.per_trunk.window_s, self.cap)
        self._source_warning = s.per_source.warning
        self._trunk_warning = s.per_trunk.warning

    def on_invite(
        self,
        out: list[FraudAlert],
        s: CpsBurstSettings,
        source: str,
        trunk: str | None,
        call_id: str,
        now: float,
    ) -> bool:
        """Count a new call per source address and per trunk. A trunk's own addresses
        are counted apart only when their limit is below the trunk's: otherwise the
        trunk's count, which includes theirs, always gets there first."""
        if s is not self._bound:
            self._bind(s)
        hit = False
        if trunk is None or self._apart:
            if self._source_counter.add(source, now) >= self._source_warning:
                hit = self._count(
                    out,
                    self.per_source,
                    s.per_source,
                    SUBJECT_SOURCE_IP,
                    source,
                    now,
                    call_id,
                    counted=True,
                )
        if trunk is not None and self._trunk_counter.add(trunk, now) >= self._trunk_warning:
            hit = (
                self._count(
                    out,
                    self.per_trunk,
                    s.per_trunk,
                    SUBJECT_TRUNK,
                    trunk,
                    now,
                    call_id,
                    counted=True,
                )
                or hit
            )
        return hit


def _below(source: Threshold, trunk: Threshold) -> bool:
    """Whether a source's limit can be reached before its trunk's."""
    return source.warning * trunk.window_s < trunk.warning * source.window_s


class Scanner(_Counting):
    """Requests carrying a scanning tool's User-Agent, and sources probing many users."""

    id = SCANNER

    def __init__(self, incidents: Incidents, cap: int) -> None:
        super().__init__(incidents, cap)
        self.per_source = self._table()
        self.probes: dict[int, DistinctCounter] = {}
        # User-Agent -> verdict, per settings record (held for the monitor's lifetime);
        # the last record's at hand, since every trunk without an override shares one.
        self._verdicts: dict[int, dict[str, bool]] = {}
        self._bound: ScannerSettings | None = None
        self._bound_verdicts: dict[str, bool] = {}

    def is_scanner(self, s: ScannerSettings, user_agent: str) -> bool:
        if s is self._bound:
            verdicts = self._bound_verdicts
        else:
            found = self._verdicts.get(id(s))
            if found is None:
                found = self._verdicts[id(s)] = {}
            self._bound, self._bound_verdicts = s, found
            verdicts = found
        verdict = verdicts.get(user_agent)
        if verdict is None:
            lowered = user_agent.lower()
            verdict = any(agent in lowered for agent in s.user_agents)
            if len(verdicts) >= _AGENT_CACHE_LIMIT:
                verdicts.clear()  # User-Agent is the sender's to choose
            verdicts[user_agent] = verdict
        return verdict

    def on_agent(
        self,
        out: list[FraudAlert],
        s: ScannerSettings,
        source: str,
        user_agent: str,
        call_id: str,
        now: float,
    ) -> bool:
        return self._count(
            out,
            self.per_source,
            s.per_source,
            SUBJECT_SOURCE_IP,
            source,
            now,
            call_id,
            details={"user_agent": user_agent[:128]},
        )

    def on_probe(
        self,
        out: list[FraudAlert],
        s: ScannerSettings,
        source: str,
        user: str,
        call_id: str,
        now: float,
    ) -> bool:
        probing = s.probing
        counter = self.probes.get(probing.window_s)
        if counter is None:
            counter = self.probes[probing.window_s] = DistinctCounter(
                probing.window_s, self.cap, max_values=probing.critical
            )
        users = counter.add(source, user, now)
        if users < probing.warning:
            return False
        self.incidents.report(
            out,
            self.id,
            SUBJECT_SOURCE_IP,
            source,
            users,
            (probing.warning, probing.critical),
            probing.window_s,
            now,
            call_id=call_id,
            details={"distinct_users": users},
        )
        return True

    def tracked(self) -> int:
        return super().tracked() + sum(len(c) for c in self.probes.values())

    def evicted(self) -> int:
        return super().evicted() + sum(c.evicted for c in self.probes.values())

    def expire(self, now: float) -> None:
        super().expire(now)
        for counter in self.probes.values():
            counter.expire(now)


class AuthFailures(_Counting):
    """Failed digest authentication per requesting address: a 403, or a 401/407 to a
    retry on a Call-ID that was already challenged (a wrong password). The first
    challenge of a Call-ID is how digest authentication starts and does not count."""

    id = AUTH_FAILURES

    def __init__(self, incidents: Incidents, cap: int) -> None:
        super().__init__(incidents, cap)
        self.per_source = self._table()
        # Call-ID -> (CSeq of its last 401/403/407, when): copies of one response (a
        # retransmission, the other leg) share the CSeq and count once. The monitor
        # drops the entry at a 2xx, so a later refresh's challenge starts afresh.
        self.challenged: dict[str, tuple[int, float]] = {}
        self.challenges_evicted = 0

    def on_response(
        self,
        out: list[FraudAlert],
        s: AuthFailuresSettings,
        requester: str,
        status: int,
        call_id: str,
        cseq: int,
        method: str,
        now: float,
    ) -> bool:
        challenged = self.challenged
        before = challenged.pop(call_id, None)
        challenged[call_id] = (cseq, now)
        if len(challenged) > self.cap:
            self.challenges_evicted += len(evict_oldest(challenged, self.cap))
        # Without an earlier response on the Call-ID only a 403 is a failure; after one,
        # any of them to a later CSeq is (copies of one response share the CSeq).
        failed = status == 403 if before is None else before[0] != cseq
        if not failed:
            return False
        return self._count(
            out,
            self.per_source,
            s.per_source,
            SUBJECT_SOURCE_IP,
            requester,
            now,
            call_id,
            tally=("methods", method),
        )

    def tracked(self) -> int:
        return super().tracked() + len(self.challenged)

    def evicted(self) -> int:
        return super().evicted() + self.challenges_evicted

    def expire(self, now: float) -> None:
        super().expire(now)
        horizon = now - CHALLENGE_MEMORY_S
        challenged = self.challenged
        stale: list[str] = []
        for call_id, (_cseq, seen) in challenged.items():
            if seen >= horizon:
                break
            stale.append(call_id)
        for call_id in stale:
            del challenged[call_id]


class HighRiskDestination(_Counting):
    """Calls to listed IRSF and premium-rate prefixes."""

    id = HIGH_RISK_DESTINATION

    def __init__(self, incidents: Incidents, cap: int) -> None:
        super().__init__(incidents, cap)
        self.per_account = self._table()
        self.per_prefix = self._table()

    def on_invite(
        self,
        out: list[FraudAlert],
        s: HighRiskDestinationSettings,
        account_kind: str,
        account: str,
        callee: str,
        call_id: str,
        now: float,
    ) -> bool:
        prefix = s.prefixes.match(callee)
        if prefix is None:
            return False
        hit = self._count(
            out,
            self.per_account,
            s.per_account,
            account_kind,
            account,
            now,
            call_id,
            tally=("prefixes", prefix),
        )
        by_prefix = self._count(
            out,
            self.per_prefix,
            s.per_prefix,
            SUBJECT_PREFIX,
            prefix,
            now,
            call_id,
            tally=("accounts", account),
            details={"listed_as": s.prefixes.entries[prefix]},
        )
        return hit or by_prefix


class InvalidDestination(_Counting):
    """International calls to numbers that cannot exist."""

    id = INVALID_DESTINATION

    def __init__(self, incidents: Incidents, cap: int) -> None:
        super().__init__(incidents, cap)
        self.per_account = self._table()

    def on_invite(
        self,
        out: list[FraudAlert],
        s: InvalidDestinationSettings,
        account_kind: str,
        account: str,
        callee: str,
        call_id: str,
        now: float,
    ) -> bool:
        verdict = s.plan.verdict(callee)
        if verdict is None:
            return False
        code = s.plan.country_code(callee) if verdict != VERDICT_UNASSIGNED_CODE else None
        return self._count(
            out,
            self.per_account,
            s.per_account,
            account_kind,
            account,
            now,
            call_id,
            tally=("country_codes", code or VERDICT_UNASSIGNED_CODE),
        )
