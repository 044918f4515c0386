"""JSONL sink: one CDR v1 object per line, for quick looks and line-oriented tools.

A spool consumer like every sink: each batch is written, flushed and fsynced before
the cursor moves, so a CDR in the file is on disk. A crash between the fsync and the
cursor save (or a cursor that went back) makes the spool deliver those records again;
they are not written twice. When the file is opened, the lines of its last
`TAIL_BYTES` (those of the newest rotated file when it is empty: a rotation right
before the crash) are kept until the first batches: records at the head of those
batches whose bytes are the file's lines in the same order, ending with its last line,
are already there and are skipped (the file fsynced first: a process killed between a
write and its fsync leaves lines that are read back but may not be on disk). Only a
record whose exact bytes are already in the file (compared by a 128-bit BLAKE2b
digest) is ever skipped, so nothing is lost however the repeats are guessed; a repeat
that reaches further back than that window (1,000 records or 4 MiB make a delivery batch) is
written again, and readers that need exactly-once still dedupe by `cdr_id`, as for
Kafka. Fraud alert records (with `alert_id`) are written too when `alerts` is set,
which the daemon does when the file is its only sink; signaling never is.
The file is rotated by size to `<name>.<UTC time>` so no single file grows unbounded.
A rotation that fails (no inode left for the new file, say) comes after its batch is
on disk, so it never fails that batch, which would deliver it again: it is counted
and tried again after the next batch.

The file and the rotated ones are private (`sipcdr.private`): the folder must be a
real folder of the user sipcdr runs as that no one else may write to, the file is
never opened through a link; rotated files an older version left readable by others
are made 0600 at start.

A batch that cannot be written whole (a full disk) is cut back to where it began and
fails, to be retried from the spool: a torn line would merge with the next record
into one unreadable line. A torn line found when the file is opened (a crash mid
write, or a cut that failed) is cut off the same way, before its tail is read: the
record it began was never confirmed, so it comes again and is written whole.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import re
import stat
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Final

import structlog

from sipcdr.private import check_file_location, open_private_fd, private_dir, tighten_files
from sipcdr.sinks.base import KIND_ALERT, KIND_CDR, STREAM_RECORDS, AsyncLifecycle, SpoolRecord

DEFAULT_ROTATE_BYTES: Final = 256 * 1024 * 1024  # a day of a busy trunk group, still greppable
CONFIG_KEY: Final = "sinks.jsonl.path"  # what a refused path is reported under
_ROTATED_SUFFIX: Final = re.compile(r"\.\d{8}T\d{6}Z(\.\d+)?")  # what _rotate appends
# How much of the file's end is compared with the records delivered again after a
# crash: twice the largest delivery batch (4 MiB), read once at open (a few ms).
TAIL_BYTES: Final = 8 * 1024 * 1024
# No record is shorter (a CDR line takes several hundred bytes): lines past
# `TAIL_BYTES // MIN_RECORD_BYTES` from the end are not kept, so a tail of blank or
# tiny lines (a damaged file) costs no more than one of records.
MIN_RECORD_BYTES: Final = 64
# How long a write waits for one a cancelled `deliver` left running, and `stop` for it
# before leaving the file open to it: a stalled disk fails batches (to come again after
# the loop's backoff) rather than piling threads up behind the first.
WRITE_WAIT_S: Final = 1.0
STOP_WAIT_S: Final = 10.0


class JsonlSink(AsyncLifecycle):
    name = "jsonl"
    streams: tuple[str, ...] = (STREAM_RECORDS,)

    def __init__(
        self, path: Path, rotate_bytes: int = DEFAULT_ROTATE_BYTES, *, alerts: bool = False
    ) -> None:
        self.path = path
        self.kinds = frozenset({KIND_CDR, KIND_ALERT} if alerts else {KIND_CDR})
        self.rotate_bytes = rotate_bytes
        self.written = 0
        self.rotation_failures = 0  # the batch before was kept; tried again after the next
        self._file: IO[bytes] | None = None
        self._size = 0
        # Until the first batches after an open: digests of the file's last lines, which
        # records delivered again may repeat (see the module docstring), and where in
        # them the next record must match; None once the repeats are past. Digests, not
        # the lines: kept until a record comes, which may be hours after a start.
        self._tail: list[bytes] | None = None
        self._tail_next = -1  # -1: not matched yet
        self.repeats_skipped = 0  # records already in the file when delivered again
        self._skipped_since_open = 0
        # One write at a time, and none while the file is closed: a `deliver` given up
        # by its timeout leaves its thread writing, and the batch comes again at once;
        # the two at once would interleave, and the first, failing, would cut the file
        # back over the second's confirmed lines.
        self._writing = threading.Lock()
        self._log = structlog.get_logger("sipcdr.jsonl")

    async def start(self) -> None:
        check_file_location(self.path, key=CONFIG_KEY)
        prefix = self.path.name
        rotated = [
            name
            for name in os.listdir(self.path.parent)
            if name.startswith(prefix) and _ROTATED_SUFFIX.fullmatch(name, len(prefix))
        ]
        tighten_files(self.path.parent, rotated, key=CONFIG_KEY)
        self._open()

    async def prepare(self) -> None:
        """The file is opened by `start`."""

    async def probe(self) -> None:
        """A local file has no server to be gone: failures wait the whole backoff."""

    def _open(self, *, after_rotation: bool = False) -> IO[bytes]:
        if self._file is None:
            # The folder may be the operator's: checked, never changed.
            private_dir(self.path.parent, tighten=False, key=CONFIG_KEY)
            # Unbuffered: a write that failed leaves nothing behind to land later.
            fd = open_private_fd(self.path, os.O_RDWR | os.O_APPEND, key=CONFIG_KEY)
            handle = os.fdopen(fd, "a+b", buffering=0)
            try:
                self._size = _cut_torn_line(handle.fileno())
                if not after_rotation:  # a new file after a rotation repeats nothing
                    self._tail = self._read_tail(handle.fileno())
                    self._tail_next = -1
                    self._skipped_since_open = 0
            except OSError:
                handle.close()
                raise
            self._file = handle
        return self._file

    def _read_tail(self, fd: int) -> list[bytes] | None:
        """Digests of the whole lines of the file's last `TAIL_BYTES`, or of the newest
        rotated file's when this one is empty; None when there are none."""
        if self._size > 0:
            return _whole_lines(fd, self._size)
        newest = self._newest_rotated()
        if newest is None:
            return None
        # A name that is no file (a FIFO would wait for a writer for ever without
        # O_NONBLOCK, a folder cannot be read) or cannot be read has nothing to compare:
        # repeats, if any, are written again, never anything left out.
        try:
            rotated = os.open(newest, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            info = os.fstat(rotated)
            if not stat.S_ISREG(info.st_mode):
                return None
            return _whole_lines(rotated, info.st_size)
        except OSError:
            return None
        finally:
            os.close(rotated)

    def _newest_rotated(self) -> Path | None:
        prefix = self.path.name
        stamps = []
        for name in os.listdir(self.path.parent):
            match = _ROTATED_SUFFIX.fullmatch(name, len(prefix))
            if name.startswith(prefix) and match:
                stamp, _, serial = name[len(prefix) + 1 :].partition(".")
                stamps.append((stamp, int(serial or 0), name))
        return self.path.with_name(max(stamps)[2]) if stamps else None

    async def deliver(self, stream: str, records: Sequence[SpoolRecord]) -> None:
        kinds = self.kinds
        lines = [record.value for record in records if record.kind in kinds]
        if lines:
            # fsync takes milliseconds; the event loop keeps receiving meanwhile. Straight
            # to the executor: nothing the write logs reads context variables, so the
            # copy of them `asyncio.to_thread` makes for each batch is not needed.
            await asyncio.get_running_loop().run_in_executor(None, self._write, lines)

    def _write(self, lines: list[bytes]) -> None:
        if not self._writing.acquire(timeout=WRITE_WAIT_S):
            raise OSError(errno.EBUSY, "the previous write to the file has not returned")
        try:
            self._write_locked(lines)
        finally:
            self._writing.release()

    def _write_locked(self, lines: list[bytes]) -> None:
        handle = self._open()
        if self._tail is not None:
            skipped, after = self._already_written(lines)
            lines = lines[skipped:]
            if lines:
                self._write_lines(handle, lines)  # its fsync covers the repeats too
            elif skipped:
                # Read back from the page cache, they may never have reached the disk
                # (killed between the write and its fsync): on disk before they count
                # as written, as every batch is.
                os.fsync(handle.fileno())
            # Only once the rest is on disk: a batch that failed comes again whole, and
            # is compared again from the same line.
            self._caught_up(skipped, after)
            return
        self._write_lines(handle, lines)

    def _caught_up(self, skipped: int, after: int) -> None:
        self._skipped_since_open += skipped
        self.repeats_skipped += skipped
        if after < 0 or self._tail is None or after >= len(self._tail):
            self._tail = None
            if self._skipped_since_open:
                self._log.info("jsonl_repeats_skipped", records=self._skipped_since_open)
        else:
            self._tail_next = after

    def _write_lines(self, handle: IO[bytes], lines: list[bytes]) -> None:
        # The closing newline joined in: one copy of the batch, not a second for it.
        data = memoryview(b"\n".join([*lines, b""]))
        start, end = self._size, self._size + len(data)
        try:
            while data:
                written = handle.write(data)
                if not written:
                    raise OSError(errno.ENOSPC, "short write")
                data = data[written:]
            os.fsync(handle.fileno())
        except OSError:
            self._cut_back(start)
            raise
        self.written += len(lines)
        self._size = end
        if self._size >= self.rotate_bytes:
            try:
                self._rotate()
            except OSError:
                # The batch is on disk: failing it now would write it twice. The file
                # is closed; the next batch opens it (or a new one) and tries again.
                self.rotation_failures += 1

    def _already_written(self, lines: list[bytes]) -> tuple[int, int]:
        """How many of `lines`, from the first, are the file's last lines delivered
        again, and the tail line the next record must match (-1: the repeats are past,
        everything from here on is new). Changes nothing."""
        tail = self._tail
        assert tail is not None
        digests = [_digest(line) for line in lines]
        start = self._tail_next
        if start < 0:
            # The first record delivered after the open: where in the tail it was
            # written, if anywhere, with the records after it matching too.
            first = digests[0]
            start = next(
                (
                    at
                    for at, line in enumerate(tail)
                    if line == first and _continues(tail, at, digests)
                ),
                -1,
            )
            if start < 0:
                return 0, -1
        matched = 0
        for digest in digests:
            if start + matched >= len(tail) or tail[start + matched] != digest:
                return matched, -1
            matched += 1
        return matched, start + matched

    def _cut_back(self, size: int) -> None:
        """Remove what a failed batch wrote; if even that fails, close the file, so the
        next open cuts the torn line off before anything is appended to it."""
        assert self._file is not None
        try:
            os.ftruncate(self._file.fileno(), size)
        except OSError:
            self._file.close()
            self._file = None

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.{stamp}")
        serial = 1
        while target.exists():  # several rotations in one second must not overwrite
            target = self.path.with_name(f"{self.path.name}.{stamp}.{serial}")
            serial += 1
        self.path.rename(target)
        self._open(after_rotation=True)

    async def flush(self) -> None:
        """Nothing buffered: every `deliver` that returned is fsynced."""

    async def stop(self) -> None:
        """Idempotent: every delivered line is already on disk; closes the file once a
        write a cancelled `deliver` left running is done (left open to it, which ends
        with the process, when it does not return within `STOP_WAIT_S`)."""
        if not await asyncio.to_thread(self._writing.acquire, timeout=STOP_WAIT_S):
            self._log.warning("jsonl_write_still_running", waited_s=STOP_WAIT_S)
            return
        try:
            if self._file is not None:
                self._file.close()
                self._file = None
        finally:
            self._writing.release()


def _continues(tail: list[bytes], at: int, lines: list[bytes]) -> bool:
    """Whether `lines` and the tail from `at` agree as far as both go."""
    count = min(len(tail) - at, len(lines))
    return tail[at : at + count] == lines[:count]


def _digest(line: bytes) -> bytes:
    # 128 bits: two different records alike by chance is a 2**-128 event, far below a
    # disk returning wrong data.
    return hashlib.blake2b(line, digest_size=16).digest()


def _whole_lines(fd: int, size: int) -> list[bytes] | None:
    """Digests of the whole lines in the last `TAIL_BYTES` of the file's first `size`
    bytes (which end with a newline), None when there are none."""
    # One byte before the window tells whether its first line is whole.
    start = max(0, size - TAIL_BYTES - 1)
    data = os.pread(fd, size - start, start)
    if not data.endswith(b"\n"):
        return None
    most = TAIL_BYTES // MIN_RECORD_BYTES
    lines = data[:-1].rsplit(b"\n", most)
    if start > 0 or len(lines) > most:
        # Begun before the window (empty when the window starts a line), or the lines
        # before the last `most`, left in one piece by rsplit.
        lines = lines[1:]
    return [_digest(line) for line in lines] or None


def _cut_torn_line(fd: int) -> int:
    """Cut the file after its last newline; returns its size then."""
    size = os.fstat(fd).st_size
    end = size
    while end > 0:
        start = max(0, end - 64 * 1024)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    if end < size:
        os.ftruncate(fd, end)
    return end
