"""Large freed blocks go back to the system: the daemon's allocator setting, on which
the fraud detectors' memory bound under a spray depends (benchmarks/fraud.py)."""

from __future__ import annotations

import platform

import pytest
from sipcdr.limits import return_large_blocks


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_glibc_takes_the_setting() -> None:
    assert return_large_blocks() is True
