"""Room kept on the state disk for when it is full: a preallocated spare file.

A CDR the disk refuses waits in the spool's in-memory reserve, and each dialog
checkpoint carries the held CDRs, so a crash does not lose them. On a disk that is
full for everything, though, the checkpoint and the journal are refused as well, and a
crash would take them. The spare file (`state.dir/spare`, `[state] spare_bytes`) is
the room for that moment, set aside while there is room: allocated with
`posix_fallocate` (its blocks are really taken, not a sparse promise). The first write
of a CDR, a journal record or a checkpoint that the disk refuses for want of space
deletes it, and the write is tried again at once. While it is given up the daemon
refuses new calls (as for a CDR the disk refused), so its room goes to the calls
already open, which still end, to their journal records and to the checkpoints. It is
allocated again once the filesystem has twice its size free (the spare and as much
again), read at most every `_CHECK_S`. A disk too small for that never gets one, and
the daemon works as without; so does a copy-on-write or compressing filesystem (ZFS,
btrfs), which keeps no blocks for the file (said once, at WARNING).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from time import monotonic
from typing import Final

import structlog

from sipcdr.private import open_private_fd

SPARE_NAME: Final = "spare"
# About what a large carrier's open calls need once its disk fills: the CDRs of ~20,000
# calls (~1.1 KB each), their journal records (~0.8 KB) and a checkpoint of the calls
# still open; 0.5 % of the 15 GiB the default limits ask for.
DEFAULT_SPARE_BYTES: Final = 64 * 1024 * 1024
# Free space is read at most this often while the spare is missing.
_CHECK_S: Final = 5.0


class SpareSpace:
    """The spare file. `ensure()` allocates it when there is room (at start and on each
    tick); `release()` gives it up (the spool's and the dialog store's `on_no_space`)."""

    def __init__(self, path: Path, size_bytes: int) -> None:
        self.path = path
        self.size_bytes = size_bytes
        self.ready = False  # allocated, whole, on disk
        self.released = False  # given up for a full disk, not yet allocated again
        self.releases = 0
        self._checked_until = 0.0
        self._told_no_room = False
        self.log = structlog.get_logger("sipcdr.spare")

    def ensure(self) -> bool:
        """Allocate the spare if it is missing and the disk has twice its size free;
        True when it is there. Never raises."""
        if self.ready:
            return True
        now = monotonic()
        if now < self._checked_until:
            return False
        self._checked_until = now + _CHECK_S
        if self.size_bytes <= 0:
            self._checked_until = float("inf")
            self._remove()  # switched off: the room a former setting kept is given back
            return False
        if self._kept_from_before():
            return True
        try:
            stat = os.statvfs(self.path.parent)
        except OSError:
            return False
        if stat.f_bavail * stat.f_frsize < 2 * self.size_bytes:
            if not self._told_no_room and not self.released:
                self._told_no_room = True
                self.log.warning(
                    "spare_space_not_allocated",
                    spare_bytes=self.size_bytes,
                    free_bytes=stat.f_bavail * stat.f_frsize,
                    note="allocated once twice its size is free",
                )
            return False
        try:
            self._allocate()
        except OSError as exc:
            self._remove()
            self.log.warning("spare_space_not_allocated", error=exc.strerror or str(exc))
            return False
        if self.released:
            self.log.info("spare_space_restored", spare_bytes=self.size_bytes)
        elif not self._holds_blocks():
            # Copy-on-write or compressing filesystems (ZFS, btrfs) keep no blocks for
            # it: giving it up then frees nothing, and the daemon works as without.
            self.log.warning("spare_space_holds_no_blocks", path=str(self.path))
        self.ready, self.released = True, False
        return True

    def _holds_blocks(self) -> bool:
        try:
            return self.path.lstat().st_blocks * 512 >= self.size_bytes
        except OSError:
            return False

    def _kept_from_before(self) -> bool:
        """A spare of the full size left by an earlier run is taken as it is."""
        try:
            info = self.path.lstat()
        except OSError:
            return False
        if info.st_size == self.size_bytes and info.st_blocks * 512 >= self.size_bytes:
            self.ready = True
            return True
        return False

    def _allocate(self) -> None:
        fd = open_private_fd(self.path, os.O_RDWR)
        try:
            os.ftruncate(fd, 0)  # a spare of another size starts over
            os.posix_fallocate(fd, 0, self.size_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
        self.ready = False

    def release(self) -> bool:
        """Give the spare's room back to the disk; True when there was one to give."""
        if not self.ready:
            return False
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                self.log.error("spare_space_release_failed", error=exc.strerror or str(exc))
                return False
        self.ready = False
        self.released = True
        self.releases += 1
        self._checked_until = 0.0
        # Nothing is lost yet: the room goes to the calls already open while new calls
        # are refused.
        self.log.warning("spare_space_released", spare_bytes=self.size_bytes)
        return True

    @property
    def bytes_held(self) -> int:
        return self.size_bytes if self.ready else 0


def same_filesystem(first: Path, second: Path) -> bool:
    """Whether two existing paths are on one filesystem (a spare frees room only there)."""
    try:
        return first.stat().st_dev == second.stat().st_dev
    except OSError:
        return False
