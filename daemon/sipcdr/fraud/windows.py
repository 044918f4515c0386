"""Bounded per-subject counters over time: the only state the detectors keep.

Every structure takes the time as an argument, forgets what is older than its window,
and holds at most `cap` subjects. Past the cap the least recently touched subject is
evicted and counted in `evicted`, so a spray of random addresses or numbers costs a
fixed amount of memory and pushes out the quiet subjects first, not the busy ones
(each update moves its subject to the back of an insertion-ordered dict).
"""

from __future__ import annotations

import itertools
import math
from typing import Final, TypeVar

K = TypeVar("K")
V = TypeVar("V")
# Past a cap, the oldest sixteenth goes at once. Finding a dict's oldest entry walks
# the slots its deletions left at the front, so evicting one entry per insert costs
# ~37 us at 100,000 entries on this machine; in batches it is 0.7 us.
EVICTION_BATCH: Final = 16


def evict_oldest(table: dict[K, V], cap: int) -> list[tuple[K, V]]:
    """Remove the oldest entries of `table`, which is over `cap`, leaving it a
    sixteenth below; return them."""
    excess = len(table) - cap + max(1, cap // EVICTION_BATCH)
    victims = list(itertools.islice(table.items(), excess))
    for key, _value in victims:
        del table[key]
    return victims


class WindowCounter:
    """A total per subject over a sliding window of `slices` equal slices.

    Each slice is one dict of subject -> amount; the totals are kept beside them, so an
    update is two dict writes and a slice rolling out of the window subtracts only what
    it held. The window is exact to one slice: a count covers between
    `window_s - window_s / slices` and `window_s` of the past.
    """

    __slots__ = (
        "_current",
        "_epoch",
        "_next",
        "_slices",
        "_width",
        "cap",
        "evicted",
        "totals",
        "window_s",
    )

    def __init__(self, window_s: float, slices: int, cap: int) -> None:
        if window_s <= 0 or slices < 1 or cap < 1:
            raise ValueError("window_s, slices and cap must be positive")
        self.window_s = window_s
        self.cap = cap
        self.evicted = 0
        self.totals: dict[str, int] = {}  # least recently updated first
        self._width = window_s / slices
        self._slices: list[dict[str, int]] = [{} for _ in range(slices)]
        self._epoch = -(2**62)  # absolute index of the newest slice
        self._current = self._slices[0]  # the newest slice
        self._next = -math.inf  # when the next slice begins

    def __len__(self) -> int:
        return len(self.totals)

    def add(self, subject: str, now: float, amount: int = 1) -> int:
        """Count `amount` for `subject` at `now`; return its total over the window.

        A time older than the newest slice (agents' clocks differ by milliseconds) is
        counted in the newest slice rather than refused.
        """
        if now >= self._next:
            self._advance(int(now // self._width))
        current = self._current
        current[subject] = current.get(subject, 0) + amount
        totals = self.totals
        total = totals.pop(subject, 0) + amount
        totals[subject] = total
        if len(totals) > self.cap:
            self._evict()
        return total

    def get(self, subject: str) -> int:
        return self.totals.get(subject, 0)

    def first_seen(self, subject: str) -> float | None:
        """Start of the oldest slice in which `subject` still counts."""
        slices = self._slices
        for age in range(len(slices) - 1, -1, -1):
            epoch = self._epoch - age
            if subject in slices[epoch % len(slices)]:
                return epoch * self._width
        return None

    def expire(self, now: float) -> None:
        """Roll the window forward to `now`: subjects with nothing left in it are dropped."""
        epoch = int(now // self._width)
        if epoch > self._epoch:
            self._advance(epoch)

    def _advance(self, epoch: int) -> None:
        slices = self._slices
        totals = self.totals
        steps = epoch - self._epoch
        if steps >= len(slices):
            totals.clear()
            for old in slices:
                old.clear()
        else:
            for step in range(1, steps + 1):
                old = slices[(self._epoch + step) % len(slices)]
                for subject, amount in old.items():
                    total = totals.get(subject)
                    if total is None:
                        continue
                    total -= amount
                    if total > 0:
                        totals[subject] = total  # an existing key keeps its place
                    else:
                        del totals[subject]
                old.clear()
        self._epoch = epoch
        self._current = slices[epoch % len(slices)]
        self._next = (epoch + 1) * self._width

    def _evict(self) -> None:
        victims = evict_oldest(self.totals, self.cap)
        slices = self._slices
        for index, old in enumerate(slices):
            if old:
                for subject, _total in victims:
                    old.pop(subject, None)
                if not old and old is not self._current:
                    # A dict keeps its table when emptied: a slice that held a spray's
                    # subjects would hold their memory until it leaves the window.
                    slices[index] = {}
        self.evicted += len(victims)


class DistinctCounter:
    """How many distinct values each subject showed within the window (users probed,
    numbers called). At most `max_values` are remembered per subject: the count then
    stays at that figure, which is already far past any threshold."""

    __slots__ = ("_subjects", "cap", "evicted", "max_values", "window_s")

    def __init__(self, window_s: float, cap: int, max_values: int) -> None:
        if window_s <= 0 or cap < 1 or max_values < 1:
            raise ValueError("window_s, cap and max_values must be positive")
        self.window_s = window_s
        self.cap = cap
        self.max_values = max_values
        self.evicted = 0
        # subject -> value -> last time seen; both levels least recently seen first
        self._subjects: dict[str, dict[str, float]] = {}

    def __len__(self) -> int:
        return len(self._subjects)

    def add(self, subject: str, value: str, now: float) -> int:
        subjects = self._subjects
        values = subjects.pop(subject, None)
        if values is None:
            values = {}
            if len(subjects) >= self.cap:
                self.evicted += len(evict_oldest(subjects, self.cap - 1))
        subjects[subject] = values
        values.pop(value, None)
        values[value] = now
        horizon = now - self.window_s
        while True:  # oldest first; never empty, the value just added is in time
            oldest = next(iter(values))
            if values[oldest] >= horizon:
                break
            del values[oldest]
        if len(values) > self.max_values:
            del values[next(iter(values))]
        return len(values)

    def count(self, subject: str, now: float) -> int:
        values = self._subjects.get(subject)
        if values is None:
            return 0
        horizon = now - self.window_s
        return sum(1 for seen in values.values() if seen >= horizon)

    def expire(self, now: float) -> None:
        """Drop subjects with nothing in the window. Subjects are in order of their last
        value, so the walk stops at the first one still active; stale values of active
        subjects go when the subject is next updated."""
        horizon = now - self.window_s
        subjects = self._subjects
        idle: list[str] = []
        for subject, values in subjects.items():
            if next(reversed(values.values())) >= horizon:
                break
            idle.append(subject)
        for subject in idle:
            del subjects[subject]


_Run = tuple[str, str, int, int, float]  # (caller, trunk, caller's run, trunk's run, time)


def _longer(
    old: _Run, caller: str, trunk: str, caller_run: int, trunk_run: int, now: float
) -> _Run:
    """The entry a call leaves where a run in time already waits: each subject's
    longer run."""
    if old[0] == caller and old[2] > caller_run:
        caller_run = old[2]
    if old[1] == trunk and old[3] > trunk_run:
        trunk_run = old[3]
    return (caller, trunk, caller_run, trunk_run, now)


class RunTracker:
    """Runs of consecutive numbers (sequential dialling), up or down, for two subjects
    of a call at once (its caller and its trunk), whatever calls come in between.

    One map from the number a run expects next (negated for runs going down) to the
    caller, trunk, each one's run length, and when the run last grew: a call to N
    extends the runs left at N and leaves runs at N+1 and N-1. There is no state per
    subject, so a subject that makes no runs costs two entries for `max_gap_s`; the map
    holds at most `cap` entries, the oldest evicted first.
    """

    __slots__ = ("_expected", "cap", "evicted", "max_gap_s")

    def __init__(self, max_gap_s: float, cap: int) -> None:
        if max_gap_s <= 0 or cap < 1:
            raise ValueError("max_gap_s and cap must be positive")
        self.max_gap_s = max_gap_s
        self.cap = cap
        self.evicted = 0
        # expected next number -> (caller, trunk, caller's run, trunk's run, time)
        self._expected: dict[int, _Run] = {}

    def __len__(self) -> int:
        return len(self._expected)

    def add(self, caller: str, trunk: str, number: int, now: float) -> tuple[int, int]:
        """Record a call from `caller` on `trunk` ("" for none) to `number`; return the
        length of the longest run it extends for each."""
        expected = self._expected
        horizon = now - self.max_gap_s
        caller_up = trunk_up = caller_down = trunk_down = 1
        up = expected.pop(number, None)
        if up is not None and up[4] >= horizon:
            if caller and up[0] == caller:
                caller_up = up[2] + 1
            if trunk and up[1] == trunk:
                trunk_up = up[3] + 1
        down = expected.pop(-number, None)
        if down is not None and down[4] >= horizon:
            if caller and down[0] == caller:
                caller_down = down[2] + 1
            if trunk and down[1] == trunk:
                trunk_down = down[3] + 1
        # The runs left at N+1 and N-1; a redial of a number in a run leaves the longer
        # run where it was. Most calls extend nothing and find nothing there: one entry
        # serves both keys then.
        key = number + 1
        old = expected.pop(key, None)
        if old is not None and old[4] >= horizon:
            entry = _longer(old, caller, trunk, caller_up, trunk_up, now)
        else:
            entry = (caller, trunk, caller_up, trunk_up, now)
        expected[key] = entry
        key = 1 - number
        old = expected.pop(key, None)
        if old is not None and old[4] >= horizon:
            expected[key] = _longer(old, caller, trunk, caller_down, trunk_down, now)
        elif caller_down == entry[2] and trunk_down == entry[3]:
            expected[key] = entry
        else:
            expected[key] = (caller, trunk, caller_down, trunk_down, now)
        if len(expected) > self.cap:
            self.evicted += len(evict_oldest(expected, self.cap))
        caller_run = caller_up if caller_up > caller_down else caller_down
        return caller_run, trunk_up if trunk_up > trunk_down else trunk_down

    def expire(self, now: float) -> None:
        """Drop runs that can no longer grow (oldest first, so the walk stops early)."""
        horizon = now - self.max_gap_s
        expected = self._expected
        stale: list[int] = []
        for key, entry in expected.items():
            if entry[4] >= horizon:
                break
            stale.append(key)
        for key in stale:
            del expected[key]


class Gauge:
    """A level per subject that goes up and down (answered calls in progress). Subjects
    at zero are dropped, so its size follows the calls in progress, which the monitor
    caps; it cannot go below zero whatever the order of events."""

    __slots__ = ("levels",)

    def __init__(self) -> None:
        self.levels: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.levels)

    def up(self, subject: str) -> int:
        level = self.levels.get(subject, 0) + 1
        self.levels[subject] = level
        return level

    def down(self, subject: str) -> None:
        level = self.levels.get(subject, 0) - 1
        if level > 0:
            self.levels[subject] = level
        else:
            self.levels.pop(subject, None)

    def get(self, subject: str) -> int:
        return self.levels.get(subject, 0)


HOURS_PER_DAY: Final = 24
_HOUR: Final = 3600.0


class _Season:
    __slots__ = ("acc", "hour", "learning", "slots")

    def __init__(self, hour: int) -> None:
        self.hour = hour  # absolute hour (since the epoch) being accumulated
        self.acc = 0.0
        self.learning = True  # the first hour is seen only in part: it seeds nothing
        self.slots: list[float | None] = [None] * HOURS_PER_DAY


class SeasonalBaseline:
    """A subject's own normal for each hour of the day (UTC): per hour, an exponentially
    weighted average over days of what the subject did in that hour (a sum of events, or
    the highest level). Daily curves make an average over all hours useless: a trunk's
    busy hour is many times its night, and a surge must be measured against the same
    hour on other days. An hour of the day seen for the first time has no baseline yet.
    """

    __slots__ = ("_rolled", "_subjects", "alpha", "cap", "evicted", "peak")

    def __init__(self, alpha: float, cap: int, *, peak: bool) -> None:
        if not 0 < alpha <= 1 or cap < 1:
            raise ValueError("alpha must be in (0, 1] and cap positive")
        self.alpha = alpha
        self.cap = cap
        self.peak = peak  # True: the hour's highest level; False: the hour's sum
        self.evicted = 0
        self._subjects: dict[str, _Season] = {}
        self._rolled = -1  # the hour `roll` last closed

    def __len__(self) -> int:
        return len(self._subjects)

    def observe(self, subject: str, now: float, value: float) -> None:
        """Add `value` to this hour's sum, or raise this hour's peak to it."""
        season = self._season(subject, now, value)
        if self.peak:
            season.acc = max(season.acc, value)
        else:
            season.acc += value

    def update(self, subject: str, now: float, value: float) -> float | None:
        """`observe`, then `expected`, in one lookup (the per-call path)."""
        season = self._subjects.get(subject)
        if season is None or now >= (season.hour + 1) * _HOUR:
            season = self._season(subject, now, value)
        if self.peak:
            season.acc = max(season.acc, value)
        else:
            season.acc += value
        hour = season.hour
        this = season.slots[hour % HOURS_PER_DAY]
        if this is None:
            return None
        before = season.slots[(hour - 1) % HOURS_PER_DAY]
        return this if before is None or before < this else before

    def expected(self, subject: str, now: float) -> float | None:
        """The baseline for the hour containing `now` (the higher of this hour's and the
        previous hour's, since a sliding hour straddles both), or None while learning."""
        season = self._subjects.get(subject)
        if season is None:
            return None
        hour = int(now // _HOUR)
        this = season.slots[hour % HOURS_PER_DAY]
        if this is None:
            return None
        before = season.slots[(hour - 1) % HOURS_PER_DAY]
        return this if before is None or before < this else before

    def roll(self, now: float, levels: dict[str, int] | None = None) -> None:
        """Close every subject's finished hours, including hours with no events at all.
        `levels` gives the current level of peak subjects (carried into the new hour)."""
        hour = int(now // _HOUR)
        if hour <= self._rolled:
            return
        self._rolled = hour
        for subject, season in self._subjects.items():
            if season.hour < hour:
                carry = float(levels.get(subject, 0)) if levels is not None else 0.0
                self._fold(season, hour, carry)

    def snapshot(self) -> dict[str, list[float | None]]:
        return {subject: list(season.slots) for subject, season in self._subjects.items()}

    def restore(self, slots: dict[str, list[float | None]], now: float) -> None:
        for subject, values in slots.items():
            if len(values) != HOURS_PER_DAY:
                raise ValueError(f"baseline of {len(values)} hours, expected {HOURS_PER_DAY}")
            season = self._season(subject, now, 0.0)
            season.slots = [None if v is None or not math.isfinite(v) else float(v) for v in values]

    def _season(self, subject: str, now: float, carry: float) -> _Season:
        hour = int(now // _HOUR)
        subjects = self._subjects
        season = subjects.get(subject)
        if season is None:
            if len(subjects) >= self.cap:
                self.evicted += len(evict_oldest(subjects, self.cap - 1))
            season = subjects[subject] = _Season(hour)
        elif season.hour < hour:
            self._fold(season, hour, carry if self.peak else 0.0)
        return season

    def _fold(self, season: _Season, hour: int, carry: float) -> None:
        alpha = self.alpha
        slots = season.slots
        rest = carry if self.peak else 0.0  # what an hour without events amounts to
        # A subject silent for days folds each hour of the day once: older days add nothing.
        first = max(season.hour, hour - HOURS_PER_DAY)
        acc = season.acc if first == season.hour else rest
        for closed in range(first, hour):
            if not (season.learning and closed == season.hour):
                slot = closed % HOURS_PER_DAY
                old = slots[slot]
                slots[slot] = acc if old is None else old + alpha * (acc - old)
            acc = rest
        season.learning = False
        season.hour = hour
        season.acc = rest
