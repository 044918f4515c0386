"""An import's delivery in a process of its own, fed by the import's spool.

Where the sinks keep signaling (PostgreSQL, the default), delivering a capture costs
about as much as reading it: the COPY rows of every message, each CDR's JSON. In one
process the two take turns on one core; apart, the import reads, parses and correlates
on one core while this process writes to the sinks on another, as `sipcdr run` does
(`sipcdr.deliverer`). The import's own spool is the whole hand-over: the import
appends, this process reads it (`Outputs` role "deliver") and tells the import, fifty
times a second, how far each sink has confirmed (a `DeliverySnapshot`, which the
import's `Outputs.remote` holds), so the import waits for a full spool as it does in
one process.

Apart only where it pays (`delivers_apart`): a sink keeps signaling (CDRs alone are
cheap to deliver), the capture is large enough to pay for the process's start, and
the state disk is above the signaling floor.
`[spool] delivery_processes` 1 always, 0 never.

Messages on the pipe, to this process: {"stop": seconds, "next_seq": {stream: n}}
(drain up to what the spool holds and end; a second stop, the pipe closing or
SIGTERM ends a drain at once). The import sends nothing else while it reads: a
delivery process that stopped reading would fill the pipe and block it. From it: a
`DeliverySnapshot` (the first one says the sinks are open and the restriction list
is in force), then {"undelivered": {"sink/stream": records}}; or, at
its start, {"refused": why} (`RestrictionsUnavailable`) or {"error": why} (the sinks
could not be opened).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Final

import structlog

from sipcdr.config import Config, output_settings
from sipcdr.deliverer import (
    PipeToChild,
    make_picklable,
    pipe_inbox,
    run_event_loop,
    spawn_ignoring,
    watch_spools,
)
from sipcdr.privacy.import_list import (
    RestrictionsUnavailable,
    apply_restrictions,
    drain,
    undelivered,
)
from sipcdr.privacy.stats import PrivacyStats
from sipcdr.private import open_private, private_dir
from sipcdr.sinks.base import STREAM_SIGNALING
from sipcdr.sinks.outputs import Outputs
from sipcdr.sinks.remote import DeliverySnapshot, sink_plans, take_snapshot

# A process's start (a fresh interpreter, its imports, its sinks opened) delays the
# import by 0.2-1 s; delivering signaling apart saves about a second per 100,000 SIP
# messages, some 70 MB of capture. Below this, one process is as fast.
APART_FROM_BYTES: Final = 64 * 1024 * 1024
# How stale the import's view of the sinks may be: below the signaling floor it waits
# for them after every slice it reads.
SNAPSHOT_INTERVAL_S: Final = 0.02
STOP_GRACE_S: Final = 20.0  # beyond the drain: the sinks' own stop, an embedded server
TERM_GRACE_S: Final = 5.0  # a stop asked by SIGTERM: the sinks closed, no drain
# Held by the delivery process while it reads the import's spool: an import started
# meanwhile does not take the folder for one a killed import abandoned.
LOCK_FOLDER: Final = "delivery"
_log = structlog.get_logger("sipcdr.import")


def delivers_apart(config: Config, files: Sequence[Path]) -> bool:
    """Whether an import of `files` delivers from a process of its own."""
    plans = sink_plans(output_settings(config))
    if not config.spool.delivery_apart or not plans:
        return False
    if config.spool.delivery_processes > 0:
        return True
    # CDRs alone (a call's one record against its ten messages) are delivered in a
    # fraction of the reading's time: the second start would cost more than it saves.
    if not any(STREAM_SIGNALING in plan.streams for plan in plans):
        return False
    # Below the signaling floor the import waits for its sinks after every slice it
    # reads: the two processes would take turns, and the hand-over costs more.
    with contextlib.suppress(OSError):
        stat = os.statvfs(config.state.dir)
        if stat.f_bavail * stat.f_frsize < config.spool.signaling_min_free_bytes:
            return False
    size = 0
    for path in files:
        with contextlib.suppress(OSError):  # the import says what is wrong with it
            size += path.stat().st_size
    return size >= APART_FROM_BYTES


class ImportDelivery(PipeToChild):
    """The import's side: starts the process, feeds `outputs.remote` with its counts,
    and has it drain and end."""

    def __init__(self, config: Config, spool_dir: Path, outputs: Outputs) -> None:
        self.config = config
        self.spool_dir = spool_dir
        self.outputs = outputs
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._first: asyncio.Future[None] | None = None
        self._done: asyncio.Future[dict[str, Any]] | None = None
        self._serving = False  # its first counts came: it reads its pipe

    def has_ended(self) -> bool:
        return self._process is not None and not self._process.is_alive()

    @property
    def answered(self) -> bool:
        """Whether it said how its drain went (else it died or stopped answering)."""
        return self._done is not None and self._done.done()

    async def start(self) -> None:
        """Start it and wait until its sinks are open and the restriction list is in
        force; raise RestrictionsUnavailable or OSError as an import in one process
        would. As long as that takes: one process waits too (an embedded server's
        first start, a migration another process holds the lock of), and Ctrl-C ends
        the wait."""
        loop = asyncio.get_running_loop()
        self._first = loop.create_future()
        self._done = loop.create_future()
        make_picklable(self.config)
        # Ctrl-C reaches the terminal's whole group: the import decides what its
        # delivery does then (it ends it), and exiting ends it whatever cut the
        # import's clean-up short (a daemon process).
        process, conn = spawn_ignoring(
            child_main,
            (self.config, self.spool_dir),
            "sipcdr-import-deliver",
            (signal.SIGINT,),
            daemon=True,
        )
        self._process, self._conn = process, conn
        loop.add_reader(conn.fileno(), self._readable)
        loop.add_reader(process.sentinel, self._ended)
        _log.info("import_delivery_process_started", pid=process.pid)
        await self._first

    def _readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            while conn.poll():
                self._take(conn.recv())
        except (EOFError, OSError):
            self._forget_conn()

    def _take(self, message: object) -> None:
        assert self._first is not None and self._done is not None
        if isinstance(message, DeliverySnapshot):
            self._serving = True
            self.outputs.remote = message
            self.outputs.held_for_restrictions = message.held_for_restrictions
            if not self._first.done():
                self._first.set_result(None)
            return
        if not isinstance(message, dict):
            return
        if "refused" in message and not self._first.done():
            self._first.set_exception(RestrictionsUnavailable(str(message["refused"])))
        elif "error" in message and not self._first.done():
            self._first.set_exception(OSError(str(message["error"])))
        elif "undelivered" in message and not self._done.done():
            self._done.set_result(message)

    def _ended(self) -> None:
        process = self._process
        if process is None:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(process.sentinel)
        process.join(1)
        self._readable()  # its last words
        self._forget_conn()
        if self._first is not None and not self._first.done():
            self._first.set_exception(
                OSError(
                    f"the import's delivery process ended as it started (exit {process.exitcode})"
                )
            )

    async def finish(self, next_seq: Mapping[str, int], timeout_s: float) -> dict[str, int]:
        """Have it deliver up to `next_seq` within `timeout_s` and end: what each sink
        and stream did not get (`answered` says whether it told, or this is from its
        last counts)."""
        assert self._done is not None
        self.send({"stop": timeout_s, "next_seq": dict(next_seq)})
        deadline = time.monotonic() + timeout_s + STOP_GRACE_S
        while not self._done.done() and not self.has_ended() and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await asyncio.shield(self._done)
        self._readable()  # an answer sent just before it ended
        if self._done.done():
            return dict(self._done.result()["undelivered"])
        # Ended, or frozen past the drain and its grace (ended now): its last counts
        # say what is missing.
        self._kill()
        return self.lag(next_seq)

    def _kill(self) -> None:
        """End it now: SIGTERM, on which it stops its sinks (and an embedded server),
        then SIGKILL if that takes longer than `TERM_GRACE_S`."""
        process = self._process
        if process is None or not process.is_alive():
            return
        process.terminate()
        process.join(TERM_GRACE_S)
        if process.is_alive():
            _log.error("import_delivery_stop_timeout", pid=process.pid)
            process.kill()
            process.join(5)

    def lag(self, next_seq: Mapping[str, int]) -> dict[str, int]:
        """Each sink and stream's records not confirmed, by its last counts."""
        remote = self.outputs.remote
        missing: dict[str, int] = {}
        for loop in [] if remote is None else remote.loops:
            behind = next_seq.get(loop.state.stream, 0) - loop.confirmed_seq
            if behind > 0:
                missing[f"{loop.state.sink}/{loop.state.stream}"] = behind
        return missing

    async def close(self) -> None:
        """End it: at once when the import stopped early (it drains nothing more)."""
        process = self._process
        if process is None:
            return
        if process.is_alive():
            self.send({"stop": 0.0, "next_seq": {}})
            if not self._serving:
                process.terminate()  # still starting: its pipe is not read yet
            deadline = time.monotonic() + STOP_GRACE_S
            try:
                while process.is_alive() and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
            finally:  # also when this wait is cancelled: nothing may outlive it
                self._kill()
        self._ended()
        if self._first is not None and not self._first.done():
            self._first.cancel()  # a start that timed out: nobody waits for it now
        self._process = None


