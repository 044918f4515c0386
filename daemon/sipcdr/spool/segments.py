"""A stream's segment files, as the writer keeps them (`Spool`) and as a reader in
another process finds them (`SpoolTail`)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Final

from mypy_extensions import mypyc_attr

from sipcdr.private import open_private_fd
from sipcdr.spool.records import (
    SEGMENT_SUFFIX,
    _next_valid,
    _scan,
    parse_segment_name,
)

# Earlier versions spent the numbers of a buffered batch the disk refused, so genuine
# records may follow a gap that no bytes stand for; never of this many (a hundred
# thousand refused records a second for four months).
_MOST_NUMBERS_SKIPPED: Final = 1 << 40


@dataclass(slots=True)
class _Segment:
    first_seq: int
    path: Path
    size: int  # the writer's: what it completed; a tail's: what it last saw
    seed: int  # its records' CRC start value, from its name (`records.segment_name`)


def list_segments(directory: Path) -> list[_Segment]:
    """The segment files in `directory`, oldest first."""
    found: list[_Segment] = []
    for path in directory.glob(f"*{SEGMENT_SUFFIX}"):
        named = parse_segment_name(path.name)
        if named is None:
            continue
        try:
            status = path.stat()
        except OSError:
            continue  # deleted meanwhile, or a link that leads nowhere
        if not stat.S_ISREG(status.st_mode):
            continue
        size = status.st_size
        found.append(_Segment(named[0], path, size, named[1]))
    return sorted(found, key=lambda segment: segment.first_seq)


def whole_records_end(data: bytes, segment: _Segment) -> tuple[int, int]:
    """The sequence number after the last valid record of a segment's bytes (its first
    number when it has none), and the offset where that record ends. A record is taken
    only numbered above the one before it and at most `_MOST_NUMBERS_SKIPPED` past it:
    else one forged in a captured value, in a segment of an earlier version (seed 0),
    would set the next number, near 2**64 every append failing, or below numbers
    handed out, the next records then read as already delivered. Genuine numbers
    only rise within a segment; a record written again after a failed cut-back has
    the number of the torn one, which was never valid."""
    last_seq = segment.first_seq - 1
    end = 0
    offset = 0
    while offset < len(data):
        for seq, _kind, _key, _value, record_end in _scan(data, offset, segment.seed):
            if not last_seq < seq <= last_seq + _MOST_NUMBERS_SKIPPED:
                break
            last_seq = seq
            end = offset = record_end
        following = _next_valid(data, offset + 1, segment.seed)
        if following < 0:
            break
        offset = following
    return last_seq + 1, end


def cut_torn_tail(segment: _Segment) -> tuple[int, int]:
    """Cut a torn tail off `segment`, the newest, as the writer opens it: the next
    sequence number, and the bytes cut. Only what follows the last valid record is
    cut: readers skip and count damage before it."""
    data = segment.path.read_bytes()
    next_seq, end = whole_records_end(data, segment)
    if end < len(data):
        fd = open_private_fd(segment.path, os.O_WRONLY)
        try:
            os.ftruncate(fd, end)
            os.fsync(fd)
        finally:
            os.close(fd)
        segment.size = end
    return next_seq, len(data) - end


@mypyc_attr(allow_interpreted_subclasses=True)
class Segments:
    """What a `SpoolReader` asks of the stream it reads."""

    _segments: list[_Segment]
    # Written by another process (`SpoolTail`): a segment's end is its file's size. A
    # class attribute, not a slot, so that compiled and interpreted code read one value.
    tailing: ClassVar[bool] = False

    def growing(self, segment: _Segment) -> bool:
        """Whether a record cut short at the end of `segment` may still be completed."""
        return False

    def refresh(self) -> None:
        """Find segments another process created or deleted (`SpoolTail`)."""

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
