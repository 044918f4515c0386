"""A wheel of sipcdr, installed the plain way (not editable) into a fresh virtualenv,
is complete: it migrates a database and imports a capture into PostgreSQL with
nothing from the source tree. Its runtime files (migrations, fraud data) are package
data, read through importlib.resources.

The wheel is built pure (SIPCDR_PURE_PYTHON): what it must carry besides the modules
is the same either way, and the compiled build takes minutes (`make` builds it, and
tests/integration/test_hotpath.py checks it). Dependencies come from the package
registry as `make` installs them, through pip's cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import asyncpg
import pytest
from daemonproc import daemon_environ
from pcapdata import require_shared_data
from pgserver import run_sync
from sipcdr.storage.migrations import load_migrations

pytestmark = pytest.mark.integration

# What a first `sipcdr db migrate` prints: every shipped migration, in order.
APPLIED = "".join(f"applied {migration.name}\n" for migration in load_migrations())

ROOT = Path(__file__).resolve().parents[2]
CAPTURE = "heplify-sip_ipv4_tcp_fragmented.pcap"  # 37 calls (test_import_captures.py)
STEP_TIMEOUT_S = 240.0
BUILD_LEFTOVERS = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")

# What `sipcdr db migrate` prints on an empty database: every shipped migration.
APPLIED = "".join(f"applied {m.name}\n" for m in load_migrations())


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, f"{args[:4]} failed:\n{result.stdout}\n{result.stderr}"
    return result


def outside_the_source_tree(**env: str) -> dict[str, str]:
    """The environment of an operator's shell: no path into the source tree."""
    environ = daemon_environ(**env)
    environ.pop("PYTHONPATH", None)
    environ.pop("VIRTUAL_ENV", None)
    return environ


async def cdr_ids(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [str(row["cdr_id"]) for row in await conn.fetch("SELECT cdr_id FROM cdrs")]
    finally:
        await conn.close()


def test_a_wheel_installed_plainly_migrates_and_imports_into_postgresql(
    tmp_path: Path, pg_dsn: str
) -> None:
    capture = require_shared_data() / "pcaps" / CAPTURE
    # A clean copy of what the repository holds: a build folder or compiled modules
    # left in the working tree must not slip into the wheel and hide a missing file.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "daemon", source / "daemon", ignore=BUILD_LEFTOVERS)
    wheels = tmp_path / "wheels"
    build_env = {**os.environ, "SIPCDR_PURE_PYTHON": "1"}
    run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(wheels)],
        tmp_path, build_env)  # fmt: skip
    (wheel,) = wheels.glob("sipcdr-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {
        "sipcdr/storage/sql/0001_initial.sql",
        "sipcdr/storage/sql/0002_privacy.sql",
        "sipcdr/fraud/data/nsn_lengths.csv",
        "sipcdr/fraud/data/high_risk_prefixes.csv",
        "sipcdr/sip/_scan.pyi",
        "sipcdr/py.typed",
    } <= names

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path, dict(os.environ))
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", str(wheel)], tmp_path, dict(os.environ))

    workdir = tmp_path / "operator"
    workdir.mkdir()
    env = outside_the_source_tree(SIPCDR_SINKS__POSTGRES__DSN=pg_dsn)
    where = run([str(python), "-c", "import sipcdr; print(sipcdr.__file__)"], workdir, env)
    assert Path(where.stdout.strip()).is_relative_to(venv)

    sipcdr = str(venv / "bin" / "sipcdr")
    migrated = run([sipcdr, "db", "migrate"], workdir, env)
    assert migrated.stdout == APPLIED
    run([sipcdr, "import", str(capture)], workdir, env)

    stored = run_sync(lambda: cdr_ids(pg_dsn))
    written = (workdir / "var" / "cdrs.jsonl").read_text().splitlines()
    assert len(stored) == len(written) == 37
    assert sorted(stored) == sorted(line.split('"cdr_id":"', 1)[1][:36] for line in written)
