"""Retention against a real PostgreSQL: partitions dropped exactly when past their
table's (or their trunk's) period, nothing changed by a dry run, the run audited."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType

import asyncpg
import pytest
from daemonproc import daemon_environ
from privacydata import NOW, alert, cdr, sip_message, write
from sipcdr.privacy.retention import RETENTION_LOCK_KEY, RetentionBusy, run_retention
from sipcdr.privacy.settings import RetentionSettings
from sipcdr.storage.migrations import migrate

pytestmark = pytest.mark.integration

CLASSES = {"long": 400, "short": 30}
SETTINGS = RetentionSettings(trunk_cdr_days=MappingProxyType(CLASSES))


def day(n: int) -> str:
    """The partition name part of the day `n` days before NOW."""
    return days_ago(n).strftime("%Y%m%d")


def days_ago(n: int, hour: int = 12) -> datetime:
    return (NOW - timedelta(days=n)).replace(hour=hour)


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_dsn)
    await migrate(connection)
    yield connection
    await connection.close()


async def call_ids(conn: asyncpg.Connection, table: str = "cdrs") -> set[str]:
    return {row[0] for row in await conn.fetch(f"SELECT call_id FROM {table}")}


async def populate(dsn: str) -> None:
    cdrs = [
        # default class: 180 days. The partition of day d goes once d < today - 180.
        cdr(1, days_ago(181, hour=23), call_id="default-181"),
        cdr(2, days_ago(180, hour=0), call_id="default-180"),
        cdr(3, days_ago(401), trunk="long", call_id="long-401"),
        cdr(4, days_ago(181), trunk="long", call_id="long-181"),
        cdr(5, days_ago(31), trunk="short", call_id="short-31"),
        cdr(6, days_ago(30), trunk="short", call_id="short-30"),
        cdr(7, days_ago(181), trunk="unknown", call_id="unknown-181"),  # default class
    ]
    messages = [
        sip_message(days_ago(91), "sip-91"),
        sip_message(days_ago(90, hour=0), "sip-90"),
    ]
    alerts = [alert(days_ago(366), "a-366"), alert(days_ago(365), "a-365")]
    await write(dsn, cdrs, messages, alerts, retention_classes=CLASSES)


async def snapshot(conn: asyncpg.Connection) -> tuple[set[str], ...]:
    tables = await conn.fetch(
        "SELECT relname FROM pg_class WHERE relname ~ '^(cdrs|sip_messages|fraud_alerts)_p'"
    )
    return (
        await call_ids(conn),
        await call_ids(conn, "sip_messages"),
        {row[0] for row in await conn.fetch("SELECT subject FROM fraud_alerts")},
        {row[0] for row in tables},
    )


async def test_cdrs_are_stored_under_their_trunks_retention_class(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    await populate(pg_dsn)
    rows = await conn.fetch(
        "SELECT call_id, retention_days, tableoid::regclass::text AS t FROM cdrs"
    )
    by_call = {row["call_id"]: (row["retention_days"], row["t"]) for row in rows}
    day = days_ago(401).strftime("%Y%m%d")
    assert by_call["long-401"] == (400, f"cdrs_p{day}_r400")
    assert by_call["short-30"][0] == 30
    assert by_call["unknown-181"][0] == 0


async def test_dry_run_lists_and_changes_nothing(pg_dsn: str, conn: asyncpg.Connection) -> None:
    await populate(pg_dsn)
    before = await snapshot(conn)
    report = await run_retention(conn, SETTINGS, dry_run=True, operator="tester", now=NOW)
    assert await snapshot(conn) == before
    names = {item.name for item in report.dropped}
    # Every day has a sub-partition per class; the empty ones past retention go as well.
    assert names >= {
        f"cdrs_p{day(181)}_r0",
        f"cdrs_p{day(401)}_r400",
        f"cdrs_p{day(31)}_r30",
        f"sip_messages_p{day(91)}",
        f"fraud_alerts_p{day(366)}",
    }
    assert not names & {
        f"cdrs_p{day(180)}_r0",
        f"cdrs_p{day(181)}_r400",
        f"cdrs_p{day(30)}_r30",
        f"sip_messages_p{day(90)}",
        f"fraud_alerts_p{day(365)}",
    }
    assert report.bytes > 0
    assert await conn.fetchval("SELECT count(*) FROM audit_log") == 0


async def test_run_drops_exactly_what_is_past_retention_per_table_and_trunk(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    await populate(pg_dsn)
    report = await run_retention(conn, SETTINGS, dry_run=False, operator="tester", now=NOW)
    assert await call_ids(conn) == {"default-180", "long-181", "short-30"}
    assert await call_ids(conn, "sip_messages") == {"sip-90"}
    assert {row[0] for row in await conn.fetch("SELECT subject FROM fraud_alerts")} == {"a-365"}
    assert {item.table for item in report.dropped} == {"cdrs", "sip_messages", "fraud_alerts"}
    # A cdrs day left with no class sub-partition goes too; days still holding one stay.
    exists = "SELECT to_regclass($1) IS NOT NULL"
    assert not await conn.fetchval(exists, f"cdrs_p{day(401)}")
    assert await conn.fetchval(exists, f"cdrs_p{day(181)}")  # long-181 is still in it
    row = await conn.fetchrow("SELECT actor, action, details FROM audit_log")
    assert (row["actor"], row["action"]) == ("tester", "retention.run")
    assert '"bytes_freed"' in row["details"]
    # A second run finds nothing more.
    again = await run_retention(conn, SETTINGS, dry_run=False, operator="tester", now=NOW)
    assert again.dropped == []


async def test_a_plain_partition_of_the_first_schema_is_kept_for_the_longest_period(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    # What version 1 made: a plain day partition holding rows of any class.
    day = days_ago(200).strftime("%Y%m%d")
    start = days_ago(200).date()
    await conn.execute(
        f"CREATE TABLE cdrs_p{day} PARTITION OF cdrs FOR VALUES FROM "
        f"('{start} 00:00:00+00') TO ('{start + timedelta(days=1)} 00:00:00+00')"
    )
    await write(pg_dsn, [cdr(1, days_ago(200), trunk="long", call_id="legacy")])
    await run_retention(conn, SETTINGS, dry_run=False, operator="t", now=NOW)
    assert await call_ids(conn) == {"legacy"}  # 200 < 400, the longest class
    later = NOW + timedelta(days=201)
    await run_retention(conn, SETTINGS, dry_run=False, operator="t", now=later)
    assert await call_ids(conn) == set()


async def test_a_second_run_at_the_same_time_is_refused(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    other = await asyncpg.connect(pg_dsn)
    try:
        await other.execute("SELECT pg_advisory_lock($1)", RETENTION_LOCK_KEY)
        with pytest.raises(RetentionBusy):
            await run_retention(conn, SETTINGS, dry_run=False, operator="t", now=NOW)
    finally:
        await other.close()


def test_retention_command_lists_on_dry_run_and_deletes_expired_jsonl_files(
    pg_dsn: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    old = out / "cdrs.jsonl.20200101T000000Z"
    recent = out / f"cdrs.jsonl.{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    current = out / "cdrs.jsonl"
    for path in (old, recent, current):
        path.write_bytes(b"{}\n")
    asyncio.run(write(pg_dsn, [cdr(1, datetime(2020, 1, 1, tzinfo=UTC), call_id="old")]))
    env = daemon_environ(
        SIPCDR_SINKS__POSTGRES__DSN=pg_dsn,
        SIPCDR_SINKS__JSONL__PATH=str(current),
        SIPCDR_STATE__DIR=str(tmp_path / "state"),
    )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sipcdr.cli", "retention", "run", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    dry = run("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would drop cdrs_p20200101_r0 (cdrs, 2020-01-01, kept 180 days" in dry.stdout
    assert f"would delete {old}" in dry.stdout
    assert old.exists()
    done = run("--operator", "ops")
    assert done.returncode == 0, done.stderr
    assert "dropped cdrs_p20200101_r0" in done.stdout
    assert not old.exists() and recent.exists() and current.exists()
