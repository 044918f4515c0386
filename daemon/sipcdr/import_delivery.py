"""An import's delivery in a process of its own, fed by the import's spool.

Where the sinks keep signaling (PostgreSQL, the default), delivering a capture costs
about as much as reading it: the COPY rows of every message, each CDR's JSON. In one
process the two take turns on one core; apart, the import reads, parses and correlates
on one core while this process writes to the sinks on another, as `sipcdr run` does
(`sipcdr.deliverer`). The import's own spool is the whole hand-over: the import
appends, this process reads it (`Outputs` role "deliver") and tells the import, several
times a second, how far each sink has confirmed (a `DeliverySnapshot`, which the
import's `Outputs.remote` holds), so the import waits for a full spool as it does in
one process.

Apart only when it pays (`delivers_apart`): a process started costs about a second,
paid back from about a hundred thousand messages on. `[spool] delivery_processes` 1
always, 0 never.

Messages on the pipe, to this process: {"next_seq": {stream: n}} (what the spool
holds; with "stop": seconds, drain up to there and end). From it: a `DeliverySnapshot`
(the first one says the sinks are open and the restriction list is in force), then
{"done": bool, "undelivered": {"sink/stream": records}}; or, at its start, {"refused":
why} (`RestrictionsUnavailable`) or {"error": why} (the sinks could not be opened).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Final

import structlog

from sipcdr.config import Config, output_settings
from sipcdr.deliverer import make_picklable, watch_spools
from sipcdr.privacy.import_list import RestrictionsUnavailable, apply_restrictions, drain
from sipcdr.privacy.stats import PrivacyStats
from sipcdr.sinks.outputs import Outputs
from sipcdr.sinks.remote import DeliverySnapshot, sink_plans, take_snapshot

# A process's start (a fresh interpreter, its imports) is about a second on a small
# machine; delivering apart saves about as much per 100,000 SIP messages, some 70 MB
# of capture. Below this, one process is as fast.
APART_FROM_BYTES: Final = 64 * 1024 * 1024
SNAPSHOT_INTERVAL_S: Final = 0.1  # how stale the import's view of the sinks may be
# The start: an embedded PostgreSQL's first start initialises its data folder.
STARTUP_TIMEOUT_S: Final = 120.0
STOP_GRACE_S: Final = 20.0  # beyond the drain: the sinks' own stop, an embedded server
_log = structlog.get_logger("sipcdr.import")


def delivers_apart(config: Config, files: Sequence[Path]) -> bool:
    """Whether an import of `files` delivers from a process of its own."""
    if not sink_plans(output_settings(config)):
        return False
    processes = config.spool.delivery_processes
    if processes >= 0:
        return processes > 0
    if (os.cpu_count() or 1) < 2:
        return False
    size = 0
    for path in files:
        with contextlib.suppress(OSError):  # the import says what is wrong with it
            size += path.stat().st_size
    return size >= APART_FROM_BYTES


class ImportDelivery:
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

    @property
    def ended(self) -> int | None:
        """Its exit code once it has ended, else None."""
        process = self._process
        if process is None or process.is_alive():
            return None
        return process.exitcode if process.exitcode is not None else -1

    def has_ended(self) -> bool:
        return self.ended is not None

    async def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Start it and wait until its sinks are open and the restriction list is in
        force; raise RestrictionsUnavailable or OSError as an import in one process
        would."""
        loop = asyncio.get_running_loop()
        self._first = loop.create_future()
        self._done = loop.create_future()
        make_picklable(self.config)
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(
            target=child_main,
            args=(self.config, self.spool_dir, child),
            name="sipcdr-import-deliver",
        )
        # Ctrl-C reaches the terminal's whole group: the import decides what its
        # delivery does then (it ends it), so the child ignores it from its first
        # instruction; blocked here meanwhile, so this process keeps its own.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGINT,))
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            process.start()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler if handler is None else handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child.close()
        self._process, self._conn = process, parent
        loop.add_reader(parent.fileno(), self._readable)
        loop.add_reader(process.sentinel, self._ended)
        _log.info("import_delivery_process_started", pid=process.pid)
        try:
            async with asyncio.timeout(timeout_s):
                await self._first
        except TimeoutError:
            raise OSError(
                f"the import's delivery process did not start within {timeout_s:g} s"
            ) from None

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
        elif "done" in message and not self._done.done():
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

    def _forget_conn(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._conn.fileno())
            self._conn.close()
            self._conn = None

    def _send(self, message: dict[str, Any]) -> None:
        if self._conn is None:
            return
        try:
            self._conn.send(message)
        except (OSError, ValueError):
            self._forget_conn()

    async def finish(
        self, next_seq: Mapping[str, int], timeout_s: float
    ) -> tuple[bool, dict[str, int]]:
        """Have it deliver up to `next_seq` within `timeout_s` and end: whether every
        sink got every record, and what each sink and stream did not get."""
        assert self._done is not None
        self._send({"stop": timeout_s, "next_seq": dict(next_seq)})
        deadline = time.monotonic() + timeout_s + STOP_GRACE_S
        while not self._done.done() and self.ended is None and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await asyncio.shield(self._done)
        if self._done.done():
            result = self._done.result()
            return bool(result["done"]), dict(result["undelivered"])
        # Ended or stuck without a word: its last counts say what is missing.
        return False, self.lag(next_seq)

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
            self._send({"stop": 0.0, "next_seq": {}})
            deadline = time.monotonic() + STOP_GRACE_S
            while process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if process.is_alive():
                _log.error("import_delivery_stop_timeout", pid=process.pid)
                process.kill()
                await asyncio.to_thread(process.join, 5)
        self._ended()
        self._process = None


