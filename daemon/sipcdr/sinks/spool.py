"""The durable write-ahead spool between the correlator and the sinks.

Every closed CDR and fraud alert is appended here before anything else happens to
it; each sink then reads with its own cursor and moves that cursor only after its
destination confirmed the write. A sink that is down, slow or restarted resumes
from its cursor, so nothing closed is lost and nothing needs to be held in memory
(except, bounded, what a full disk refuses: see below).

On disk, one directory per stream holds segment files named by the sequence number
of their first record (`00000000000000000001.seg`) and one cursor file per sink
(`cursors/<sink>.cursor`). A record is

    magic u16 | kind u8 | key length u16 | value length u32 | seq u64 | crc32 u32
    | key | value

with the CRC over everything before it and after it, so a torn write, a flipped bit
or a record from another stream is recognised. Sequence numbers increase by one per
record across segments, which makes the records lost to corruption countable.

Durability:
- Appends are written to the segment file at once with one `write` call per record,
  so a killed process (SIGKILL, OOM) loses nothing it appended; the signaling stream,
  which is a hundred times the volume, batches its writes (`buffered=True`) and loses
  at most its unwritten buffer.
- `sync()` fsyncs the active segment; the delivery loop calls it every
  `DEFAULT_FSYNC_INTERVAL_S`, which bounds what a power loss can take.
- A cursor file is created, at its full size, when its reader is, and afterwards only
  rewritten in place, so saving a cursor needs no new disk space. It holds two
  checksummed slots 4 KiB apart (separate pages and sectors on any disk), written in
  turn: a torn write spoils one, and the other still holds the previous position.
  Cursors are not fsynced: a cursor that goes back after a power loss re-delivers
  records, which every sink deduplicates; it never skips one.

A full or failing disk:
- A write that fails (ENOSPC, EIO) or is cut short is cut back to the last whole
  record, so nothing torn is left for the next record to hide behind; if the cut
  itself fails, the readers skip the torn bytes. No sequence number is spent on a
  record that was not written, so a failed write leaves neither a gap nor a backlog.
- The CDR stream keeps what it could not write in a bounded in-memory reserve
  (`reserve_records`), each record encoded once, numbered in the order it will be
  written, and writes it, in order, before anything newer. While the reserve holds
  records an append only joins it: the write is tried again on every `flush` (the
  tick, the delivery loop's sync), so a refusing disk costs the capture path no
  system call. `append` says whether a record is on disk (`WRITTEN`) or waits in the
  reserve (`HELD`); `on_reserve_written` is told of each held record once it is on
  disk, which is when the dialog journal may record its call as closed. A record in
  the reserve lives in memory only: the owner keeps it durable elsewhere (the dialog
  checkpoint carries held CDRs) and may take it back at a stop (`take_reserve`). While
  the reserve holds records the daemon refuses new calls as it does for a full spool;
  a record is lost only when the reserve is full.
- A write refused for want of space (ENOSPC, EDQUOT) first asks `on_no_space` to make
  room (the daemon's spare file) and, when it did, is tried once more at once.
- The buffered signaling stream refuses records while the filesystem's free space is
  below `min_free_bytes`, so signaling gives way before CDRs run out of room. The
  free space is read at most once a second, or sooner when what was written since
  could have crossed the floor: never per record. It refuses them as well, with the
  same reason, while its owner keeps the disk's room for CDRs (`room_withheld`: the
  daemon, while the room its spare file gave is for the calls already open), however
  much of that room is free.
- A cursor that cannot be saved keeps its position in memory, so the sink goes on
  and segments it passed are still deleted; the file is written again later.

Recovery: at open, the newest segment (the only one that was being written) is
scanned; a torn or corrupt tail is cut off and counted. Corruption inside a segment
is skipped by each reader, which finds the next valid record and counts the records
missing between the two sequence numbers.

Size: `max_bytes` bounds all segments of a stream. When it is reached, `full_policy`
decides: `drop_newest` refuses new records (counted, and the delivery loop logs it at
ERROR), `block` keeps writing and raises `full`, on which the daemon stops taking in
signaling (every refused packet counted) until the sinks have caught up below
`RESUME_FRACTION` of the limit. Blocking overshoots the limit only by what the calls
already open still close, which the dialog limits bound.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import BinaryIO, Final

import orjson

from sipcdr.clock import SYSTEM_CLOCK, Clock
from sipcdr.private import open_private, open_private_fd, private_dir
from sipcdr.sinks.base import KIND_ALERT, KIND_CDR, KIND_SIP, SpoolRecord

_HEAD = struct.Struct("<HBHIQ")  # magic, kind, key length, value length, seq
_CRC = struct.Struct("<I")
HEADER_BYTES: Final = _HEAD.size + _CRC.size
MAGIC: Final = 0x5350  # "PS" little-endian; an arbitrary start-of-record mark
_MAGIC_BYTES: Final = struct.pack("<H", MAGIC)
_KIND_CODES: Final = {KIND_CDR: 1, KIND_ALERT: 2, KIND_SIP: 3}
_KIND_NAMES: Final = {code: name for name, code in _KIND_CODES.items()}
MAX_VALUE_BYTES: Final = 16 * 1024 * 1024  # far above any record; bounds a corrupt length
SEGMENT_SUFFIX: Final = ".seg"

FULL_POLICIES: Final = ("block", "drop_newest")
# A day of CDRs of a large carrier (~10 M calls at ~1 KB) can wait out a sink outage.
DEFAULT_MAX_BYTES: Final = 10 * 1024**3
# Signaling copies are for troubleshooting: a few hours of backlog, then newest dropped.
DEFAULT_SIGNALING_MAX_BYTES: Final = 4 * 1024**3
# Small enough that a delivered segment is deleted soon, large enough for few files.
DEFAULT_SEGMENT_BYTES: Final = 64 * 1024 * 1024
# A power loss takes at most this much; an fsync costs ~1-5 ms, five times a second.
DEFAULT_FSYNC_INTERVAL_S: Final = 0.2
# CDRs are money: stop intake rather than lose closed calls.
DEFAULT_FULL_POLICY: Final = "block"
# Resume intake only with room for a burst, so it does not flap at the limit.
RESUME_FRACTION: Final = 0.9
# The signaling stream writes when this much is buffered (and on every flush); the
# reserve is written back in batches of this size too.
_WRITE_BUFFER_BYTES: Final = 256 * 1024
# Closed CDRs the disk refuses wait in memory, up to this many: every call a large
# carrier has open when its disk fills (~120 calls/s x 3 min) twice over, ~120 MB (the
# encoded record and the CDR itself, which the dialog checkpoints carry, ~2.3 KB each).
DEFAULT_CDR_RESERVE_RECORDS: Final = 50_000
# Signaling stops below this much free space, so CDRs keep room on a shared disk:
# about two hours of a large carrier's CDRs (~400 MB an hour).
DEFAULT_SIGNALING_MIN_FREE_BYTES: Final = 1024**3
# Free space is read at most this often, unless what was written since could have
# crossed the floor.
_FLOOR_CHECK_S: Final = 1.0
CURSOR_SUFFIX: Final = ".cursor"
_CURSOR = struct.Struct("<4sQQI")  # magic, generation, seq, crc32 of the rest
_CURSOR_MAGIC: Final = b"SPCU"
# One slot per page (and so per sector, whatever the disk's sector size): a write torn
# by a power loss spoils one slot only.
_CURSOR_SLOT_BYTES: Final = 4096
_CURSOR_FILE_BYTES: Final = 2 * _CURSOR_SLOT_BYTES
# Where earlier versions put the second slot (1 KiB files); read, then rewritten.
_LEGACY_CURSOR_SLOT_BYTES: Final = 512
# A generation this high cannot have been counted to: a crafted or damaged file, whose
# position is kept but whose slots are written anew from generation 1.
_CURSOR_GENERATION_LIMIT: Final = 1 << 63
_NO_SPACE: Final = frozenset((errno.ENOSPC, errno.EDQUOT))


class Appended(IntEnum):
    """What `append` did with a record. REFUSED is false, the others true."""

    REFUSED = 0  # not kept (counted in `SpoolStats.dropped` with its reason)
    WRITTEN = 1  # in the segment file (the buffered stream: taken into its buffer)
    HELD = 2  # in the reserve, in memory, until the disk takes it


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
    corrupt_records: int = 0  # missing between valid records, summed over readers
    rotation_failures: int = 0  # a new segment could not be opened; the old one grows
    # fsyncs that failed: what was written since the last good one may not be on disk
    # (an I/O error; the filesystem often turns read-only next).
    sync_failures: int = 0


@dataclass(slots=True)
class _Segment:
    first_seq: int
    path: Path
    size: int


class Spool:
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
        self._segments: list[_Segment] = []
        self._fd = -1
        self._lock: BinaryIO | None = None
        self._buffer: list[bytes] = []
        self._buffered_bytes = 0
        self._dirty = False
        self._size = 0
        self._readers: dict[str, SpoolReader] = {}
        self._opened = False

    # -- lifecycle -------------------------------------------------------------------

    def open(self) -> None:
        if self._opened:
            return
        try:
            private_dir(self.directory)
            private_dir(self.directory / "cursors")
            self._take_lock()
        except OSError as exc:
            raise SpoolError(f"spool {self.directory}: {exc.strerror or exc}") from exc
        segments = sorted(
            (
                _Segment(int(path.stem), path, path.stat().st_size)
                for path in self.directory.glob(f"*{SEGMENT_SUFFIX}")
                if path.stem.isdigit()
            ),
            key=lambda segment: segment.first_seq,
        )
        self._segments = segments
        if segments:
            self.next_seq = self._recover_tail(segments[-1])
        self._size = sum(segment.size for segment in self._segments)
        self._start_segment()
        self._opened = True
        for name in self.consumers:
            self._readers[name] = SpoolReader(self, name)
        self._update_full()

    def _take_lock(self) -> None:
        import fcntl  # noqa: PLC0415 - POSIX only, like the daemon

        handle = open_private(self.directory / "lock", "wb")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise OSError(0, "in use by another sipcdr process") from None
        self._lock = handle

    def _recover_tail(self, segment: _Segment) -> int:
        """Cut a torn tail off the newest segment; return the next sequence number.
        Damage followed by valid records is left for the readers, which skip and
        count it: only what follows the last valid record is cut."""
        data = segment.path.read_bytes()
        last_seq = segment.first_seq - 1
        end = 0
        offset = 0
        while offset < len(data):
            for seq, _kind, _key, _value, record_end in _scan(data, offset):
                last_seq = seq
                end = offset = record_end
            following = _next_valid(data, offset + 1)
            if following < 0:
                break
            offset = following
        if end < len(data):
            self.stats.torn_tails += 1
            self.stats.torn_tail_bytes += len(data) - end
            fd = open_private_fd(segment.path, os.O_WRONLY)
            try:
                os.ftruncate(fd, end)
                os.fsync(fd)
            finally:
                os.close(fd)
            segment.size = end
        return last_seq + 1

    def _start_segment(self) -> None:
        """Appends always go to a fresh segment after open or when one is full, so a
        segment is never appended to after a crash may have torn it. The new file is
        opened before the old one is let go: if it cannot be (no space, no file
        handles), appends go on into the old segment and rotation is tried again."""
        reuse = bool(self._segments) and self._segments[-1].size == 0
        if reuse and self._fd >= 0:
            return
        if reuse:
            segment = self._segments[-1]  # an empty newest segment is reused
        else:
            segment = _Segment(
                self.next_seq, self.directory / f"{self.next_seq:020d}{SEGMENT_SUFFIX}", 0
            )
        fd = open_private_fd(segment.path, os.O_WRONLY | os.O_APPEND)
        try:
            self._close_active()  # an fsync error here must not lose the new segment
        finally:
            self._fd = fd
            if not reuse:
                self._segments.append(segment)
        with contextlib.suppress(OSError):
            _fsync_directory(self.directory)

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
        self._close_active()
        for reader in self._readers.values():
            if reader.cursor_unsaved:
                reader.save_cursor()
            reader.close()
        self._readers.clear()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        self._opened = False

    # -- writing -----------------------------------------------------------------------

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
            record = _encode(kind, key, value, seq)
            self._buffer.append(record)
            self._buffered_bytes += len(record)
            if self._buffered_bytes >= _WRITE_BUFFER_BYTES and not self._flush_buffer():
                return Appended.REFUSED
            return Appended.WRITTEN
        reserve = self._reserve
        # Oldest first: while the reserve holds records, a new one joins them and the
        # write is retried by `flush`, not here, so a refusing disk costs no system call.
        record = _encode(kind, key, value, self.next_seq + len(reserve))
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
        Its records were numbered when held: nothing else is written meanwhile, so the
        first of them is always `next_seq`."""
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
        cut fail too, the torn bytes count as part of the segment and readers skip
        them."""
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
        """Whether free space is below `min_free_bytes`. Read at most once a second,
        and sooner only when the bytes written since, or the `pending` ones, could
        cross the floor."""
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
        and it is deleted only once it is no longer active: when every reader has all
        of it, a new (empty) segment takes its place so it can go."""
        if not self._readers or not self._segments or self._segments[-1].size == 0:
            return
        if min(reader.confirmed_seq for reader in self._readers.values()) < self.next_seq:
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
        for reader in self._readers.values():
            if reader.cursor_unsaved:
                reader.save_cursor()

    def sync(self) -> None:
        """Flush, then fsync the active segment if anything was written since the last
        sync. A failed fsync is counted and raised."""
        self.flush()
        if self._dirty and self._fd >= 0:
            self._dirty = False
            try:
                os.fsync(self._fd)
            except OSError:
                self.stats.sync_failures += 1
                raise

    # -- reading -----------------------------------------------------------------------

    def reader(self, name: str) -> SpoolReader:
        """The reader of consumer `name`, resuming from its saved cursor."""
        return self._readers[name]

    @property
    def size_bytes(self) -> int:
        return self._size + self._buffered_bytes

    @property
    def segments(self) -> int:
        return len(self._segments)

    def _segment_after(self, first_seq: int) -> _Segment | None:
        for segment in self._segments:
            if segment.first_seq > first_seq:
                return segment
        return None

    def _segment_for(self, seq: int) -> _Segment:
        """The segment holding `seq`, or the oldest one when it is older than all."""
        found = self._segments[0]
        for segment in self._segments:
            if segment.first_seq <= seq:
                found = segment
            else:
                break
        return found

    def _collect(self) -> None:
        """Delete segments every reader has passed; the active one always stays."""
        if not self._readers:
            return
        low = min(reader.confirmed_seq for reader in self._readers.values())
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
            behind = [r for r in self._readers.values() if r.confirmed_seq < following.first_seq]
            if behind:
                lowest = min(reader.confirmed_seq for reader in behind)
                dropped += following.first_seq - max(lowest, segment.first_seq)
            for reader in self._readers.values():
                reader.skip_to(following.first_seq)
                reader.forget(segment)
        if dropped:
            self.stats.dropped["retention"] = self.stats.dropped.get("retention", 0) + dropped
        self._update_full()
        return dropped

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


