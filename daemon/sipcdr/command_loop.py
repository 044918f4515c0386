"""The event loop of a command that ends on its own (`import`, `db migrate`, the privacy
commands): SIGTERM stops it as Ctrl-C does.

A service manager, `timeout` or `kill` sends SIGTERM; its default action ends the
process where it stands, leaving an embedded PostgreSQL running with no holder and an
import's spool behind. Here it cancels the command's task instead, so its clean-up
runs (sinks closed, the embedded server stopped, the spool removed), and the command
ends with `Terminated`, which the command line reports with exit status 143. `sipcdr
run` handles SIGTERM itself (a clean stop, exit 0).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Terminated(KeyboardInterrupt):
    """SIGTERM stopped the command; its clean-up has run, as after Ctrl-C."""


def run_command(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, with SIGTERM cancelling `main` (a second one cancels it
    again, as a second Ctrl-C does) and then raising `Terminated`."""
    return asyncio.run(_stopped_by_sigterm(main))


async def _stopped_by_sigterm(main: Coroutine[Any, Any, T]) -> T:
    task = asyncio.current_task()
    if task is None or threading.current_thread() is not threading.main_thread():
        # Signals reach the main thread only; a caller elsewhere keeps its own.
        return await main
    loop = asyncio.get_running_loop()
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        return await main
    except asyncio.CancelledError:
        if terminated:
            raise Terminated from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
