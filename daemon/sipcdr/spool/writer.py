"""The spool's writing side: segments, appends, the reserve a refusing disk leaves
records in, the size policy (`sipcdr.spool` describes the whole)."""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import BinaryIO

from mypy_extensions import mypyc_attr

from sipcdr.clock import SYSTEM_CLOCK, Clock
from sipcdr.private import open_private, open_private_fd, private_dir
from sipcdr.spool.reader import SpoolReader
from sipcdr.spool.records import (
    _FLOOR_CHECK_S,
    _KIND_NAMES,
    _NO_SPACE,
    _WRITE_BUFFER_BYTES,
    CURSOR_SUFFIX,
    DEFAULT_CDR_RESERVE_RECORDS,
    DEFAULT_FULL_POLICY,
    DEFAULT_MAX_BYTES,
    DEFAULT_SEGMENT_BYTES,
    FULL_POLICIES,
    MAX_VALUE_BYTES,
    RESUME_FRACTION,
    _encode,
    _fsync_directory,
    read_cursor_seq,
    segment_name,
)
from sipcdr.spool.segments import Segments, _Segment, cut_torn_tail, list_segments


class Appended(IntEnum):
    """What `append` did with a record. REFUSED is false, the others true."""

    REFUSED = 0  # not kept (counted in `SpoolStats.dropped` with its reason)
    WRITTEN = 1  # in the segment file (the buffered stream: taken into its buffer)
    HELD = 2  # in the reserve, in memory, until the disk takes it


@mypyc_attr(native_class=False)  # compiled classes cannot derive from OSError
class SpoolError(OSError):
    """The spool directory cannot be used (not writable, locked by another process)."""


@dataclass(slots=True)
class SpoolStats:
    """Counters the daemon exports; all cumulative since open."""

    appended: dict[str, int] = field(default_factory=dict)  # by kind, once written
    # by reason: full, write_error (beyond the reserve), too_large, disk_floor,
    # retention (expired by `expire_segments` before a sink took them)
    dropped: dict[str, int] = field(default_factory=dict)
    held: int = 0  # records the disk refused that went to the reserve
    torn_tail_bytes: int = 0  # cut off the newest segment at open
    torn_tails: int = 0
    # Records missing between valid ones are each reader's own count
    # (`SpoolReader.corrupt_records`): every sink's reader meets the same gap.
    rotation_failures: int = 0  # a new segment could not be opened; the old one grows
    # fsyncs that failed: what was written since the last good one may not be on disk
    # (an I/O error; the filesystem often turns read-only next).
    sync_failures: int = 0


