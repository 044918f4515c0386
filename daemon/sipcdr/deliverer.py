"""Delivery in a process of its own, fed by the spool only.

`sipcdr run` with two cores or more to use (`[spool] delivery_processes`, cores counted
by `config.cores`) splits in two. The capture process receives, parses, correlates,
journals and appends to the spool; it keeps what decides on intake (the spool's limits,
the spare file) because it owns the spool's writer. The delivery process reads the spool
files (`SpoolTail`), writes to the sinks, runs an embedded PostgreSQL and the privacy
task, and keeps its cursors on disk, from which the writer deletes delivered segments.
Nothing else passes between them but a pipe: the capture process sends the spool's
sequence numbers (what a stop drains to) and the sinks the spare file holds; the
delivery process sends its counts once a second, which the capture process exports
(`sinks.remote`).

The spool is the whole hand-over, so a delivery process that dies loses nothing: it is
started again after a back-off (logged at ERROR, counted) and its sinks resume from
their cursors; the records in between wait in the spool, as for a sink that is down.
A capture process that dies leaves the delivery process to see its pipe close: it
delivers what it can within the drain timeout and ends.

Stopping: the capture process stops its intake, writes every CDR into the spool,
fsyncs it, and then tells the delivery process to drain up to the spool's last
sequence number (within `[spool] stop_drain_ms`, as in one process) and end. SIGTERM
and SIGINT may reach both processes (Ctrl-C signals the terminal's whole group, and so
does systemd with `KillMode=control-group`; the shipped unit signals the main one); the
delivery process ignores them and waits for that word, so it never ends before the
capture side has written its last CDR.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, Final

import structlog

from sipcdr.config import Config, output_settings
from sipcdr.delivery import DEFAULT_DRAIN_TIMEOUT_S
from sipcdr.delivery.loop import TAIL_POLL_S
from sipcdr.privacy.plan import spool_retention_days
from sipcdr.privacy.stats import PrivacyStats
from sipcdr.privacy.task import PrivacyTask
from sipcdr.private import open_private
from sipcdr.sinks.outputs import Outputs
from sipcdr.sinks.remote import DeliverySnapshot, carry_counts, take_snapshot
from sipcdr.spool import Spool
from sipcdr.spool.tail import WATCHED_POLL_S, SpoolWatch

SNAPSHOT_INTERVAL_S: Final = 1.0  # the metrics are scraped every 15 s or so
READINESS_POLL_S: Final = 0.05  # a sink that goes down or up reaches /readyz this soon
# A start waits this long at most for the sinks' first connections (a server that
# does not answer is tried on in the background, as in one process).
FIRST_CONNECT_WAIT_S: Final = 2.0
RESTART_BACKOFF_S: Final = (1.0, 30.0)  # first and longest wait before a restart
STABLE_AFTER_S: Final = 60.0  # a process that lived this long starts the back-off anew
# Counts not heard of for this long (ten missed snapshots): a delivery process frozen
# (stopped, swapped out) delivers nothing, and its sinks are shown down until it speaks.
SILENT_AFTER_S: Final = 10.0
# What a stop waits for beyond the drain: the sinks' own stop, an embedded PostgreSQL.
STOP_GRACE_S: Final = 20.0
# A first start may initialise an embedded PostgreSQL's data folder.
STARTUP_TIMEOUT_S: Final = 120.0


def _mapping(items: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    return MappingProxyType(items)


def _reduce_mapping(mapping: Any) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    return _mapping, (dict(mapping),)


def _rebuild(cls: type, values: dict[str, Any]) -> object:
    return cls(**values)


def _reduce_dataclass(item: Any) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    values = {f.name: getattr(item, f.name) for f in dataclasses.fields(item) if f.init}
    return _rebuild, (type(item), values)


def make_picklable(item: object) -> None:
    """The configuration goes to the delivery process pickled: its read-only tables,
    and its frozen dataclasses (compiled ones cannot be restored field by field) built
    anew from their fields."""
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        ForkingPickler.register(type(item), _reduce_dataclass)
        for f in dataclasses.fields(item):
            make_picklable(getattr(item, f.name))
    elif isinstance(item, Mapping):
        for value in item.values():
            make_picklable(value)
    elif isinstance(item, tuple | list | frozenset | set):
        for value in item:
            make_picklable(value)


ForkingPickler.register(MappingProxyType, _reduce_mapping)


class PipeToChild:
    """This process's end of the pipe to a process it started: sending on it, and
    letting it go once the other end is gone."""

    _conn: Connection | None

    def send(self, message: dict[str, Any]) -> None:
        """A message for the process; dropped if it is gone (a restarted one gets the
        next)."""
        if self._conn is None:
            return
        try:
            self._conn.send(message)
        except (OSError, ValueError):
            self._forget_conn()

    def _forget_conn(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._conn.fileno())
            self._conn.close()
            self._conn = None


class DeliveryProcess(PipeToChild):
    """The capture side: starts the delivery process, restarts it when it dies, hands
    it the spool's state and takes its counts."""

    def __init__(self, config: Config, on_snapshot: Callable[[DeliverySnapshot], None]) -> None:
        self.config = config
        self.on_snapshot = on_snapshot
        self.restarts = 0  # times it died and was started again
        self.starts = 0  # processes started: which one a snapshot comes from
        self.log = structlog.get_logger("sipcdr.deliverer")
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._started_at = 0.0
        self._backoff = RESTART_BACKOFF_S[0]
        self._restart: asyncio.TimerHandle | None = None
        self._stopping = False
        # Its first counts: it has opened the sinks (an embedded PostgreSQL started)
        # and read the saved restrictions, what a start in one process waits for.
        self._first: asyncio.Future[None] | None = None

    async def ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Wait for its first counts; raise OSError when it ends or waits too long."""
        if self._first is None:
            self._first = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._first)
        except TimeoutError:
            raise OSError(f"the delivery process did not start within {timeout_s:g} s") from None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        make_picklable(self.config)
        # A SIGTERM to the whole group must not end it while it starts; SIGHUP too: a
        # reload (rate decks) sent to the group, or a terminal's hang-up, is the
        # capture process's to act on; it would end the delivery process.
        process, parent = spawn_ignoring(
            child_main,
            (self.config,),
            "sipcdr-deliver",
            (signal.SIGTERM, signal.SIGINT, signal.SIGHUP),
        )
        self._process, self._conn = process, parent
        self.starts += 1
        self._started_at = time.monotonic()
        loop.add_reader(parent.fileno(), self._readable)
        loop.add_reader(process.sentinel, self._ended)
        self.log.info("delivery_process_started", pid=process.pid)

    def _readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            while conn.poll():
                message = conn.recv()
                if isinstance(message, DeliverySnapshot):
                    self.on_snapshot(message)
                    if self._first is None:
                        self._first = asyncio.get_running_loop().create_future()
                    if not self._first.done():
                        self._first.set_result(None)
        except (EOFError, OSError):
            self._forget_conn()

    def _ended(self) -> None:
        process = self._process
        if process is None:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(process.sentinel)
        process.join(1)  # it has ended: reaped at once
        self._readable()  # its last counts
        self._forget_conn()
        self._process = None
        if self._stopping:
            return
        if self._first is None:
            self._first = asyncio.get_running_loop().create_future()
        if not self._first.done():
            # A first start that fails ends `sipcdr run`, as it did in one process.
            self._first.set_exception(
                OSError(f"the delivery process ended as it started (exit {process.exitcode})")
            )
            self._stopping = True
            return
        lived = time.monotonic() - self._started_at
        if lived >= STABLE_AFTER_S:
            self._backoff = RESTART_BACKOFF_S[0]
        self.restarts += 1
        # Nothing is lost (the records wait in the spool), but nothing is delivered
        # until it runs again.
        self.log.error(
            "delivery_process_died",
            exitcode=process.exitcode,
            lived_s=round(lived, 1),
            restart_in_s=self._backoff,
        )
        self._restart = asyncio.get_running_loop().call_later(self._backoff, self._start_again)
        self._backoff = min(self._backoff * 2, RESTART_BACKOFF_S[1])

    def _start_again(self) -> None:
        self._restart = None
        if self._stopping:
            return
        try:
            self.start()
        except Exception as exc:
            self.restarts += 1
            self.log.error("delivery_process_not_started", error=repr(exc))
            loop = asyncio.get_running_loop()
            self._restart = loop.call_later(self._backoff, self._start_again)
            self._backoff = min(self._backoff * 2, RESTART_BACKOFF_S[1])

    async def stop(self, drain_timeout_s: float | None, next_seq: Mapping[str, int]) -> None:
        """Have it deliver up to `next_seq` (within the drain timeout) and end; ended by
        force when it does not within the drain timeout and `STOP_GRACE_S`."""
        self._stopping = True
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        process = self._process
        if process is None:
            return
        drain = DEFAULT_DRAIN_TIMEOUT_S if drain_timeout_s is None else drain_timeout_s
        self.send({"stop": drain, "next_seq": dict(next_seq)})
        deadline = time.monotonic() + drain + STOP_GRACE_S
        while process.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            self._readable()
        if process.is_alive():
            self.log.error("delivery_process_stop_timeout", pid=process.pid)
            process.kill()
            await asyncio.to_thread(process.join, 5)
        self._ended()


def expire_spools(config: Config, spools: Mapping[str, Spool], now: float) -> dict[str, int]:
    """Retention of the spool's segments, by their writer (which alone deletes them):
    what the privacy task does for the spools when delivery shares its process."""
    dropped: dict[str, int] = {}
    for stream, spool in spools.items():
        days = spool_retention_days(config.retention, stream)
        count = spool.expire_segments(now - days * 86400)
        if count:
            dropped[stream] = count
    return dropped


async def expire_spools_daily(config: Config, spools: Callable[[], Mapping[str, Spool]]) -> None:
    log = structlog.get_logger("sipcdr.privacy")
    while True:
        try:
            for stream, count in expire_spools(config, spools(), time.time()).items():
                log.warning("spool_records_expired", stream=stream, records=count)
        except Exception as exc:
            log.error("retention_failed", error=f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(config.retention.run_interval_s)


# -- the delivery process ------------------------------------------------------------


def child_main(config: Config, conn: Connection) -> None:
    """The delivery process's entry point (spawned: a fresh interpreter)."""
    # The capture process decides when delivery stops (see above).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    from sipcdr.telemetry.logs import configure  # noqa: PLC0415

    configure()
    _lower_priority(config.spool.delivery_nice)
    run_event_loop(_deliver(config, conn))