# -- the delivery process ------------------------------------------------------------


def child_main(config: Config, spool_dir: Path, conn: Connection) -> None:
    """The import's delivery process (spawned: a fresh interpreter; it ignores
    Ctrl-C from its first instruction, see above)."""
    from sipcdr.telemetry.logs import configure  # noqa: PLC0415

    configure()
    # SIGTERM's cancel, its clean-up done: an end as asked, not a failure to report.
    with contextlib.suppress(asyncio.CancelledError):
        run_event_loop(_deliver(config, spool_dir, conn))


async def _deliver(config: Config, spool_dir: Path, conn: Connection) -> None:
    # SIGTERM (from the import ending it, or sent to the whole group) ends the work
    # under way, and the cleanup below still closes the sinks and an embedded server.
    work = asyncio.current_task()
    assert work is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, work.cancel)
    lock = open_private(private_dir(spool_dir / LOCK_FOLDER) / "lock", "wb")
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    outputs = Outputs(
        output_settings(config), spool_dir=spool_dir, restrictions=True, role="deliver"
    )
    reading: asyncio.Task[None] | None = None
    try:
        try:
            await outputs.open()
            reading = await apply_restrictions(outputs)
        except RestrictionsUnavailable as exc:
            _send(conn, {"refused": str(exc)})
            return
        except OSError as exc:
            _send(conn, {"error": str(exc)})
            return
        await _serve(outputs, conn)
    finally:
        if reading is not None:
            reading.cancel()
        await outputs.close(drain_timeout_s=0)
        lock.close()