class Spool(Segments):
    """One stream's segments. Not thread-safe: the daemon's event loop owns it."""

    def __init__(
        self,
        directory: Path,
        consumers: tuple[str, ...],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        full_policy: str = DEFAULT_FULL_POLICY,
        buffered: bool = False,
        reserve_records: int = DEFAULT_CDR_RESERVE_RECORDS,
        min_free_bytes: int = 0,
        refuse_below_floor: bool = True,
        readers_elsewhere: bool = False,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if full_policy not in FULL_POLICIES:
            raise ValueError(f"full_policy must be one of {FULL_POLICIES}")
        if reserve_records < 1:
            raise ValueError("reserve_records must be at least 1")
        self.directory = directory
        self._clock = clock  # how often the free space is read
        # Every sink that reads the stream, named up front: a segment is deleted only
        # when all of them are past it. A sink taken out of the config no longer holds
        # segments back; its stale cursor restarts from the oldest record if it returns.
        self.consumers = consumers
        # The readers are another process's (`SpoolTail`): segments are deleted by what
        # their cursor files on disk say, read at each flush.
        self.readers_elsewhere = readers_elsewhere
        self.max_bytes = max_bytes
        # The active segment is never deleted, so it must be small against the limit
        # or a delivered-but-undeletable segment would keep the spool "full".
        self.segment_bytes = max(1, min(segment_bytes, max_bytes // 4))
        self.full_policy = full_policy
        self.buffered = buffered
        # Unbuffered streams: records the disk refused, written back before newer ones.
        # At least one, so a failing disk always shows as a non-empty reserve. Each is
        # kept encoded, numbered from `next_seq` on in order, with its owner's tag.
        self.reserve_records = reserve_records
        self._reserve: deque[tuple[bytes, object]] = deque()
        # Told the tags of held records once they are on disk, oldest first.
        self.on_reserve_written: Callable[[list[object]], None] | None = None
        # Asked to make room when a write is refused for want of space; True when it
        # did, and the write is tried once more.
        self.on_no_space: Callable[[], bool] | None = None
        self._no_space = False  # the last failed write was refused for want of space
        # Buffered streams: refuse records while the filesystem has less free space, or,
        # with `refuse_below_floor` off, only say so (`below_floor`) for an owner that
        # waits instead (an import).
        self.min_free_bytes = min_free_bytes
        self.refuse_below_floor = refuse_below_floor
        self.below_floor = False
        # Set by the owner while the disk's room is kept for another stream: refused as
        # below the floor, whatever the free space.
        self.room_withheld = False
        self._floor_budget = 0  # bytes that may still be written before the floor
        self._floor_checked_until = 0.0
        self._write_failed = False  # the last write was refused
        self.stats = SpoolStats()
        self.full = False
        self.next_seq = 1
        # The CRC start value of every segment this writer creates, drawn at `open`
        # (`records.segment_name`): records in the reserve, encoded before a rotation,
        # stay valid in the segment after it.
        self._seed = 0
        self._segments: list[_Segment] = []
        self._fd = -1
        self._lock: BinaryIO | None = None
        self._buffer: list[bytes] = []
        self._buffered_bytes = 0
        self._dirty = False
        self._size = 0
        self._readers: dict[str, SpoolReader] = {}
        self._opened = False

    def open(self) -> None:
        if self._opened:
            return
        try:
            private_dir(self.directory)
            private_dir(self.directory / "cursors")
            self._take_lock()
        except OSError as exc:
            raise SpoolError(f"spool {self.directory}: {exc.strerror or exc}") from exc
        segments = list_segments(self.directory)
        self._segments = segments
        # Never 0, the seed of an earlier version's segments.
        self._seed = int.from_bytes(os.urandom(4), "little") or 1
        if segments:
            self.next_seq, torn = cut_torn_tail(segments[-1])
            if torn:
                self.stats.torn_tails += 1
                self.stats.torn_tail_bytes += torn
        self._size = sum(segment.size for segment in self._segments)
        self._start_segment()
        self._opened = True
        if self.readers_elsewhere:
            self._reset_cursors_ahead()
        for name in () if self.readers_elsewhere else self.consumers:
            self._readers[name] = SpoolReader(self, name)
        self._update_full()

    def _reset_cursors_ahead(self) -> None:
        """A cursor past the spool's end (a power cut kept it, lost what it passed) set
        back to the oldest record before any is appended, as a reader in this process
        is: else this writer deletes by it and a late delivery process skips by it."""
        for name in self.consumers:
            seq = read_cursor_seq(self.directory / "cursors" / f"{name}{CURSOR_SUFFIX}")
            if seq is not None and seq > self.next_seq:
                reader = SpoolReader(self, name)
                reader.save_cursor()
                reader.close()

    def _take_lock(self) -> None:
        import fcntl  # noqa: PLC0415 - POSIX only, like the daemon

        handle = open_private(self.directory / "lock", "wb")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise OSError(0, "in use by another sipcdr process") from None
        self._lock = handle

    def _start_segment(self) -> None:
        """Appends always go to a fresh segment after open or when one is full, so a
        segment is never appended to after a crash may have torn it. The new file is
        opened before the old one is let go: if it cannot be (no space, no file
        handles), appends go on into the old segment and rotation is tried again."""
        # A newest segment with no whole record (empty, or torn bytes a failed cut-back
        # left) is reused, with its seed: a new one would have its first number, and two
        # segments of one number leave readers to the folder's order.
        newest = self._segments[-1] if self._segments else None
        reuse = newest is not None and (newest.size == 0 or newest.first_seq == self.next_seq)
        if reuse and self._fd >= 0:
            return
        if newest is not None and reuse and newest.seed == 0:
            self._replace_unseeded(newest)
            newest, reuse = None, False
        if newest is not None and reuse:
            segment = newest
            # Its own seed; at open, an earlier open's (nothing is encoded yet).
            self._seed = segment.seed
        else:
            name = segment_name(self.next_seq, self._seed)
            segment = _Segment(self.next_seq, self.directory / name, 0, self._seed)
        fd = open_private_fd(segment.path, os.O_WRONLY | os.O_APPEND)
        try:
            self._close_active()
        except OSError:
            # The old segment may not be on disk; the new one is in use all the same.
            self.stats.sync_failures += 1
        finally:
            self._fd = fd
            if not reuse:
                self._segments.append(segment)
        with contextlib.suppress(OSError):
            _fsync_directory(self.directory)

    def _replace_unseeded(self, segment: _Segment) -> None:
        """Delete the newest segment, of an earlier version (seed 0) and with no whole
        record, for one with a seed: never written on, nor renamed (a reader of it in
        another process would go on checking with seed 0). Raises when it cannot be."""
        os.close(open_private_fd(segment.path, os.O_WRONLY))  # refuses what is not ours
        os.unlink(segment.path)
        self._segments.pop()
        self._size -= segment.size

    def _close_active(self) -> None:
        """Write what is buffered, fsync and close the active segment."""
        if self._fd >= 0:
            try:
                self._flush_buffer()
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1

    def close(self) -> None:
        """Idempotent: writes what is buffered or reserved, fsyncs and closes. What the
        reserve still holds then is lost, and counted (see `take_reserve`)."""
        if self._reserve:
            self._write_reserve()
            self._refuse("write_error", len(self._reserve))
            self._reserve.clear()
        try:
            self._close_active()
        except OSError:
            self.stats.sync_failures += 1  # the last records may not be on disk
            raise
        finally:  # the cursors saved and the lock let go all the same
            for reader in self._readers.values():
                if reader.cursor_unsaved:
                    reader.save_cursor()
                reader.close()
            self._readers.clear()
            if self._lock is not None:
                self._lock.close()
                self._lock = None
            self._opened = False

    def append(self, kind: str, key: bytes, value: bytes, tag: object = None) -> Appended:
        """Append one record: WRITTEN when it is in the segment file, HELD when the disk
        refused it and the reserve keeps it (with `tag`, handed to `on_reserve_written`
        once written), REFUSED when it was not kept (full, too large, below the
        free-space floor, or a write error with the reserve full), which the stats count
        by reason. Never raises: the caller is the capture path."""
        if self.full and self.full_policy == "drop_newest":
            self._refuse("full")
            return Appended.REFUSED
        if len(key) > 0xFFFF or len(value) > MAX_VALUE_BYTES:
            self._refuse("too_large")
            return Appended.REFUSED
        if self.buffered:
            if (self.below_floor or self.room_withheld) and self.refuse_below_floor:
                self._refuse("disk_floor")
                return Appended.REFUSED
            # Numbered once buffered, so each record is encoded once; a batch write
            # that fails gives the numbers of what it did not write back.
            seq = self.next_seq
            self.next_seq = seq + 1
            record = _encode(kind, key, value, seq, self._seed)
            self._buffer.append(record)
            self._buffered_bytes += len(record)
            if self._buffered_bytes >= _WRITE_BUFFER_BYTES and not self._flush_buffer():
                return Appended.REFUSED
            return Appended.WRITTEN
        reserve = self._reserve
        # Oldest first: while the reserve holds records, a new one joins them and the
        # write is retried by `flush`, not here, so a refusing disk costs no system call.
        record = _encode(kind, key, value, self.next_seq + len(reserve), self._seed)
        if not reserve and self._write_numbered([record]):
            return Appended.WRITTEN
        if len(reserve) < self.reserve_records:
            reserve.append((record, tag))
            self.stats.held += 1
            return Appended.HELD
        self._refuse("write_error")
        return Appended.REFUSED

    def _refuse(self, reason: str, count: int = 1) -> None:
        dropped = self.stats.dropped
        dropped[reason] = dropped.get(reason, 0) + count

    def _write_reserve(self) -> bool:
        """Write what the reserve holds, oldest first, in batches; True once it is empty.
        Numbered when held, with nothing written meanwhile: the first is `next_seq`."""
        reserve = self._reserve
        while reserve:
            batch: list[bytes] = []
            size = 0
            for record, _tag in reserve:
                batch.append(record)
                size += len(record)
                if size >= _WRITE_BUFFER_BYTES:
                    break
            written = self._write_numbered(batch)
            if written:
                tags = [reserve.popleft()[1] for _ in range(written)]
                if self.on_reserve_written is not None:
                    self.on_reserve_written(tags)
            if written < len(batch):
                return False
        return True

    def take_reserve(self) -> list[object]:
        """Empty the reserve without writing it, returning the tags of its records: the
        owner has kept them elsewhere (a checkpoint, at a stop). Not counted as lost."""
        tags = self.reserved_tags()
        self._reserve.clear()
        return tags

    def _write_numbered(self, records: list[bytes]) -> int:
        """Write records numbered from `next_seq` on; returns how many were written. A
        write refused for want of space is tried once more if `on_no_space` made room."""
        written = self._write(records)
        if (
            written < len(records)
            and self._no_space
            and self.on_no_space is not None
            and self.on_no_space()
        ):
            written += self._write(records[written:])
        if written:
            self.next_seq += written
            self._written(records if written == len(records) else records[:written])
        return written

    def _written(self, records: list[bytes]) -> None:
        """Count records now on disk; mark the spool full and rotate as needed."""
        appended = self.stats.appended
        for record in records:
            kind = _KIND_NAMES[record[2]]  # the kind code follows the two magic bytes
            appended[kind] = appended.get(kind, 0) + 1
        if self._size >= self.max_bytes and not self.full:
            self.full = True
        if self._segments[-1].size >= self.segment_bytes:
            try:
                self._start_segment()
            except OSError:
                self.stats.rotation_failures += 1  # tried again at the next append

    def _write(self, records: Sequence[bytes]) -> int:
        """Write `records` to the active segment in one call; returns how many were
        written whole. A failed or short write (a full disk) is cut back to the last
        whole record, so no torn record is left for the next one to follow; should the
        cut fail too, the torn bytes count as the segment's and readers skip them."""
        if self._fd < 0:
            try:
                self._start_segment()  # the active file was lost: a new one, if possible
            except OSError:
                return 0
        segment = self._segments[-1]
        data = records[0] if len(records) == 1 else b"".join(records)
        self._no_space = False
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            written = 0
            self._no_space = exc.errno in _NO_SPACE
        else:
            self._no_space = written != len(data)  # a short write: the disk filled up
        whole = len(records)
        kept = written
        self._write_failed = written != len(data)
        if self._write_failed:
            whole = kept = 0
            for record in records:
                if kept + len(record) > written:
                    break
                kept += len(record)
                whole += 1
            try:
                os.ftruncate(self._fd, segment.size + kept)
            except OSError:
                with contextlib.suppress(OSError):
                    kept = max(kept, os.fstat(self._fd).st_size - segment.size)
        if kept:
            segment.size += kept
            self._size += kept
            self._floor_budget -= kept
            self._dirty = True
            for reader in self._readers.values():
                reader.wake()
        return whole

    def _flush_buffer(self) -> bool:
        """Write the buffered records; False when some were refused (counted). Their
        numbers are given back, so readers see neither a gap nor a backlog for them."""
        if not self._buffer:
            return True
        # Taken first: a rotation while writing flushes the buffer again.
        records, size = self._buffer, self._buffered_bytes
        self._buffer, self._buffered_bytes = [], 0
        first_seq = self.next_seq - len(records)
        below_floor = self.room_withheld or (bool(self.min_free_bytes) and self._check_floor(size))
        if below_floor and self.refuse_below_floor:
            reason, written = "disk_floor", 0
        else:
            reason, written = "write_error", self._write(records)
        self.next_seq = first_seq + written
        if written:
            self._written(records if written == len(records) else records[:written])
        if written == len(records):
            return True
        self._refuse(reason, len(records) - written)
        return False

    def _check_floor(self, pending: int = 0) -> bool:
        """Whether free space is below `min_free_bytes`. Read at most once a second, and
        sooner only when the bytes written since, or the `pending` ones, could cross."""
        now = self._clock.monotonic()
        if now < self._floor_checked_until and (self.below_floor or self._floor_budget > pending):
            return self.below_floor
        self._floor_checked_until = now + _FLOOR_CHECK_S
        try:
            stat = os.statvfs(self.directory)
        except OSError:
            return self.below_floor  # unknown: as before
        free = stat.f_bavail * stat.f_frsize
        self._floor_budget = free - self.min_free_bytes
        self.below_floor = self._floor_budget < 0
        return self.below_floor

    def _retire_delivered_segment(self) -> None:
        """On a full disk, the active segment may hold all the space there is to free,
        and only an inactive one is deleted: once every reader has all of it, a new
        (empty) segment takes its place so it can go."""
        if not self.consumers or not self._segments or self._segments[-1].size == 0:
            return
        if self.confirmed_low() < self.next_seq:
            return
        try:
            self._start_segment()
        except OSError:
            self.stats.rotation_failures += 1
            return
        self._collect()

    @property
    def reserved(self) -> int:
        """Records the disk refused that wait in memory to be written."""
        return len(self._reserve)

    def reserved_tags(self) -> list[object]:
        """The tags of the records in the reserve, oldest first."""
        return [tag for _record, tag in self._reserve]

    def flush(self) -> None:
        """Write what the buffered stream holds and what the reserve holds, and save
        cursors that could not be saved before (the daemon calls this on its tick)."""
        if self._write_failed or self.below_floor:
            self._retire_delivered_segment()
        if self.buffered:
            self._flush_buffer()
            if self.min_free_bytes:
                self._check_floor()  # refused appends buffer nothing: check here
        elif self._reserve:
            self._write_reserve()
        if self.readers_elsewhere:
            self._collect()
        for reader in self._readers.values():
            if reader.cursor_unsaved:
                reader.save_cursor()

    def sync(self) -> None:
        """Flush, then fsync the active segment if anything was written since the last
        sync (a failure is counted and raised)."""
        self.flush()
        if self._dirty and self._fd >= 0:
            self._dirty = False
            try:
                os.fsync(self._fd)
            except OSError:
                self.stats.sync_failures += 1
                raise

    def reader(self, name: str) -> SpoolReader:
        """The reader of consumer `name`, resuming from its saved cursor."""
        return self._readers[name]

    @property
    def size_bytes(self) -> int:
        return self._size + self._buffered_bytes

    @property
    def segments(self) -> int:
        return len(self._segments)

    def _collect(self) -> None:
        """Delete segments every reader has passed; the active one always stays."""
        if not self.consumers or not self._segments:
            return
        low = self.confirmed_low()
        while len(self._segments) > 1 and self._segments[1].first_seq <= low:
            segment = self._segments[0]
            try:
                segment.path.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                break  # tried again at the next commit
            self._segments.pop(0)
            for reader in self._readers.values():
                reader.forget(segment)
            self._size -= segment.size
        self._update_full()

    def expire_segments(self, before: float) -> int:
        """Delete the closed segments last written before `before` (Unix time), read or
        not: retention says their records may no longer be kept. Readers behind move
        past them; what some reader had not confirmed is counted as dropped with the
        reason "retention". The active segment always stays. Returns records dropped."""
        dropped = 0
        while len(self._segments) > 1:
            segment, following = self._segments[0], self._segments[1]
            try:
                if segment.path.stat().st_mtime >= before:
                    break
                segment.path.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                break  # tried again at the next run
            self._segments.pop(0)
            self._size -= segment.size
            behind = [seq for seq in self.confirmed().values() if seq < following.first_seq]
            if behind:
                dropped += following.first_seq - max(min(behind), segment.first_seq)
            for reader in self._readers.values():
                reader.skip_to(following.first_seq)
                reader.forget(segment)
        if dropped:
            self.stats.dropped["retention"] = self.stats.dropped.get("retention", 0) + dropped
        self._update_full()
        return dropped

    def confirmed(self) -> dict[str, int]:
        """Each consumer's confirmed position: its reader's, or its cursor file's (an
        unreadable or missing one holds everything back, as a new reader would)."""
        if not self.readers_elsewhere:
            return {name: reader.confirmed_seq for name, reader in self._readers.items()}
        oldest = self._segments[0].first_seq if self._segments else self.next_seq
        cursors = self.directory / "cursors"
        found = {
            name: read_cursor_seq(cursors / f"{name}{CURSOR_SUFFIX}") for name in self.consumers
        }
        return {name: oldest if seq is None else seq for name, seq in found.items()}

    def confirmed_low(self) -> int:
        return min(self.confirmed().values(), default=self.next_seq)

    def _update_full(self) -> None:
        if self.full and self.size_bytes < self.max_bytes * RESUME_FRACTION:
            self.full = False
        elif not self.full and self.size_bytes >= self.max_bytes:
            self.full = True

    def __enter__(self) -> Spool:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
