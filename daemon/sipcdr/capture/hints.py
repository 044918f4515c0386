"""The hint a UDP listener gives when what arrives is the other listener's protocol:
HEP sent to the plain SIP listener, or plain SIP to the HEP one. Either is otherwise
only a parse error or a `bad_hep` drop, which does not say what to change.

The listeners here are the plain ones with one cheap check in front (a compare or two
on the first bytes, a start-line match only for what is not HEP on the HEP listener);
the daemon's tick logs each `ListenerHint` at most once per `HINT_INTERVAL_S`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from sipcdr.capture.listeners import (
    AllowList,
    HepGate,
    HepUdpProtocol,
    ListenerStats,
    SipUdpProtocol,
)
from sipcdr.clock import SYSTEM_CLOCK, Clock
from sipcdr.pipeline import Pipeline

__all__ = [
    "HINT_INTERVAL_S",
    "HintedHepUdpProtocol",
    "HintedSipUdpProtocol",
    "ListenerHint",
    "ListenerHints",
]

# At most one hint in this long per listener; the first at the next tick.
HINT_INTERVAL_S: Final = 600.0


class ListenerHint:
    """Counts datagrams of the wrong protocol on one listener (the hot path only adds
    one), and says so in one log line at most every `HINT_INTERVAL_S`."""

    __slots__ = ("address", "arriving", "key", "listener", "logged_at", "seen")

    def __init__(self, listener: str, address: str, arriving: str, key: str) -> None:
        self.listener = listener  # e.g. "SIP/UDP"
        self.address = address  # the listener's own address, not a sender's
        self.arriving = arriving  # what arrives there, e.g. "HEP packets"
        self.key = key  # the config key those belong on
        # Only logged (with the listener's address): the datagrams themselves are
        # already in sipcdr_packets_dropped_total under the listener's reason.
        self.seen = 0
        self.logged_at = float("-inf")

    def due(self, now: float) -> dict[str, object] | None:
        """The fields of the hint to log now, or None (nothing new, or logged lately)."""
        if not self.seen or now - self.logged_at < HINT_INTERVAL_S:
            return None
        self.logged_at = now
        count, self.seen = self.seen, 0
        return {
            "listener": f"{self.listener} {self.address}",
            "datagrams": count,
            "hint": (
                f"{self.arriving} are arriving on the {self.listener} listener "
                f"{self.address}; configure them on {self.key}"
            ),
        }


class ListenerHints:
    """The hints of every listener that gives one, logged from the tick."""

    __slots__ = ("_hints",)

    def __init__(self) -> None:
        self._hints: list[ListenerHint] = []

    def add(self, listener: str, address: str, arriving: str, key: str) -> ListenerHint:
        hint = ListenerHint(listener, address, arriving, key)
        self._hints.append(hint)
        return hint

    def log_due(self, now: float, log: Callable[..., object]) -> None:
        """`log(event, **fields)` each hint that is due."""
        for hint in self._hints:
            fields = hint.due(now)
            if fields is not None:
                log("listener_protocol_mismatch", **fields)


class HintedSipUdpProtocol(SipUdpProtocol):
    """The SIP/UDP listener, counting what looks like HEP for its hint (the check is
    in `SipUdpProtocol.datagram_received`, in the one frame a datagram takes)."""

    __slots__ = ("hint",)

    def __init__(
        self,
        pipeline: Pipeline,
        allow: AllowList,
        local: tuple[str, int],
        hint: ListenerHint,
        stats: ListenerStats,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(pipeline, allow, local, stats, clock, hint)
        self.hint = hint


class HintedHepUdpProtocol(HepUdpProtocol):
    """The HEP/UDP listener, counting what looks like plain SIP for its hint (the check
    is in `HepUdpProtocol.datagram_received`, in the one frame a datagram takes)."""

    __slots__ = ("hint",)

    def __init__(
        self,
        pipeline: Pipeline,
        allow: AllowList,
        gate: HepGate,
        hint: ListenerHint,
        stats: ListenerStats,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(pipeline, allow, gate, stats, clock, hint)
        self.hint = hint
