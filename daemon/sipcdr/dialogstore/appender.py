"""The dialog journal's appends, the capture path's part of the dialog store: records
framed and written, one `writev` per record or, batched, per event loop turn
(`sipcdr.dialogstore` describes the files and the order of things)."""

from __future__ import annotations

import asyncio
import errno
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Final, Protocol, TypeVar, cast

from mypy_extensions import mypyc_attr

from sipcdr.dialog import Correlator
from sipcdr.dialogstore.journal import (
    _FRAME,
    KIND_CLOSED,
    KIND_MESSAGE,
    MAX_RECORD_BYTES,
    closed_record,
    decided_record,
    message_record,
    timer_record,
)
from sipcdr.dialogstore.stats import DialogStoreStats
from sipcdr.model import Cdr, Packet
from sipcdr.pipeline import CdrSink


class _Destinations(Protocol):
    """`sipcdr.engine.Destinations`, as far as the barrier reads it (a layer up)."""

    @property
    def cdrs(self) -> Sequence[CdrSink]: ...


_D = TypeVar("_D", bound=_Destinations)
_NO_SPACE: Final = frozenset((errno.ENOSPC, errno.EDQUOT))
# Records held for the end of the event loop's turn are written sooner past either
# bound: memory stays small whatever one turn takes in, and a batch's frames and
# bodies stay within the 1024 buffers one `writev` takes.
BATCH_MAX_RECORDS: Final = 512
BATCH_MAX_BYTES: Final = 256 * 1024
_BATCH_MAX_BUFFERS: Final = 2 * BATCH_MAX_RECORDS  # a frame and a body each
# Bound once: called for every record.
_FRAME_PACK: Final = _FRAME.pack
_FRAME_SIZE: Final = _FRAME.size
_crc32: Final = zlib.crc32