# -- the delivery process ------------------------------------------------------------


def child_main(config: Config, spool_dir: Path, conn: Connection) -> None:
    """The import's delivery process (spawned: a fresh interpreter)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the import ends it (see above)
    from sipcdr.telemetry.logs import configure  # noqa: PLC0415

    configure()
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        runner: Callable[..., Any] = asyncio.run
    else:
        runner = uvloop.run
    runner(_deliver(config, spool_dir, conn))


async def _deliver(config: Config, spool_dir: Path, conn: Connection) -> None:
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


async def _serve(outputs: Outputs, conn: Connection) -> None:
    watch = watch_spools(outputs)
    privacy = PrivacyStats()  # an import runs no retention: stays empty
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def readable() -> None:
        try:
            while conn.poll():
                inbox.put_nowait(conn.recv())
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            inbox.put_nowait(None)  # the import is gone: nothing more to do

    loop.add_reader(conn.fileno(), readable)
    try:
        _send(conn, take_snapshot(outputs, privacy))
        while True:
            message: dict[str, Any] | None = {}
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SNAPSHOT_INTERVAL_S):
                    message = await inbox.get()
            if message is None:
                return
            next_seq = dict(message.get("next_seq", {}))
            for stream, seq in next_seq.items():
                tail = outputs.tails.get(stream)
                if tail is not None:
                    tail.note_next_seq(int(seq))
            if "stop" in message:
                timeout_s = float(message["stop"])
                delivered = await drain(outputs, timeout_s)
                _send(conn, take_snapshot(outputs, privacy))
                _send(conn, {"done": delivered, "undelivered": _undelivered(outputs)})
                return
            _send(conn, take_snapshot(outputs, privacy))
    finally:
        with contextlib.suppress(Exception):
            loop.remove_reader(conn.fileno())
        if watch is not None:
            watch.close()


def _undelivered(outputs: Outputs) -> dict[str, int]:
    missing: dict[str, int] = {}
    if outputs.delivery is not None:
        for state, reader in outputs.delivery.readers():
            if reader.lag_records:
                missing[f"{state.sink}/{state.stream}"] = reader.lag_records
    return missing


def _send(conn: Connection, message: object) -> None:
    with contextlib.suppress(OSError, ValueError):
        conn.send(message)
