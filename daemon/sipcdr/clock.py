"""Where the glue reads the time: wall time, monotonic time, and sleeping.

Components that run timers or timeouts take a `Clock` at construction, so tests drive
them with `FakeClock` instead of real sleeps and elapsed-time bounds. Packet times are
not read here: they come from the capture (the kernel, the HEP agent, the file), and
the correlator's timers run on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import Callable
from time import monotonic as _monotonic
from time import time as _wall
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch: what a record or a capture time is compared to."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never steps back: for deadlines and timeouts."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait this long on this clock."""
        ...

    def timeout(self, seconds: float) -> asyncio.Timeout:
        """`asyncio.timeout`, on this clock: `async with clock.timeout(s):` raises
        TimeoutError when the block has not ended `s` seconds from now."""
        ...

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Timer:
        """Call `callback` on the event loop `seconds` from now, unless cancelled
        first: a timer costs far less than a task that sleeps, where most are
        cancelled long before their time."""
        ...


class Timer(Protocol):
    def cancel(self) -> None: ...


class SystemClock:
    """The host's clocks and the event loop's sleep and timeouts."""

    __slots__ = ()

    # The functions themselves, not wrappers: a capture time read per datagram through
    # the clock costs what `time.time()` costs.
    time = staticmethod(_wall)
    monotonic = staticmethod(_monotonic)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def timeout(self, seconds: float) -> asyncio.Timeout:
        return asyncio.timeout(seconds)

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(seconds, callback)


SYSTEM_CLOCK = SystemClock()


class FakeClock:
    """A clock that moves only when told to. `sleep` returns once `advance` has moved
    the time to its deadline; both clocks move together, the wall clock from
    `wall_start`."""

    def __init__(
        self, wall_start: float = 1_700_000_000.0, monotonic_start: float = 1000.0
    ) -> None:
        self._wall_offset = wall_start - monotonic_start
        self._now = monotonic_start
        # (deadline, order, what to do then): sleeps to wake and timeouts to fire.
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._waiting: set[asyncio.Future[None]] = set()

    def time(self) -> float:
        return self._now + self._wall_offset

    def monotonic(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)  # like asyncio.sleep(0): let other tasks run
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        self._at(seconds, wake)
        self._waiting.add(future)
        try:
            await future
        finally:
            self._waiting.discard(future)

    def timeout(self, seconds: float) -> asyncio.Timeout:
        # An asyncio.Timeout with no deadline of its own, moved to "now" on the event
        # loop's clock once this clock reaches the deadline: it then cancels the block
        # and raises TimeoutError exactly as a real one does.
        loop = asyncio.get_running_loop()
        if seconds <= 0:
            return asyncio.Timeout(loop.time())  # due already, as asyncio.timeout(0)
        timeout = asyncio.Timeout(None)

        def expire() -> None:
            # RuntimeError: the block ended before its deadline, or has not begun.
            with contextlib.suppress(RuntimeError):
                timeout.reschedule(loop.time())

        self._at(seconds, expire)
        return timeout

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Timer:
        # Called on the event loop's next turn, as a real timer's callback is.
        loop = asyncio.get_running_loop()
        handle = _FakeTimer()

        def due() -> None:
            if not handle.cancelled:
                loop.call_soon(handle.run, callback)

        self._at(seconds, due)
        return handle

    def _at(self, seconds: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._due, (self._now + seconds, next(self._order), action))

    @property
    def deadlines(self) -> int:
        """Sleeps and timeouts whose time has not come (a timeout whose block ended
        early stays here until then)."""
        return len(self._due)

    @property
    def sleepers(self) -> int:
        """Sleeps waiting now."""
        return len(self._waiting)

    def advance(self, seconds: float) -> None:
        """Move both clocks on and wake the sleeps whose deadline has come, earliest
        first. The woken tasks run at the event loop's next turns: `await
        settle()` lets them."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += seconds
        while self._due and self._due[0][0] <= self._now:
            _deadline, _n, action = heapq.heappop(self._due)
            action()

    def set_time(self, wall: float) -> None:
        """Step the wall clock (as NTP may) without moving the monotonic one."""
        self._wall_offset = wall - self._now

    async def run_for(self, seconds: float, step: float = 0.05) -> None:
        """Advance by `seconds` in steps of `step`, letting woken tasks run after each:
        what the tasks see matches a real wait of that long, in no real time."""
        remaining = seconds
        while remaining > 1e-9:
            tick = min(step, remaining)
            self.advance(tick)
            remaining -= tick
            await settle()


class _FakeTimer:
    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def run(self, callback: Callable[[], None]) -> None:
        # Cancelled between its time and its turn: not called, as with a real timer.
        if not self.cancelled:
            callback()


async def settle(turns: int = 20) -> None:
    """Let ready tasks run: a few event-loop turns, no time passing."""
    for _ in range(turns):
        await asyncio.sleep(0)
