"""Room kept on the state disk for when it is full: a preallocated spare file.

A CDR the disk refuses waits in the spool's in-memory reserve, and each dialog
checkpoint carries the held CDRs, so a crash does not lose them. On a disk that is
full for everything, though, the checkpoint and the journal are refused as well, and a
crash would take them. The spare file (`state.dir/spare`, `[state] spare_bytes`) is
the room for that moment, set aside while there is room: allocated with
`posix_fallocate` (its blocks are really taken, not a sparse promise). The first write
of a CDR, a journal record or a checkpoint that the disk refuses for want of space
deletes it, and the write is tried again at once. While its room is kept for them
(`withheld`) the daemon refuses new calls (as for a CDR the disk refused), stops
signaling and holds the sinks that write to the disk, so that room goes to the calls
already open, which still end, to their CDRs and journal records and to the
checkpoints. That lasts until the disk has at least the spare's size free again (right
after the release it has less: the write that asked for the room needed more than was
free), whether or not a spare can be made again, or until its room is used up (a CDR
had to wait in memory after all): from then on, nothing is left to keep, and the
daemon works as without a spare (new calls wait for the CDRs in memory to be written)
until it has one again. After a release the spare is allocated again with a quarter of
its size to spare.

That room is kept across a restart too (a crash, or a stop, with calls still open): the
release leaves an empty marker, `state.dir/spare.released`, removed when the room is
no longer kept. A start that finds it keeps the room as the stopped daemon did (new
calls refused until the disk has the spare's size free again or the room is used up),
so the calls it recovers open, and their CDRs, get it rather than new calls. The marker
needs no block (the release has just given back an inode and blocks). It is fsynced,
and then its folder (which holds its name and the spare's removal), before the release
is reported, so a crash or power loss right after the release still finds it; one that
cannot be made or synced is said at ERROR, and the next start may then see no release.
A start that finds the marker beside a whole spare (allocated again before the crash
could remove the marker) removes it and keeps nothing back.

It is allocated (at start, or after it went missing) once the filesystem has twice its
size free (the spare and as much again), read at most every `_CHECK_S`; a file of
another size (the setting changed) is resized in place, its own blocks counted as
room. The file is looked at as often, never trusted by its name alone: one deleted,
cut short or given a second name from outside is made again, and only blocks really
there count as room to give. A disk too small never gets one, and the daemon works as
without; so does a copy-on-write or compressing filesystem (ZFS, btrfs), which keeps
no blocks for the file (said once, at WARNING).
"""

from __future__ import annotations

import contextlib
import os
import stat as statmod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

import structlog

from sipcdr.clock import SYSTEM_CLOCK, Clock
from sipcdr.private import open_folder, open_private_fd
from sipcdr.sinks.base import STREAM_RECORDS, STREAM_SIGNALING

if TYPE_CHECKING:
    from sipcdr.sinks.outputs import Outputs
    from sipcdr.sinks.remote import SinkPlan
    from sipcdr.spool import Spool

SPARE_NAME: Final = "spare"
# Beside the spare while the room its release gave is kept: see the module docstring.
RELEASED_SUFFIX: Final = ".released"
# About what a large carrier's open calls need once its disk fills: the CDRs of ~20,000
# calls (~1.1 KB each), their journal records (~0.8 KB) and a checkpoint of the calls
# still open; 0.5 % of the 15 GiB the default limits ask for.
DEFAULT_SPARE_BYTES: Final = 64 * 1024 * 1024
# The file is looked at, and the free space read while it is missing, at most this often.
_CHECK_S: Final = 5.0


