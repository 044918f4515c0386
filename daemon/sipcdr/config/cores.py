"""How many cores this process may use: what "auto" settings count.

A container is limited two ways, and the host's core count tells neither: by CPU
affinity (`taskset`, `docker --cpuset-cpus`) and by a CPU-time quota (`docker --cpus`,
a Kubernetes CPU limit: the cgroup's `cpu.max`, or `cpu.cfs_quota_us` under cgroup v1).
A quota is counted down to whole cores: on one and a half cores' worth of time, two
busy processes run together and are then both throttled for the rest of each period,
capture's datagrams waiting in the kernel meanwhile; only a whole second core was
measured to pay for a second process.

Nothing here raises: it runs at every start, and what cannot be read is no limit.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath

ReadText = Callable[[str], "str | None"]
# /proc/self/mountinfo writes a space, tab, newline and backslash in a path as \ooo.
_MOUNTINFO_ESCAPE = re.compile(r"\\([0-7]{3})")


def usable_cores() -> int:
    """The whole cores this process may run on: the fewer of its CPU affinity and its
    cgroups' CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on this platform
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(_read_text)
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return cores


def cgroup_cpu_quota(read: ReadText) -> float | None:
    """The tightest CPU-time quota of this process's cgroup and its parents, in cores;
    None when there is none (or no cgroup file can be read)."""
    membership = read("/proc/self/cgroup")
    mounts = read("/proc/self/mountinfo")
    if membership is None or mounts is None:
        return None
    limits = [
        limit
        for mount_point, folder, version in _cpu_folders(membership, mounts)
        for limit in _limits_up_from(mount_point, folder, version, read)
    ]
    return min(limits) if limits else None


def _cpu_folders(
    membership: str, mounts: str
) -> Iterator[tuple[PurePosixPath, PurePosixPath, int]]:
    """Each cgroup holding CPU controller files: its mount point, its folder below it,
    and its cgroup version."""
    wanted: dict[int, PurePosixPath] = {}
    for line in membership.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not path.startswith("/") or ".." in PurePosixPath(path).parts:
            continue  # outside this cgroup namespace's root: not a folder seen here
        if hierarchy == "0" and controllers == "":
            wanted.setdefault(2, PurePosixPath(path))
        elif "cpu" in controllers.split(","):
            wanted.setdefault(1, PurePosixPath(path))
    for line in mounts.splitlines():
        mount, separator, kind = line.partition(" - ")
        fields, kinds = mount.split(), kind.split()
        if not separator or len(fields) < 5 or len(kinds) < 3:
            continue
        if kinds[0] == "cgroup2":
            version = 2
        elif kinds[0] == "cgroup" and "cpu" in kinds[2].split(","):
            version = 1
        else:
            continue
        held = wanted.get(version)
        root = PurePosixPath(_unescape(fields[3]))
        # Inside a container the mount's root is the container's own cgroup, and its
        # path in /proc/self/cgroup starts with it; outside, the root is "/". A mount
        # of another part of the tree is passed over for one that holds the path.
        if held is not None and held.is_relative_to(root):
            del wanted[version]
            yield PurePosixPath(_unescape(fields[4])), held.relative_to(root), version


def _unescape(field: str) -> str:
    return _MOUNTINFO_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def _limits_up_from(
    mount_point: PurePosixPath, folder: PurePosixPath, version: int, read: ReadText
) -> Iterator[float]:
    """The quota set on `folder` and on each parent up to the mount point (a parent's
    quota limits every cgroup below it)."""
    for place in (folder, *folder.parents):
        limit = _quota_at(mount_point / place, version, read)
        if limit is not None:
            yield limit


def _quota_at(folder: PurePosixPath, version: int, read: ReadText) -> float | None:
    if version == 2:
        quota, _, period = (read(str(folder / "cpu.max")) or "").strip().partition(" ")
    else:
        quota = (read(str(folder / "cpu.cfs_quota_us")) or "").strip()
        period = (read(str(folder / "cpu.cfs_period_us")) or "").strip()
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None  # "max", or nothing readable: no quota here
    if quota_us <= 0 or period_us <= 0:
        return None  # -1: no quota here
    return quota_us / period_us


def _read_text(path: str) -> str | None:
    try:
        # Non-blocking: a FIFO put where a cgroup file should be must not hang a start.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            data = os.read(fd, 4 << 20)
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return None
    # The kernel's paths are bytes: decoded as the file system's names are.
    return os.fsdecode(data)
