"""Open calls on disk: checkpoints of the correlator plus a journal of what changed
since, so that a call answered before a crash (SIGKILL, OOM kill, power loss) still
gets its correct CDR when its BYE arrives after the restart.

Files in the state directory, numbered by generation g, each created 0600:

    dialogs.<g>.json      checkpoint: the correlator's snapshot as generation g began
    dialogs.<g>.journal   what changed during generation g

The journal holds two kinds of record: a message the correlator reported as
`changed` (a first INVITE, the first ringing, answer or final response to it, a
CANCEL, an auth retry, a BYE), appended with one `write` before any CDR it closes
goes to the spool; and a close, appended right after each CDR's spool append. Both
survive a killed process at once; the journal is fsynced every `fsync_interval_s`,
which bounds what a power loss takes. Retransmissions and in-dialog requests other
than BYE change nothing but a call's last-message time and are not journaled: the
checkpoints carry that time.

A checkpoint starts generation g+1: the snapshot is taken, journal g+1 opened, the
snapshot written to `dialogs.<g+1>.tmp` (in a thread, while messages go on into the
new journal), fsynced and renamed, then the files of older generations deleted. The
snapshot and the switch of journals run between two messages on the one event loop,
so the snapshot is exactly the state journal g+1 starts from. If the checkpoint cannot
be written (a full disk), the older checkpoint and journals stay and still rebuild
the state; nothing half-written is left.

Recovery restores the newest checkpoint and replays the journals from its generation
on through the correlator, in order: the same messages in the same order rebuild the
same state, with no second encoding of it. A CDR closed by a replayed message whose
close record follows was written before the crash and is dropped; one without (the
process died between the journal write and the close record) is handed back to be
written again: the same record under the same `cdr_id`, which the sinks deduplicate.
A close record for a call that replay left open (closed by a timer or an eviction,
which replay does not repeat) closes it without a CDR.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from sipcdr.dialog import Correlator
from sipcdr.dialog.correlator import CorrelatorStats
from sipcdr.dialog.kpi import Kpi
from sipcdr.model import Cdr, Packet
from sipcdr.private import open_private_fd
from sipcdr.sinks.spool import DEFAULT_FSYNC_INTERVAL_S
from sipcdr.sip import parse
from sipcdr.telemetry.metrics import Metrics

# At most this long between checkpoints while messages arrive: after a crash, a call's
# last-message time (which ends a call whose BYE never comes) is at most this old, and
# the journal replayed at start holds at most this long of call changes.
DEFAULT_CHECKPOINT_INTERVAL_S: Final = 10.0
# A checkpoint holds intake while it serializes every open call (~1.5 ms per 1,000,
# `benchmarks/journal.py`): spaced so they take at most this share of the time, which
# stretches the 10 s interval only past ~300,000 open calls.
CHECKPOINT_MAX_SHARE: Final = 0.05

CHECKPOINT_SUFFIX: Final = ".json"
JOURNAL_SUFFIX: Final = ".journal"
_PREFIX: Final = "dialogs."
TMP_SUFFIX: Final = ".tmp"  # a checkpoint being written; renamed once complete
# Written by versions without a journal, at a clean stop: read once as generation 0.
LEGACY_SNAPSHOT: Final = "dialogs.json"

MAGIC: Final = b"SIPCDRJ\x01"  # journal file format 1
_FRAME = struct.Struct("<II")  # crc32 of the body, body length
# kind, timestamp, source port, destination port, capture node length, source address
# length, destination address length, transport length; then those strings, then the
# payload as captured.
_MESSAGE = struct.Struct("<BdHHHBBB")
_CLOSED = struct.Struct("<BdB")  # kind, close time, cdr_id length; then cdr_id, Call-ID
KIND_MESSAGE: Final = 1
KIND_CLOSED: Final = 2
MAX_RECORD_BYTES: Final = 16 * 1024 * 1024  # far above any SIP message; bounds a bad length
_TEXT: Final = "surrogatepass"  # any str round-trips, even one a capture file name gave


@dataclass(slots=True)
class _Checkpoint:
    generation: int
    data: bytes
    open_dialogs: int
    errors_before: int  # journal write errors when the snapshot was taken
    final: bool
    began: float
    finished: bool = False


@dataclass(slots=True)
class DialogStoreStats:
    """Cumulative counts the daemon exports."""

    journal_messages: int = 0
    journal_closes: int = 0
    journal_write_errors: int = 0  # records not journaled: not rebuilt after a crash
    checkpoints: int = 0
    checkpoint_failures: int = 0
    torn_tails: int = 0  # journals that ended in a partial or damaged record at recovery
    torn_bytes: int = 0
    bad_records: int = 0  # well-framed records recovery could not apply
    unreadable_checkpoints: int = 0
    replayed_records: int = 0


class JournalCloses:
    """The pipeline sink that journals each CDR's close, placed after the spool writer
    so that a close is recorded only once its CDR is in the spool."""

    name = "dialog_journal"

    def __init__(self, store: DialogStore) -> None:
        self._store = store

    def write(self, cdr: Cdr) -> None:
        self._store.closed(cdr)

    def flush(self) -> None:
        return None  # fsynced by the store's own interval


class DialogStore:
    """Owns the checkpoint and journal files of one correlator. Call `recover()` once
    before `start()`; `message` is the pipeline's journal hook, `closes` its sink."""

    def __init__(
        self,
        directory: Path,
        correlator: Correlator,
        *,
        checkpoint_interval_s: float = DEFAULT_CHECKPOINT_INTERVAL_S,
        fsync_interval_s: float = DEFAULT_FSYNC_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.correlator = correlator
        self.checkpoint_interval_s = checkpoint_interval_s
        self.fsync_interval_s = fsync_interval_s
        self.stats = DialogStoreStats()
        self.closes = JournalCloses(self)
        self.log = structlog.get_logger("sipcdr.dialogs")
        self._clock = clock
        self._fd = -1
        self._size = 0  # bytes in the open journal; a failed write is cut back to this
        self._dirty = False
        self._generation = 0  # of the open journal (and of the newest checkpoint tried)
        # False after a journal write failed, until a checkpoint succeeds: the files on
        # disk no longer rebuild the current state.
        self._intact = True
        self._recovered = False
        self._started = False
        self._stopped = False
        self._task: asyncio.Task[None] | None = None
        self._last_checkpoint = 0.0
        self._last_checkpoint_s = 0.0  # how long the last one blocked
        self._messages_at_checkpoint = -1
        self._failures_in_row = 0
        self._reported_intact = True
        self._writing: tuple[_Checkpoint, asyncio.Future[None]] | None = None
        self._unwritten: list[Cdr] = []  # from recovery, until the start has succeeded
        self._exported: dict[str, int] = {}

    @property
    def journal_bytes(self) -> int:
        return self._size

    # -- hot path -----------------------------------------------------------------------

    def message(self, packet: Packet) -> None:
        """Journal one message that changed a call. Never raises: the caller is the
        capture path, and a failed write is counted."""
        timestamp, src_ip, src_port, dst_ip, dst_port, transport, payload, node = packet
        src = src_ip.encode("utf-8", _TEXT)
        dst = dst_ip.encode("utf-8", _TEXT)
        proto = transport.encode("utf-8", _TEXT)
        capture_node = node.encode("utf-8", _TEXT)
        try:
            head = _MESSAGE.pack(
                KIND_MESSAGE,
                timestamp,
                src_port,
                dst_port,
                len(capture_node),
                len(src),
                len(dst),
                len(proto),
            )
        except struct.error:
            self.stats.journal_write_errors += 1  # a field out of range: cannot be framed
            self._intact = False
            return
        if self._append(b"".join((head, src, dst, proto, capture_node, payload))):
            self.stats.journal_messages += 1

    def closed(self, cdr: Cdr) -> None:
        """Journal that a call's CDR is in the spool."""
        ident = cdr.cdr_id.encode()
        body = b"".join(
            (
                _CLOSED.pack(KIND_CLOSED, max(cdr.end_time, self.correlator.now), len(ident)),
                ident,
                cdr.call_id.encode("utf-8", _TEXT),
            )
        )
        if self._append(body):
            self.stats.journal_closes += 1

    def _append(self, body: bytes) -> bool:
        length = len(body)
        frame = _FRAME.pack(zlib.crc32(body), length)
        try:
            if self._fd < 0:
                raise OSError(errno.EBADF, "journal not open")
            if length > MAX_RECORD_BYTES:
                raise OSError(errno.EFBIG, "record too large")
            if os.writev(self._fd, (frame, body)) != length + _FRAME.size:
                raise OSError(errno.ENOSPC, "short write")
        except OSError:
            if self._fd >= 0:
                # Half a record would hide every record after it from recovery.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._size)
            self.stats.journal_write_errors += 1
            self._intact = False
            return False
        self._size += length + _FRAME.size
        self._dirty = True
        return True

    # -- recovery -----------------------------------------------------------------------

    def recover(self) -> list[Cdr]:
        """Rebuild the correlator from the newest checkpoint and the journals after it.
        Returns the CDRs a crash kept from reaching the spool, to be written now.
        Writes nothing but renaming an unreadable checkpoint aside: a start that fails
        later leaves every file for the next one."""
        if self._recovered:
            return list(self._unwritten)  # a start tried again in the same process
        self._recovered = True
        files = self._files()
        checkpoints, journals = files[CHECKPOINT_SUFFIX], files[JOURNAL_SUFFIX]
        base = max(checkpoints, default=0)
        restored = 0
        if checkpoints:
            restored = self._restore(checkpoints[base])
        elif (self.directory / LEGACY_SNAPSHOT).exists():
            restored = self._restore(self.directory / LEGACY_SNAPSHOT)
        pending: dict[str, Cdr] = {}
        replayed = 0
        for generation in sorted(journals):
            if generation >= base:
                replayed += self._replay(journals[generation], pending)
        self._generation = max((base, *checkpoints, *journals))
        # What replay counted was counted by the process that first saw it; this one
        # counts the calls it holds and the CDRs it still has to write.
        stats = CorrelatorStats()
        stats.dialogs_restored = self.correlator.open_dialogs
        self.correlator.stats = stats
        self.correlator.kpis.clear()
        for cdr in pending.values():
            stats.cdrs[cdr.disposition] = stats.cdrs.get(cdr.disposition, 0) + 1
            self.correlator.kpis.setdefault(cdr.trunk, Kpi()).add(cdr)
        self.stats.replayed_records += replayed
        if checkpoints or journals or restored:
            self.log.info(
                "dialogs_recovered",
                from_checkpoint=restored,
                journal_records=replayed,
                open_dialogs=self.correlator.open_dialogs,
                cdrs_to_write=len(pending),
            )
        self._log_damage()
        self._unwritten = list(pending.values())
        return list(self._unwritten)

    def _files(self) -> dict[str, dict[int, Path]]:
        """The state files by suffix, then generation."""
        found: dict[str, dict[int, Path]] = {
            CHECKPOINT_SUFFIX: {},
            JOURNAL_SUFFIX: {},
            TMP_SUFFIX: {},
        }
        for path in self.directory.glob(_PREFIX + "*"):
            stem, suffix = path.name[len(_PREFIX) :], path.suffix
            number = stem[: -len(suffix)] if suffix else ""
            if suffix in found and number.isascii() and number.isdigit():
                found[suffix][int(number)] = path
        return found

    def _restore(self, path: Path) -> int:
        try:
            return self.correlator.restore(path.read_bytes())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Unreadable state must not stop capture: the calls in it get no CDR (the
            # journals after it still reopen the calls they saw begin).
            self.stats.unreadable_checkpoints += 1
            self.log.error("dialog_checkpoint_unreadable", path=str(path), error=str(exc))
            path.rename(path.with_name(path.name + ".unreadable"))
            return 0

    def _replay(self, path: Path, pending: dict[str, Cdr]) -> int:
        data = path.read_bytes()
        if not data:
            return 0  # created, then the process died before the header
        if not data.startswith(MAGIC):
            self._torn(len(data))
            return 0
        offset = len(MAGIC)
        end_of_data = len(data)
        replayed = 0
        while offset < end_of_data:
            body_at = offset + _FRAME.size
            if body_at > end_of_data:
                break
            crc, length = _FRAME.unpack_from(data, offset)
            end = body_at + length
            if not 0 < length <= MAX_RECORD_BYTES or end > end_of_data:
                break
            body = data[body_at:end]
            if zlib.crc32(body) != crc:
                break
            offset = end
            replayed += 1
            if body[0] == KIND_MESSAGE:
                self._replay_message(body, pending)
            elif body[0] == KIND_CLOSED:
                self._replay_closed(body, pending)
            else:
                self.stats.bad_records += 1
        if offset < end_of_data:
            # A record cut short or damaged (a power loss inside the fsync interval):
            # it and what follows are not replayed. Records are never rewritten, so
            # nothing valid can follow a damaged one.
            self._torn(end_of_data - offset)
        return replayed

    def _torn(self, length: int) -> None:
        self.stats.torn_tails += 1
        self.stats.torn_bytes += length

    def _replay_message(self, body: bytes, pending: dict[str, Cdr]) -> None:
        try:
            _kind, timestamp, src_port, dst_port, node_len, src_len, dst_len, proto_len = (
                _MESSAGE.unpack_from(body)
            )
            at = _MESSAGE.size
            strings = []
            for length in (src_len, dst_len, proto_len, node_len):
                strings.append(body[at : at + length].decode("utf-8", _TEXT))
                at += length
            packet = Packet(
                timestamp,
                strings[0],
                src_port,
                strings[1],
                dst_port,
                strings[2],
                body[at:],
                strings[3],
            )
            closed = self.correlator.feed(packet, parse(packet.payload))
        except Exception:
            # A parser of another version that refuses it, or a correlator error: the
            # message is lost, as it would be live.
            self.stats.bad_records += 1
            return
        for cdr in closed:
            pending[cdr.cdr_id] = cdr

    def _replay_closed(self, body: bytes, pending: dict[str, Cdr]) -> None:
        try:
            _kind, closed_at, id_len = _CLOSED.unpack_from(body)
            at = _CLOSED.size
            cdr_id = body[at : at + id_len].decode()
            call_id = body[at + id_len :].decode("utf-8", _TEXT)
        except (struct.error, UnicodeDecodeError):
            self.stats.bad_records += 1
            return
        if pending.pop(cdr_id, None) is None:
            self.correlator.forget(call_id, cdr_id, closed_at)

    # -- checkpoints --------------------------------------------------------------------

    async def start(self) -> None:
        """Write a checkpoint of the recovered state and open a fresh journal. Raises
        OSError when the journal cannot be created (the state directory is unusable)."""
        if self._started:
            return
        if not self._recovered:
            raise RuntimeError("DialogStore.recover() must run before start()")
        # Raises before anything changes: the start fails, plainly, files untouched.
        fd = self._open_journal(self._generation + 1)
        os.close(fd)
        self._started = True
        self._unwritten = []  # written by now: the checkpoint holds them closed
        self.checkpoint()
        self._task = asyncio.create_task(self._run(), name="sipcdr-dialog-store")
        self._task.add_done_callback(self._task_failed)

    async def stop(self) -> None:
        """Idempotent: a last checkpoint of the open calls, then the journal closed. On
        failure the older checkpoint and journals stay, and still rebuild the calls."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._writing is not None:
            plan, future = self._writing
            await asyncio.wait({future})  # a checkpoint being written is finished first
            self._finish(plan, _error_of(future))
        self.checkpoint(final=True)

    def flush(self) -> None:
        """fsync the journal if anything was written since the last time."""
        if self._dirty and self._fd >= 0:
            self._dirty = False
            os.fsync(self._fd)

    async def __aenter__(self) -> DialogStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    def _task_failed(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("dialog_store_task_failed", error=repr(task.exception()))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.fsync_interval_s)
            try:
                self.flush()
            except OSError as exc:
                self.stats.journal_write_errors += 1
                self._intact = False
                self.log.error("dialog_journal_sync_failed", error=str(exc))
            if self.checkpoint_due():
                await self._checkpoint_in_background()

    def checkpoint_due(self) -> bool:
        if self._writing is not None:
            return False
        if self.correlator.stats.messages == self._messages_at_checkpoint:
            return False  # nothing arrived: the last checkpoint is still exact
        spacing = max(self.checkpoint_interval_s, self._last_checkpoint_s / CHECKPOINT_MAX_SHARE)
        return self._clock() - self._last_checkpoint >= spacing

    def checkpoint(self, *, final: bool = False) -> bool:
        """Start a new generation from a snapshot of the correlator and write it now;
        False when it could not be written (then the older files stay and still
        rebuild the state). At a stop (`final`) no new journal is opened."""
        plan = self._begin(final)
        if plan is None:
            return False
        error: OSError | None = None
        try:
            self._write_file(plan.generation, plan.data)
        except OSError as exc:
            error = exc
        self._last_checkpoint_s = self._clock() - plan.began
        self._finish(plan, error)
        return error is None

    async def _checkpoint_in_background(self) -> None:
        """The snapshot and the journal switch on the event loop (they must fall between
        two messages); writing and fsyncing the file in a thread, while messages go on
        into the new journal."""
        plan = self._begin(final=False)
        if plan is None:
            return
        self._last_checkpoint_s = self._clock() - plan.began
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, self._write_file, plan.generation, plan.data)
        self._writing = (plan, future)
        future.add_done_callback(lambda done: self._finish(plan, _error_of(done)))
        # Shielded: a stop waits for the file rather than leave a thread writing it.
        with contextlib.suppress(Exception):
            await asyncio.shield(future)

    def _begin(self, final: bool) -> _Checkpoint | None:
        began = self._clock()
        messages = self.correlator.stats.messages
        # The snapshot makes a tuple per open call; letting the garbage collector walk
        # every open call meanwhile doubles its cost (measured at 100,000).
        collecting = gc.isenabled()
        gc.disable()
        try:
            data = self.correlator.snapshot()
        finally:
            if collecting:
                gc.enable()
        plan = _Checkpoint(
            generation=self._generation + 1,
            data=data,
            open_dialogs=self.correlator.open_dialogs,
            errors_before=self.stats.journal_write_errors,
            final=final,
            began=began,
        )
        if final:
            self._close_journal()
        else:
            try:
                fd = self._open_journal(plan.generation)
            except OSError as exc:
                self.stats.checkpoint_failures += 1
                self._report_failure(exc, plan)
                return None  # appends go on in the current generation
            self._close_journal()
            self._fd, self._size = fd, len(MAGIC)
        self._generation = plan.generation
        self._last_checkpoint = began
        self._messages_at_checkpoint = messages
        return plan

    def _write_file(self, generation: int, data: bytes) -> None:
        """Thread-safe: file system calls only. Leaves nothing half-written."""
        tmp = self.directory / f"{_PREFIX}{generation}{TMP_SUFFIX}"
        try:
            tmp.unlink(missing_ok=True)  # a stale one may have other permissions
            fd = open_private_fd(tmp, os.O_WRONLY | os.O_EXCL)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.directory / f"{_PREFIX}{generation}{CHECKPOINT_SUFFIX}")
            _fsync_directory(self.directory)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise

    def _finish(self, plan: _Checkpoint, error: BaseException | None) -> None:
        if plan.finished:
            return
        plan.finished = True
        if self._writing is not None and self._writing[0] is plan:
            self._writing = None
        if error is not None:
            # The older checkpoint is untouched, and so are the journals since.
            self.stats.checkpoint_failures += 1
            self._report_failure(error, plan)
            return
        self.stats.checkpoints += 1
        # Complete again, unless a journal write failed after the snapshot was taken.
        self._intact = self.stats.journal_write_errors == plan.errors_before
        if self._failures_in_row:
            self.log.info("dialog_checkpoint_written", after_failures=self._failures_in_row)
        self._failures_in_row = 0
        self._reported_intact = True
        self._delete_before(plan.generation)

    def _report_failure(self, error: BaseException, plan: _Checkpoint) -> None:
        self._failures_in_row += 1
        # Logged when a run of failures begins, when the journal stops covering for
        # it, and at the stop; the metric counts every one.
        if not (plan.final or self._failures_in_row == 1 or self._reported_intact != self._intact):
            return
        self._reported_intact = self._intact
        # Data is lost only when the journal missed writes too; otherwise the older
        # checkpoint and the journals since rebuild every call.
        log = self.log.warning if self._intact else self.log.error
        log(
            "dialog_checkpoint_failed",
            error=getattr(error, "strerror", None) or repr(error),
            at_stop=plan.final,
            open_dialogs=plan.open_dialogs,
            recoverable_from_journal=self._intact,
            journal_write_errors=self.stats.journal_write_errors,
        )

    def _open_journal(self, generation: int) -> int:
        path = self.directory / f"{_PREFIX}{generation}{JOURNAL_SUFFIX}"
        path.unlink(missing_ok=True)  # left by a start that failed before using it
        fd = open_private_fd(path, os.O_WRONLY | os.O_EXCL | os.O_APPEND)
        try:
            if os.write(fd, MAGIC) != len(MAGIC):
                raise OSError(errno.ENOSPC, "short write")
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        return fd

    def _close_journal(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            os.fsync(fd)
        except OSError as exc:
            self.stats.journal_write_errors += 1
            self._intact = False
            self.log.error("dialog_journal_sync_failed", error=str(exc))
        finally:
            os.close(fd)
        self._dirty = False

    def _delete_before(self, generation: int) -> None:
        stale = [
            path
            for by_generation in self._files().values()
            for number, path in by_generation.items()
            if number < generation
        ]
        stale.append(self.directory / LEGACY_SNAPSHOT)
        for path in stale:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    # -- metrics ------------------------------------------------------------------------

    def export_metrics(self, metrics: Metrics) -> None:
        """Move the counts into Prometheus; log lost journal records at ERROR."""
        stats = self.stats
        metrics.dialog_journal_bytes.set(self._size)
        for kind, total in (("message", stats.journal_messages), ("close", stats.journal_closes)):
            self._add(metrics.dialog_journal_records.labels(kind), f"rec:{kind}", total)
        for outcome, total in (
            ("written", stats.checkpoints),
            ("failed", stats.checkpoint_failures),
        ):
            self._add(metrics.dialog_checkpoints.labels(outcome), f"ckpt:{outcome}", total)
        for what, total in (
            ("journal_write_error", stats.journal_write_errors),
            ("torn_tail", stats.torn_tails),
            ("bad_record", stats.bad_records),
            ("unreadable_checkpoint", stats.unreadable_checkpoints),
        ):
            delta = self._add(metrics.dialog_state_errors.labels(what), f"err:{what}", total)
            if delta and what == "journal_write_error":
                self.log.error(
                    "dialog_journal_write_failed",
                    records=delta,
                    note="calls changed since the last checkpoint are not rebuilt after a crash",
                )

    def _log_damage(self) -> None:
        stats = self.stats
        if stats.torn_tails or stats.bad_records:
            # Call changes in the damaged records are lost: those calls may close wrong.
            self.log.error(
                "dialog_journal_damaged",
                torn_tails=stats.torn_tails,
                torn_bytes=stats.torn_bytes,
                bad_records=stats.bad_records,
            )

    def _add(self, counter: Any, key: str, total: int) -> int:
        delta = total - self._exported.get(key, 0)
        if delta > 0:
            self._exported[key] = total
            counter.inc(delta)
        return max(delta, 0)


def _error_of(future: asyncio.Future[None]) -> BaseException | None:
    if future.cancelled():
        return asyncio.CancelledError()
    return future.exception()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__: Sequence[str] = [
    "DEFAULT_CHECKPOINT_INTERVAL_S",
    "DialogStore",
    "DialogStoreStats",
    "JournalCloses",
]
