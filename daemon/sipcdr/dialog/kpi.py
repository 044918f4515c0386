"""Carrier KPI totals from closed calls, per trunk (ITU-T E.411, GSMA IR.42).

Counted from CDRs, so retransmissions and both-leg copies never count twice. Only
running totals are kept: counters of attempts, answered, network-effective and failed
calls, and histograms of post-dial delay and call duration. ASR, NER, ACD and PDD are
ratios of their increases over a window, which Prometheus computes (see
deploy/prometheus/alerts.yml); an average over the life of the process would hide a
trunk that stopped answering an hour ago behind a day of good calls.
"""

from __future__ import annotations

from bisect import bisect_left

from sipcdr.dialog import state
from sipcdr.model import Cdr

# Outcomes where the network did its job and the user decided (GSMA IR.42 NER):
# answered, busy, no answer, rejected by the callee, or abandoned by the caller.
NETWORK_EFFECTIVE = frozenset(
    (state.ANSWERED, state.BUSY, state.NO_ANSWER, state.REJECTED, state.CANCELLED)
)
# Outcomes where the network or the far end failed the call: a 4xx-6xx final response
# without a disposition of its own, or no answer at all to the INVITE.
FAILED = frozenset((state.FAILED, state.TIMEOUT))

# Post-dial delay, seconds: a PSTN call rings within a few seconds; past 10 s callers
# hang up, and 30 s is longer than any carrier's setup timer.
PDD_BUCKETS_S: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0)
# Answered call duration, seconds, up to the 4 h default of [dialog] max_duration_s.
DURATION_BUCKETS_S: tuple[float, ...] = (
    5.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
)


class Histogram:
    """Observations per bucket (each counted once, in the first bucket whose upper
    bound holds it; the last is +Inf) and their sum: Prometheus' histogram, kept as
    plain numbers and made cumulative when exported."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)


class Kpi:
    """Running totals for one trunk (or for the calls of no configured trunk)."""

    __slots__ = ("answered", "attempts", "duration", "failed", "network_effective", "pdd")

    def __init__(self) -> None:
        self.attempts = 0
        self.answered = 0
        self.network_effective = 0
        self.failed = 0
        self.pdd = Histogram(PDD_BUCKETS_S)  # seconds, of the calls that got a response
        self.duration = Histogram(DURATION_BUCKETS_S)  # seconds, of answered calls

    def add(self, cdr: Cdr) -> None:
        self.attempts += 1
        disposition = cdr.disposition
        if disposition == state.ANSWERED:
            self.answered += 1
            self.duration.observe(cdr.billsec)
        if disposition in NETWORK_EFFECTIVE:
            self.network_effective += 1
        elif disposition in FAILED:
            self.failed += 1
        if cdr.pdd_ms is not None:
            self.pdd.observe(cdr.pdd_ms / 1000)
