"""The dialog store: the journal written as calls change, checkpoints, recovery at
start (`sipcdr.dialogstore` describes the files and the order of things)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import structlog

from sipcdr.dialog import Correlator
from sipcdr.dialogstore.appender import _NO_SPACE, JournalAppender
from sipcdr.dialogstore.checkpoint import (
    _Checkpoint,
    _error_of,
    _unwritten_json,
    read_checkpoint,
    write_checkpoint,
)
from sipcdr.dialogstore.journal import (
    MAGIC,
    JournalReplay,
)
from sipcdr.dialogstore.stats import DialogStoreStats
from sipcdr.model import Cdr
from sipcdr.private import open_private_fd
from sipcdr.spool import DEFAULT_FSYNC_INTERVAL_S

# At most this long between checkpoints while messages arrive: after a crash, a call's
# last-message time (which ends a call whose BYE never comes) is at most this old, and
# the journal replayed at start holds at most this long of call changes.
DEFAULT_CHECKPOINT_INTERVAL_S: Final = 10.0
# A checkpoint holds intake while it serializes every open call (~1.5 ms per 1,000,
# `benchmarks/journal.py`): spaced so they take at most this share of the time, which
# stretches the 10 s interval only past ~300,000 open calls.
CHECKPOINT_MAX_SHARE: Final = 0.05
# Failed checkpoints are retried at a doubling interval up to this: on a full disk each
# attempt costs a snapshot and a journal file, yet space that returns is used soon.
CHECKPOINT_RETRY_MAX_S: Final = 60.0
# Files recovery could not read are kept this long for a look, then deleted (they hold
# personal data): a week covers a holiday.
UNREADABLE_RETENTION_S: Final = 7 * 86400.0

CHECKPOINT_SUFFIX: Final = ".json"
JOURNAL_SUFFIX: Final = ".journal"
UNREADABLE_SUFFIX: Final = ".unreadable"
_PREFIX: Final = "dialogs."
TMP_SUFFIX: Final = ".tmp"  # a checkpoint being written; renamed once complete
# Written by versions without a journal, at a clean stop: read once as generation 0.
LEGACY_SNAPSHOT: Final = "dialogs.json"


def _no_cdrs() -> Sequence[Cdr]:
    return ()


class DialogStore(JournalAppender):
    """Owns the checkpoint and journal files of one correlator. Call `recover()` once
    before `start()`. The pipeline's hooks: `message` (each message that changed a
    call), `decided` (closes no message repeats); the spool writer's: `closed` (a CDR
    is in the spool file); the store asks `held` for the CDRs the spool keeps in memory
    at each checkpoint."""

    def __init__(
        self,
        directory: Path,
        correlator: Correlator,
        *,
        checkpoint_interval_s: float = DEFAULT_CHECKPOINT_INTERVAL_S,
        fsync_interval_s: float = DEFAULT_FSYNC_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        on_no_space: Callable[[], bool] | None = None,
        batch_writes: bool = False,
    ) -> None:
        super().__init__(correlator, DialogStoreStats(), on_no_space, batch_writes)
        self.directory = directory
        self.checkpoint_interval_s = checkpoint_interval_s
        self.fsync_interval_s = fsync_interval_s
        self._replayer = JournalReplay(correlator, self.stats, self._journal_unreadable)
        self.log = structlog.get_logger("sipcdr.dialogs")
        # CDRs closed but held in memory by the spool (its reserve): each checkpoint
        # carries them, so a crash does not lose them.
        self.held: Callable[[], Sequence[Cdr]] = _no_cdrs
        self._clock = clock
        self._wall_clock = wall_clock
        # Sizes of the journals since the last good checkpoint, but the open one: all of
        # them are replayed at start.
        self._older_journals: dict[int, int] = {}
        self._generation = 0  # of the open journal (and of the newest checkpoint tried)
        self._recovered = False
        self._started = False
        self._task: asyncio.Task[None] | None = None
        self._last_checkpoint = 0.0
        self._last_checkpoint_s = 0.0  # how long the last one blocked
        self._messages_at_checkpoint = -1
        self._failures_in_row = 0
        self._reported_intact = True
        self._writing: tuple[_Checkpoint, asyncio.Future[None]] | None = None
        self._unwritten: list[Cdr] = []  # from recovery, until the start writes them
        self._write_errors_logged = 0  # journal_write_errors as of the last log line

    @property
    def journal_bytes(self) -> int:
        """Bytes of journal a start would replay: every journal since the last good
        checkpoint."""
        return self._size + sum(self._older_journals.values())

    @property
    def intact(self) -> bool:
        """Whether the files on disk rebuild the current state (and the held CDRs)."""
        return self._intact

    # -- recovery -----------------------------------------------------------------------

    def recover(self) -> list[Cdr]:
        """Rebuild the correlator from the newest checkpoint and the journals after it.
        Returns the CDRs closed before the stop or crash that are not known to be in
        the spool, to be written now (by `start`). Writes nothing but renaming an
        unreadable file aside: a start that fails later leaves every file for the next
        one."""
        if self._recovered:
            return list(self._unwritten)
        self._recovered = True
        files = self._files()
        checkpoints, journals = files[CHECKPOINT_SUFFIX], files[JOURNAL_SUFFIX]
        base = max(checkpoints, default=0)
        pending: dict[str, Cdr] = {}
        restored = 0
        if checkpoints:
            restored = self._restore(checkpoints[base], pending)
        elif (self.directory / LEGACY_SNAPSHOT).exists():
            restored = self._restore(self.directory / LEGACY_SNAPSHOT, pending)
        carried = len(pending)
        replayed = 0
        newest = max(journals, default=-1)
        for generation in sorted(journals):
            if generation >= base:
                path = journals[generation]
                replayed += self._replayer.replay(path, pending, newest=generation == newest)
                with contextlib.suppress(OSError):
                    self._older_journals[generation] = path.stat().st_size
        self._generation = max((base, *checkpoints, *journals))
        # A clock that ran ahead before the stop must not stamp what closes from now on.
        self.correlator.limit_time(self._wall_clock())
        self.correlator.recount(pending.values())
        self.stats.replayed_records += replayed
        if checkpoints or journals or restored:
            self.log.info(
                "dialogs_recovered",
                from_checkpoint=restored,
                journal_records=replayed,
                open_dialogs=self.correlator.open_dialogs,
                cdrs_to_write=len(pending),
                cdrs_carried_by_checkpoint=carried,
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

    def _restore(self, path: Path, pending: dict[str, Cdr]) -> int:
        try:
            snapshot, unwritten = read_checkpoint(path.read_bytes())
            count = self.correlator.restore(snapshot)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Unreadable state must not stop capture: the calls in it get no CDR (the
            # journals after it still reopen the calls they saw begin).
            self.stats.unreadable_checkpoints += 1
            self.log.error("dialog_checkpoint_unreadable", path=str(path), error=_reason(exc))
            self._set_aside(path)
            return 0
        for cdr in unwritten:
            pending[cdr.cdr_id] = cdr
        return count

    def _set_aside(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            path.rename(path.with_name(path.name + UNREADABLE_SUFFIX))

    def _journal_unreadable(self, path: Path, exc: OSError) -> None:
        self.stats.unreadable_journals += 1
        self.log.error("dialog_journal_unreadable", path=str(path), error=_reason(exc))
        self._set_aside(path)

    # -- checkpoints --------------------------------------------------------------------

    async def start(self, write_unwritten: Callable[[list[Cdr]], None] | None = None) -> None:
        """Open a fresh journal, hand the recovered CDRs to `write_unwritten` (whose
        spool writes journal their closes, so a second crash does not write them again),
        then write a checkpoint. A journal that cannot be created for want of space
        leaves the store without one (counted, ERROR), and every due checkpoint tries
        again; any other failure (the directory is unusable) raises."""
        if self._started:
            return
        if not self._recovered:
            raise RuntimeError("DialogStore.recover() must run before start()")
        generation = self._generation + 1
        try:
            fd = self._open_journal(generation)
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise  # the start fails, plainly, files untouched
            self.stats.journal_write_errors += 1
            self._intact = False
            self.log.error(
                "dialog_journal_unavailable",
                error=_reason(exc),
                note="calls are not rebuilt after a crash until a checkpoint is written; "
                "retried at every checkpoint",
            )
        else:
            self.use_journal(fd, len(MAGIC))
        self._generation = generation
        self._started = True
        if write_unwritten is not None and self._unwritten:
            write_unwritten(list(self._unwritten))
        self._unwritten = []
        self.checkpoint()
        self._task = asyncio.create_task(self._run(), name="sipcdr-dialog-store")
        self._task.add_done_callback(self._task_failed)

    async def stop(self) -> bool:
        """Idempotent: a last checkpoint of the open calls and the held CDRs, then the
        journal closed. On failure the older checkpoint and journals stay, and still
        rebuild the calls. True when the files on disk hold everything: the last
        checkpoint was written, or the journal missed nothing."""
        if self._stopped or not self._started:
            return self._intact
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._writing is not None:
            plan, future = self._writing
            await asyncio.wait({future})  # a checkpoint being written is finished first
            self._finish(plan, _error_of(future))
        return self.checkpoint(final=True) or self._intact

    def flush(self) -> None:
        """fsync the journal if anything was written since the last time."""
        self.write_pending()
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
                try:
                    self.flush()
                except OSError as exc:
                    self.stats.journal_write_errors += 1
                    self._intact = False
                    self.log.error("dialog_journal_sync_failed", error=str(exc))
                if self.checkpoint_due():
                    await self._checkpoint_in_background()
            except Exception as exc:
                # A snapshot that raised, say: counted, and the next round tries again;
                # ending here would stop every later fsync and checkpoint.
                self.stats.internal_errors += 1
                self.log.error("dialog_store_step_failed", error=repr(exc))

    def checkpoint_due(self) -> bool:
        if self._writing is not None:
            return False
        if self._intact and self.correlator.stats.messages == self._messages_at_checkpoint:
            return False  # nothing arrived: the last checkpoint is still exact
        spacing = max(self.checkpoint_interval_s, self._last_checkpoint_s / CHECKPOINT_MAX_SHARE)
        if self._failures_in_row:
            backoff = self.checkpoint_interval_s * 2 ** min(self._failures_in_row - 1, 16)
            spacing = max(spacing, min(backoff, CHECKPOINT_RETRY_MAX_S))
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
            self._write_file(plan)
        except OSError as exc:
            error = exc
            if exc.errno in _NO_SPACE and self._make_room():
                try:
                    self._write_file(plan)
                    error = None
                except OSError as again:
                    error = again
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
        future = loop.run_in_executor(None, self._write_file, plan)
        self._writing = (plan, future)
        future.add_done_callback(lambda done: self._finish(plan, _error_of(done)))
        # Shielded: a stop waits for the file rather than leave a thread writing it.
        with contextlib.suppress(Exception):
            await asyncio.shield(future)

    def _begin(self, final: bool) -> _Checkpoint | None:
        began = self._clock()
        # What the snapshot holds belongs to the journal it ends, not the next one.
        self.write_pending()
        messages = self.correlator.stats.messages
        # The snapshot makes a tuple per open call; letting the garbage collector walk
        # every open call meanwhile doubles its cost (measured at 100,000).
        collecting = gc.isenabled()
        gc.disable()
        try:
            snapshot = self.correlator.snapshot()
            unwritten = _unwritten_json(self.held())
        finally:
            if collecting:
                gc.enable()
        plan = _Checkpoint(
            generation=self._generation + 1,
            snapshot=snapshot,
            unwritten=unwritten,
            open_dialogs=self.correlator.open_dialogs,
            errors_before=self.stats.journal_write_errors,
            final=final,
            began=began,
        )
        self._last_checkpoint = began  # a failed attempt counts too: retries are spaced
        if final:
            self._close_journal()
        else:
            try:
                fd = self._open_journal(plan.generation)
            except OSError as exc:
                self.stats.checkpoint_failures += 1
                self._report_failure(exc, plan)
                return None  # appends go on in the current generation
            if self._fd >= 0:
                self._older_journals[self._generation] = self._size
            self._close_journal()
            self.use_journal(fd, len(MAGIC))
        self._generation = plan.generation
        self._messages_at_checkpoint = messages
        return plan

    def _write_file(self, plan: _Checkpoint) -> None:
        """Thread-safe: file system calls only. Leaves nothing half-written."""
        write_checkpoint(
            plan,
            self.directory / f"{_PREFIX}{plan.generation}{TMP_SUFFIX}",
            self.directory / f"{_PREFIX}{plan.generation}{CHECKPOINT_SUFFIX}",
        )

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
            if not plan.final and getattr(error, "errno", None) in _NO_SPACE and self._make_room():
                self._last_checkpoint = float("-inf")  # room was made: again at once
            return
        self.stats.checkpoints += 1
        # Complete again, unless a journal write failed after the snapshot was taken.
        self._intact = self.stats.journal_write_errors == plan.errors_before
        if self._failures_in_row:
            self.log.info("dialog_checkpoint_written", after_failures=self._failures_in_row)
        self._failures_in_row = 0
        self._reported_intact = True
        for generation in [g for g in self._older_journals if g < plan.generation]:
            del self._older_journals[generation]
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
            error=_reason(error),
            at_stop=plan.final,
            open_dialogs=plan.open_dialogs,
            recoverable_from_journal=self._intact,
            journal_write_errors=self.stats.journal_write_errors,
        )

    def _open_journal(self, generation: int) -> int:
        """Create journal `generation` with its header; a header refused for want of
        space is tried once more if room could be made."""
        path = self.directory / f"{_PREFIX}{generation}{JOURNAL_SUFFIX}"
        for attempt in (1, 2):
            path.unlink(missing_ok=True)  # left by a start that failed before using it
            fd = open_private_fd(path, os.O_WRONLY | os.O_EXCL | os.O_APPEND)
            try:
                if os.write(fd, MAGIC) != len(MAGIC):
                    raise OSError(errno.ENOSPC, "short write")
            except OSError as exc:
                os.close(fd)
                with contextlib.suppress(OSError):
                    path.unlink()
                if attempt == 1 and exc.errno in _NO_SPACE and self._make_room():
                    continue
                raise
            return fd
        raise AssertionError("unreachable")  # pragma: no cover

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
        # What recovery could not read, once it has been kept long enough for a look.
        expired = self._wall_clock() - UNREADABLE_RETENTION_S
        for path in self.directory.glob(f"{_PREFIX}*{UNREADABLE_SUFFIX}"):
            with contextlib.suppress(OSError):
                if path.lstat().st_mtime < expired:
                    stale.append(path)
        for path in stale:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    # -- metrics ------------------------------------------------------------------------

    def log_losses(self) -> None:
        """Log lost journal records at ERROR each time their count grows; the counts
        reach Prometheus through the telemetry exporter."""
        total = self.stats.journal_write_errors
        delta = total - self._write_errors_logged
        if delta > 0:
            self._write_errors_logged = total
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


def _reason(error: BaseException) -> str:
    return getattr(error, "strerror", None) or repr(error)
