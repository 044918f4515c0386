"""When new calls are refused and when they are taken again: the daemon's intake gate,
which pauses the engine's `Intake` while a full spool or a refusing disk holds and
resumes it only after a calm stretch."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from sipcdr.pipeline import Intake

# Intake resumes only once what paused it has been gone this long: a disk that took the
# reserve back must go on taking writes before new calls come in again.
RESUME_AFTER_S = 5.0
# A pause that follows a resume within `RELAPSE_WINDOW_S` doubles the wait before the
# next resume, up to this long: a disk at the edge does not make intake flap, yet a disk
# that recovered costs a carrier at most half a minute of refused calls.
RESUME_AFTER_MAX_S = 30.0
# Each calm stretch this long since the last resume halves the wait again, down to
# `RESUME_AFTER_S`.
RELAPSE_WINDOW_S = 60.0


class IntakeGate:
    """Pauses intake while a reason to refuse new calls holds, and resumes it only once
    the reason has been gone for `RESUME_AFTER_S`, doubled for each pause that comes
    within `RELAPSE_WINDOW_S` of the last resume (up to `RESUME_AFTER_MAX_S`) and halved
    for each such window of calm: at the edge of a full disk, intake stays paused for
    longer stretches instead of flapping, and a calm disk is back to the short wait."""

    def __init__(self, intake: Intake, clock: Callable[[], float] = time.monotonic) -> None:
        self.intake = intake
        self.log = structlog.get_logger("sipcdr")
        self.resume_after_s = RESUME_AFTER_S
        self._clock = clock
        self._paused_at = 0.0
        self._reason_seen_at = 0.0  # the last check that found a reason to pause
        self._resumed_at = float("-inf")
        self._refused_at_pause = 0

    def update(self, reason: str | None) -> None:
        intake = self.intake
        now = self._clock()
        if reason is not None:
            self._reason_seen_at = now
            if not intake.paused:
                self.resume_after_s = self._next_wait(now - self._resumed_at)
                intake.reason = reason
                intake.paused = True
                self._paused_at = now
                self._refused_at_pause = self._refused()
                # New calls are refused from now on: calls lost, hence ERROR.
                self.log.error("intake_paused", reason=reason, resume_after_s=self.resume_after_s)
            elif reason != intake.reason:
                intake.reason = reason
                self.log.warning("intake_pause_reason_changed", reason=reason)
            return
        if not intake.paused or now - self._reason_seen_at < self.resume_after_s:
            return
        intake.paused = False
        self._resumed_at = now
        self.log.info(
            "intake_resumed",
            paused_s=round(now - self._paused_at, 1),
            calls_refused=self._refused() - self._refused_at_pause,
        )

    def _next_wait(self, calm_s: float) -> float:
        if calm_s < RELAPSE_WINDOW_S:
            return min(RESUME_AFTER_MAX_S, self.resume_after_s * 2)
        halvings = min(calm_s // RELAPSE_WINDOW_S, 16.0)  # inf before the first resume
        return max(RESUME_AFTER_S, self.resume_after_s / 2**halvings)

    def _refused(self) -> int:
        return sum(self.intake.refused.values())
