"""JSONL sink: one CDR v1 object per line, for quick looks and line-oriented tools.

A spool consumer like every sink: each batch is written, flushed and fsynced before
the cursor moves, so a CDR in the file is on disk. A crash between the fsync and the
cursor save repeats that batch's lines; tools that need exactly-once dedupe by
`cdr_id`. Fraud alert records (with `alert_id`) are written too when `alerts` is set,
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
write, or a cut that failed) is cut off the same way.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Final

from sipcdr.private import check_file_location, open_private_fd, private_dir, tighten_files
from sipcdr.sinks.base import KIND_ALERT, KIND_CDR, STREAM_RECORDS, AsyncLifecycle, SpoolRecord

DEFAULT_ROTATE_BYTES: Final = 256 * 1024 * 1024  # a day of a busy trunk group, still greppable
CONFIG_KEY: Final = "sinks.jsonl.path"  # what a refused path is reported under
_ROTATED_SUFFIX: Final = re.compile(r"\.\d{8}T\d{6}Z(\.\d+)?")  # what _rotate appends


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

    def _open(self) -> IO[bytes]:
        if self._file is None:
            # The folder may be the operator's: checked, never changed.
            private_dir(self.path.parent, tighten=False, key=CONFIG_KEY)
            # Unbuffered: a write that failed leaves nothing behind to land later.
            fd = open_private_fd(self.path, os.O_RDWR | os.O_APPEND, key=CONFIG_KEY)
            handle = os.fdopen(fd, "a+b", buffering=0)
            try:
                self._size = _cut_torn_line(handle.fileno())
            except OSError:
                handle.close()
                raise
            self._file = handle
        return self._file

    async def deliver(self, stream: str, records: Sequence[SpoolRecord]) -> None:
        kinds = self.kinds
        lines = [record.value for record in records if record.kind in kinds]
        if lines:
            # fsync takes milliseconds; the event loop keeps receiving meanwhile.
            await asyncio.to_thread(self._write, lines)

    def _write(self, lines: list[bytes]) -> None:
        handle = self._open()
        data = memoryview(b"\n".join(lines) + b"\n")
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
        self._open()

    async def flush(self) -> None:
        """Nothing buffered: every `deliver` that returned is fsynced."""

    async def stop(self) -> None:
        """Idempotent: every delivered line is already on disk; closes the file."""
        if self._file is not None:
            self._file.close()
            self._file = None


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
