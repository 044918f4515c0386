"""The dialog checkpoint file: the correlator's snapshot and the CDRs the spool still
held, as JSON with a CRC-32 trailer (`sipcdr.dialogstore` describes the files)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Final

import orjson

from sipcdr.model import CDR_MONEY_FIELDS, Cdr, money
from sipcdr.private import open_private_fd

CHECKPOINT_FORMAT: Final = 1  # the "checkpoint" member of the file's JSON object
_TRAILER_BYTES: Final = 11  # b"\n#" + 8 hex digits of the CRC-32 + b"\n"
_CDR_FIELDS: Final = tuple(item.name for item in dataclasses.fields(Cdr))
_CDR_FIELD_SET: Final = frozenset(_CDR_FIELDS)


@dataclass(slots=True)
class _Checkpoint:
    generation: int
    snapshot: bytes
    unwritten: bytes  # the CDRs the spool held in memory, as JSON
    open_dialogs: int
    errors_before: int  # journal write errors when the snapshot was taken
    final: bool
    began: float
    finished: bool = False


def read_checkpoint(data: bytes) -> tuple[dict[str, object], list[Cdr]]:
    """The correlator snapshot and the unwritten CDRs of a checkpoint file; ValueError
    when its checksum or form is wrong. A file without the trailer is the plain
    snapshot of an earlier version (or of `dialogs.json`)."""
    view = memoryview(data)
    trailer = bytes(view[-_TRAILER_BYTES:])
    if trailer.startswith(b"\n#") and trailer.endswith(b"\n"):
        body = view[:-_TRAILER_BYTES]
        try:
            crc = int(trailer[2:-1], 16)
        except ValueError:
            raise ValueError("checkpoint trailer is damaged") from None
        if zlib.crc32(body) != crc:
            raise ValueError("checkpoint checksum does not match")
        document = orjson.loads(body)
        del body, view
        if not isinstance(document, dict) or document.get("checkpoint") != CHECKPOINT_FORMAT:
            raise ValueError("not a checkpoint of this format")
        snapshot = document.pop("snapshot")
        if not isinstance(snapshot, dict):
            raise ValueError("checkpoint without a snapshot")
        return snapshot, _unwritten_cdrs(document.get("unwritten"))
    del view
    document = orjson.loads(data)
    if not isinstance(document, dict) or "version" not in document:
        raise ValueError("checkpoint without its trailer")
    return document, []


def _unwritten_json(cdrs: Sequence[Cdr]) -> bytes:
    # Money as decimal strings, read back exact by `_unwritten_cdrs`.
    return orjson.dumps(
        {
            "fields": _CDR_FIELDS,
            "rows": [[getattr(cdr, name) for name in _CDR_FIELDS] for cdr in cdrs],
        },
        default=_money_text,
    )


def _money_text(value: object) -> str:
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _unwritten_cdrs(document: object) -> list[Cdr]:
    if not isinstance(document, dict):
        raise ValueError("checkpoint unwritten CDRs are malformed")
    names, rows = document.get("fields"), document.get("rows")
    if (
        not isinstance(names, list)
        or not isinstance(rows, list)
        or not all(isinstance(name, str) and name in _CDR_FIELD_SET for name in names)
    ):
        raise ValueError("checkpoint unwritten CDRs are malformed")
    cdrs = []
    for row in rows:
        if not isinstance(row, list) or len(row) != len(names):
            raise ValueError("checkpoint unwritten CDR is malformed")
        fields = dict(zip(names, row, strict=True))
        fields["fraud_flags"] = tuple(fields.get("fraud_flags") or ())
        for name in CDR_MONEY_FIELDS:
            if name in fields:
                fields[name] = money(fields[name])
        cdrs.append(Cdr(**fields))
    return cdrs


def write_checkpoint(plan: _Checkpoint, tmp: Path, path: Path) -> None:
    """Write `plan` to `tmp`, fsync it, rename it to `path` and fsync the directory.
    Thread-safe: file system calls only. Leaves nothing half-written."""
    pieces = (
        b'{"checkpoint":%d,"unwritten":' % CHECKPOINT_FORMAT,
        plan.unwritten,
        b',"snapshot":',
        plan.snapshot,
        b"}",
    )
    crc = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    try:
        tmp.unlink(missing_ok=True)  # a stale one may have other permissions
        fd = open_private_fd(tmp, os.O_WRONLY | os.O_EXCL)
        try:
            for piece in (*pieces, b"\n#%08x\n" % crc):
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _error_of(future: asyncio.Future[None]) -> BaseException | None:
    if future.cancelled():
        return asyncio.CancelledError()
    return future.exception()
