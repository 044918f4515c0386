"""Retention of the JSONL output: rotated files whose newest line is past the longest
CDR retention are deleted.

A rotated file is named `<name>.<UTC time of rotation>`, which is no earlier than its
newest line, so the name alone says when all of it expired. One file mixes trunks, so
it is kept for the longest CDR period configured. The file being written is never
deleted: it is rotated by size (`[sinks.jsonl] rotate_bytes`).
"""

from __future__ import annotations

import contextlib
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

from sipcdr.privacy.plan import jsonl_expired, rotation_time

if TYPE_CHECKING:
    from sipcdr.config import Config

_ROTATED_SUFFIX: Final = re.compile(r"\.\d{8}T\d{6}Z(\.\d+)?")  # as sinks.jsonl writes it


def rotated_files(path: Path) -> list[tuple[str, datetime]]:
    """The rotated files next to `path`, with their rotation times."""
    prefix = path.name
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if name.startswith(prefix) and _ROTATED_SUFFIX.fullmatch(name, len(prefix)):
            closed = rotation_time(name[len(prefix) + 1 :])
            if closed is not None:
                found.append((name, closed))
    return found


def expire_files(config: Config, *, dry_run: bool, now: datetime | None = None) -> list[Path]:
    """Delete (or with `dry_run` only list) the expired rotated JSONL files."""
    jsonl = config.sinks.jsonl
    if not jsonl.enabled:
        return []
    path = Path(jsonl.path)
    now = now or datetime.now(UTC)
    names = jsonl_expired(rotated_files(path), now, config.retention.longest_cdr_days())
    expired = [path.with_name(name) for name in names]
    if not dry_run:
        for item in expired:
            with contextlib.suppress(FileNotFoundError):
                item.unlink()
    return expired