class SpoolReader:
    """One sink's position in a stream: `read` a batch, then `commit` it once the sink
    confirmed it, or `rewind` to read it again after a failure."""

    def __init__(self, spool: Spool, name: str) -> None:
        self.spool = spool
        self.name = name
        cursors = spool.directory / "cursors"
        self.cursor_path = cursors / f"{name}{CURSOR_SUFFIX}"
        self._legacy_cursor_path = cursors / f"{name}.json"  # the older form, taken over
        self.corrupt_records = 0
        self.cursor_reset = False  # the saved cursor was unreadable or pointed nowhere
        self.cursor_write_failures = 0  # saves that failed; the position stayed in memory
        self._cursor_fd = -1
        self._cursor_generation = 0  # of the newest slot in the file
        self._cursor_slot = 0  # the slot the next save writes: never the newest one
        self._saved_seq = -1  # what the file holds; -1 when it holds nothing valid
        self.confirmed_seq = self._load_cursor()  # next record to deliver
        # Created now, while there is room: later saves only rewrite it in place.
        self._open_cursor()
        # Gaps below this sequence number are counted already (or were delivered).
        self._gap_counted_to = self.confirmed_seq
        self._read_seq = self.confirmed_seq
        self._segment: _Segment | None = None
        self._handle: BinaryIO | None = None
        self._offset = 0
        self.on_append: list[Callable[[], None]] = []  # the delivery loop's wake-up
        self._position_at(self.confirmed_seq)

    def _load_cursor(self) -> int:
        oldest = self.spool._segments[0].first_seq if self.spool._segments else 1
        try:
            newest = _newest_cursor_slot(self.cursor_path.read_bytes())
        except FileNotFoundError:
            return self._load_legacy_cursor(oldest)
        except OSError:
            newest = None
        if newest is None:
            self.cursor_reset = True
            return oldest
        slot, generation, seq, current = newest
        if current and generation < _CURSOR_GENERATION_LIMIT:
            self._cursor_generation = generation
            self._cursor_slot = 1 - slot
            self._saved_seq = seq
        # Otherwise (the older 1 KiB layout, or a generation that cannot be counted on)
        # the position is kept and the whole file written anew when it is opened.
        if seq < oldest or seq > self.spool.next_seq:
            self.cursor_reset = True
            return oldest
        return seq

    def _load_legacy_cursor(self, oldest: int) -> int:
        """The JSON cursor file of earlier versions (`{"seq": N}`, replaced by rename)."""
        try:
            seq = int(orjson.loads(self._legacy_cursor_path.read_bytes())["seq"])
        except FileNotFoundError:
            # A sink seen for the first time starts with what the spool still holds.
            return oldest
        except (OSError, ValueError, KeyError, TypeError):
            self.cursor_reset = True
            return oldest
        if seq < oldest or seq > self.spool.next_seq:
            self.cursor_reset = True
            return oldest
        return seq

    def _open_cursor(self) -> bool:
        """Open the cursor file; one missing or without a valid slot is written whole
        (both slots) first. False when that fails: the next save tries again."""
        if self._cursor_fd >= 0:
            return True
        existed = self.cursor_path.exists()
        try:
            fd = open_private_fd(self.cursor_path, os.O_RDWR)
        except OSError:
            return False
        if self._saved_seq < 0:
            slot = _encode_cursor_slot(self._cursor_generation + 1, self.confirmed_seq)
            image = slot.ljust(_CURSOR_SLOT_BYTES, b"\0") * 2
            try:
                if os.pwrite(fd, image, 0) != len(image):
                    raise OSError(errno.ENOSPC, "short write")
                os.fsync(fd)  # blocks allocated now, not when the disk is full
            except OSError:
                os.close(fd)
                if not existed:
                    # An empty file would hide the older JSON cursor from the next start.
                    with contextlib.suppress(OSError):
                        self.cursor_path.unlink()
                return False
            self._cursor_generation += 1
            self._cursor_slot = 0
            self._saved_seq = self.confirmed_seq
            with contextlib.suppress(OSError):
                self._legacy_cursor_path.unlink(missing_ok=True)
        self._cursor_fd = fd
        return True

    @property
    def cursor_unsaved(self) -> bool:
        return self._saved_seq != self.confirmed_seq

    def save_cursor(self) -> bool:
        """Write the confirmed position into the cursor file's older slot, in place;
        False (counted) when it cannot be, the position then lives on in memory."""
        seq = self.confirmed_seq
        if not self._open_cursor():
            self.cursor_write_failures += 1
            return False
        if seq == self._saved_seq:
            return True  # the file was just written whole with it
        generation = self._cursor_generation + 1
        slot = _encode_cursor_slot(generation, seq)
        try:
            offset = self._cursor_slot * _CURSOR_SLOT_BYTES
            if os.pwrite(self._cursor_fd, slot, offset) != len(slot):
                raise OSError(errno.ENOSPC, "short write")
        except OSError:
            # The slot may be torn; the other one holds the previous position, and the
            # next save writes this slot again.
            self.cursor_write_failures += 1
            return False
        self._cursor_generation = generation
        self._cursor_slot ^= 1
        self._saved_seq = seq
        return True

    def _position_at(self, seq: int) -> None:
        """Open the segment holding `seq` and stop just before the first record at or
        after it. If the file cannot be opened (no file handles), the reader still
        points at `seq` and the next `read` tries again: a failed repositioning must
        never move the reader past a record that was not confirmed."""
        self._close_handle()
        self._segment = None
        self._read_seq = seq
        spool = self.spool
        if not spool._segments:
            return
        segment = spool._segment_for(seq)
        handle = segment.path.open("rb")
        self._segment, self._handle, self._offset = segment, handle, 0
        end = segment.size
        while (found := self._next_record(end)) is not None and found[0] < seq:
            self._offset += found[4]
        # Records before `seq` were delivered; damage among them is not counted again.
        self._gap_counted_to = max(self._gap_counted_to, seq)

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def wake(self) -> None:
        for callback in self.on_append:
            callback()

    def forget(self, segment: _Segment) -> None:
        if self._segment is segment:
            # Reached when every reader is past it, this one included, or when
            # retention expired it (`skip_to` moved this reader past it first).
            self._close_handle()
            self._segment = None

    def skip_to(self, seq: int) -> None:
        """Records before `seq` are gone (expired by retention): not to be delivered,
        nor counted as corrupt. A batch read from them and committed later still
        counts as delivered."""
        if self.confirmed_seq < seq:
            self.confirmed_seq = seq
            self.save_cursor()
        self._gap_counted_to = max(self._gap_counted_to, seq)
        if self._read_seq < seq:
            self._read_seq = seq
            self._close_handle()
            self._segment = None

    @property
    def lag_records(self) -> int:
        return self.spool.next_seq - self.confirmed_seq

    def read(self, max_records: int, max_bytes: int) -> list[SpoolRecord]:
        """Up to `max_records` records (at least one, whatever its size) from the read
        position on; [] when the sink has everything."""
        records: list[SpoolRecord] = []
        size = 0
        while len(records) < max_records and size < max_bytes:
            if self._segment is None or self._handle is None:
                self._position_at(self._read_seq)
                if self._segment is None:
                    return records
            segment = self._segment
            want = max_records - len(records)
            got = self._read_in_segment(want, max_bytes - size)
            if got:
                records.extend(got)
                size += sum(len(record.value) for record in got)
                continue
            following = self.spool._segment_after(segment.first_seq)
            if following is None:
                break
            self._open_segment(following)
        return records

    def _open_segment(self, segment: _Segment) -> None:
        self._close_handle()
        self._segment = segment
        self._handle = segment.path.open("rb")
        self._offset = 0
        if segment.first_seq > self._read_seq:
            # Records lost between the segments (a segment cut short by corruption).
            self._count_gap(self._read_seq, segment.first_seq)
            self._read_seq = segment.first_seq

    def _read_in_segment(self, limit: int, max_bytes: int) -> list[SpoolRecord]:
        assert self._segment is not None
        records: list[SpoolRecord] = []
        size = 0
        # Only what the writer has completed: the segment's size, not the file's.
        end = self._segment.size
        while len(records) < limit and (found := self._next_record(end)) is not None:
            seq, kind_code, key, value, total = found
            self._offset += total
            if seq < self._read_seq:
                continue  # already passed (a resync may land before the read position)
            if seq > self._read_seq:
                self._count_gap(self._read_seq, seq)
            self._read_seq = seq + 1
            records.append(SpoolRecord(seq, _KIND_NAMES[kind_code], key, value))
            size += len(value)
            if size >= max_bytes:
                break
        return records

    def _next_record(self, end: int) -> tuple[int, int, bytes, bytes, int] | None:
        """The valid record at the read offset, skipping damage before it, without
        moving past it: (seq, kind code, key, value, total length), or None at `end`."""
        handle = self._handle
        assert handle is not None
        while self._offset + HEADER_BYTES <= end:
            handle.seek(self._offset)
            header = handle.read(HEADER_BYTES)
            decoded = _decode_header(header)
            if decoded is None:
                self._resync(end)
                continue
            kind_code, key_len, value_len, seq = decoded
            total = HEADER_BYTES + key_len + value_len
            if self._offset + total > end:
                self._resync(end)
                continue
            body = handle.read(key_len + value_len)
            crc = zlib.crc32(body[key_len:], zlib.crc32(body[:key_len], zlib.crc32(header[:-4])))
            if crc != _CRC.unpack_from(header, _HEAD.size)[0]:
                self._resync(end)
                continue
            return seq, kind_code, body[:key_len], body[key_len:], total
        return None

    def _resync(self, end: int) -> None:
        """Skip a damaged record: on to the next offset where a valid one starts, or to
        the end of what is written."""
        assert self._segment is not None and self._handle is not None
        self._handle.seek(self._offset)
        rest = self._handle.read(end - self._offset)
        following = _next_valid(rest, 1)
        # Nothing valid follows in this segment: the next segment's first sequence
        # number tells how many records were lost.
        self._offset = end if following < 0 else self._offset + following

    def _count_gap(self, expected: int, found: int) -> None:
        """Records `expected` .. `found - 1` are missing. A rewind or a restart reads
        the same gap again; only what was not counted before is counted."""
        start = max(expected, self._gap_counted_to)
        if found > start:
            self.corrupt_records += found - start
            self.spool.stats.corrupt_records += found - start
            self._gap_counted_to = found

    def rewind(self) -> None:
        """Read again from the last confirmed record (the sink failed the batch)."""
        self._position_at(self.confirmed_seq)

    def commit(self) -> None:
        """The sink confirmed everything read so far: move the cursor, save it and
        delete the segments every reader has passed. A cursor that cannot be saved
        (counted) keeps its position in memory: the sink goes on from there rather than
        deliver the batch again and again, and only a crash before a later save
        delivers it again, which every sink deduplicates."""
        if self._read_seq == self.confirmed_seq:
            return
        self.confirmed_seq = self._read_seq
        self.save_cursor()
        self.spool._collect()

    def close(self) -> None:
        self._close_handle()
        if self._cursor_fd >= 0:
            fd, self._cursor_fd = self._cursor_fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)