class SpareSpace:
    """The spare file. `ensure()` allocates it when there is room (at start and on each
    tick) and checks that it is still whole; `release()` gives it up (the spool's and
    the dialog store's `on_no_space`)."""

    def __init__(self, path: Path, size_bytes: int, clock: Clock = SYSTEM_CLOCK) -> None:
        self.path = path
        self._clock = clock
        self.size_bytes = size_bytes
        self.ready = False  # allocated, whole, on disk
        self.released = False  # given up for a full disk, not allocated again since
        # The room it gave is kept for the calls already open (see `SpareRoom`): from a
        # release until as much is free again, or the owner says it is used up
        # (`room_back`).
        self.withheld = False
        self.releases = 0
        self._checked_until = 0.0
        self._told_no_room = False
        self._told_failure = False
        self._keeps_no_blocks = False  # a copy-on-write filesystem: see the module
        self._resumed = False  # a release by an earlier run looked for
        self.marker = path.with_name(path.name + RELEASED_SUFFIX)
        self.log = structlog.get_logger("sipcdr.spare")

    def ensure(self) -> bool:
        """Allocate the spare if it is missing (or no longer whole) and the disk has room
        for it and as much again, or a quarter as much after a release; True when it is
        there. The file is looked at, at most every `_CHECK_S`: never trusted by its name
        alone. Never raises."""
        now = self._clock.monotonic()
        if now < self._checked_until:
            return self.ready
        self._checked_until = now + _CHECK_S
        if self.size_bytes <= 0:
            self._checked_until = float("inf")
            self._remove()  # switched off: the room a former setting kept is given back
            self._end_withheld()
            return False
        found = self._inspect()
        if not self._resumed:
            self._resumed = True
            self._resume_release(found)
        if found is not None and self._whole(*found):
            if not self.ready:
                self._now_ready(allocated=False)  # left by an earlier run, or put back
            return True
        if self.ready:
            self.ready = False
            # Nothing was lost, but there is no room set aside any more until it is back.
            self.log.warning(
                "spare_space_lost",
                path=str(self.path),
                note="deleted, cut short or linked from outside; allocated again with room",
            )
        held = 0 if found is None else found[1]  # resized in place: its blocks count
        try:
            stat = os.statvfs(self.path.parent)
        except OSError:
            return False
        free = stat.f_bavail * stat.f_frsize
        if self.withheld and free >= self.size_bytes:
            # As much room as it gave is free again (right after a release there is less:
            # the write that asked for it needed more than was free): the calls already
            # open have their room without keeping new ones out.
            self._end_withheld()
            self.log.info("spare_space_release_over", free_bytes=free)
        # Twice its size at first, so that setting it aside leaves the disk room; after a
        # release the disk was full anyway, and a spare back soon is worth more.
        headroom = self.size_bytes // 4 if self.released else self.size_bytes
        if free + held < self.size_bytes + headroom:
            if not self._told_no_room and not self.released:
                self._told_no_room = True
                self.log.warning(
                    "spare_space_not_allocated",
                    spare_bytes=self.size_bytes,
                    free_bytes=free,
                    note="allocated once twice its size is free",
                )
            return False
        try:
            self._allocate()
        except OSError as exc:
            self._remove()
            # The disk has room, so what the spare's release held back is over even
            # without a new one: nothing is gained by refusing calls for it.
            self._end_withheld()
            if not self._told_failure:
                self._told_failure = True
                self.log.warning("spare_space_not_allocated", error=exc.strerror or str(exc))
            return False
        self._now_ready(allocated=True)
        return True

    def _inspect(self) -> tuple[int, int] | None:
        """(size, bytes allocated) of the spare file; None when there is none to count
        on. A name that is not a regular file of its own (another link to the same
        file would keep its blocks when the spare is unlinked) is removed."""
        try:
            info = self.path.lstat()
        except OSError:
            return None
        if not statmod.S_ISREG(info.st_mode) or info.st_nlink != 1:
            with contextlib.suppress(OSError):
                self.path.unlink()
            return None
        return info.st_size, info.st_blocks * 512

    def _whole(self, size: int, allocated: int) -> bool:
        return size == self.size_bytes and (allocated >= size or self._keeps_no_blocks)

    def _now_ready(self, *, allocated: bool) -> None:
        if self.released:
            self.log.info("spare_space_restored", spare_bytes=self.size_bytes)
        elif allocated and not self._holds_blocks():
            # Copy-on-write or compressing filesystems (ZFS, btrfs) keep no blocks for
            # it: giving it up then frees nothing, and the daemon works as without.
            self._keeps_no_blocks = True
            self.log.warning("spare_space_holds_no_blocks", path=str(self.path))
        self.ready, self.released = True, False
        self._end_withheld()
        self._told_failure = False

    def _holds_blocks(self) -> bool:
        try:
            return self.path.lstat().st_blocks * 512 >= self.size_bytes
        except OSError:
            return False

    def _allocate(self) -> None:
        fd = open_private_fd(self.path, os.O_RDWR)
        try:
            # Resized in place: a smaller one gives its surplus back at once, a larger
            # one keeps the blocks it has.
            if os.fstat(fd).st_size > self.size_bytes:
                os.ftruncate(fd, self.size_bytes)
            os.posix_fallocate(fd, 0, self.size_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
        self.ready = False

    def release(self) -> bool:
        """Give the spare's room back to the disk; True when there was room to give: a
        file missing, or holding no blocks, gives none, whatever the daemon thought."""
        found = self._inspect()
        if found is not None and self._keeps_no_blocks:
            return False  # said at allocation: it holds nothing to give
        if found is None or found[1] == 0:
            if self.ready:
                self.ready = False
                self.log.warning("spare_space_lost", path=str(self.path), note="none to give up")
            return False
        try:
            self.path.unlink()
        except FileNotFoundError:
            self.ready = False
            return False
        except OSError as exc:
            self.log.error("spare_space_release_failed", error=exc.strerror or str(exc))
            return False
        self.ready = False
        self.released = self.withheld = True
        self.releases += 1
        self._checked_until = 0.0
        self._resumed = True  # this run's own release, not one to look for
        self._mark_released()
        # Nothing is lost yet: the room goes to the calls already open while new calls
        # are refused.
        self.log.warning("spare_space_released", spare_bytes=found[1])
        return True

    def room_back(self) -> None:
        """The room it gave is used up: nothing is held back for it any more; it is
        allocated again once there is room."""
        if self.withheld:
            self._end_withheld()
            self.log.info("spare_space_release_over", note="its room was used up")

    def _resume_release(self, found: tuple[int, int] | None) -> None:
        """At the first look: an earlier run gave the spare up and was stopped (or
        killed) while its room was kept; it is kept now as it was then."""
        try:
            self.marker.lstat()
        except OSError:
            return
        if found is not None and self._whole(*found):
            self._end_withheld()  # allocated again before the marker was removed
            return
        self.released = self.withheld = True
        self.log.warning(
            "spare_space_released_before_start",
            spare_bytes=self.size_bytes,
            note="its room is kept for the calls still open until as much is free again",
        )

    def _mark_released(self) -> None:
        try:
            fd = open_private_fd(self.marker, os.O_WRONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            # The marker's name, and the spare's unlink before it, are entries of the
            # folder: on disk only once the folder is synced.
            folder = open_folder(self.marker.parent)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        except OSError as exc:
            # The room is kept all the same; only a restart would not know it.
            self.log.error(
                "spare_release_not_recorded",
                path=str(self.marker),
                error=exc.strerror or str(exc),
            )

    def _end_withheld(self) -> None:
        self.withheld = False
        with contextlib.suppress(OSError):
            self.marker.unlink(missing_ok=True)

    @property
    def bytes_held(self) -> int:
        return self.size_bytes if self.ready else 0


def same_filesystem(first: Path, second: Path) -> bool:
    """Whether two existing paths are on one filesystem (a spare frees room only there)."""
    try:
        return first.stat().st_dev == second.stat().st_dev
    except OSError:
        return False


class HoldsLoops(Protocol):
    held: set[tuple[str, str]]


class SpareRoom:
    """Who gets the room the spare gives, on its disk: the CDR spool, whose refused
    write (`make_room`, its `on_no_space`) gives it up, and the calls already open. While
    that room is kept (`SpareSpace.withheld`) the signaling spool refuses records and
    the delivery loops that write to the disk (`destinations`: the JSONL file, an
    embedded PostgreSQL) wait; the daemon refuses new calls (`holds_intake`). `keep()`
    runs on the tick."""

    def __init__(self, spare: SpareSpace) -> None:
        self.spare = spare
        self.cdrs: Spool | None = None  # the CDR spool, when on the spare's filesystem
        self.signaling: Spool | None = None  # likewise the signaling spool
        # The delivery loops' holds: a `Delivery`, or what passes them to its process.
        self.delivery: HoldsLoops | None = None
        self.destinations: set[tuple[str, str]] = set()  # (sink, stream) loops held
        self._held_at_release = 0  # CDRs the spool had held in memory at the release

    def connect(self, outputs: Outputs, destinations: Mapping[SinkPlan, Path | None]) -> None:
        """Find what shares the spare's filesystem: the spools, and the sinks' folders
        (`destinations`, None for a server elsewhere)."""
        here = self.spare.path.parent
        records = outputs.spools.get(STREAM_RECORDS)
        if records is not None and same_filesystem(records.directory, here):
            self.cdrs = records
        signaling = outputs.spools.get(STREAM_SIGNALING)
        if signaling is not None and same_filesystem(signaling.directory, here):
            self.signaling = signaling
        self.delivery = outputs.delivery
        for sink, where in destinations.items():
            if where is not None and same_filesystem(where, here):
                self.destinations.update((sink.name, stream) for stream in sink.streams)
        # A release an earlier run left kept (see `SpareSpace`) holds from the start.
        self._withhold()

    def make_room(self) -> bool:
        """A write was refused for want of space: give up the spare, and from now on
        keep its room; True when there was room to give."""
        if not self.spare.release():
            return False
        if self.cdrs is not None:
            self._held_at_release = self.cdrs.stats.held
        self._withhold()
        return True

    def holds_intake(self, blocks_intake: bool) -> bool:
        """Whether new calls wait for the spare's room: only while it is kept for CDRs
        (a spool on another disk gains nothing from it) under the `block` policy."""
        return self.spare.withheld and self.cdrs is not None and blocks_intake

    def keep(self) -> None:
        """End what the spare's release holds back once its room is used up; allocate
        the spare again once the disk has room and the reserve is empty."""
        spool = self.cdrs
        try:
            if spool is not None and spool.stats.held > self._held_at_release:
                # A CDR had to wait in memory after the spare was given up: its room is
                # used up and there is nothing left to keep. New calls wait for the
                # reserve, as without a spare.
                self.spare.room_back()
            if spool is None or not spool.reserved:  # the room goes to the reserve first
                self.spare.ensure()
        finally:
            self._withhold()

    def _withhold(self) -> None:
        withheld = self.spare.withheld
        if self.signaling is not None:
            self.signaling.room_withheld = withheld
        if self.delivery is not None and self.destinations:
            if withheld:
                self.delivery.held |= self.destinations
            else:
                self.delivery.held -= self.destinations