async def _serve(outputs: Outputs, conn: Connection) -> None:
    watch = watch_spools(outputs)
    privacy = PrivacyStats()  # an import runs no retention: stays empty
    loop = asyncio.get_running_loop()
    inbox = pipe_inbox(conn)  # None: the import is gone, nothing more to do
    # The event loop made the pipe non-blocking; a message sent while the import is not
    # reading (stopped) would fail and be lost, the last answer (what each sink lacks)
    # with it, so sends wait for room instead.
    os.set_blocking(conn.fileno(), True)
    draining: asyncio.Task[bool] | None = None
    try:
        _send(conn, take_snapshot(outputs, privacy))
        while True:
            message: dict[str, Any] | None = {}
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SNAPSHOT_INTERVAL_S):
                    message = await inbox.get()
            if message is None:
                return
            for stream, seq in dict(message.get("next_seq", {})).items():
                tail = outputs.tails.get(stream)
                if tail is not None:
                    tail.note_next_seq(int(seq))
            if "stop" in message:
                if draining is not None:  # stopped early while it drained: at once
                    draining.cancel()
                else:
                    draining = asyncio.create_task(drain(outputs, float(message["stop"])))
            _send(conn, take_snapshot(outputs, privacy))
            if draining is not None and draining.done():
                if not draining.cancelled() and (error := draining.exception()) is not None:
                    _log.error("import_drain_failed", error=repr(error))
                _send(conn, {"undelivered": undelivered(outputs)})
                return
    finally:
        if draining is not None:
            draining.cancel()
        with contextlib.suppress(Exception):
            loop.remove_reader(conn.fileno())
        if watch is not None:
            watch.close()


def _send(conn: Connection, message: object) -> None:
    with contextlib.suppress(OSError, ValueError):
        conn.send(message)
