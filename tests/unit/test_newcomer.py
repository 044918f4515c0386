"""What a newcomer runs first: `make run` installs the daemon without the development
tools, which `make test` still installs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def planned(target: str, *variables: str) -> str:
    """The commands `make` would run for `target`, all of them (-B), none run (-n)."""
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is needed: it is how the project is set up")
    done = subprocess.run(
        [make, "--no-print-directory", "-n", "-B", target, *variables],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_make_run_installs_the_daemon_without_the_development_tools() -> None:
    commands = planned("run")
    assert "pip install --quiet -e .\n" in commands
    assert "[dev]" not in commands
    assert commands.rstrip().endswith("sipcdr run")


def test_make_run_passes_a_config_file() -> None:
    assert planned("run", "CONFIG=sipcdr.toml").rstrip().endswith("sipcdr run -c sipcdr.toml")


def test_make_test_installs_the_development_tools() -> None:
    assert "pip install --quiet -e '.[dev]'" in planned("test")
