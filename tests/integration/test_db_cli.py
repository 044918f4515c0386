"""`sipcdr db migrate` as an operator runs it: a subprocess configured by environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemonproc import daemon_environ
from sipcdr.storage.migrations import load_migrations
from test_import_delivery import HeldMigrationLock

pytestmark = pytest.mark.integration

# What a first `sipcdr db migrate` prints: every shipped migration, in order.
APPLIED = "".join(f"applied {migration.name}\n" for migration in load_migrations())

# The command starts Python, connects and migrates; an embedded server adds its start.
COMMAND_TIMEOUT_S = 60.0


def db_migrate(workdir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sipcdr.cli", "db", "migrate"],
        cwd=workdir,
        env=daemon_environ(**env),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def test_migrate_applies_then_reports_current(pg_dsn: str, tmp_path: Path) -> None:
    first = db_migrate(tmp_path, SIPCDR_SINKS__POSTGRES__DSN=pg_dsn)
    assert (first.returncode, first.stdout) == (0, APPLIED), first.stderr
    second = db_migrate(tmp_path, SIPCDR_SINKS__POSTGRES__DSN=pg_dsn)
    assert (second.returncode, second.stdout) == (0, "schema is current\n"), second.stderr


def test_migrate_embedded_server_under_state_dir(open_tmp_path: Path) -> None:
    state = open_tmp_path / "state"
    env = {"SIPCDR_SINKS__POSTGRES__DSN": "embedded", "SIPCDR_STATE__DIR": str(state)}
    first = db_migrate(open_tmp_path, **env)
    assert (first.returncode, first.stdout) == (0, APPLIED), first.stderr
    assert (state / "pg" / "PG_VERSION").exists()
    # The server was started for the command only, and is stopped again.
    assert not (state / "pg" / "postmaster.pid").exists()
    second = db_migrate(open_tmp_path, **env)
    assert (second.returncode, second.stdout) == (0, "schema is current\n"), second.stderr


def test_migrate_with_postgres_disabled_is_a_usage_error(tmp_path: Path) -> None:
    result = db_migrate(tmp_path, SIPCDR_SINKS__POSTGRES__DSN="")
    assert result.returncode == 2
    assert "PostgreSQL is disabled" in result.stderr


def test_migrate_unreachable_server_is_one_clear_line(tmp_path: Path) -> None:
    dsn = "postgresql://sipcdr:s3cret@127.0.0.1:1/cdrs"
    result = db_migrate(tmp_path, SIPCDR_SINKS__POSTGRES__DSN=dsn)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sipcdr: db migrate: cannot connect to postgresql://sipcdr:")
    assert "127.0.0.1:1/cdrs" in lines[0]
    assert "s3cret" not in result.stderr


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://sipcdr:s3cret@db.example.net:54x2/cdrs",
        "postgresql://sipcdr:s3cret@[2001:db8::1/cdrs",
        "postgresql://sipcdr:s3cret@[2001:db8::zz]:5432/cdrs",
    ],
)
def test_migrate_with_a_malformed_dsn_is_one_clear_line(tmp_path: Path, dsn: str) -> None:
    result = db_migrate(tmp_path, SIPCDR_SINKS__POSTGRES__DSN=dsn)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    # A refused DSN is named by its scheme alone: its parts are what is in doubt.
    assert lines[0].startswith("sipcdr: configuration: sinks.postgres.dsn = 'postgresql://...'")
    assert "SIPCDR_SINKS__POSTGRES__DSN" in lines[0]
    assert "s3cret" not in result.stderr
    assert result.stdout == ""


def test_migrate_with_a_host_that_does_not_resolve_is_one_clear_line(tmp_path: Path) -> None:
    dsn = "postgresql://sipcdr:s3cret@no-such-host.invalid:5432/cdrs"
    result = db_migrate(tmp_path, SIPCDR_SINKS__POSTGRES__DSN=dsn)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sipcdr: db migrate: cannot connect to postgresql://sipcdr:***@")
    assert "s3cret" not in result.stderr


def test_sigterm_stops_a_migration_that_waits_for_the_lock(pg_dsn: str, tmp_path: Path) -> None:
    """Another session holds the migrations' lock: SIGTERM (a service manager's stop)
    ends the waiting command with its own line and exit 143, not by the signal."""
    holder = HeldMigrationLock(pg_dsn)
    try:
        with subprocess.Popen(
            [sys.executable, "-m", "sipcdr.cli", "db", "migrate"],
            cwd=tmp_path,
            env=daemon_environ(SIPCDR_SINKS__POSTGRES__DSN=pg_dsn),
            stderr=subprocess.PIPE,
            text=True,
        ) as migrating:
            time.sleep(3.0)  # started, connected, waiting for the lock
            assert migrating.poll() is None
            migrating.send_signal(signal.SIGTERM)
            _, stderr = migrating.communicate(timeout=30)
        assert migrating.returncode == 143, stderr[-3000:]
        assert stderr.endswith("sipcdr: db migrate: terminated\n")
    finally:
        holder.release()


def _server_programs_of(data_dir: Path) -> list[str]:
    """The command lines of running programs that name `data_dir` (initdb, pg_ctl, the
    server)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and str(data_dir).encode() in b" ".join(args):
            found.append(b" ".join(args).decode(errors="replace"))
    return found


@pytest.mark.parametrize("signals", [1, 2, 3])
def test_sigterm_to_the_group_while_the_embedded_server_starts_leaves_none_running(
    open_tmp_path: Path, signals: int
) -> None:
    """`timeout` and a terminal signal the whole process group: pg_ctl, started by the
    command, must not die between starting the server and the command holding it, or
    the server runs on with nobody to stop it. Nor do a second and a third SIGTERM,
    though the third closes the event loop before the start is over: the thread that
    starts the server has already set up its release at exit."""
    state = open_tmp_path / "state"
    data_dir = state / "pg"
    with subprocess.Popen(
        [sys.executable, "-m", "sipcdr.cli", "db", "migrate"],
        cwd=open_tmp_path,
        env=daemon_environ(SIPCDR_SINKS__POSTGRES__DSN="embedded", SIPCDR_STATE__DIR=str(state)),
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as migrating:
        deadline = time.monotonic() + 60
        while not any(
            "pg_ctl" in line and "start" in line for line in _server_programs_of(data_dir)
        ):
            assert time.monotonic() < deadline and migrating.poll() is None
            time.sleep(0.01)
        for _ in range(signals):
            os.killpg(migrating.pid, signal.SIGTERM)
            time.sleep(0.05)
        _, stderr = migrating.communicate(timeout=60)
    assert migrating.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "never retrieved" not in stderr, stderr[-3000:]
    deadline = time.monotonic() + 15
    while _server_programs_of(data_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _server_programs_of(data_dir) == []
