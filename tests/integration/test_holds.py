"""Legal holds against a real PostgreSQL: held rows survive the drop of their
partition, leave once the hold ends, and a hold longer than the cap is refused."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from daemonproc import daemon_environ
from privacydata import NOW, alert, cdr, sip_message, write
from sipcdr.privacy.holds import add_hold, list_holds, release_hold
from sipcdr.privacy.plan import HoldRefused
from sipcdr.privacy.retention import run_retention
from sipcdr.privacy.settings import RetentionSettings
from sipcdr.storage.migrations import migrate

pytestmark = pytest.mark.integration

SETTINGS = RetentionSettings()
SUBJECT = "4940555666"
OTHER = "4940111222"
COMMAND_TIMEOUT_S = 60.0


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_dsn)
    await migrate(connection)
    yield connection
    await connection.close()


def ago(days: int) -> datetime:
    return NOW - timedelta(days=days)


async def populate(dsn: str) -> None:
    """Two calls 200 days ago (past CDR and signaling retention), one of the subject."""
    await write(
        dsn,
        [
            cdr(1, ago(200), caller=SUBJECT, call_id="held-call"),
            cdr(2, ago(200), caller=OTHER, call_id="other-call", trunk="carrier-b"),
        ],
        [sip_message(ago(200), "held-call", caller=SUBJECT), sip_message(ago(200), "other-call")],
        [alert(ago(400), SUBJECT), alert(ago(400), OTHER)],
    )


async def rows(conn: asyncpg.Connection, query: str) -> set[str]:
    return {row[0] for row in await conn.fetch(query)}


async def test_held_rows_survive_the_drop_and_go_after_the_hold_ends(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    await populate(pg_dsn)
    hold_id = await add_hold(
        conn,
        kind="number",
        subject="+49 40 555-666",
        reason="case 17",
        starts_at=None,
        expires_at=NOW + timedelta(days=30),
        tables=("cdrs", "sip_messages", "fraud_alerts"),
        signaling_max_days=365,
        operator="officer",
        now=NOW - timedelta(days=1),
    )
    dry = await run_retention(conn, SETTINGS, dry_run=True, operator="t", now=NOW)
    assert sum(item.held_rows for item in dry.dropped) == 3
    assert await rows(conn, "SELECT call_id FROM cdrs_held") == set()  # dry: nothing moved

    report = await run_retention(conn, SETTINGS, dry_run=False, operator="t", now=NOW)
    assert sum(item.held_rows for item in report.dropped) == 3
    assert await rows(conn, "SELECT call_id FROM cdrs") == set()
    assert await rows(conn, "SELECT call_id FROM cdrs_held") == {"held-call"}
    assert await rows(conn, "SELECT call_id FROM sip_messages_held") == {"held-call"}
    assert await rows(conn, "SELECT subject FROM fraud_alerts_held") == {SUBJECT}
    assert await rows(conn, "SELECT hold_id::text FROM cdrs_held") == {str(hold_id)}

    # Still in force a day later: kept.
    await run_retention(conn, SETTINGS, dry_run=False, operator="t", now=NOW + timedelta(days=1))
    assert await rows(conn, "SELECT call_id FROM cdrs_held") == {"held-call"}
    # Expired: the next run removes them.
    await run_retention(conn, SETTINGS, dry_run=False, operator="t", now=NOW + timedelta(days=31))
    for table in ("cdrs_held", "sip_messages_held", "fraud_alerts_held"):
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table


async def test_a_released_hold_lets_its_rows_go_and_is_audited(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    await populate(pg_dsn)
    hold_id = await add_hold(
        conn,
        kind="trunk",
        subject="carrier-b",
        reason="case 18",
        starts_at=None,
        expires_at=NOW + timedelta(days=60),
        tables=("cdrs", "sip_messages"),
        signaling_max_days=365,
        operator="officer",
        now=NOW - timedelta(days=1),
    )
    await run_retention(conn, SETTINGS, dry_run=False, operator="t", now=NOW)
    assert await rows(conn, "SELECT call_id FROM cdrs_held") == {"other-call"}
    assert await rows(conn, "SELECT call_id FROM sip_messages_held") == {"other-call"}
    assert await conn.fetchval("SELECT count(*) FROM fraud_alerts_held") == 0  # not covered
    assert await release_hold(conn, hold_id, "officer2", now=NOW)
    assert not await release_hold(conn, hold_id, "officer2", now=NOW)
    assert await list_holds(conn, include_ended=False, now=NOW) == []
    await run_retention(conn, SETTINGS, dry_run=False, operator="t", now=NOW + timedelta(hours=1))
    assert await conn.fetchval("SELECT count(*) FROM cdrs_held") == 0
    actions = await conn.fetch("SELECT actor, action, subject FROM audit_log ORDER BY id")
    assert [(r["actor"], r["action"]) for r in actions] == [
        ("officer", "hold.add"),
        ("t", "retention.run"),
        ("officer2", "hold.release"),
        ("t", "retention.run"),
    ]


async def test_a_signaling_hold_past_the_cap_is_refused_with_the_reason(
    conn: asyncpg.Connection,
) -> None:
    with pytest.raises(HoldRefused, match="at most 180 days"):
        await add_hold(
            conn,
            kind="number",
            subject=SUBJECT,
            reason="case",
            starts_at=None,
            expires_at=NOW + timedelta(days=181),
            tables=("cdrs", "sip_messages"),
            signaling_max_days=180,
            operator="o",
            now=NOW,
        )
    # Without signaling, a long hold is allowed.
    await add_hold(
        conn,
        kind="number",
        subject=SUBJECT,
        reason="case",
        starts_at=None,
        expires_at=NOW + timedelta(days=3 * 365),
        tables=("cdrs",),
        signaling_max_days=180,
        operator="o",
        now=NOW,
    )
    assert await conn.fetchval("SELECT count(*) FROM holds") == 1
    # The database refuses a signaling hold past 12 months from anyone.
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(
            "INSERT INTO holds (subject, reason, expires_at, created_by) "
            "VALUES ('1', 'r', now() + interval '13 months', 'x')"
        )


def sipcdr(workdir: Path, dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sipcdr.cli", *args],
        cwd=workdir,
        env=daemon_environ(SIPCDR_SINKS__POSTGRES__DSN=dsn, SIPCDR_SINKS__JSONL__PATH=""),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def test_hold_commands(pg_dsn: str, tmp_path: Path) -> None:
    assert sipcdr(tmp_path, pg_dsn, "db", "migrate").returncode == 0
    until = (datetime.now().astimezone() + timedelta(days=400)).date().isoformat()
    refused = sipcdr(
        tmp_path,
        pg_dsn,
        "hold",
        "add",
        "--number",
        "+4940555666",
        "--reason",
        "c1",
        "--until",
        until,
    )
    assert refused.returncode == 3, refused.stderr
    assert "a hold on signaling lasts at most 365 days" in refused.stderr
    placed = sipcdr(
        tmp_path,
        pg_dsn,
        "hold",
        "add",
        "--call-id",
        "abc@x",
        "--reason",
        "c2",
        "--until",
        until,
        "--tables",
        "cdrs",
        "--operator",
        "jane",
    )
    assert (placed.returncode, placed.stdout) == (0, "hold 1 placed\n"), placed.stderr
    listed = sipcdr(tmp_path, pg_dsn, "hold", "list")
    assert "call_id abc@x" in listed.stdout and "jane: c2" in listed.stdout
    released = sipcdr(tmp_path, pg_dsn, "hold", "release", "1")
    assert released.returncode == 0, released.stderr
    assert sipcdr(tmp_path, pg_dsn, "hold", "list").stdout == ""
    verify = sipcdr(tmp_path, pg_dsn, "audit", "verify")
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.startswith("audit log intact: 2 rows")
