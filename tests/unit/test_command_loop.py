"""SIGTERM stops a one-shot command as Ctrl-C does: the command's clean-up runs, and it
ends with `Terminated`."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from sipcdr.command_loop import Terminated, run_command


def test_sigterm_cancels_the_command_and_its_clean_up_runs() -> None:
    cleaned: list[str] = []

    async def command() -> None:
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
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
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        try:
            await asyncio.sleep(30)
        finally:
            loop.call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
            try:
                await asyncio.sleep(30)  # a drain that would wait out its timeout
            finally:
                cleaned.append("cut short")

    with pytest.raises(Terminated):
        run_command(command())
    assert cleaned == ["cut short"]


def test_a_command_that_ends_returns_its_result() -> None:
    async def command() -> int:
        await asyncio.sleep(0)
        return 7

    assert run_command(command()) == 7
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
