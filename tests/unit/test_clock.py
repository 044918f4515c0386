"""The fake clock moves only when told, and what waits on it wakes exactly then."""

from __future__ import annotations

import asyncio

import pytest
from sipcdr.clock import SYSTEM_CLOCK, FakeClock, settle


async def test_sleeps_wake_when_the_time_reaches_them_in_order() -> None:
    clock = FakeClock()
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    tasks = [asyncio.create_task(sleeper(n, s)) for n, s in (("b", 2.0), ("a", 1.0))]
    await settle()
    assert clock.sleepers == 2
    clock.advance(0.999)
    await settle()
    assert woke == []
    clock.advance(0.001)
    await settle()
    assert woke == ["a"]
    clock.advance(5.0)
    await settle()
    assert woke == ["a", "b"]
    await asyncio.gather(*tasks)
    assert clock.sleepers == 0


async def test_a_cancelled_sleep_is_forgotten() -> None:
    clock = FakeClock()
    task = asyncio.create_task(clock.sleep(1.0))
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert clock.sleepers == 0
    clock.advance(2.0)  # nothing left to wake, nothing raises


async def test_a_timeout_fires_on_the_clock_and_not_before() -> None:
    clock = FakeClock()
    never = asyncio.Event()

    async def guarded() -> str:
        try:
            async with clock.timeout(3.0):
                await never.wait()
        except TimeoutError:
            return "timed out"
        return "set"

    task = asyncio.create_task(guarded())
    await settle()
    clock.advance(2.9)
    await settle()
    assert not task.done()
    clock.advance(0.1)
    assert await task == "timed out"


async def test_a_block_that_ends_before_its_timeout_is_not_touched_by_it() -> None:
    clock = FakeClock()
    async with clock.timeout(1.0):
        await asyncio.sleep(0)
    clock.advance(2.0)  # the expired deadline of a finished block does nothing
    await settle()
    with pytest.raises(TimeoutError):
        async with clock.timeout(0):
            await asyncio.sleep(1)


def test_wall_and_monotonic_move_together_and_the_wall_can_step() -> None:
    clock = FakeClock(wall_start=1_800_000_000.0, monotonic_start=50.0)
    clock.advance(2.5)
    assert (clock.time(), clock.monotonic()) == (1_800_000_002.5, 52.5)
    clock.set_time(1_700_000_000.0)  # NTP steps the wall clock back
    assert (clock.time(), clock.monotonic()) == (1_700_000_000.0, 52.5)
    with pytest.raises(ValueError):
        clock.advance(-1)


async def test_run_for_lets_a_periodic_task_run_as_often_as_in_real_time() -> None:
    clock = FakeClock()
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            await clock.sleep(1.0)
            ticks.append(clock.monotonic())

    task = asyncio.create_task(ticker())
    await settle()
    await clock.run_for(5.0, step=0.5)
    task.cancel()
    assert ticks == [1001.0, 1002.0, 1003.0, 1004.0, 1005.0]


def test_the_system_clock_reads_the_host_clocks() -> None:
    import time

    before = time.time()
    assert before <= SYSTEM_CLOCK.time() <= time.time()
    assert SYSTEM_CLOCK.monotonic() <= time.monotonic()


async def test_a_timer_fires_at_its_time_on_the_next_turn_and_a_cancelled_one_never() -> None:
    clock = FakeClock()
    fired: list[str] = []
    clock.call_later(1.0, lambda: fired.append("kept"))
    dropped = clock.call_later(1.0, lambda: fired.append("dropped"))
    late = clock.call_later(2.0, lambda: fired.append("cancelled at its time"))
    dropped.cancel()
    clock.advance(0.999)
    await settle()
    assert fired == []
    clock.advance(0.001)
    assert fired == []  # on the event loop's next turn, as a real timer
    await settle()
    assert fired == ["kept"]
    clock.advance(1.0)
    late.cancel()  # due, not yet run: a real timer cancelled then is not called either
    await settle()
    assert fired == ["kept"]


async def test_the_system_clock_timer_fires_and_cancels() -> None:
    fired: list[str] = []
    SYSTEM_CLOCK.call_later(0.01, lambda: fired.append("kept"))
    SYSTEM_CLOCK.call_later(0.01, lambda: fired.append("dropped")).cancel()
    await asyncio.sleep(0.05)
    assert fired == ["kept"]