def spawn_ignoring(
    target: Callable[..., object],
    args: tuple[Any, ...],
    name: str,
    ignored: tuple[signal.Signals, ...],
    *,
    daemon: bool = False,
) -> tuple[BaseProcess, Connection]:
    """A spawned process running `target(*args, conn)`, and this process's end of
    the pipe `conn` is the other end of. It ignores `ignored` from its first
    instruction (an ignored signal stays ignored across exec), so one sent to the
    whole group cannot end it as it starts; they are blocked here meanwhile, so this
    process keeps one that arrives then (Linux queues a blocked signal even while it
    is ignored) for its own handler. A `daemon` one is ended when this process exits,
    where another is waited for."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=target, args=(*args, child), name=name, daemon=daemon)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, ignored)
    handlers = [signal.signal(sig, signal.SIG_IGN) for sig in ignored]
    try:
        process.start()
    finally:
        for sig, handler in zip(ignored, handlers, strict=True):
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    child.close()  # the child's end: its EOF tells the child this process is gone
    return process, parent


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """A spawned process's event loop: uvloop, as the daemon's, where installed."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def _lower_priority(increment: int) -> None:
    """Yield the processor to the capture process when both want it: this process's
    records wait safely in the spool, a datagram the capture side is late for does not
    (`[spool] delivery_nice`). Children it starts (an embedded PostgreSQL) inherit it."""
    if increment <= 0:
        return
    log = structlog.get_logger("sipcdr.deliverer")
    try:
        niceness = os.nice(increment)
    except OSError as exc:
        log.warning("delivery_priority_unchanged", error=exc.strerror or repr(exc))
    else:
        log.info("delivery_priority_lowered", nice=niceness)


