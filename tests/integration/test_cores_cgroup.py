"""A process in a cgroup with a CPU-time quota of one core runs delivery in one
process, read from the kernel's own cgroup files (`[spool] delivery_processes` auto)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ASK = (
    "from sipcdr.config import load_config\n"
    "from sipcdr.config.cores import usable_cores\n"
    "print(usable_cores(), load_config(None, {}).spool.delivery_apart)\n"
)


def _unavailable(message: str) -> None:
    """A CI run must not pass by skipping what it exists to test."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _cpu_controller() -> tuple[Path, int]:
    """Where a child cgroup with a CPU quota can be made: cgroup v1's cpu hierarchy,
    or v2's root when it offers the cpu controller."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount, _, kind = line.partition(" - ")
        fields, kinds = mount.split(), kind.split()
        if kinds[0] == "cgroup" and "cpu" in kinds[2].split(","):
            return Path(fields[4]), 1
        if kinds[0] == "cgroup2":
            offered = (Path(fields[4]) / "cgroup.controllers").read_text().split()
            if "cpu" in offered:
                return Path(fields[4]), 2
    _unavailable("no cgroup hierarchy with the cpu controller is mounted")
    raise AssertionError("unreachable")


@pytest.fixture
def one_core_cgroup() -> Iterator[Path]:
    if os.geteuid() != 0:
        _unavailable("making a cgroup needs root")
    root, version = _cpu_controller()
    folder = root / f"sipcdr-test-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir()
    except OSError as exc:
        _unavailable(f"cannot make a cgroup under {root}: {exc}")
    try:
        if version == 1:
            (folder / "cpu.cfs_period_us").write_text("100000")
            (folder / "cpu.cfs_quota_us").write_text("100000")
        else:
            (folder / "cpu.max").write_text("100000 100000")
        yield folder
    finally:
        folder.rmdir()


def ask(cgroup: Path | None) -> tuple[int, bool]:
    # The child moves itself into the cgroup before it asks (then exits, leaving it empty).
    enter = "" if cgroup is None else f"open({str(cgroup / 'cgroup.procs')!r}, 'w').write('0')\n"
    done = subprocess.run(
        [sys.executable, "-c", enter + ASK],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    cores, apart = done.stdout.split()
    return int(cores), apart == "True"


def test_a_one_core_quota_counts_as_one_core(one_core_cgroup: Path) -> None:
    cores, apart = ask(None)
    if cores < 2:
        _unavailable("this machine gives the tests one core")
    assert apart
    assert ask(one_core_cgroup) == (1, False)
