"""JSONL sink: one CDR v1 object per line, for quick looks and line-oriented tools.

Lines are buffered in memory and written, flushed and fsynced together on `flush()`,
which the daemon calls about once a second and on shutdown: a crash loses at most
that second, and a partial last line from a crash is the only torn record possible.
The file is rotated by size to `<name>.<UTC time>` so no single file grows unbounded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import orjson

from sipcdr.model import Cdr

DEFAULT_ROTATE_BYTES = 256 * 1024 * 1024  # a day of a busy trunk group, still greppable


class JsonlSink:
    name = "jsonl"

    def __init__(self, path: Path, rotate_bytes: int = DEFAULT_ROTATE_BYTES) -> None:
        self.path = path
        self.rotate_bytes = rotate_bytes
        self.written = 0
        self._pending: list[bytes] = []
        self._file: IO[bytes] | None = None
        self._size = 0

    def start(self) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
            self._size = self._file.tell()

    def write(self, cdr: Cdr) -> None:
        self._pending.append(orjson.dumps(cdr.to_record(), option=orjson.OPT_APPEND_NEWLINE))

    def flush(self) -> None:
        if not self._pending:
            return
        self.start()
        assert self._file is not None
        data = b"".join(self._pending)
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.written += len(self._pending)
        self._size += len(data)
        self._pending.clear()
        if self._size >= self.rotate_bytes:
            self._rotate()

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.path.rename(self.path.with_name(f"{self.path.name}.{stamp}"))
        self.start()

    def stop(self) -> None:
        """Idempotent: flushes what is pending and closes the file."""
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlSink:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
