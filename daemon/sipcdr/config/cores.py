"""How many cores this process may use: what "auto" settings count.

A container is limited two ways, and the host's core count tells neither: by CPU
affinity (`taskset`, `docker --cpuset-cpus`) and by a CPU-time quota (`docker --cpus`,
a Kubernetes CPU limit: the cgroup's `cpu.max`, or `cpu.cfs_quota_us` under cgroup v1).
A quota is counted down to whole cores: two processes on one and a half cores' worth of
time take turns much as on one, where a second process measured slower than one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath

ReadText = Callable[[str], "str | None"]


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
    wanted: dict[int, str] = {}
    for line in membership.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            wanted.setdefault(2, path)
        elif "cpu" in controllers.split(","):
            wanted.setdefault(1, path)
    for line in mounts.splitlines():
        fields = line.split(" - ", 1)
        if len(fields) != 2:
            continue
        mount = fields[0].split()
        kind = fields[1].split()
        if len(mount) < 5 or len(kind) < 3:
            continue
        root, mount_point = PurePosixPath(mount[3]), PurePosixPath(mount[4])
        if kind[0] == "cgroup2":
            version = 2
        elif kind[0] == "cgroup" and "cpu" in kind[2].split(","):
            version = 1
        else:
            continue
        path = wanted.pop(version, "")
        # Inside a container the mount's root is the container's own cgroup, and its
        # path in /proc/self/cgroup starts with it; outside, the root is "/".
        if path and PurePosixPath(path).is_relative_to(root):
            yield mount_point, PurePosixPath(path).relative_to(root), version


def _limits_up_from(
    mount_point: PurePosixPath, folder: PurePosixPath, version: int, read: ReadText
) -> Iterator[float]:
    """The quota set on `folder` and on each parent up to the mount point."""
    for place in (folder, *folder.parents):
        limit = _quota_at(mount_point / place, version, read)
        if limit is not None:
            yield limit


def _quota_at(folder: PurePosixPath, version: int, read: ReadText) -> float | None:
    if version == 2:
        text = read(str(folder / "cpu.max"))
        if text is None:
            return None
        quota, _, period = text.strip().partition(" ")
    else:
        quota = (read(str(folder / "cpu.cfs_quota_us")) or "").strip()
        period = (read(str(folder / "cpu.cfs_period_us")) or "").strip()
    if not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None  # "max", -1: no quota here
    return int(quota) / int(period)


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            return file.read(1 << 20)
    except OSError:
        return None