async def _deliver(config: Config, conn: Connection) -> None:
    log = structlog.get_logger("sipcdr.deliverer")
    settings = output_settings(config)
    # One reader per cursor: a delivery process left draining by a capture process
    # that died is waited for by the one the next start begins.
    lock = await asyncio.to_thread(_exclusive, settings.state_dir / "spool" / "delivery.lock")
    outputs = Outputs(settings, restrictions=True, role="deliver")
    stats = PrivacyStats()
    await outputs.open()
    watch = watch_spools(outputs)
    privacy = PrivacyTask(config, stats, lambda: outputs.postgres_dsn, outputs.outbound)
    privacy.start()
    # What the capture side's start waits for: open, and the sinks' first connections
    # tried (or a moment passed), so /readyz answers as it did in one process.
    deadline = time.monotonic() + FIRST_CONNECT_WAIT_S
    while not _settled(outputs) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    _send(conn, take_snapshot(outputs, stats))
    loop = asyncio.get_running_loop()
    inbox = pipe_inbox(conn)
    drain: float | None = None
    sent, shown = time.monotonic(), _readiness(outputs)
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(READINESS_POLL_S):
                message = await inbox.get()
                if message is None:
                    log.warning("capture_process_gone", note="delivering what the spool holds")
                    for tail in outputs.tails.values():
                        tail.note_end_on_disk()
                    drain = config.spool.stop_drain_ms / 1000
                    break
                _apply(outputs, message)
                if "stop" in message:
                    drain = float(message["stop"])
                    break
        now, readiness = time.monotonic(), _readiness(outputs)
        if now - sent < SNAPSHOT_INTERVAL_S and readiness == shown:
            continue  # a sink's readiness is sent at once, the counts once a second
        sent, shown = now, readiness
        _send(conn, take_snapshot(outputs, stats))
        with contextlib.suppress(Exception):
            outputs.log_losses()
    with contextlib.suppress(Exception):
        loop.remove_reader(conn.fileno())
    await privacy.stop()
    await outputs.close(drain_timeout_s=drain)
    if watch is not None:
        watch.close()
    outputs.log_losses()
    _send(conn, take_snapshot(outputs, stats))
    log.info("delivery_process_stopped")
    if lock is not None:
        lock.close()