def _encode(kind: str, key: bytes, value: bytes, seq: int) -> bytes:
    head = _HEAD.pack(MAGIC, _KIND_CODES[kind], len(key), len(value), seq)
    crc = zlib.crc32(value, zlib.crc32(key, zlib.crc32(head)))
    return b"".join((head, _CRC.pack(crc), key, value))


def _encode_cursor_slot(generation: int, seq: int) -> bytes:
    body = _CURSOR.pack(_CURSOR_MAGIC, generation, seq, 0)[:-4]
    return body + _CRC.pack(zlib.crc32(body))


def _newest_cursor_slot(data: bytes) -> tuple[int, int, int, bool] | None:
    """(slot, generation, seq, current) of the newest valid slot of a cursor file, or
    None; `current` is False when the file is not of the current layout (the 1 KiB one
    of earlier versions, or one cut short), which is then to be written anew. Slots are
    read at the old offset too: the newest generation wins wherever it is."""
    newest: tuple[int, int, int, bool] | None = None
    for slot, offset in ((0, 0), (1, _LEGACY_CURSOR_SLOT_BYTES), (1, _CURSOR_SLOT_BYTES)):
        raw = data[offset : offset + _CURSOR.size]
        if len(raw) < _CURSOR.size:
            continue
        magic, generation, seq, crc = _CURSOR.unpack(raw)
        if magic != _CURSOR_MAGIC or crc != zlib.crc32(raw[:-4]):
            continue
        if newest is None or generation > newest[1]:
            current = len(data) == _CURSOR_FILE_BYTES and offset != _LEGACY_CURSOR_SLOT_BYTES
            newest = (slot, generation, seq, current)
    return newest


