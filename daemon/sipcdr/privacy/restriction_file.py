"""The restriction list as last read from PostgreSQL, kept in the state folder.

Restrictions live in PostgreSQL, which may not answer when the daemon starts. Without
a copy, a restart during a database outage would lift every restriction until the
database is back; with it, the list the daemon last read is in force from its first
record. The file holds numbers, so it is private like every state file (0600).

A file that cannot be read as a list (cut short, too large for `read_private`) counts
as none: the daemon then waits for the database before anything leaves for Kafka.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import orjson

from sipcdr.private import open_private, read_private

FILE_NAME: Final = "restrictions.json"
_NEW_SUFFIX: Final = ".new"


def saved_restrictions(state_dir: Path) -> frozenset[str] | None:
    """The list last saved, or None when there is no usable one."""
    data = read_private(state_dir / FILE_NAME)
    if data is None:
        return None
    try:
        numbers = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(numbers, list) or not all(isinstance(n, str) for n in numbers):
        return None
    return frozenset(numbers)


def save_restrictions(state_dir: Path, numbers: frozenset[str]) -> None:
    """Replace the saved list; a crash leaves the old list or the new one, never half."""
    path = state_dir / FILE_NAME
    new = path.with_name(FILE_NAME + _NEW_SUFFIX)
    with open_private(new, "wb") as handle:
        handle.write(orjson.dumps(sorted(numbers)))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(new, path)