def pipe_inbox(conn: Connection) -> asyncio.Queue[dict[str, Any] | None]:
    """The messages arriving on `conn`, read as they come; None once the other end
    is gone (the process that started this one has ended)."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def readable() -> None:
        try:
            while conn.poll():
                inbox.put_nowait(conn.recv())
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            inbox.put_nowait(None)

    loop.add_reader(conn.fileno(), readable)
    return inbox


def watch_spools(outputs: Outputs) -> SpoolWatch | None:
    """Wake the delivery loops when the capture process writes to the spool, and let
    them look on their own only seldom (`SpoolWatch`); None where the spool's folders
    cannot be watched: the loops then look every `TAIL_POLL_S`, as they do again
    should the watch end."""
    delivery = outputs.delivery
    if delivery is None or not outputs.tails:
        return None

    def lost() -> None:
        delivery.idle_wait_s = TAIL_POLL_S
        structlog.get_logger("sipcdr.deliverer").warning(
            "spool_watch_lost", note=f"looking for records every {TAIL_POLL_S * 1000:g} ms"
        )

    watch = SpoolWatch(list(outputs.tails.values()), on_lost=lost)
    try:
        started = watch.start()
    except OSError:
        started = False
    if not started:
        structlog.get_logger("sipcdr.deliverer").info(
            "spool_watch_unavailable", note=f"looking for records every {TAIL_POLL_S * 1000:g} ms"
        )
        return None
    delivery.idle_wait_s = WATCHED_POLL_S
    return watch


def _readiness(outputs: Outputs) -> tuple[object, ...]:
    delivery = outputs.delivery
    loops = [] if delivery is None else delivery.readers()
    return (outputs.held_for_restrictions, *((s.tried, s.up) for s, _reader in loops))


def _settled(outputs: Outputs) -> bool:
    delivery = outputs.delivery
    return delivery is None or all(state.tried for state, _reader in delivery.readers())


def _exclusive(path: Path) -> BinaryIO | None:
    """The lock, or None when its file cannot be made (a full disk at a first start):
    delivery goes on, as a second reader only re-delivers what sinks deduplicate."""
    try:
        handle = open_private(path, "wb")
    except OSError:
        return None
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    return handle


def _apply(outputs: Outputs, message: dict[str, Any]) -> None:
    for stream, next_seq in dict(message.get("next_seq", {})).items():
        tail = outputs.tails.get(stream)
        if tail is not None:
            tail.note_next_seq(int(next_seq))
    held = message.get("held")
    if held is not None and outputs.delivery is not None:
        outputs.delivery.held = {(str(sink), str(stream)) for sink, stream in held}


def _send(conn: Connection, snapshot: DeliverySnapshot) -> None:
    with contextlib.suppress(OSError, ValueError):
        conn.send(snapshot)


class DeliveryApart:
    """What `App` holds when delivery runs apart: the process, the retention of the
    spool's segments (theirs is the writer's), and the sinks the spare file holds
    (`held`, which `SpareRoom` sets as it would on an in-process `Delivery`)."""

    def __init__(self, config: Config, outputs: Outputs, privacy: PrivacyStats) -> None:
        self.config = config
        self.outputs = outputs
        self.privacy = privacy
        self.held: set[tuple[str, str]] = set()
        self.process = DeliveryProcess(config, self._snapshot)
        self._expiry: asyncio.Task[None] | None = None
        self._heard = time.monotonic()  # the last snapshot's arrival
        self._from = 0  # the process the last snapshot came from (`starts`)
        self._last: DeliverySnapshot | None = None  # its counts, with the earlier ones
        self._earlier: DeliverySnapshot | None = None  # the counts of processes that died

    def launch(self) -> None:
        self.outputs.on_close = self.process.stop
        self.process.start()

    def start(self) -> None:
        """The spool's retention (the privacy task, in the delivery process, does the
        rest)."""
        self._expiry = asyncio.create_task(
            expire_spools_daily(self.config, lambda: self.outputs.spools), name="sipcdr-retention"
        )

    async def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._expiry

    async def ready(self) -> None:
        await self.process.ready()

    def tick(self) -> None:
        spools = self.outputs.spools
        held = sorted(self.held)
        silent = time.monotonic() - self._heard > SILENT_AFTER_S
        if not silent:
            # Only to a process that reads: a frozen one would fill the pipe within
            # minutes, and the send that then blocks would stop this event loop. The
            # state is whole in each message, so one sent after it speaks again does.
            self.process.send(
                {"next_seq": {s: spool.next_seq for s, spool in spools.items()}, "held": held}
            )
        remote = self.outputs.remote
        if remote is not None and (self.process.pid is None or silent):
            # Gone (waiting for its restart) or frozen: nothing reaches the sinks, and
            # /readyz judges them as down, by the room left in the spool.
            for loop in remote.loops:
                loop.state.up = False

    def _snapshot(self, snapshot: DeliverySnapshot) -> None:
        self._heard = time.monotonic()
        if self.process.starts != self._from:
            self._from, self._earlier = self.process.starts, self._last
        carry_counts(self._earlier, snapshot)
        self._last = snapshot
        outputs = self.outputs
        outputs.remote = snapshot
        outputs.held_for_restrictions = snapshot.held_for_restrictions
        if outputs.outbound is not None:
            outputs.outbound.withheld.update(snapshot.withheld)
        for item in dataclasses.fields(PrivacyStats):
            setattr(self.privacy, item.name, getattr(snapshot.privacy, item.name))