def _decode_header(header: bytes) -> tuple[int, int, int, int] | None:
    if len(header) < HEADER_BYTES:
        return None
    magic, kind_code, key_len, value_len, seq = _HEAD.unpack_from(header)
    if magic != MAGIC or kind_code not in _KIND_NAMES or value_len > MAX_VALUE_BYTES:
        return None
    return kind_code, key_len, value_len, seq


def _scan(
    data: bytes, offset: int, *, first_only: bool = False
) -> Iterator[tuple[int, str, bytes, bytes, int]]:
    """Valid records of `data` from `offset`, stopping at the first invalid one:
    (seq, kind, key, value, end offset)."""
    view = memoryview(data)
    while offset + HEADER_BYTES <= len(data):
        decoded = _decode_header(data[offset : offset + HEADER_BYTES])
        if decoded is None:
            return
        kind_code, key_len, value_len, seq = decoded
        body_start = offset + HEADER_BYTES
        end = body_start + key_len + value_len
        if end > len(data):
            return
        crc = zlib.crc32(view[body_start:end], zlib.crc32(view[offset : offset + _HEAD.size]))
        if crc != _CRC.unpack_from(data, offset + _HEAD.size)[0]:
            return
        yield (
            seq,
            _KIND_NAMES[kind_code],
            data[body_start : body_start + key_len],
            data[body_start + key_len : end],
            end,
        )
        if first_only:
            return
        offset = end


def _next_valid(data: bytes, offset: int) -> int:
    """Offset of the next valid record at or after `offset`, or -1."""
    position = data.find(_MAGIC_BYTES, offset)
    while position >= 0:
        for _record in _scan(data, position, first_only=True):
            return position
        position = data.find(_MAGIC_BYTES, position + 1)
    return -1


def _fsync_directory(directory: Path) -> None:
    """A new segment's name must survive a power loss as well as its contents."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
