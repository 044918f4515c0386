"""The restriction list as last read from PostgreSQL, kept in the state folder.

Restrictions live in PostgreSQL, which may not answer when the daemon starts. Without
a copy, a restart during a database outage would lift every restriction until the
database is back; with it, the list the daemon last read is in force from its first
record. The file holds numbers, so it is private like every state file (0600).

A copy holds at most `MAX_SAVED_SUBJECTS` numbers, and is read back up to the size
that many E.164 numbers take, so every list saved is one a start can read. A longer
list is in force all the same while the daemon runs, but is not copied: the file then
says so instead (`{"not_saved": ...}`), which a start reads as no list (delivery waits
for PostgreSQL) and an import with Kafka as a list it cannot have (it refuses), never
as an older, shorter list.

A save that fails (a full disk, the new copy's name taken) empties the copy in place,
which takes no room: the older list it held would lift the restrictions added since.

A file that cannot be read as a list (cut short, too large, a list not copied, emptied
by a failed save) counts as none: the daemon then waits for the database before
anything leaves for Kafka.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Final

import orjson

from sipcdr.private import open_folder, open_private, open_private_fd, read_private

FILE_NAME: Final = "restrictions.json"
_NEW_SUFFIX: Final = ".new"
# Restricted subjects a copy is kept for: far more than restriction requests come to
# (each is a data subject's request, handled by hand); that many take 18 MB, written in
# under a second and read back at start in about half of one.
MAX_SAVED_SUBJECTS: Final = 1_000_000
# One saved number: up to 15 E.164 digits, its quotes and a comma.
_ENTRY_BYTES: Final = 15 + 3
# The largest file a copy of `MAX_SAVED_SUBJECTS` numbers makes (with its brackets).
MAX_FILE_BYTES: Final = MAX_SAVED_SUBJECTS * _ENTRY_BYTES + 2


class TooManyToSave(ValueError):
    """The list is longer than a copy is kept for; the message says so in one line."""


def saved_restrictions(state_dir: Path) -> frozenset[str] | None:
    """The list last saved, or None when there is no usable one."""
    data = read_private(state_dir / FILE_NAME, limit=MAX_FILE_BYTES + 1)
    if data is None or len(data) > MAX_FILE_BYTES:
        return None
    try:
        numbers = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(numbers, list) or not all(isinstance(n, str) for n in numbers):
        return None
    return frozenset(numbers)


def save_restrictions(state_dir: Path, numbers: frozenset[str]) -> None:
    """Replace the saved list; a crash leaves the old list or the new one, never half.

    A list of more than `MAX_SAVED_SUBJECTS` numbers (or larger than a start reads)
    replaces the copy with a note that it was not kept, then raises `TooManyToSave`:
    an older, shorter list left in its place would lift the restrictions added since.
    """
    too_many = len(numbers) > MAX_SAVED_SUBJECTS
    data = b"" if too_many else orjson.dumps(sorted(numbers))
    too_many = too_many or len(data) > MAX_FILE_BYTES  # numbers longer than E.164's
    if too_many:
        data = orjson.dumps({"not_saved": len(numbers), "limit": MAX_SAVED_SUBJECTS})
    _replace(state_dir / FILE_NAME, data)
    if too_many:
        raise TooManyToSave(
            f"{len(numbers):,} restricted subjects: a copy is kept for at most "
            f"{MAX_SAVED_SUBJECTS:,}, so a start while PostgreSQL does not answer waits "
            "for it"
        )


def _replace(path: Path, data: bytes) -> None:
    new = path.with_name(path.name + _NEW_SUFFIX)
    try:
        with open_private(new, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(new, path)
    except OSError:
        # The list in force is newer than the copy: left readable, the copy would lift
        # the restrictions added since on a start while PostgreSQL does not answer.
        with contextlib.suppress(OSError):
            os.unlink(new)  # its room back, and no half-written list
        _withdraw(path)
        raise
    # The rename itself on disk: a power loss must not bring back the older list.
    folder = open_folder(path.parent)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _withdraw(path: Path) -> None:
    """Empty the copy in place (which takes no room, so works on a full disk too; made
    empty when there was none, since the list in force names someone): an empty file
    reads as a list that cannot be had, as a note does. When even that
    fails, nothing more can be done here; the caller reports the failure."""
    with contextlib.suppress(OSError):
        fd = open_private_fd(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
