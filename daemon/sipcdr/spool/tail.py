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

The delivery loops are woken when the writer writes (`SpoolWatch`, inotify on the
folders), and look on their own only seldom, as a fallback.

Deleting segments stays with the writer, which reads the readers' cursor files
(`Spool.readers_elsewhere`); a segment retention deleted under a reader moves it past
(`refresh`), as `Spool.expire_segments` does for readers of its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from sipcdr.spool.reader import SpoolReader
from sipcdr.spool.segments import Segments, _Segment, list_segments, whole_records_end
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
        # By path, not by first number: the writer's open replaces an earlier version's
        # empty newest segment by a seeded one of the same first number.
        known = {segment.path: segment for segment in self._segments}
        current = [known.get(segment.path, segment) for segment in found]
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
    return whole_records_end(data, segment)[0]


# -- waking the readers when the writer writes ----------------------------------------

# A loop that is told when the writer writes looks for records without it this seldom:
# a wake-up the watch failed to give is late by this much at most, never missed.
WATCHED_POLL_S: Final = 0.5
# The readers are woken at most this often: the writer of CDRs writes each one as it
# closes, and a wake-up per record would cost a sink round trip per CDR. Under load a
# loop reads a batch of this long's records; an idle stream's first record goes at once.
WAKE_INTERVAL_S: Final = 0.025

# inotify(7): what a write, a new segment or a rename into the folder signals.
_IN_MODIFY: Final = 0x002
_IN_MOVED_TO: Final = 0x080
_IN_CREATE: Final = 0x100
_IN_DELETE_SELF: Final = 0x400
_IN_MOVE_SELF: Final = 0x800
_IN_Q_OVERFLOW: Final = 0x4000
_IN_IGNORED: Final = 0x8000
_IN_NONBLOCK: Final = os.O_NONBLOCK
_IN_CLOEXEC: Final = os.O_CLOEXEC
_WATCHED: Final = _IN_MODIFY | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE_SELF | _IN_MOVE_SELF
_EVENT: Final = struct.Struct("iIII")  # wd, mask, cookie, length of the name that follows
_GONE: Final = _IN_IGNORED | _IN_DELETE_SELF | _IN_MOVE_SELF


def _inotify() -> tuple[Callable[[int], int], Callable[[int, bytes, int], int]] | None:
    """libc's inotify_init1 and inotify_add_watch, or None where there are none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        init, add = libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError):
        return None
    init.argtypes, init.restype = [ctypes.c_int], ctypes.c_int
    add.argtypes, add.restype = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32], ctypes.c_int
    return init, add


def watch_events(data: bytes) -> list[tuple[int, int]]:
    """(watch descriptor, mask) of each event in what a read of the inotify file gave."""
    events = []
    at = 0
    while at + _EVENT.size <= len(data):
        wd, mask, _cookie, length = _EVENT.unpack_from(data, at)
        events.append((wd, mask))
        at += _EVENT.size + length
    return events


class SpoolWatch:
    """Wakes the readers of `SpoolTail`s when the writer's process writes to their
    folders (inotify on each stream's folder: a record appended, a segment created),
    in place of looking for records every `TAIL_POLL_S`: an idle delivery process
    sleeps, and a CDR is read as soon as it is written rather than at the next look.

    Nothing here is needed for correctness: the delivery loops still look on their own
    every `WATCHED_POLL_S`, so a wake-up that is lost (an event queue that overflowed
    is taken as a write to every stream) delays records, never skips them. Only the
    folder is watched, not the writer: a writer that restarts, or a delivery process
    started again, is covered by the next write or the first look. A watch that ends
    (the folder removed or moved) calls `on_lost`, which returns the loops to polling.
    """

    def __init__(
        self,
        tails: Sequence[SpoolTail],
        *,
        wake_interval_s: float = WAKE_INTERVAL_S,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.tails = tuple(tails)
        self.wake_interval_s = wake_interval_s
        self.on_lost = on_lost
        self.wakes = 0  # readers' wake-ups given, for tests and the curious
        self._fd = -1
        self._by_wd: dict[int, SpoolTail] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set while the file is not read, for `wake_interval_s` after a wake-up.
        self._resume: asyncio.TimerHandle | None = None

    @property
    def active(self) -> bool:
        return self._fd >= 0 and bool(self._by_wd)

    def start(self) -> bool:
        """Watch every tail's folder from the running event loop; False (and nothing
        started) where inotify is missing or refused (no instances left)."""
        calls = _inotify()
        if calls is None or not self.tails:
            return False
        init, add = calls
        fd = init(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            return False
        for tail in self.tails:
            wd = add(fd, os.fsencode(tail.directory), _WATCHED)
            if wd < 0:
                os.close(fd)
                self._by_wd.clear()
                return False
            self._by_wd[wd] = tail
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)
        return True

    def close(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
        self._by_wd.clear()

    def _readable(self) -> None:
        """Read every event queued, wake the streams they are about, then leave the
        file unread for `wake_interval_s`: the writer writes each CDR alone, and a
        wake-up of this process per write would cost both processes more than the
        records. Events queued meanwhile (the kernel merges repeats) are read when it
        is watched again, and wake their streams then."""
        events: list[tuple[int, int]] = []
        while True:
            try:
                data = os.read(self._fd, 65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._lost()
                return
            if not data:
                break
            events.extend(watch_events(data))
        self.handle(events)
        if self._fd >= 0 and self.wake_interval_s > 0 and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._resume = self._loop.call_later(self.wake_interval_s, self._watch_again)

    def _watch_again(self) -> None:
        self._resume = None
        if self._fd >= 0 and self._loop is not None:
            self._loop.add_reader(self._fd, self._readable)

    def handle(self, events: Sequence[tuple[int, int]]) -> None:
        """Wake the readers of the streams the events are about (all of them for an
        overflow); a watch that ended ends them all (`on_lost`)."""
        woken: dict[int, SpoolTail] = {}
        ended = False
        for wd, mask in events:
            if mask & _IN_Q_OVERFLOW:
                woken.update((id(tail), tail) for tail in self._by_wd.values())
                continue
            tail = self._by_wd.get(wd)
            if tail is None:
                continue
            woken[id(tail)] = tail
            if mask & _GONE:
                del self._by_wd[wd]
                ended = True
        for tail in woken.values():
            self.wakes += 1
            for reader in tail._readers.values():
                reader.wake()
        # One stream no longer watched is enough: the loops' slow look is shared by
        # every stream, and that stream's records would wait for it.
        if self._fd >= 0 and (ended or not self._by_wd):
            self._lost()

    def _lost(self) -> None:
        self.close()
        # What was written just before the watch ended is looked for now.
        for tail in self.tails:
            for reader in tail._readers.values():
                reader.wake()
        if self.on_lost is not None:
            self.on_lost()
