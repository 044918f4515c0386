"""The spool's reading side: one sink's cursor in a stream, its batches, the
corruption it skips (`sipcdr.spool` describes the whole)."""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO, Final

import orjson

from sipcdr.private import open_private_fd
from sipcdr.spool.records import (
    _CRC,
    _CURSOR_GENERATION_LIMIT,
    _CURSOR_SLOT_BYTES,
    _HEAD,
    _KIND_NAMES,
    CURSOR_SUFFIX,
    HEADER_BYTES,
    MAGIC,
    MAX_VALUE_BYTES,
    SpoolRecord,
    _decode_header,
    _encode_cursor_slot,
    _newest_cursor_slot,
    _next_valid,
)

# What one read takes of a segment: a batch of signaling (1,000 messages) and more.
_WINDOW_BYTES: Final = 1 << 20
_unpack_head: Final = _HEAD.unpack_from
_unpack_crc: Final = _CRC.unpack_from
crc32: Final = zlib.crc32
# A record's header and its CRC in one unpack; the CRC covers the header before it.
_unpack_record_head: Final = struct.Struct(_HEAD.format + _CRC.format.lstrip("<")).unpack_from
_CRC_AT: Final = _HEAD.size

if TYPE_CHECKING:
    from sipcdr.spool.segments import _Segment
    from sipcdr.spool.tail import SpoolTail
    from sipcdr.spool.writer import Spool


