"""A stream read by another process than the one writing it: the delivery process
reads the spool the capture process appends to, with nothing but the files between
them.

The segments are found by listing the folder, again whenever a reader reaches the end
of the newest one it knows. A reader reads a segment up to the file's size at that
moment; a record cut short at the end of the newest segment is one being written,
not damage, and is read again at the next poll. A segment stops growing before the
next one is created (the writer opens the new file, then writes there only), so a
reader that finds a newer segment reads the older one once more before it moves on:
nothing written just before a rotation is skipped.

Deleting segments stays with the writer, which reads the readers' cursor files
(`Spool.readers_elsewhere`); a segment retention deleted under a reader moves it past
(`refresh`), as `Spool.expire_segments` does for readers of its own process.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Final

from sipcdr.spool.reader import SpoolReader
from sipcdr.spool.records import _next_valid, _scan
from sipcdr.spool.segments import Segments, _Segment, list_segments
from sipcdr.spool.writer import SpoolStats

# Beyond the coarsest timestamps of a filesystem a spool may be on (FAT's 2 s).
_MTIME_TRUSTED_AFTER_NS: Final = 2_500_000_000


class SpoolTail(Segments):
    """The segments of a stream another process writes, and its consumers' readers."""

    tailing = True
    # What the writer's process knows and this one does not; the telemetry and the
    # readiness check of the writer's process read them there.
    full = False
    reserved = 0
    below_floor = False
    full_policy = ""

    def __init__(self, directory: Path, consumers: tuple[str, ...]) -> None:
        self.directory = directory
        self.consumers = consumers
        self.max_bytes = 0
        self.stats = SpoolStats()  # the writer counts; kept for the same log lines
        self.next_seq = 1  # at least; the writer's process tells more (`note_next_seq`)
        self._segments: list[_Segment] = []
        self._readers: dict[str, SpoolReader] = {}
        self._listed_at = -1  # the folder's mtime at the last listing

    def open(self) -> None:
        self._segments = list_segments(self.directory)
        if self._segments:
            self.next_seq = _end_of(self._segments[-1])
        for name in self.consumers:
            self._readers[name] = SpoolReader(self, name)

    def reader(self, name: str) -> SpoolReader:
        return self._readers[name]

    def note_end_on_disk(self) -> None:
        """The writer is gone: what its segments hold is all there is to drain."""
        self._listed_at = -1
        self.refresh()
        if self._segments:
            self.note_next_seq(_end_of(self._segments[-1]))

    def note_next_seq(self, next_seq: int) -> None:
        """The writer's next sequence number: what a drain waits for."""
        self.next_seq = max(self.next_seq, next_seq)

    def growing(self, segment: _Segment) -> bool:
        return bool(self._segments) and segment is self._segments[-1]

    def refresh(self) -> None:
        """List the segments again: new ones appended, deleted ones forgotten, and a
        reader behind the oldest one (retention deleted what it had not read) moved
        past the gap, which the writer counted. Only when the folder changed since the
        last listing (a file created or deleted changes its mtime): an idle loop looks
        often, and one stat is what that costs."""
        try:
            changed = os.stat(self.directory).st_mtime_ns
        except OSError:
            return
        if changed == self._listed_at:
            return
        # The mtime has the kernel's coarse clock: a change within the same tick as
        # this listing would not change it again, so a recent one is not relied on.
        recent = time.time_ns() - changed < _MTIME_TRUSTED_AFTER_NS
        self._listed_at = -1 if recent else changed
        found = list_segments(self.directory)
        if not found:
            return  # the active segment always stays: a listing that failed
        known = {segment.first_seq: segment for segment in self._segments}
        current = [known.get(segment.first_seq, segment) for segment in found]
        kept = {id(segment) for segment in current}
        gone = [segment for segment in self._segments if id(segment) not in kept]
        self._segments = current
        oldest = current[0].first_seq
        for reader in self._readers.values():
            if reader.confirmed_seq < oldest:
                reader.skip_to(oldest)
            for segment in gone:
                reader.forget(segment)

    def _segment_after(self, first_seq: int) -> _Segment | None:
        following = super()._segment_after(first_seq)
        if following is None:
            self.refresh()
            following = super()._segment_after(first_seq)
        return following

    def _collect(self) -> None:
        """The writer deletes segments, by the cursor files."""

    def flush(self) -> None:
        for reader in self._readers.values():
            if reader.cursor_unsaved:
                reader.save_cursor()

    def sync(self) -> None:
        self.flush()

    @property
    def size_bytes(self) -> int:
        return sum(segment.size for segment in self._segments)

    def close(self) -> None:
        self.flush()
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


def _end_of(segment: _Segment) -> int:
    """The sequence number after the last valid record of a segment (its first one
    when it holds none)."""
    try:
        data = segment.path.read_bytes()
    except OSError:
        return segment.first_seq
    last = segment.first_seq - 1
    offset = 0
    while offset < len(data):
        for seq, _kind, _key, _value, end in _scan(data, offset):
            last, offset = seq, end
        following = _next_valid(data, offset + 1)
        if following < 0:
            break
        offset = following
    return last + 1
