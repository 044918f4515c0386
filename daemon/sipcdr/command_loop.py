"""The event loop of a command that ends on its own (`import`, `db migrate`, the privacy
commands): SIGTERM stops it as Ctrl-C does.

A service manager or `kill` sends SIGTERM; its default action ends the process where it
stands, leaving an embedded PostgreSQL running with no holder and an import's spool
behind. Here the first SIGTERM cancels the command's task instead, so its clean-up
runs (sinks closed, the embedded server stopped, the spool removed), and the command
ends with `Terminated`, which the command line reports with exit status 143.

A second one raises `Terminated` at once, wherever the process is, as a second Ctrl-C
raises KeyboardInterrupt: the way out of a command blocked outside the event loop (a
FIFO that went quiet, a full stdout pipe), whose task the first could only mark. Since
`timeout` and service managers send one SIGTERM, a loop that has not turned within
`BLOCKED_AFTER_S` of it is sent the second by this process itself. `sipcdr run`
handles SIGTERM itself (a clean stop, exit 0).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Coroutine
from types import FrameType
from typing import Any, Final, TypeVar

T = TypeVar("T")

# Longer than any step an import takes between two turns of its loop (a slice of
# packets, a whole RTP file's frames without SIP): a loop silent this long is blocked.
BLOCKED_AFTER_S: Final = 5.0


class Terminated(KeyboardInterrupt):
    """SIGTERM stopped the command; after one, its clean-up has run."""


def run_command(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, stopped by SIGTERM as above. A SIGTERM the caller ignores
    stays ignored, and the caller's own handling comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        return asyncio.run(main)  # signals reach the main thread only
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:
        return asyncio.run(main)
    stop = _Stop()
    # Started before any signal: a thread started inside a handler could wait for a
    # lock the interrupted code holds (threading's own, when it starts a thread). With
    # SIGINT and SIGTERM blocked in it, so that the kernel never hands it one the main
    # thread keeps blocked a moment for itself (`deliverer.spawn_ignoring`).
    stopping = {signal.SIGINT, signal.SIGTERM}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
    try:
        watchdog = threading.Thread(target=stop.unblock, name="sipcdr-sigterm", daemon=True)
        watchdog.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    # Held through asyncio.run's own end too (tasks cancelled, threads joined).
    signal.signal(signal.SIGTERM, stop.on_sigterm)
    try:
        return asyncio.run(stop.watch(main))
    except (asyncio.CancelledError, Exception) as exc:
        # Once terminated, whatever the cancel led to (a child process ended by the
        # same signal to the group, a wait cut short) is the termination.
        if stop.signals:
            raise Terminated from exc
        raise
    except KeyboardInterrupt:
        stop.forget_task()
        raise
    finally:
        stop.finished()  # first: no watchdog signal after the handler is put back
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class _Stop:
    """The command's task, and how many SIGTERMs have come (asyncio.Runner's way with
    SIGINT)."""

    def __init__(self) -> None:
        self.signals = 0
        self._task: asyncio.Task[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signalled = threading.Event()
        self._turned = threading.Event()
        self._over = False
        self._over_lock = threading.Lock()  # `finished` against the watchdog's signal

    async def watch(self, main: Coroutine[Any, Any, T]) -> T:
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        if self.signals:  # one came before the loop ran: nothing started yet
            main.close()
            raise asyncio.CancelledError
        return await main

    def on_sigterm(self, _signum: int, _frame: FrameType | None) -> None:
        self.signals += 1
        task, loop = self._task, self._loop
        if self.signals > 1:
            raise Terminated
        if task is None or loop is None:
            return  # before the loop ran: `watch` ends the command
        if task.done() or loop.is_closed():
            raise Terminated  # past the command, in asyncio.run's end: as for SIGINT
        task.cancel()
        loop.call_soon_threadsafe(self._turned.set)  # also wakes a loop in select
        self._signalled.set()

    def unblock(self) -> None:
        """The watchdog's thread: the second SIGTERM a person would send, sent for them
        when the loop did not turn after the first, which only marked a task that never
        runs again."""
        self._signalled.wait()
        if self._turned.wait(BLOCKED_AFTER_S):
            return
        with self._over_lock:
            if not self._over:
                os.kill(os.getpid(), signal.SIGTERM)

    def finished(self) -> None:
        """The command is over: the watchdog ends without a signal."""
        with self._over_lock:
            self._over = True
        self._turned.set()
        self._signalled.set()

    def forget_task(self) -> None:
        """A KeyboardInterrupt raised inside the task (a second signal landing in its
        code) ended it: taken here, so no "exception was never retrieved" follows."""
        task = self._task
        if task is not None and task.done() and not task.cancelled():
            task.exception()