class SpoolReader:
    """One sink's position in a stream: `read` a batch, then `commit` it once the sink
    confirmed it, or `rewind` to read it again after a failure."""

    def __init__(self, spool: Spool | SpoolTail, name: str) -> None:
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
        try:
            handle = segment.path.open("rb")
        except FileNotFoundError:
            if not spool.tailing:
                raise
            spool.refresh()  # deleted by the writer since it was listed: read the rest
            segment = spool._segment_for(max(seq, self._read_seq))
            handle = segment.path.open("rb")
        self._segment, self._handle, self._offset = segment, handle, 0
        end = self._end()
        while True:
            if self._skip_window(end, seq):
                continue
            found = self._next_record(end)
            if found is None or found[0] >= seq:
                break
            self._offset += found[4]
        # Records before `seq` were delivered; damage among them is not counted again.
        self._gap_counted_to = max(self._gap_counted_to, seq)

    def _skip_window(self, end: int, seq: int) -> bool:
        """Move the offset past the whole, valid records before `seq` in one read of
        up to `_WINDOW_BYTES` (a start or a rewind in a large segment passes many);
        True when it moved. Where it stops (a record at or after `seq`, the window's
        end, anything but a whole valid record) `_next_record` judges, as after
        `_read_window`."""
        assert self._handle is not None and self._segment is not None
        start = self._offset
        if end - start < HEADER_BYTES:
            return False
        window = os.pread(self._handle.fileno(), min(end - start, _WINDOW_BYTES), start)
        view = memoryview(window)
        length = len(window)
        seed = self._segment.seed
        at = 0
        while at + HEADER_BYTES <= length:
            magic, kind_code, key_len, value_len, found = _unpack_head(window, at)
            if found >= seq:
                break
            if magic != MAGIC or kind_code not in _KIND_NAMES or value_len > MAX_VALUE_BYTES:
                break
            stop = at + HEADER_BYTES + key_len + value_len
            if stop > length:
                break
            crc = crc32(view[at + HEADER_BYTES : stop], crc32(view[at : at + _HEAD.size], seed))
            if crc != _unpack_crc(window, at + _HEAD.size)[0]:
                break
            at = stop
        self._offset = start + at
        return at > 0

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
        # A tail's `next_seq` is what it was last told: it may trail what was read.
        return max(self.spool.next_seq - self.confirmed_seq, 0)

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
            got, taken = self._read_in_segment(want, max_bytes - size)
            if got:
                records.extend(got)
                size += taken
                continue
            following = self.spool._segment_after(segment.first_seq)
            if self._segment is not segment or self._handle is None:
                continue  # listing again moved this reader (its segment was deleted)
            if following is None:
                break
            if self.spool.tailing:
                got, taken = self._read_in_segment(want, max_bytes - size)
                if got:
                    # Written to this segment before the writer moved on to the next one.
                    records.extend(got)
                    size += taken
                    continue
            try:
                self._open_segment(following)
            except FileNotFoundError:
                if not self.spool.tailing:
                    raise
                # Deleted by retention since it was listed: on from what is left.
                self.spool.refresh()
                self._close_handle()
                self._segment = None
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

    def _read_in_segment(self, limit: int, max_bytes: int) -> tuple[list[SpoolRecord], int]:
        """Records from the read offset, and the bytes of their values: whole valid
        ones from a window read at once (`_read_window`), and one at a time, with the
        checks for damage and for a record being written, wherever the window has none
        left to give."""
        assert self._segment is not None
        records: list[SpoolRecord] = []
        size = 0
        end = self._end()
        while len(records) < limit and size < max_bytes:
            taken, more = self._read_window(end, limit, max_bytes - size, records)
            size += taken
            if more:
                continue  # the window ended on a whole record: the next one goes on
            if len(records) >= limit or size >= max_bytes:
                break
            found = self._next_record(end)
            if found is None:
                break
            seq, kind_code, key, value, total = found
            self._offset += total
            if seq < self._read_seq:
                continue  # already passed (a resync may land before the read position)
            if seq > self._read_seq:
                self._count_gap(self._read_seq, seq)
            self._read_seq = seq + 1
            records.append(SpoolRecord(seq, _KIND_NAMES[kind_code], key, value))
            size += len(value)
        return records, size

    def _read_window(
        self, end: int, limit: int, max_bytes: int, records: list[SpoolRecord]
    ) -> tuple[int, bool]:
        """Append to `records` the whole, valid records that follow the read offset in
        one read of up to `_WINDOW_BYTES` (a seek and two reads per record cost more
        than the rest of reading it), until `limit` records or `max_bytes` of values.
        Returns the bytes of values taken and whether it stopped only at the window's
        end, with more of the segment to read. Stops, leaving the offset there, at
        anything but a whole valid record: `_next_record` judges it.

        Every record of the signaling stream passes here once per sink, so each costs
        one unpack of header and CRC together, one look-up of its kind (which checks
        it too) and the CRC over the window without copies; the record is made as a
        tuple."""
        assert self._handle is not None and self._segment is not None
        start = self._offset
        if end - start < HEADER_BYTES:
            return 0, False
        seed = self._segment.seed
        window = os.pread(self._handle.fileno(), min(end - start, _WINDOW_BYTES), start)
        view = memoryview(window)
        length = len(window)
        last = length - HEADER_BYTES  # the last offset where a whole header fits
        at = 0
        size = 0
        taken = len(records)
        read_seq = self._read_seq
        unpack = _unpack_record_head
        kinds = _KIND_NAMES
        # The record made from its fields by tuple's own constructor: the generated
        # `__new__` (and `_make`) cost a Python call frame per record.
        new = tuple.__new__
        append = records.append
        while at <= last:
            magic, kind_code, key_len, value_len, seq, stored_crc = unpack(window, at)
            kind = kinds.get(kind_code)
            if magic != MAGIC or kind is None or value_len > MAX_VALUE_BYTES:
                break
            body = at + HEADER_BYTES
            split = body + key_len
            stop = split + value_len
            if stop > length:
                break
            if crc32(view[body:stop], crc32(view[at : at + _CRC_AT], seed)) != stored_crc:
                break
            at = stop
            if seq < read_seq:
                continue  # already passed (a resync may land before the read position)
            if seq > read_seq:
                self._count_gap(read_seq, seq)
            read_seq = seq + 1
            append(new(SpoolRecord, (seq, kind, window[body:split], window[split:stop])))
            size += value_len
            taken += 1
            if taken >= limit or size >= max_bytes:
                break
        self._offset = start + at
        self._read_seq = read_seq
        more = at > 0 and at > last and start + at < end
        return size, more and taken < limit and size < max_bytes

    def _end(self) -> int:
        """Only what the writer has completed: the segment's size, not the file's; a
        writer in another process completes records in whole writes, so there the
        file's size (a record cut short at the end is waited for, `_next_record`)."""
        assert self._segment is not None and self._handle is not None
        if self.spool.tailing:
            return os.fstat(self._handle.fileno()).st_size
        return self._segment.size

    def _next_record(self, end: int) -> tuple[int, int, bytes, bytes, int] | None:
        """The valid record at the read offset, skipping damage before it, without
        moving past it: (seq, kind code, key, value, total length), or None at `end`."""
        assert self._handle is not None and self._segment is not None
        seed = self._segment.seed
        # pread, not the handle's buffered reads: a buffer keeps the bytes it saw, and a
        # torn write the writer cut back is written again over them (`Spool._write`).
        fd = self._handle.fileno()
        while self._offset + HEADER_BYTES <= end:
            header = os.pread(fd, HEADER_BYTES, self._offset)
            if len(header) < HEADER_BYTES and self._cut_back():
                return None
            decoded = _decode_header(header)
            if decoded is None:
                self._resync(end)
                continue
            kind_code, key_len, value_len, seq = decoded
            total = HEADER_BYTES + key_len + value_len
            if self._offset + total > end:
                if self._cut_back():
                    return None  # being written by another process: read it next time
                self._resync(end)
                continue
            body = os.pread(fd, key_len + value_len, self._offset + HEADER_BYTES)
            if len(body) < key_len + value_len and self._cut_back():
                return None
            head_crc = zlib.crc32(header[:-4], seed)
            crc = zlib.crc32(body[key_len:], zlib.crc32(body[:key_len], head_crc))
            if crc != _CRC.unpack_from(header, _HEAD.size)[0]:
                self._resync(end)
                continue
            return seq, kind_code, body[:key_len], body[key_len:], total
        return None

    def _resync(self, end: int) -> None:
        """Skip a damaged record: on to the next offset where a valid one starts, or to
        the end of what is written."""
        assert self._segment is not None and self._handle is not None
        rest = os.pread(self._handle.fileno(), end - self._offset, self._offset)
        following = _next_valid(rest, 1, self._segment.seed)
        # Nothing valid follows in this segment: the next segment's first sequence
        # number tells how many records were lost.
        if following >= 0:
            self._offset += following
        elif len(rest) < end - self._offset and self._cut_back():
            self._offset += len(rest)  # the file was cut back since: read on from there
        else:
            self._offset = end

    def _cut_back(self) -> bool:
        """Whether a read that found less than `end` promised may be the writer's cut
        back of a torn write (its records are written there again): in the segment it
        writes, the read is tried again, never passed over."""
        return self._segment is not None and self.spool.growing(self._segment)

    def _count_gap(self, expected: int, found: int) -> None:
        """Records `expected` .. `found - 1` are missing. A rewind or a restart reads
        the same gap again; only what was not counted before is counted."""
        start = max(expected, self._gap_counted_to)
        if found > start:
            self.corrupt_records += found - start
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
