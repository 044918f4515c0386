"""SIGTERM stops a one-shot command as Ctrl-C does: the first cancels it and its
clean-up runs, a second raises at once, and it ends with `Terminated`."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sipcdr import command_loop
from sipcdr.command_loop import Terminated, run_command


def sigterm_in(seconds: float) -> None:
    asyncio.get_running_loop().call_later(seconds, os.kill, os.getpid(), signal.SIGTERM)


@pytest.fixture(autouse=True)
def default_sigterm() -> Iterator[None]:
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, before)


def test_sigterm_cancels_the_command_and_its_clean_up_runs() -> None:
    cleaned: list[str] = []

    async def command() -> None:
        sigterm_in(0.05)
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.append("closed")

    with pytest.raises(Terminated):
        run_command(command())
    assert cleaned == ["closed"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_second_sigterm_cuts_a_slow_clean_up_short() -> None:
    cleaned: list[str] = []

    async def command() -> None:
        sigterm_in(0.05)
        try:
            await asyncio.sleep(30)
        finally:
            sigterm_in(0.05)
            try:
                await asyncio.sleep(30)  # a drain that would wait out its timeout
            finally:
                cleaned.append("cut short")

    with pytest.raises(Terminated):
        run_command(command())
    assert cleaned == ["cut short"]


@pytest.mark.parametrize(
    "sigterms", [(0.05, 0.3), (0.05,)], ids=["a_second_sigterm", "one_sigterm_and_the_watchdog"]
)
def test_a_command_blocked_outside_the_loop_is_freed(
    monkeypatch: pytest.MonkeyPatch, sigterms: tuple[float, ...]
) -> None:
    """Reading a FIFO that went quiet blocks the event loop's thread: the first SIGTERM
    can only cancel a task that never runs again; a second raises in the read, and
    since `timeout` and service managers send one, the process sends itself the
    second when its loop stays silent."""
    monkeypatch.setattr(command_loop, "BLOCKED_AFTER_S", 0.5)
    quiet, writer = os.pipe()
    cleaned: list[str] = []

    async def command() -> None:
        # From another thread: the loop's timers never run while the read blocks.
        for delay in sigterms:
            threading.Timer(delay, os.kill, (os.getpid(), signal.SIGTERM)).start()
        try:
            os.read(quiet, 1)  # blocks: nothing is ever written
        finally:
            cleaned.append("closed")

    started = time.monotonic()
    try:
        with pytest.raises(Terminated):
            run_command(command())
    finally:
        os.close(quiet)
        os.close(writer)
    assert cleaned == ["closed"]
    assert time.monotonic() - started < 5


def test_a_loop_that_turns_is_not_sent_a_second_sigterm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clean-up that takes longer than the wait, its loop turning, is let finish."""
    monkeypatch.setattr(command_loop, "BLOCKED_AFTER_S", 0.1)
    cleaned: list[str] = []

    async def command() -> None:
        sigterm_in(0.05)
        try:
            await asyncio.sleep(30)
        finally:
            await asyncio.sleep(0.5)  # stopping an embedded server, say
            cleaned.append("closed")

    with pytest.raises(Terminated):
        run_command(command())
    assert cleaned == ["closed"]


def test_what_the_cancel_leads_to_is_reported_as_the_termination() -> None:
    """A child process ended by the same SIGTERM to the group makes the command fail
    with its own error: it was terminated all the same."""

    async def command() -> None:
        sigterm_in(0.05)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise OSError("the delivery process ended as it started") from None

    with pytest.raises(Terminated):
        run_command(command())


def test_a_command_that_ends_returns_its_result() -> None:
    async def command() -> int:
        await asyncio.sleep(0)
        return 7

    assert run_command(command()) == 7
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_the_callers_handling_of_sigterm_is_kept() -> None:
    def own(_signum: int, _frame: object) -> None:
        raise AssertionError("not reached")

    signal.signal(signal.SIGTERM, own)

    async def command() -> int:
        return 7

    assert run_command(command()) == 7
    assert signal.getsignal(signal.SIGTERM) is own
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ignored: left ignored throughout
    assert run_command(command()) == 7
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_a_sigterm_during_asyncio_runs_own_end_stops_it_too() -> None:
    """The command is over but its event loop waits for a thread (asyncio.run's end):
    a SIGTERM then is not lost."""

    async def command() -> int:
        asyncio.get_running_loop().run_in_executor(None, time.sleep, 0.6)
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        return 7

    with pytest.raises(Terminated):
        run_command(command())


def test_the_watchdog_thread_takes_no_stop_signal_meant_for_the_main_thread() -> None:
    """Blocked in it: the kernel hands a SIGINT or SIGTERM to a thread that does not
    block it, and one the main thread holds back a moment would be lost there."""

    async def command() -> set[int]:
        (watchdog,) = [t for t in threading.enumerate() if t.name == "sipcdr-sigterm"]
        status = Path(f"/proc/self/task/{watchdog.native_id}/status").read_text()
        mask = int(
            next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16
        )
        return {number for number in (signal.SIGINT, signal.SIGTERM) if mask >> (number - 1) & 1}

    assert run_command(command()) == {signal.SIGINT, signal.SIGTERM}
