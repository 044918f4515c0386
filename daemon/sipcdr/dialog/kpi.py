"""Carrier KPIs from closed calls: ASR, NER, ACD, PDD (ITU-T E.411, GSMA IR.42).

Computed from CDRs, so retransmissions and both-leg copies never count twice.
"""

from __future__ import annotations

from sipcdr.dialog import state
from sipcdr.model import Cdr

# Outcomes where the network did its job and the user decided (GSMA IR.42 NER):
# answered, busy, no answer, rejected by the callee, or abandoned by the caller.
_NETWORK_EFFECTIVE = frozenset(
    (state.ANSWERED, state.BUSY, state.NO_ANSWER, state.REJECTED, state.CANCELLED)
)


class Kpi:
    """Running totals for one trunk (or for untrunked traffic)."""

    __slots__ = ("answered", "attempts", "billsec", "network_effective", "pdd_count", "pdd_ms")

    def __init__(self) -> None:
        self.attempts = 0
        self.answered = 0
        self.network_effective = 0
        self.billsec = 0.0
        self.pdd_ms = 0
        self.pdd_count = 0

    def add(self, cdr: Cdr) -> None:
        self.attempts += 1
        if cdr.disposition == state.ANSWERED:
            self.answered += 1
            self.billsec += cdr.billsec
        if cdr.disposition in _NETWORK_EFFECTIVE:
            self.network_effective += 1
        if cdr.pdd_ms is not None:
            self.pdd_ms += cdr.pdd_ms
            self.pdd_count += 1

    @property
    def asr(self) -> float | None:
        """Answer-seizure ratio: answered calls over attempts."""
        return self.answered / self.attempts if self.attempts else None

    @property
    def ner(self) -> float | None:
        """Network effectiveness ratio: calls the network delivered over attempts."""
        return self.network_effective / self.attempts if self.attempts else None

    @property
    def acd(self) -> float | None:
        """Average call duration of answered calls, seconds."""
        return self.billsec / self.answered if self.answered else None

    @property
    def pdd(self) -> float | None:
        """Mean post-dial delay, milliseconds."""
        return self.pdd_ms / self.pdd_count if self.pdd_count else None
