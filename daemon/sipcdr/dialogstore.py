"""Open calls on disk: checkpoints of the correlator plus a journal of what changed
since, so that a call answered before a crash (SIGKILL, OOM kill, power loss) still
gets its correct CDR when its BYE arrives after the restart, and a CDR closed before
it but not yet in the spool is still written.

Files in the state directory, numbered by generation g, each created 0600:

    dialogs.<g>.json      checkpoint: the correlator's snapshot as generation g began,
                          and the CDRs closed but not yet on disk then
    dialogs.<g>.journal   what changed during generation g

The journal holds four kinds of record, each appended with one `write`:
- a message the correlator reported as `changed` (a first INVITE, the first ringing,
  answer or final response to it, a CANCEL, an auth retry, a BYE), before any CDR it
  closes goes to the spool;
- a close decision for a CDR no replayed message would close the same way (a timer, an
  eviction): the call, its end time and reason, before the CDR goes to the spool, so
  replay closes it exactly as then;
- a timer run that closed or forgot anything, after its decisions;
- a close, once the CDR is in the spool file (`closed`, the spool writer's hook): a CDR
  the disk refused waits in the spool's reserve and gets its close record only when the
  reserve is written.
All survive a killed process at once; the journal is fsynced every `fsync_interval_s`,
which bounds what a power loss takes. Retransmissions and in-dialog requests other
than BYE change nothing but a call's last-message time and are not journaled: the
checkpoints carry that time.

A checkpoint starts generation g+1: the snapshot is taken, with the CDRs the spool
still holds in memory (`held`), journal g+1 opened, the snapshot written to
`dialogs.<g+1>.tmp` (in a thread, while messages go on into the new journal), fsynced
and renamed, then the files of older generations deleted. The snapshot and the switch
of journals run between two messages on the one event loop, so the snapshot is
exactly the state journal g+1 starts from. A checkpoint file is JSON followed by a
CRC-32 trailer line, so damage is recognised rather than restored. If the checkpoint
cannot be written (a full disk), the older checkpoint and journals stay and still
rebuild the state; nothing half-written is left; attempts are then spaced out,
doubling up to `CHECKPOINT_RETRY_MAX_S`.

Recovery restores the newest checkpoint and replays the journals from its generation
on through the correlator, in order: the same messages and decisions in the same order
rebuild the same state, with no second encoding of it. A CDR closed by a replayed
record, or carried unwritten by the checkpoint, whose close record follows was written
before the crash and is dropped; one without is handed back to be written again: the
same record under the same `cdr_id`, which the sinks deduplicate. A close record for a
call that replay left open (journals of versions without close decisions) closes it
without a CDR.

A full disk: a write refused for want of space asks `on_no_space` to make room (the
daemon's spare file) and is tried once more. At start, a journal that cannot be
created for want of space leaves the store running without one (counted, ERROR):
every due checkpoint tries again. A file recovery cannot read at all is renamed
`.unreadable` and deleted after `UNREADABLE_RETENTION_S` by a later good checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import os
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import orjson
import structlog

from sipcdr.dialog import Correlator
from sipcdr.model import CDR_MONEY_FIELDS, Cdr, Packet, money
from sipcdr.private import open_private_fd
from sipcdr.sip import parse
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
# A journal is replayed in reads of this size, never read whole.
_READ_BYTES: Final = 1024 * 1024

CHECKPOINT_SUFFIX: Final = ".json"
JOURNAL_SUFFIX: Final = ".journal"
UNREADABLE_SUFFIX: Final = ".unreadable"
_PREFIX: Final = "dialogs."
TMP_SUFFIX: Final = ".tmp"  # a checkpoint being written; renamed once complete
# Written by versions without a journal, at a clean stop: read once as generation 0.
LEGACY_SNAPSHOT: Final = "dialogs.json"
CHECKPOINT_FORMAT: Final = 1  # the "checkpoint" member of the file's JSON object
_TRAILER_BYTES: Final = 11  # b"\n#" + 8 hex digits of the CRC-32 + b"\n"

MAGIC: Final = b"SIPCDRJ\x01"  # journal file format 1
_FRAME = struct.Struct("<II")  # crc32 of the body, body length
# kind, timestamp, source port, destination port, capture node length, source address
# length, destination address length, transport length; then those strings, then the
# payload as captured.
_MESSAGE = struct.Struct("<BdHHHBBB")
_CLOSED = struct.Struct("<BdB")  # kind, close time, cdr_id length; then cdr_id, Call-ID
# kind, decided at, end time, cdr_id length, end reason length, hangup side length;
# then those strings, then the Call-ID.
_DECIDED = struct.Struct("<BddBBB")
_TIMER = struct.Struct("<Bd")  # kind, the time the timers ran at
KIND_MESSAGE: Final = 1
KIND_CLOSED: Final = 2
KIND_DECIDED: Final = 3
KIND_TIMER: Final = 4
MAX_RECORD_BYTES: Final = 16 * 1024 * 1024  # far above any SIP message; bounds a bad length
_TEXT: Final = "surrogatepass"  # any str round-trips, even one a capture file name gave
_NO_SPACE: Final = frozenset((errno.ENOSPC, errno.EDQUOT))
_CDR_FIELDS: Final = tuple(item.name for item in dataclasses.fields(Cdr))
_CDR_FIELD_SET: Final = frozenset(_CDR_FIELDS)


@dataclass(slots=True)
class _Checkpoint:
    generation: int
    snapshot: bytes
    unwritten: bytes  # the CDRs the spool held in memory, as JSON
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
    journal_decisions: int = 0  # close decisions and timer runs
    journal_write_errors: int = 0  # records not journaled: not rebuilt after a crash
    checkpoints: int = 0
    checkpoint_failures: int = 0
    torn_tails: int = 0  # journals that ended in a partial or damaged record at recovery
    torn_bytes: int = 0
    bad_records: int = 0  # well-framed records recovery could not apply
    unreadable_checkpoints: int = 0
    unreadable_journals: int = 0
    internal_errors: int = 0  # the background task's own failures, survived
    replayed_records: int = 0


def _no_cdrs() -> Sequence[Cdr]:
    return ()


class DialogStore:
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
    ) -> None:
        self.directory = directory
        self.correlator = correlator
        self.checkpoint_interval_s = checkpoint_interval_s
        self.fsync_interval_s = fsync_interval_s
        self.stats = DialogStoreStats()
        self.log = structlog.get_logger("sipcdr.dialogs")
        # CDRs closed but held in memory by the spool (its reserve): each checkpoint
        # carries them, so a crash does not lose them.
        self.held: Callable[[], Sequence[Cdr]] = _no_cdrs
        # Asked to make room when a write is refused for want of space; True when it did.
        self.on_no_space = on_no_space
        self._clock = clock
        self._wall_clock = wall_clock
        self._fd = -1
        self._size = 0  # bytes in the open journal; a failed write is cut back to this
        # Sizes of the journals since the last good checkpoint, but the open one: all of
        # them are replayed at start.
        self._older_journals: dict[int, int] = {}
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
        """Journal that a call's CDR is in the spool file. After the stop's checkpoint
        (the spool writing what it still held as it closes) there is no journal: the
        next start may write such a CDR again, under the same cdr_id, which is no loss."""
        if self._stopped:
            return
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

    def decided(self, cdrs: Sequence[Cdr], timer_at: float | None) -> None:
        """Journal closes that no replayed message repeats, before their CDRs go to the
        spool: a timer run at `timer_at` (then the run itself too, for what it forgot),
        or an eviction (None) by the message journaled next."""
        now = self.correlator.now
        for cdr in cdrs:
            ident = cdr.cdr_id.encode()
            reason = cdr.end_reason.encode()
            side = (cdr.hangup_by or "").encode()
            head = _DECIDED.pack(
                KIND_DECIDED, now, cdr.end_time, len(ident), len(reason), len(side)
            )
            body = b"".join((head, ident, reason, side, cdr.call_id.encode("utf-8", _TEXT)))
            if self._append(body):
                self.stats.journal_decisions += 1
        if timer_at is not None and self._append(_TIMER.pack(KIND_TIMER, timer_at)):
            self.stats.journal_decisions += 1

    def _append(self, body: bytes) -> bool:
        length = len(body)
        frame = _FRAME.pack(zlib.crc32(body), length)
        for attempt in (1, 2):
            no_space = False
            try:
                if self._fd < 0:
                    raise OSError(errno.EBADF, "journal not open")
                if length > MAX_RECORD_BYTES:
                    raise OSError(errno.EFBIG, "record too large")
                written = os.writev(self._fd, (frame, body))
            except OSError as exc:
                no_space = exc.errno in _NO_SPACE
            else:
                if written == length + _FRAME.size:
                    self._size += written
                    self._dirty = True
                    return True
                no_space = True  # a short write: the disk filled up
            if self._fd >= 0:
                # Half a record would hide every record after it from recovery.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._size)
            if not (attempt == 1 and no_space and self._make_room()):
                break
        self.stats.journal_write_errors += 1
        self._intact = False
        return False

    def _make_room(self) -> bool:
        return self.on_no_space is not None and self.on_no_space()

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
                replayed += self._replay(path, pending, newest=generation == newest)
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

    def _replay(self, path: Path, pending: dict[str, Cdr], *, newest: bool) -> int:
        """Replay one journal, read in pieces; returns the records replayed."""
        try:
            handle = path.open("rb", buffering=_READ_BYTES)
        except OSError as exc:
            self._journal_unreadable(path, exc)
            return 0
        replayed = 0
        offset = 0
        with handle:
            try:
                size = os.fstat(handle.fileno()).st_size
                magic = handle.read(len(MAGIC))
                if not magic:
                    # The newest may have been created just before the crash; an older
                    # one was written and then emptied: damage.
                    if not newest:
                        self._torn(0)
                    return 0
                if magic != MAGIC:
                    self._torn(size)
                    return 0
                offset = len(MAGIC)
                while frame := handle.read(_FRAME.size):
                    if len(frame) < _FRAME.size:
                        break
                    crc, length = _FRAME.unpack(frame)
                    if not 0 < length <= MAX_RECORD_BYTES:
                        break
                    body = handle.read(length)
                    if len(body) < length or zlib.crc32(body) != crc:
                        break
                    offset += _FRAME.size + length
                    replayed += 1
                    self._apply(body, pending)
            except OSError as exc:
                self._journal_unreadable(path, exc)
                return replayed
        if offset < size:
            # A record cut short or damaged (a power loss inside the fsync interval):
            # it and what follows are not replayed. Records are never rewritten, so
            # nothing valid can follow a damaged one.
            self._torn(size - offset)
        return replayed

    def _journal_unreadable(self, path: Path, exc: OSError) -> None:
        self.stats.unreadable_journals += 1
        self.log.error("dialog_journal_unreadable", path=str(path), error=_reason(exc))
        self._set_aside(path)

    def _apply(self, body: bytes, pending: dict[str, Cdr]) -> None:
        kind = body[0]
        if kind == KIND_MESSAGE:
            self._replay_message(body, pending)
        elif kind == KIND_CLOSED:
            self._replay_closed(body, pending)
        elif kind == KIND_DECIDED:
            self._replay_decided(body, pending)
        elif kind == KIND_TIMER and len(body) == _TIMER.size:
            self.correlator.prune_closed(_TIMER.unpack(body)[1])
        else:
            self.stats.bad_records += 1

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

    def _replay_decided(self, body: bytes, pending: dict[str, Cdr]) -> None:
        try:
            _kind, decided_at, end_time, id_len, reason_len, side_len = _DECIDED.unpack_from(body)
            at = _DECIDED.size
            cdr_id = body[at : at + id_len].decode()
            at += id_len
            end_reason = body[at : at + reason_len].decode()
            at += reason_len
            hangup_by = body[at : at + side_len].decode() or None
            call_id = body[at + side_len :].decode("utf-8", _TEXT)
            cdr = self.correlator.close_decided(
                call_id, cdr_id, end_time, end_reason, hangup_by, decided_at
            )
        except Exception:
            self.stats.bad_records += 1
            return
        if cdr is not None:
            pending[cdr.cdr_id] = cdr

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
            self._fd, self._size = fd, len(MAGIC)
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
            self._fd, self._size = fd, len(MAGIC)
        self._generation = plan.generation
        self._messages_at_checkpoint = messages
        return plan

    def _write_file(self, plan: _Checkpoint) -> None:
        """Thread-safe: file system calls only. Leaves nothing half-written."""
        tmp = self.directory / f"{_PREFIX}{plan.generation}{TMP_SUFFIX}"
        pieces = (
            b'{"checkpoint":%d,"unwritten":' % CHECKPOINT_FORMAT,
            plan.unwritten,
            b',"snapshot":',
            plan.snapshot,
            b"}",
        )
        crc = 0
        for piece in pieces:
            crc = zlib.crc32(piece, crc)
        try:
            tmp.unlink(missing_ok=True)  # a stale one may have other permissions
            fd = open_private_fd(tmp, os.O_WRONLY | os.O_EXCL)
            try:
                for piece in (*pieces, b"\n#%08x\n" % crc):
                    view = memoryview(piece)
                    while view:
                        view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.directory / f"{_PREFIX}{plan.generation}{CHECKPOINT_SUFFIX}")
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


def read_checkpoint(data: bytes) -> tuple[dict[str, object], list[Cdr]]:
    """The correlator snapshot and the unwritten CDRs of a checkpoint file; ValueError
    when its checksum or form is wrong. A file without the trailer is the plain
    snapshot of an earlier version (or of `dialogs.json`)."""
    view = memoryview(data)
    trailer = bytes(view[-_TRAILER_BYTES:])
    if trailer.startswith(b"\n#") and trailer.endswith(b"\n"):
        body = view[:-_TRAILER_BYTES]
        try:
            crc = int(trailer[2:-1], 16)
        except ValueError:
            raise ValueError("checkpoint trailer is damaged") from None
        if zlib.crc32(body) != crc:
            raise ValueError("checkpoint checksum does not match")
        document = orjson.loads(body)
        del body, view
        if not isinstance(document, dict) or document.get("checkpoint") != CHECKPOINT_FORMAT:
            raise ValueError("not a checkpoint of this format")
        snapshot = document.pop("snapshot")
        if not isinstance(snapshot, dict):
            raise ValueError("checkpoint without a snapshot")
        return snapshot, _unwritten_cdrs(document.get("unwritten"))
    del view
    document = orjson.loads(data)
    if not isinstance(document, dict) or "version" not in document:
        raise ValueError("checkpoint without its trailer")
    return document, []


def _unwritten_json(cdrs: Sequence[Cdr]) -> bytes:
    # Money as decimal strings, read back exact by `_unwritten_cdrs`.
    return orjson.dumps(
        {
            "fields": _CDR_FIELDS,
            "rows": [[getattr(cdr, name) for name in _CDR_FIELDS] for cdr in cdrs],
        },
        default=_money_text,
    )


def _money_text(value: object) -> str:
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _unwritten_cdrs(document: object) -> list[Cdr]:
    if not isinstance(document, dict):
        raise ValueError("checkpoint unwritten CDRs are malformed")
    names, rows = document.get("fields"), document.get("rows")
    if (
        not isinstance(names, list)
        or not isinstance(rows, list)
        or not all(isinstance(name, str) and name in _CDR_FIELD_SET for name in names)
    ):
        raise ValueError("checkpoint unwritten CDRs are malformed")
    cdrs = []
    for row in rows:
        if not isinstance(row, list) or len(row) != len(names):
            raise ValueError("checkpoint unwritten CDR is malformed")
        fields = dict(zip(names, row, strict=True))
        fields["fraud_flags"] = tuple(fields.get("fraud_flags") or ())
        for name in CDR_MONEY_FIELDS:
            if name in fields:
                fields[name] = money(fields[name])
        cdrs.append(Cdr(**fields))
    return cdrs


def _reason(error: BaseException) -> str:
    return getattr(error, "strerror", None) or repr(error)


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
    "read_checkpoint",
]
