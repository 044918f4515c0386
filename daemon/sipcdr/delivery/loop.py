"""From the spool to the sinks: one loop per (sink, stream), each at its own pace.

A loop reads a batch from its cursor, hands it to the sink and, only when the sink
returns, commits the cursor. A failure (server down, topic missing, timeout) rewinds
to the cursor and retries the same batch after a backoff that doubles up to
`MAX_BACKOFF_S`: records wait on disk, never in memory, so an outage of any length
costs spool space and nothing else. The first failure of an outage is logged at
WARNING with the error, the recovery at INFO with how long it lasted; nothing is lost,
so neither is an ERROR. ERROR is kept for records the spool refused.

Two things make an outage show within seconds, not after the sink's own timeouts:
a batch still unconfirmed after `SLOW_BATCH_S` makes the loop probe the destination
(`Sink.probe`, a connect or a metadata request on a connection of its own), and a
destination that does not answer marks the loop down while the client goes on retrying
(aiokafka does for up to two request timeouts); one that answers leaves a slow batch
alone, so the gauge does not flap. After a failure the loop probes too: when the
destination does not answer, it is asked again every `PROBE_INTERVAL_S` and the batch
is retried as soon as it does, so delivery resumes about a second after a server comes
back; a destination that answers and still failed waits the whole backoff.

A batch the destination refuses for its content (`RecordsRejected`) is split in
halves until the records at fault are alone; each of those is appended to
`<spool>/rejected/<sink>.jsonl` with the reason, counted and logged at ERROR, and
delivery goes on with the next record. Nothing else is ever skipped.

A loop named in `held` delivers nothing while it is there, its records waiting in the
spool: the daemon holds the sinks that write to its state disk (the JSONL file, an
embedded PostgreSQL) while the room its spare file gave is kept for the spool's CDRs.
`held_until_restrictions` works the same for another reason (Kafka and PostgreSQL
before a first restriction list, sipcdr.sinks.outputs); each has its own set, so
ending one hold never ends the other.

Stopping drains: the loops keep delivering until every sink has everything or
`DEFAULT_DRAIN_TIMEOUT_S` has passed (a held loop is not waited for); what is left
stays in the spool for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import orjson
import structlog

from sipcdr.clock import SYSTEM_CLOCK, Clock
from sipcdr.delivery.sink import RecordsRejected, Sink
from sipcdr.private import open_private, private_dir
from sipcdr.sipevent import is_spooled, spooled_record
from sipcdr.spool import DEFAULT_FSYNC_INTERVAL_S, Spool, SpoolReader
from sipcdr.spool.records import KIND_SIP, SpoolRecord
from sipcdr.spool.tail import SpoolTail

# Large enough to amortise a COPY or a produce round trip, small enough to retry cheaply.
DEFAULT_BATCH_RECORDS: Final = 1000
DEFAULT_BATCH_BYTES: Final = 4 * 1024 * 1024  # bounds the memory of one batch in flight
MIN_BACKOFF_S: Final = 0.2  # a blip (a broker leader change) is over in well under a second
MAX_BACKOFF_S: Final = 30.0  # a batch that keeps failing is retried twice a minute, not hammered
# Confirmations take milliseconds; a batch waiting this long asks whether anyone answers.
SLOW_BATCH_S: Final = 2.0
# A destination that is gone is asked this often, so its return is noticed within a second.
PROBE_INTERVAL_S: Final = 1.0
# A connect or metadata request is answered in milliseconds by a server that serves; a
# frozen host accepts the connection and never answers.
PROBE_TIMEOUT_S: Final = 2.0
# A sink call that neither returns nor fails within this is treated as failed.
DEFAULT_DELIVER_TIMEOUT_S: Final = 60.0
# SIGTERM must end well inside systemd's 90 s stop timeout, with the drain included.
DEFAULT_DRAIN_TIMEOUT_S: Final = 20.0
_IDLE_WAIT_S: Final = 1.0  # re-check for records even without a wake-up
# A spool written by another process wakes no one: a loop with nothing to read looks
# again this soon. A look costs a stat or two; a CDR waits at most this long.
TAIL_POLL_S: Final = 0.025
_DRAIN_RETRY_S: Final = 1.0  # the longest backoff while a stop waits for the sinks


@dataclass(slots=True)
class LoopState:
    """What the metrics show for one (sink, stream)."""

    sink: str
    stream: str
    delivered: int = 0
    failures: int = 0
    rejected: int = 0  # records set aside because the destination refuses their content
    # The last few set aside, so a batch retried after a later failure keeps each once.
    set_aside: deque[int] = field(default_factory=lambda: deque(maxlen=1024))
    up: bool = True
    # Set once the sink's first connection (`prepare`) has succeeded or failed: until
    # then the daemon is not ready (see `Outputs.sinks_ready`).
    tried: bool = False
    down_since: float | None = None
    last_error: str = ""


class Delivery:
    def __init__(
        self,
        spools: Mapping[str, Spool | SpoolTail],
        sinks: Sequence[Sink],
        *,
        batch_records: int = DEFAULT_BATCH_RECORDS,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        deliver_timeout_s: float = DEFAULT_DELIVER_TIMEOUT_S,
        fsync_interval_s: float = DEFAULT_FSYNC_INTERVAL_S,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.spools = spools
        self.clock = clock
        self.sinks = tuple(sinks)
        self.batch_records = batch_records
        self.batch_bytes = batch_bytes
        self.deliver_timeout_s = deliver_timeout_s
        self.fsync_interval_s = fsync_interval_s
        tailing = any(spool.tailing for spool in spools.values())
        self.idle_wait_s = TAIL_POLL_S if tailing else _IDLE_WAIT_S
        self._loops: list[tuple[LoopState, SpoolReader]] = []
        self._log = structlog.get_logger("sipcdr.delivery")
        self._tasks: list[asyncio.Task[None]] = []
        self._watchers: set[asyncio.Task[None]] = set()  # cancelled, maybe not yet ended
        self._sync_task: asyncio.Task[None] | None = None
        self._wake: dict[tuple[str, str], asyncio.Event] = {}
        self._stopping = False
        self._started = False
        self._nudge = asyncio.Event()  # pulsed by a drain: loops in backoff retry at once
        # Counts the drain's pulses, so a loop that was busy probing when one came (not
        # waiting for the event) still sees it.
        self._nudges = 0
        self._draining = False
        # (sink, stream) loops that wait, their records kept in the spool (see above).
        self.held: set[tuple[str, str]] = set()
        self.held_until_restrictions: set[tuple[str, str]] = set()

    def readers(self) -> list[tuple[LoopState, SpoolReader]]:
        return list(self._loops)

    def is_held(self, loop: tuple[str, str]) -> bool:
        return loop in self.held or loop in self.held_until_restrictions

    def release_restrictions_hold(self) -> None:
        """A first restriction list is in force: the loops held for it deliver now."""
        loops, self.held_until_restrictions = self.held_until_restrictions, set()
        for loop in loops:
            wake = self._wake.get(loop)
            if wake is not None:
                wake.set()

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        for sink in self.sinks:
            await sink.start()
            for stream in sink.streams:
                state = LoopState(sink.name, stream)
                reader = self.spools[stream].reader(sink.name)
                self._loops.append((state, reader))
                event = asyncio.Event()
                self._wake[(sink.name, stream)] = event
                reader.on_append.append(event.set)
                self._spawn(self._loop(sink, stream, reader, state, event), f"{sink.name}-{stream}")
        self._sync_task = asyncio.create_task(self._sync_loop(), name="sipcdr-spool-sync")
        self._sync_task.add_done_callback(self._loop_ended)

    def _spawn(self, coro: Coroutine[object, object, None], name: str) -> None:
        task = asyncio.create_task(coro, name=f"sipcdr-deliver-{name}")
        task.add_done_callback(self._loop_ended)
        self._tasks.append(task)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # A loop that died would leave its sink behind for good: say so loudly.
            self._log.error("delivery_loop_failed", task=task.get_name(), error=repr(exc))

    def _watch_ended(self, task: asyncio.Task[None]) -> None:
        self._watchers.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # The batch goes on without its watcher: an outage may show later, at the
            # batch's own failure, but nothing is lost.
            self._log.warning("delivery_watch_failed", task=task.get_name(), error=repr(exc))

    async def _loop(
        self,
        sink: Sink,
        stream: str,
        reader: SpoolReader,
        state: LoopState,
        wake: asyncio.Event,
    ) -> None:
        backoff = MIN_BACKOFF_S
        if stream == sink.streams[0]:
            try:
                async with self.clock.timeout(self.deliver_timeout_s):
                    await sink.prepare()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._went_down(sink, stream, state, reader, exc)
        state.tried = True
        while True:
            wake.clear()
            if self.is_held((sink.name, stream)):
                if self._stopping:
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_IDLE_WAIT_S):
                        await wake.wait()
                continue
            try:
                batch = reader.read(self.batch_records, self.batch_bytes)
                if not batch:
                    if self._stopping:
                        return
                    with contextlib.suppress(TimeoutError):
                        async with self.clock.timeout(self.idle_wait_s):
                            await wake.wait()
                    continue
                rejected = await self._watched_deliver(sink, stream, batch, state, reader)
                # A cursor that cannot be saved (a failing disk) keeps its position in
                # memory, counted: the loop goes on instead of delivering this batch
                # again and again, and only a crash before a later save repeats it.
                reader.commit()
            except asyncio.CancelledError:
                reader.rewind()
                raise
            except Exception as exc:
                # Anything, the spool's own I/O included, is retried from the cursor: a
                # loop that ended here would leave its sink behind until a restart.
                with contextlib.suppress(Exception):
                    reader.rewind()
                self._went_down(sink, stream, state, reader, exc)
                if self._stopping:
                    return  # the records stay in the spool for the next start
                await self._pause(sink, backoff)
                # While draining, a sink that comes back is tried again within a second.
                backoff = min(backoff * 2, _DRAIN_RETRY_S if self._draining else MAX_BACKOFF_S)
                continue
            state.delivered += len(batch) - rejected
            backoff = MIN_BACKOFF_S
            if not state.up:
                state.up = True
                now = self.clock.monotonic()
                down_for = now - (state.down_since or now)
                state.down_since = None
                self._log.info(
                    "sink_recovered",
                    sink=sink.name,
                    stream=stream,
                    down_s=round(down_for, 1),
                    backlog=reader.lag_records,
                )

    def _went_down(
        self, sink: Sink, stream: str, state: LoopState, reader: SpoolReader, exc: Exception
    ) -> None:
        state.failures += 1
        self._mark_down(sink, stream, state, reader, repr(exc))

    def _mark_down(
        self,
        sink: Sink,
        stream: str,
        state: LoopState,
        reader: SpoolReader,
        error: str,
        since: float | None = None,
    ) -> None:
        state.last_error = error[:500]
        if state.up:
            state.up = False
            state.down_since = self.clock.monotonic() if since is None else since
            self._log.warning(
                "sink_unavailable",
                sink=sink.name,
                stream=stream,
                error=state.last_error,
                backlog=reader.lag_records,
            )

    async def _probe(self, sink: Sink) -> str | None:
        """None when the destination answers now; otherwise why it does not.

        `asyncio.timeout` rather than `wait_for` throughout this module: on Python 3.11
        `wait_for` can swallow a cancel that lands as its inner task ends, which would
        leave a loop (or a watcher) running after `stop` cancelled it."""
        try:
            async with self.clock.timeout(PROBE_TIMEOUT_S):
                await sink.probe()
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            return f"no answer to a probe within {PROBE_TIMEOUT_S:g} s"
        except Exception as exc:
            return repr(exc)
        return None

    async def _pause(self, sink: Sink, backoff: float) -> None:
        """Wait `backoff` before the next attempt, or less: a drain's nudge ends the wait
        (the sink may be back), and so does a destination that answers again after it
        did not at the start of the wait."""
        nudges = self._nudges
        if self._draining:
            backoff = min(backoff, _DRAIN_RETRY_S)
        deadline = self.clock.monotonic() + backoff
        gone = await self._probe(sink) is not None
        while (left := deadline - self.clock.monotonic()) > 0:
            if self._nudges != nudges:
                return  # a drain began while this loop was probing
            try:
                async with self.clock.timeout(min(left, PROBE_INTERVAL_S) if gone else left):
                    await self._nudge.wait()
                return
            except TimeoutError:
                pass
            if gone and await self._probe(sink) is None:
                return

    async def _watched_deliver(
        self,
        sink: Sink,
        stream: str,
        batch: Sequence[SpoolRecord],
        state: LoopState,
        reader: SpoolReader,
    ) -> int:
        """`_deliver`, with a watcher that marks the loop down when the batch waits
        longer than `SLOW_BATCH_S` and the destination does not answer a probe.

        The watcher is a task made only when the batch is still out after
        `SLOW_BATCH_S`; until then a timer stands for it: nearly every batch is
        confirmed in milliseconds, and a task made and cancelled for each of them
        costs the delivery process more than the timer does."""
        if not state.up:
            return await self._deliver(sink, stream, batch, state, reader)
        started = self.clock.monotonic()
        watcher: asyncio.Task[None] | None = None

        def watch() -> None:
            nonlocal watcher
            watcher = asyncio.create_task(
                self._watch(sink, stream, state, reader, started),
                name=f"sipcdr-watch-{sink.name}-{stream}",
            )
            self._watchers.add(watcher)
            watcher.add_done_callback(self._watch_ended)

        timer = self.clock.call_later(SLOW_BATCH_S, watch)
        try:
            return await self._deliver(sink, stream, batch, state, reader)
        finally:
            timer.cancel()
            # Not awaited: a probe may take a moment to end, and a cancel of this loop
            # meanwhile would rewind a batch that was delivered. `stop` awaits it.
            if watcher is not None:
                watcher.cancel()

    async def _watch(
        self, sink: Sink, stream: str, state: LoopState, reader: SpoolReader, started: float
    ) -> None:
        """Begun `SLOW_BATCH_S` after the batch: probe now, then every `SLOW_BATCH_S`."""
        watching = asyncio.current_task()
        while state.up:
            error = await self._probe(sink)
            if watching is not None and watching.cancelling():
                return  # the batch ended while the probe did (which kept the cancel)
            if error is not None:
                waited = self.clock.monotonic() - started
                self._mark_down(
                    sink,
                    stream,
                    state,
                    reader,
                    f"batch unconfirmed after {waited:.1f} s and {sink.name} does not "
                    f"answer: {error}",
                    since=started,  # the outage's length counts from its first sign
                )
            if state.up:
                await self.clock.sleep(SLOW_BATCH_S)

    async def _deliver(
        self,
        sink: Sink,
        stream: str,
        batch: Sequence[SpoolRecord],
        state: LoopState,
        reader: SpoolReader,
    ) -> int:
        """Deliver `batch`; returns how many of its records were set aside."""
        try:
            async with self.clock.timeout(self.deliver_timeout_s):
                await sink.deliver(stream, batch)
        except RecordsRejected as exc:
            if len(batch) == 1:
                self._set_aside(sink, stream, batch[0], exc, state, reader)
                return 1
            # Halves in order: the good records of each half still arrive once.
            middle = len(batch) // 2
            return await self._deliver(
                sink, stream, batch[:middle], state, reader
            ) + await self._deliver(sink, stream, batch[middle:], state, reader)
        return 0

    def _set_aside(
        self,
        sink: Sink,
        stream: str,
        record: SpoolRecord,
        exc: RecordsRejected,
        state: LoopState,
        reader: SpoolReader,
    ) -> None:
        directory = reader.spool.directory / "rejected"
        private_dir(directory)
        line = orjson.dumps(
            {
                "seq": record.seq,
                "kind": record.kind,
                "key": record.key.decode("utf-8", "replace"),
                "value": value_text(record.kind, record.value),
                "reason": str(exc)[:1000],
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )
        if record.seq in state.set_aside:
            return  # the batch is being retried after a later failure: kept already
        with open_private(directory / f"{sink.name}.jsonl", "ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        state.set_aside.append(record.seq)
        state.rejected += 1
        self._log.error(
            "record_rejected",
            sink=sink.name,
            stream=stream,
            seq=record.seq,
            kind=record.kind,
            reason=str(exc)[:500],
            kept_in=str(directory / f"{sink.name}.jsonl"),
        )

    async def _sync_loop(self) -> None:
        while True:
            await self.clock.sleep(self.fsync_interval_s)
            for spool in self.spools.values():
                try:
                    spool.sync()
                except OSError as exc:
                    self._log.error("spool_sync_failed", dir=str(spool.directory), error=str(exc))

    def caught_up(self) -> bool:
        """Whether every loop that is not held has every record."""
        return all(
            reader.lag_records == 0 or self.is_held((state.sink, state.stream))
            for state, reader in self.readers()
        )

    async def drain(self, timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> bool:
        """Wait until every sink has every record, at most `timeout_s`; True if so."""
        for spool in self.spools.values():
            spool.flush()
        for event in self._wake.values():
            event.set()
        # Wakes the loops sleeping in a backoff now (set wakes every current waiter;
        # clearing at once keeps later waits from returning immediately).
        self._draining = True
        self._nudges += 1
        self._nudge.set()
        self._nudge.clear()
        deadline = self.clock.monotonic() + timeout_s
        while not self.caught_up():
            if self.clock.monotonic() >= deadline or all(task.done() for task in self._tasks):
                return False
            # Polled on the event loop: the deadline is the clock's, the loops move
            # as fast as the sinks take records.
            await asyncio.sleep(0.05)
        return True

    async def stop(self, drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> None:
        """Idempotent: drain, end the loops, stop the sinks. The spools stay open: their
        owner closes them after the last record is appended."""
        if not self._started:
            return
        self._started = False
        caught_up = await self.drain(drain_timeout_s)
        self._stopping = True
        tasks = [*self._tasks, *([self._sync_task] if self._sync_task else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            # Not `await task` under suppress(CancelledError): that would swallow a
            # cancel of this stop too (a second Ctrl-C), and the caller's clean-up
            # would go on as if nothing had asked it to end.
            await asyncio.wait(tasks)  # their ends are taken by `_loop_ended`
        watchers = list(self._watchers)
        for task in watchers:
            task.cancel()
        if watchers:
            await asyncio.wait(watchers)
        self._tasks.clear()
        self._sync_task = None
        for sink in self.sinks:
            try:
                await sink.stop()
            except Exception as exc:
                self._log.warning("sink_stop_failed", sink=sink.name, error=repr(exc))
        if not caught_up or any(reader.lag_records for _state, reader in self.readers()):
            # Nothing lost: the next start delivers it (a held loop's records too).
            self._log.warning(
                "delivery_left_in_spool",
                backlog={f"{s.sink}/{s.stream}": r.lag_records for s, r in self.readers()},
            )


def value_text(kind: str, value: bytes) -> str:
    """A record's value as text, for the file of records set aside (here, not in the
    spool, which stores values without reading them): its JSON, the one a
    signaling value becomes included; what is no record, as UTF-8 with replacements."""
    if kind == KIND_SIP and is_spooled(value):
        try:
            return orjson.dumps(spooled_record(value)).decode()
        except ValueError:
            pass
    return value.decode("utf-8", "replace")
