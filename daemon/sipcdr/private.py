"""Files and folders holding personal data (CDRs, signaling, open calls, cursors, the
embedded database): created private whatever the process umask.

Folders are 0700 and files 0600, owned by the user sipcdr runs as. A folder or file
that exists already, belongs to that user and lets others read, write or enter it is
tightened to that; a folder whose group may only traverse it (0710: how the embedded
PostgreSQL's own system user reaches its data when root runs sipcdr) is left as it
is, since nobody can list it or open a 0600 file in it. Folders sipcdr finds on the
way (the parents of `state.dir`, the folder a configured JSONL file goes to) are never
changed: only what it creates, and its own state folders, are.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO, Final, Literal

PRIVATE_DIR_MODE: Final = 0o700  # only sipcdr's user lists, enters and writes it
PRIVATE_FILE_MODE: Final = 0o600  # only sipcdr's user reads and writes it
PRIVATE_UMASK: Final = 0o077  # files a library creates on its own are private too

# Bits that let others than the owner list, write or enter a folder; a group bit to
# traverse alone lets no one see a name or read a 0600 file.
_DIR_OPEN_BITS: Final = 0o067

_FLAGS: Final = {
    "ab": os.O_WRONLY | os.O_APPEND,
    "wb": os.O_WRONLY | os.O_TRUNC,
}


def restrict_umask() -> None:
    """Defence in depth for the commands that write personal data: whatever a library
    creates without an explicit mode is private as well."""
    os.umask(PRIVATE_UMASK)


def private_dir(path: Path, *, tighten: bool = True) -> Path:
    """Make `path` and every missing folder above it 0700. An existing `path` of ours
    that others may list, write or enter is tightened when `tighten` (sipcdr's own
    state folders); folders that existed above it are never changed."""
    missing: list[Path] = []
    current = path
    while not os.path.lexists(current):
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # made by another process meanwhile: judged below if it is `path`
        # mkdir's mode is cut by the umask; one that took the owner's bits would leave
        # a folder sipcdr itself cannot use.
        os.chmod(folder, PRIVATE_DIR_MODE)
    if tighten:
        info = os.stat(path)
        if info.st_uid == os.geteuid() and info.st_mode & _DIR_OPEN_BITS:
            os.chmod(path, PRIVATE_DIR_MODE)
    return path


def open_private_fd(path: Path, flags: int) -> int:
    """`os.open(path, flags)`, creating the file 0600 whatever the umask; a file of ours
    that others may read is tightened."""
    fd = os.open(path, flags | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        info = os.fstat(fd)
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def open_private(path: Path, mode: Literal["ab", "wb"]) -> BinaryIO:
    """A binary file object on `path` (append or truncate), private as `open_private_fd`."""
    return os.fdopen(open_private_fd(path, _FLAGS[mode]), mode)


def write_private(path: Path, data: bytes) -> None:
    """Replace the contents of `path` with `data`, the file private."""
    with open_private(path, "wb") as handle:
        handle.write(data)
