"""The audit log's hash chain and the least-privilege roles, against a real PostgreSQL:
an edited or deleted row is named by `audit verify`; the writer cannot read or rewrite
the log, the analyst only reads records, the privacy role cannot rewrite the log."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from daemonproc import daemon_environ
from privacydata import NOW, cdr, write
from sipcdr.privacy import audit
from sipcdr.storage.migrations import migrate
from sipcdr.storage.partitions import ensure_partitions

pytestmark = pytest.mark.integration

COMMAND_TIMEOUT_S = 60.0


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_dsn)
    await migrate(connection)
    yield connection
    await connection.close()


async def five_rows(conn: asyncpg.Connection) -> list[int]:
    return [
        await audit.append(conn, f"op{n}", "subject.export", "4940555666", {"n": n, "x": [1, "a"]})
        for n in range(5)
    ]


async def test_an_intact_chain_verifies(conn: asyncpg.Connection) -> None:
    await five_rows(conn)
    verdict = await audit.verify(conn)
    assert verdict.intact and verdict.rows == 5
    last = await conn.fetchval("SELECT row_hash FROM audit_log ORDER BY id DESC LIMIT 1")
    assert verdict.head == bytes(last).hex()
    # The session's time zone does not change what a row hashes to.
    await conn.execute("SET TimeZone = 'Asia/Kolkata'")
    assert (await audit.verify(conn)).intact


@pytest.mark.parametrize(
    "tamper",
    [
        "UPDATE audit_log SET actor = 'someone else' WHERE id = $1",
        "UPDATE audit_log SET details = '{\"n\": 9}' WHERE id = $1",
        "UPDATE audit_log SET at = at - interval '1 second' WHERE id = $1",
        "UPDATE audit_log SET subject = NULL WHERE id = $1",
    ],
)
async def test_an_edited_row_is_named(conn: asyncpg.Connection, tamper: str) -> None:
    ids = await five_rows(conn)
    await conn.execute(tamper, ids[2])
    verdict = await audit.verify(conn)
    assert (verdict.broken_id, verdict.rows) == (ids[2], 3)
    assert "edited" in (verdict.reason or "")


async def test_a_row_edited_with_its_hash_recomputed_breaks_the_next_link(
    conn: asyncpg.Connection,
) -> None:
    ids = await five_rows(conn)
    await conn.execute(
        "UPDATE audit_log SET actor = 'x', row_hash = sipcdr_audit_hash(id, at, 'x', action, "
        "subject, details, prev_hash) WHERE id = $1",
        ids[1],
    )
    verdict = await audit.verify(conn)
    assert verdict.broken_id == ids[2]


async def test_a_deleted_row_is_named_by_the_row_after_it(conn: asyncpg.Connection) -> None:
    ids = await five_rows(conn)
    await conn.execute("DELETE FROM audit_log WHERE id = $1", ids[3])
    verdict = await audit.verify(conn)
    assert verdict.broken_id == ids[4]
    assert "deleted" in (verdict.reason or "")


async def test_deleting_the_first_row_is_caught(conn: asyncpg.Connection) -> None:
    ids = await five_rows(conn)
    await conn.execute("DELETE FROM audit_log WHERE id = $1", ids[0])
    assert (await audit.verify(conn)).broken_id == ids[1]


async def test_expiry_keeps_the_chain_verifiable_and_refuses_under_a_year(
    conn: asyncpg.Connection,
) -> None:
    await five_rows(conn)
    await conn.execute("UPDATE audit_log SET at = at - interval '4 years' WHERE id <= 2")
    # Re-hash the two aged rows as if they had been written then (what time would do).
    previous = b""
    for row in await conn.fetch("SELECT * FROM audit_log ORDER BY id"):
        new = await conn.fetchval(
            "SELECT sipcdr_audit_hash($1, $2, $3, $4, $5, $6, $7)",
            row["id"],
            row["at"],
            row["actor"],
            row["action"],
            row["subject"],
            row["details"],
            previous,
        )
        await conn.execute(
            "UPDATE audit_log SET prev_hash = $2, row_hash = $3 WHERE id = $1",
            row["id"],
            previous,
            new,
        )
        previous = bytes(new)
    assert (await audit.verify(conn)).intact
    before = datetime.now(UTC) - timedelta(days=3 * 365)
    assert await conn.fetchval("SELECT sipcdr_audit_expire($1)", before) == 2
    verdict = await audit.verify(conn)
    assert verdict.intact and verdict.rows == 3
    with pytest.raises(asyncpg.RaiseError, match="at least 365 days"):
        await conn.fetchval("SELECT sipcdr_audit_expire(now() - interval '30 days')")


async def as_role(conn: asyncpg.Connection, role: str) -> None:
    await conn.execute(f"SET ROLE {role}")


async def test_the_writer_writes_records_and_partitions_but_cannot_touch_the_log(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    await five_rows(conn)
    await as_role(conn, "sipcdr_writer")
    # What the daemon does: make and drop partitions, append to the log.
    made = await ensure_partitions(conn, "cdrs", [date(2020, 1, 1)], [30])
    assert "cdrs_p20200101_r30" in made
    await conn.execute("DROP TABLE cdrs_p20200101")
    await audit.append(conn, "daemon", "retention.run", None, {})
    assert await conn.fetchval("SELECT count(*) FROM holds") == 0
    for statement in (
        "SELECT * FROM audit_log",
        "SELECT * FROM audit_horizon",
        "UPDATE audit_log SET actor = 'x'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
        "INSERT INTO audit_log (actor, action, prev_hash, row_hash) VALUES ('a','b','','')",
        "INSERT INTO holds (subject, reason, expires_at, created_by) "
        "VALUES ('1', 'r', now() + interval '1 day', 'x')",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(statement)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute(
            "CREATE OR REPLACE FUNCTION sipcdr_audit_hash(bigint, timestamptz, text, text, "
            "text, jsonb, bytea) RETURNS bytea LANGUAGE sql AS $$ SELECT ''::bytea $$"
        )
    await conn.execute("RESET ROLE")
    assert (await audit.verify(conn)).intact


async def test_the_analyst_reads_records_only(pg_dsn: str, conn: asyncpg.Connection) -> None:
    await write(pg_dsn, [cdr(1, NOW)])
    await as_role(conn, "sipcdr_analyst")
    assert await conn.fetchval("SELECT count(*) FROM cdrs") == 1
    for statement in (
        "SELECT * FROM audit_log",
        "SELECT * FROM holds",
        "SELECT * FROM restrictions",
        "SELECT * FROM cdrs_held",
        "UPDATE cdrs SET caller = 'x'",
        "DELETE FROM sip_messages",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(statement)


async def test_the_privacy_role_reads_the_log_but_cannot_rewrite_it(
    conn: asyncpg.Connection,
) -> None:
    await five_rows(conn)
    await as_role(conn, "sipcdr_privacy")
    assert await conn.fetchval("SELECT count(*) FROM audit_log") == 5
    for statement in (
        "UPDATE audit_log SET actor = 'x'",
        "DELETE FROM audit_log",
        "SELECT sipcdr_audit_expire(now() - interval '5 years')",
        "DELETE FROM cdrs",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(statement)


def test_audit_verify_command_names_the_broken_row(pg_dsn: str, tmp_path: Path) -> None:
    async def tamper() -> None:
        connection = await asyncpg.connect(pg_dsn)
        try:
            await migrate(connection)
            ids = await five_rows(connection)
            await connection.execute("UPDATE audit_log SET actor = 'x' WHERE id = $1", ids[1])
        finally:
            await connection.close()

    import asyncio

    asyncio.run(tamper())
    result = subprocess.run(
        [sys.executable, "-m", "sipcdr.cli", "audit", "verify"],
        cwd=tmp_path,
        env=daemon_environ(SIPCDR_SINKS__POSTGRES__DSN=pg_dsn),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 3
    assert "audit log broken at row 2: its contents do not match its hash" in result.stderr
