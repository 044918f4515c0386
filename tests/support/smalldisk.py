"""Small real filesystems for the tests of a full disk (fixture `small_disk`).

`small_disk(path, size_bytes, inodes=None)` mounts a tmpfs of that size (and, if
given, that many inodes) at `path` and unmounts it in the test's teardown;
`fill(path, leave_bytes)` writes a filler file until only `leave_bytes` are free, and
deleting that file gives the space back. Mounting needs
root, which the suite has (in CI as here); a test that cannot mount fails, it does
not skip.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest


class SmallDisk(Protocol):
    def __call__(self, path: Path, size_bytes: int, inodes: int | None = None) -> Path: ...


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def fill(path: Path, leave_bytes: int, name: str = "filler") -> Path:
    """A filler file under `path` that leaves about `leave_bytes` free (to a page)."""
    filler = path / name
    with filler.open("ab") as handle:
        handle.write(b"\0" * max(0, free_bytes(path) - leave_bytes))
    return filler


@pytest.fixture
def small_disk() -> Iterator[SmallDisk]:
    mounted: list[Path] = []

    def mount(path: Path, size_bytes: int, inodes: int | None = None) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size_bytes},mode=0700"
        if inodes is not None:
            options += f",nr_inodes={inodes}"
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs at {path} (the suite runs as root): {done.stderr}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        # Lazy: a process the test started may still hold a file open there.
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
