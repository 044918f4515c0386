"""What "auto" counts as this process's cores: CPU affinity, and a cgroup's CPU-time
quota (a container's `--cpus`, a Kubernetes CPU limit) in whole cores."""

from __future__ import annotations

import os

import pytest
from sipcdr.config import cores
from sipcdr.config.cores import cgroup_cpu_quota, usable_cores

V2_MOUNTS = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNTS = (
    "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755\n"
    "33 31 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
)


def reader(files: dict[str, str]) -> cores.ReadText:
    return files.get


def test_a_cgroup_v2_quota_is_read_from_the_process_cgroup() -> None:
    read = reader(
        {
            "/proc/self/cgroup": "0::/system.slice/sipcdr.service\n",
            "/proc/self/mountinfo": V2_MOUNTS,
            "/sys/fs/cgroup/system.slice/sipcdr.service/cpu.max": "150000 100000\n",
        }
    )
    assert cgroup_cpu_quota(read) == 1.5


def test_the_tightest_quota_up_the_tree_counts() -> None:
    """systemd's CPUQuota on a slice limits every service under it."""
    read = reader(
        {
            "/proc/self/cgroup": "0::/capture.slice/sipcdr.service\n",
            "/proc/self/mountinfo": V2_MOUNTS,
            "/sys/fs/cgroup/capture.slice/sipcdr.service/cpu.max": "max 100000\n",
            "/sys/fs/cgroup/capture.slice/cpu.max": "100000 100000\n",
            "/sys/fs/cgroup/cpu.max": "400000 100000\n",
        }
    )
    assert cgroup_cpu_quota(read) == 1.0


def test_no_quota_anywhere_is_none() -> None:
    read = reader(
        {
            "/proc/self/cgroup": "0::/user.slice\n",
            "/proc/self/mountinfo": V2_MOUNTS,
            "/sys/fs/cgroup/user.slice/cpu.max": "max 100000\n",
        }
    )
    assert cgroup_cpu_quota(read) is None
    assert cgroup_cpu_quota(reader({})) is None  # no /proc: no quota known


def test_a_cgroup_v1_quota_under_a_container_root() -> None:
    """Docker without a cgroup namespace: the mount's root is the container's cgroup."""
    mounts = V1_MOUNTS.replace(" / /sys/fs/cgroup/cpu,", " /docker/abc /sys/fs/cgroup/cpu,")
    read = reader(
        {
            "/proc/self/cgroup": "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n",
            "/proc/self/mountinfo": mounts,
            "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "200000\n",
            "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        }
    )
    assert cgroup_cpu_quota(read) == 2.0


def test_a_cgroup_v1_quota_of_minus_one_is_none() -> None:
    read = reader(
        {
            "/proc/self/cgroup": "4:cpu,cpuacct:/\n",
            "/proc/self/mountinfo": V1_MOUNTS,
            "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
            "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        }
    )
    assert cgroup_cpu_quota(read) is None


@pytest.mark.parametrize(
    ("affinity", "quota", "expected"),
    [(4, None, 4), (4, 1.5, 1), (4, 2.0, 2), (4, 2.9, 2), (2, 8.0, 2), (4, 0.5, 1)],
)
def test_usable_cores_are_the_fewer_of_affinity_and_whole_quota(
    monkeypatch: pytest.MonkeyPatch, affinity: int, quota: float | None, expected: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(affinity)))
    monkeypatch.setattr(cores, "cgroup_cpu_quota", lambda _read: quota)
    assert usable_cores() == expected


def test_this_machine_answers_without_error() -> None:
    """Whatever this machine's cgroups say, the answer is at least one core and no more
    than its affinity allows."""
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))


def test_a_mount_point_with_a_space_is_read_as_the_kernel_escapes_it() -> None:
    """mountinfo writes a space in a path as \\040; /proc/self/cgroup writes it as is."""
    mounts = "30 23 0:26 /pod\\040a /sys/fs/cgroup\\040x rw - cgroup2 cgroup2 rw\n"
    read = reader(
        {
            "/proc/self/cgroup": "0::/pod a/sipcdr\n",
            "/proc/self/mountinfo": mounts,
            "/sys/fs/cgroup x/sipcdr/cpu.max": "100000 100000\n",
        }
    )
    assert cgroup_cpu_quota(read) == 1.0


def test_a_mount_of_another_part_of_the_tree_is_passed_over() -> None:
    mounts = (
        "30 23 0:26 /other /mnt/other rw - cgroup2 cgroup2 rw\n"
        "31 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    )
    read = reader(
        {
            "/proc/self/cgroup": "0::/sipcdr.service\n",
            "/proc/self/mountinfo": mounts,
            "/sys/fs/cgroup/sipcdr.service/cpu.max": "100000 100000\n",
        }
    )
    assert cgroup_cpu_quota(read) == 1.0


def test_a_cgroup_outside_the_namespace_root_counts_no_quota_of_another() -> None:
    """Moved out of its cgroup namespace's root, a process sees `/../x`: the files
    under the mount are not its cgroup's nor its parents'."""
    read = reader(
        {
            "/proc/self/cgroup": "0::/../sibling\n",
            "/proc/self/mountinfo": V2_MOUNTS,
            "/sys/fs/cgroup/cpu.max": "100000 100000\n",
        }
    )
    assert cgroup_cpu_quota(read) is None


@pytest.mark.parametrize("text", ["max 100000", "abc def", "\u00b2 100000", "100000 0", ""])
def test_a_quota_file_that_says_no_number_is_no_quota(text: str) -> None:
    read = reader(
        {
            "/proc/self/cgroup": "0::/a\n",
            "/proc/self/mountinfo": V2_MOUNTS,
            "/sys/fs/cgroup/a/cpu.max": text,
        }
    )
    assert cgroup_cpu_quota(read) is None


def test_junk_in_the_proc_files_is_no_quota() -> None:
    read = reader(
        {
            "/proc/self/cgroup": "garbage\n::\n0\n:cpu:\n",
            "/proc/self/mountinfo": "- - -\n1 2 3\n a - b\n",
        }
    )
    assert cgroup_cpu_quota(read) is None