@mypyc_attr(allow_interpreted_subclasses=True)
class JournalAppender:
    """Appends to the open journal (`_fd`, opened and switched by the store). The
    pipeline's hooks: `message` (each message that changed a call), `decided` (closes
    no message repeats); the spool writer's: `closed` (a CDR is in the spool file)."""

    def __init__(
        self,
        correlator: Correlator,
        stats: DialogStoreStats,
        on_no_space: Callable[[], bool] | None,
        batch_writes: bool,
    ) -> None:
        self.correlator = correlator
        self.stats = stats
        # Asked to make room when a write is refused for want of space; True when it did.
        self.on_no_space = on_no_space
        self._fd = -1
        self._size = 0  # bytes in the open journal; a failed write is cut back to this
        # A failed write whose cut-back failed too left half a record, at which replay
        # stops: nothing more is written to this journal (`use_journal` ends it).
        self._torn = False
        self._dirty = False
        # False after a journal write failed, until a checkpoint succeeds: the files on
        # disk no longer rebuild the current state.
        self._intact = True
        self._stopped = False
        # Batched: records wait for the end of the event loop's turn (or the next CDR
        # for the sinks, `write_pending`) and go out in one `writev`, not one each.
        self.batch_writes = batch_writes
        self._pending: list[bytes] = []  # frame, body, frame, body, ...
        self._pending_bytes = 0
        # Records waiting, by kind: what the stats count once they are written.
        self._pending_messages = 0
        self._pending_closes = 0
        self._pending_decisions = 0
        # A callback is queued to write what waits at the end of the turn: once a turn,
        # however often the barrier and the close records write before it.
        self._turn_end_queued = False
        self.barrier = _Barrier(self)

    def use_journal(self, fd: int, size: int) -> None:
        """Append to `fd` from now on, a journal of `size` bytes."""
        self._fd, self._size, self._torn = fd, size, False

    def ahead(self, destinations: _D) -> _D:
        """`destinations` with the barrier before their CDR sinks: the records a turn
        holds are written before any CDR reaches a sink (the spool), so none is in the
        spool before the records that closed it."""
        sinks = (self.barrier, *destinations.cdrs)
        return cast(_D, replace(cast(Any, destinations), cdrs=sinks))

    def message(self, packet: Packet) -> None:
        """Journal one message that changed a call. Never raises: the caller is the
        capture path, and a failed write is counted."""
        body = message_record(packet)
        if body is None:
            self.stats.journal_write_errors += 1  # a field out of range: cannot be framed
            self._intact = False
            return
        # `_append`'s work in line: once per message that changed a call.
        length = len(body)
        if length > MAX_RECORD_BYTES:
            self._refuse()
            return
        pending = self._pending
        pending.append(_FRAME_PACK(_crc32(body), length))
        pending.append(body)
        self._pending_bytes += length + _FRAME_SIZE
        self._pending_messages += 1
        if self._turn_end_queued:
            if len(pending) >= _BATCH_MAX_BUFFERS or self._pending_bytes >= BATCH_MAX_BYTES:
                self.write_pending()
            return
        self._hold_or_write()

    def closed(self, cdr: Cdr) -> None:
        """Journal that a call's CDR is in the spool file, written at once, batched or
        not: held to the end of the turn, a kill before it would make the start write
        this CDR again, and through the stages anew, without the fraud flags its call
        had gathered (the fraud stage's state is not journaled). After the stop's
        checkpoint (the spool writing what it still held as it closes) there is no
        journal: the next start may write such a CDR again, under the same cdr_id,
        which is no loss."""
        if self._stopped:
            return
        body = closed_record(cdr, max(cdr.end_time, self.correlator.now))
        length = len(body)
        frame = _FRAME_PACK(_crc32(body), length)
        if self._pending:
            # Records still wait (the spool wrote several held CDRs in a row): in order.
            self._pending += (frame, body)
            self._pending_bytes += length + _FRAME_SIZE
            self._pending_closes += 1
            self.write_pending()
            return
        # Nothing waits, as the barrier has just written the turn's records: the
        # record alone, with no list or counts to set up and take down.
        size = length + _FRAME_SIZE
        if self._write([frame, body], size) == size:
            self.stats.journal_closes += 1
        else:
            self.stats.journal_write_errors += 1
            self._intact = False

    def decided(self, cdrs: Sequence[Cdr], timer_at: float | None) -> None:
        """Journal closes that no replayed message repeats, before their CDRs go to the
        spool: a timer run at `timer_at` (then the run itself too, for what it forgot),
        or an eviction (None) by the message journaled next."""
        now = self.correlator.now
        for cdr in cdrs:
            self._append(decided_record(cdr, now))
        if timer_at is not None:
            self._append(timer_record(timer_at))

    def _append(self, body: bytes) -> None:
        """A close decision or a timer run, to be written as `message` writes."""
        length = len(body)
        if length > MAX_RECORD_BYTES:
            self._refuse()
            return
        self._pending += (_FRAME_PACK(_crc32(body), length), body)
        self._pending_bytes += length + _FRAME_SIZE
        self._pending_decisions += 1
        if self._turn_end_queued:
            if len(self._pending) >= _BATCH_MAX_BUFFERS or self._pending_bytes >= BATCH_MAX_BYTES:
                self.write_pending()
            return
        self._hold_or_write()

    def _refuse(self) -> None:
        # Replay would stop at a record this long: refused here, alone, and counted.
        self.stats.journal_write_errors += 1
        self._intact = False

    def _hold_or_write(self) -> None:
        """Batched, with an event loop: the records wait for the end of the turn, when
        one callback, queued now and only now in the turn, writes them (the barrier
        and the close records may write them sooner: the callback then finds less or
        nothing). Otherwise they are written now."""
        if self.batch_writes:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                pass  # no event loop (a test, a tool): nothing would end the turn
            else:
                # After the callbacks of this turn: every datagram uvloop read on this
                # wake-up, a stream's whole read, a timer run.
                loop.call_soon(self._turn_ended)
                self._turn_end_queued = True
                return
        self.write_pending()

    def _turn_ended(self) -> None:
        self._turn_end_queued = False
        self.write_pending()

    def write_pending(self) -> None:
        """Write the records waiting for the end of the turn, in one `writev`. Called
        then, before any CDR goes to the sinks (the barrier `ahead` puts first: a CDR never
        reaches a sink before the records that closed it, `ahead`), and before the
        journal is fsynced or switched. Never raises: a failed write is counted per record."""
        pending = self._pending
        if not pending:
            return
        length = self._pending_bytes
        messages, closes = self._pending_messages, self._pending_closes
        decisions = self._pending_decisions
        self._pending, self._pending_bytes = [], 0
        self._pending_messages = self._pending_closes = self._pending_decisions = 0
        written = self._write(pending, length)
        stats = self.stats
        if written == length:
            stats.journal_messages += messages
            stats.journal_closes += closes
            stats.journal_decisions += decisions
            return
        # Some records did not fit: those wholly on disk stay, the rest are lost.
        at = 0
        for index in range(0, len(pending), 2):
            size = len(pending[index]) + len(pending[index + 1])
            if at + size > written:
                stats.journal_write_errors += (len(pending) - index) // 2
                break
            at += size
            kind = pending[index + 1][0]
            if kind == KIND_MESSAGE:
                stats.journal_messages += 1
            elif kind == KIND_CLOSED:
                stats.journal_closes += 1
            else:
                stats.journal_decisions += 1
        self._intact = False

    def _write(self, buffers: list[bytes], length: int) -> int:
        """Append `buffers` (whole records, `length` bytes) with `writev`, going on
        after a short write; returns the bytes kept, `length` unless the disk refused
        the rest, and then cut back to the last whole record (half a record would hide
        every record after it from recovery)."""
        done = 0
        made_room = False
        rest = buffers
        while True:
            try:
                if self._fd < 0 or self._torn:
                    raise OSError(errno.EBADF, "journal not open, or torn")
                written = os.writev(self._fd, rest)
            except OSError as exc:
                # Room is made once a batch, and only when the disk said it was full.
                if exc.errno in _NO_SPACE and not made_room and self._make_room():
                    made_room = True
                    continue
                break
            if written <= 0:
                break
            done += written
            self._size += written
            self._dirty = True
            if done == length:
                return done
            rest = _after(buffers, done)
        kept = 0  # bytes of the records wholly written
        for index in range(0, len(buffers), 2):
            size = len(buffers[index]) + len(buffers[index + 1])
            if kept + size > done:
                break
            kept += size
        if kept < done:
            self._size -= done - kept
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                self._torn = True
        return kept

    def _make_room(self) -> bool:
        return self.on_no_space is not None and self.on_no_space()


def _after(buffers: list[bytes], done: int) -> list[bytes]:
    """What is left of `buffers` once their first `done` bytes are written."""
    for index, buffer in enumerate(buffers):
        if done < len(buffer):
            return [buffer[done:], *buffers[index + 1 :]]
        done -= len(buffer)
    return []


class _Barrier:
    """The first CDR sink of the daemon's chain: writes what the journal holds."""

    name = "dialog_journal"

    def __init__(self, appender: JournalAppender) -> None:
        self.write_pending = appender.write_pending

    def write(self, cdr: Cdr) -> None:
        self.write_pending()

    def flush(self) -> None:
        self.write_pending()
