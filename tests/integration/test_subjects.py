"""Data-subject rights against a real PostgreSQL (and JSONL): an export holds
everything about a number and nothing else, erasure removes or pseudonymizes exactly
the subject's data and is refused under a hold, restriction flags the rows."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from daemonproc import daemon_environ
from privacydata import NOW, alert, cdr, sip_message, write
from sipcdr.privacy.holds import add_hold
from sipcdr.privacy.pseudonym import pseudonym
from sipcdr.privacy.subjects import erase, restrict
from sipcdr.sinks.base import (
    KIND_ALERT,
    KIND_CDR,
    KIND_SIP,
    STREAM_RECORDS,
    STREAM_SIGNALING,
    SpoolRecord,
)
from sipcdr.sinks.postgres import PostgresSink
from sipcdr.storage.migrations import migrate

pytestmark = pytest.mark.integration

SUBJECT = "4940555666"
OTHER = "4940111222"
THIRD = "4930999888"
KEY = b"0123456789abcdef0123456789abcdef"
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
    await write(
        dsn,
        [
            cdr(1, ago(10), caller=SUBJECT, callee=OTHER, call_id="c1"),
            cdr(2, ago(20), caller=OTHER, callee=SUBJECT, call_id="c2"),
            cdr(3, ago(400), caller=SUBJECT, callee=THIRD, call_id="c3"),
            cdr(4, ago(10), caller=OTHER, callee=THIRD, call_id="c4"),
        ],
        [
            sip_message(ago(10), "c1", caller=SUBJECT, callee=OTHER),
            sip_message(ago(20), "c2", caller=OTHER, callee=SUBJECT),
            sip_message(ago(10), "c4", caller=OTHER, callee=THIRD),
            # A REGISTER of the subject: no CDR, named in its headers only.
            sip_message(ago(5), "reg-1", caller=SUBJECT, callee=SUBJECT),
            # A longer number that contains the subject's digits: not the subject.
            sip_message(ago(5), "c9", caller="1" + SUBJECT + "1", callee=THIRD),
        ],
        [alert(ago(3), SUBJECT), alert(ago(3), OTHER)],
    )


def sipcdr(
    workdir: Path, *args: str, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sipcdr.cli", *args],
        input=stdin,
        cwd=workdir,
        env=daemon_environ(**env),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def pg_env(dsn: str) -> dict[str, str]:
    return {"SIPCDR_SINKS__POSTGRES__DSN": dsn, "SIPCDR_SINKS__JSONL__PATH": ""}


def test_export_json_holds_everything_about_the_number_and_nothing_else(
    pg_dsn: str, tmp_path: Path
) -> None:
    asyncio.run(populate(pg_dsn))
    result = sipcdr(tmp_path, "subject", "export", "--number", "+49 40 555-666", **pg_env(pg_dsn))
    assert result.returncode == 0, result.stderr
    bundle = json.loads(result.stdout)
    assert bundle["subject"] == SUBJECT
    assert sorted(row["call_id"] for row in bundle["cdrs"]) == ["c1", "c2", "c3"]
    assert sorted(row["call_id"] for row in bundle["sip_messages"]) == ["c1", "c2", "reg-1"]
    assert [row["subject"] for row in bundle["fraud_alerts"]] == [SUBJECT]
    # Nothing of the call between two others, nor of a longer number holding its digits.
    assert THIRD not in json.dumps([row for row in bundle["cdrs"] if row["call_id"] != "c3"])
    assert "1" + SUBJECT + "1" not in result.stdout


def test_export_csv_zip_has_one_file_per_kind(pg_dsn: str, tmp_path: Path) -> None:
    asyncio.run(populate(pg_dsn))
    out = tmp_path / "subject.zip"
    result = sipcdr(
        tmp_path,
        "subject",
        "export",
        "--number",
        SUBJECT,
        "--format",
        "csv",
        "--out",
        str(out),
        **pg_env(pg_dsn),
    )
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    with zipfile.ZipFile(out) as archive:
        assert sorted(archive.namelist()) == [
            "cdrs.csv",
            "fraud_alerts.csv",
            "sip_messages.csv",
            "subject.json",
        ]
        tables = {
            name: list(csv.DictReader(io.TextIOWrapper(archive.open(name), encoding="utf-8")))
            for name in ("cdrs.csv", "sip_messages.csv", "fraud_alerts.csv")
        }
    assert sorted(row["call_id"] for row in tables["cdrs.csv"]) == ["c1", "c2", "c3"]
    assert sorted(row["call_id"] for row in tables["sip_messages.csv"]) == ["c1", "c2", "reg-1"]
    assert [row["subject"] for row in tables["fraud_alerts.csv"]] == [SUBJECT]
    # A second export does not overwrite the first.
    again = sipcdr(
        tmp_path,
        "subject",
        "export",
        "--number",
        SUBJECT,
        "--format",
        "csv",
        "--out",
        str(out),
        **pg_env(pg_dsn),
    )
    assert again.returncode == 1 and "exists" in again.stderr


def test_export_from_jsonl_when_it_is_the_only_sink(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    lines = [
        cdr(n, ago(n), caller=c, callee=d).to_record()
        for n, c, d in (
            (1, SUBJECT, OTHER),
            (2, OTHER, THIRD),
            (3, THIRD, SUBJECT),
        )
    ]
    (out / "cdrs.jsonl.20261101T000000Z").write_bytes(orjson.dumps(lines[0]) + b"\n")
    (out / "cdrs.jsonl").write_bytes(
        orjson.dumps(lines[1]) + b"\n" + orjson.dumps(lines[2]) + b"\n" + b'{"torn'
    )
    env = {
        "SIPCDR_SINKS__POSTGRES__DSN": "",
        "SIPCDR_SINKS__JSONL__PATH": str(out / "cdrs.jsonl"),
        "SIPCDR_STATE__DIR": str(tmp_path / "state"),
    }
    result = sipcdr(tmp_path, "subject", "export", "--number", SUBJECT, **env)
    assert result.returncode == 0, result.stderr
    bundle = json.loads(result.stdout)
    assert [row["cdr_id"] for row in bundle["cdrs"]] == [lines[0]["cdr_id"], lines[2]["cdr_id"]]
    assert bundle["sip_messages"] == [] and bundle["fraud_alerts"] == []


async def all_text(conn: asyncpg.Connection, tables: list[str]) -> str:
    parts: list[str] = []
    for table in tables:
        parts.extend(row[0] for row in await conn.fetch(f"SELECT t::text FROM {table} t"))
    return "\n".join(parts)


async def totals(conn: asyncpg.Connection) -> Any:
    return await conn.fetchrow("SELECT count(*), sum(cost), sum(billsec) FROM cdrs")


async def test_erase_pseudonymizes_cdrs_and_alerts_and_deletes_signaling(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    await populate(pg_dsn)
    before = await totals(conn)
    report = await erase(conn, SUBJECT, KEY, statutory_cdr_days=0, operator="dpo", now=NOW)
    alias = pseudonym(KEY, SUBJECT)
    assert report.complete
    assert report.done == {"sip_messages": 3, "cdrs": 3, "fraud_alerts": 1}
    assert await totals(conn) == before  # billing totals unchanged
    text = await all_text(conn, ["cdrs", "sip_messages", "fraud_alerts"])
    assert SUBJECT not in text.replace("1" + SUBJECT + "1", "")
    rows = {r["call_id"]: r for r in await conn.fetch("SELECT * FROM cdrs")}
    assert (rows["c1"]["caller"], rows["c1"]["callee"]) == (alias, OTHER)
    assert rows["c1"]["from_uri"] == f"sip:{alias}@example.com"
    assert rows["c1"]["to_uri"] == f"sip:+{OTHER}@example.net"
    assert (rows["c2"]["callee"], rows["c2"]["request_uri"]) == (
        alias,
        f"sip:{alias}@example.net;user=phone",
    )
    assert (rows["c4"]["caller"], rows["c4"]["callee"]) == (OTHER, THIRD)
    assert {r[0] for r in await conn.fetch("SELECT call_id FROM sip_messages")} == {"c4", "c9"}
    assert {r[0] for r in await conn.fetch("SELECT subject FROM fraud_alerts")} == {alias, OTHER}
    row = await conn.fetchrow("SELECT actor, action, subject, details FROM audit_log")
    assert (row["actor"], row["action"]) == ("dpo", "subject.erase")
    assert alias in row["details"] and KEY.decode() not in row["details"]


async def test_erase_keeps_cdrs_inside_statutory_retention(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    await populate(pg_dsn)
    report = await erase(conn, SUBJECT, KEY, statutory_cdr_days=100, operator="dpo", now=NOW)
    assert not report.complete
    assert (report.done["cdrs"], report.refused["cdrs"]) == (1, 2)  # c3 is 400 days old
    assert "statutory retention of 100 days" in "; ".join(report.reasons)
    kept = {
        r[0]
        for r in await conn.fetch(
            "SELECT call_id FROM cdrs WHERE caller = $1 OR callee = $1", SUBJECT
        )
    }
    assert kept == {"c1", "c2"}


async def test_erase_is_refused_under_a_hold_on_the_number(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    await populate(pg_dsn)
    await add_hold(
        conn,
        kind="number",
        subject=SUBJECT,
        reason="case 3",
        starts_at=None,
        expires_at=NOW + timedelta(days=30),
        tables=("cdrs", "sip_messages", "fraud_alerts"),
        signaling_max_days=365,
        operator="officer",
        now=NOW,
    )
    before = await all_text(conn, ["cdrs", "sip_messages", "fraud_alerts"])
    report = await erase(conn, SUBJECT, KEY, statutory_cdr_days=0, operator="dpo", now=NOW)
    assert not report.complete
    assert report.refused["cdrs"] == 3 and report.done == {k: 0 for k in report.done}
    assert "hold 1 on this number" in report.reasons[0]
    assert await all_text(conn, ["cdrs", "sip_messages", "fraud_alerts"]) == before
    actions = [r[0] for r in await conn.fetch("SELECT action FROM audit_log ORDER BY id")]
    assert actions == ["hold.add", "subject.erase"]


async def test_erase_leaves_calls_under_a_call_hold(pg_dsn: str, conn: asyncpg.Connection) -> None:
    await populate(pg_dsn)
    await add_hold(
        conn,
        kind="call_id",
        subject="c2",
        reason="case 4",
        starts_at=None,
        expires_at=NOW + timedelta(days=30),
        tables=("cdrs", "sip_messages"),
        signaling_max_days=365,
        operator="officer",
        now=NOW,
    )
    report = await erase(conn, SUBJECT, KEY, statutory_cdr_days=0, operator="dpo", now=NOW)
    assert report.refused["cdrs"] == 1 and report.refused["sip_messages"] == 1
    assert await conn.fetchval("SELECT callee FROM cdrs WHERE call_id = 'c2'") == SUBJECT


def test_erase_command_refuses_with_the_reason(pg_dsn: str, tmp_path: Path) -> None:
    asyncio.run(populate(pg_dsn))
    key = tmp_path / "pseudonym.key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    env = pg_env(pg_dsn) | {
        "SIPCDR_PRIVACY__PSEUDONYM_KEY_FILE": str(key),
        "SIPCDR_PRIVACY__STATUTORY_CDR_DAYS": "15",
    }
    result = sipcdr(tmp_path, "subject", "erase", "--number", SUBJECT, "--operator", "dpo", **env)
    assert result.returncode == 3
    assert "1 CDRs inside the statutory retention of 15 days" in result.stderr
    assert pseudonym(KEY, SUBJECT) in result.stdout
    key.chmod(0o644)
    loose = sipcdr(tmp_path, "subject", "erase", "--number", SUBJECT, **env)
    assert loose.returncode == 2 and "open to other users" in loose.stderr


async def test_restrict_flags_rows_and_unrestrict_clears_them(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    await populate(pg_dsn)
    counts = await restrict(conn, SUBJECT, "dpo")
    assert counts == {"cdrs": 3, "sip_messages": 3, "fraud_alerts": 1}
    flagged = {r[0] for r in await conn.fetch("SELECT call_id FROM cdrs WHERE restricted")}
    assert flagged == {"c1", "c2", "c3"}
    await restrict(conn, OTHER, "dpo")
    await restrict(conn, SUBJECT, "dpo", lift=True)
    flagged = {r[0] for r in await conn.fetch("SELECT call_id FROM cdrs WHERE restricted")}
    assert flagged == {"c1", "c2", "c4"}  # OTHER's calls stay restricted
    signaling = {
        r[0] for r in await conn.fetch("SELECT call_id FROM sip_messages WHERE restricted")
    }
    # The REGISTER named the subject alone; the other messages belong to OTHER's calls.
    assert signaling == {"c1", "c2", "c4"}
    actions = [r[0] for r in await conn.fetch("SELECT action FROM audit_log ORDER BY id")]
    assert actions == ["subject.restrict", "subject.restrict", "subject.unrestrict"]


async def test_the_writer_role_cannot_read_the_pseudonym_key(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    await populate(pg_dsn)
    await erase(conn, SUBJECT, KEY, statutory_cdr_days=0, operator="dpo", now=NOW)
    await conn.execute("SET ROLE sipcdr_writer")
    readable = [
        r[0]
        for r in await conn.fetch(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v') "
            "AND has_table_privilege(c.oid, 'SELECT')"
        )
    ]
    assert "cdrs" in readable and "audit_log" not in readable
    text = await all_text(conn, readable)
    assert KEY.decode() not in text and KEY.hex() not in text
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.fetch("SELECT details FROM audit_log")


async def test_new_cdrs_and_alerts_of_a_restricted_number_are_flagged_as_written(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    restricted = {SUBJECT}
    async with PostgresSink(pg_dsn, restricted=restricted.__contains__) as sink:
        records = [
            SpoolRecord(n, KIND_CDR, b"", orjson.dumps(item.to_record()))
            for n, item in enumerate(
                [cdr(1, ago(1), caller=OTHER, callee=SUBJECT), cdr(2, ago(1), caller=OTHER)], 1
            )
        ]
        records.append(SpoolRecord(3, KIND_ALERT, b"", orjson.dumps(alert(ago(1), SUBJECT))))
        await sink.deliver(STREAM_RECORDS, records)
    flagged = await conn.fetch("SELECT callee, restricted FROM cdrs ORDER BY callee")
    assert [(r["callee"], r["restricted"]) for r in flagged] == [
        ("4930333444", False),
        (SUBJECT, True),
    ]
    assert await conn.fetchval("SELECT restricted FROM fraud_alerts") is True


def test_the_number_can_be_given_where_other_local_users_do_not_see_it(
    pg_dsn: str, tmp_path: Path
) -> None:
    """A command line is visible to every local user (ps); standard input and a private
    file are not, so the number of someone who asked to be forgotten stays out of it."""
    asyncio.run(populate(pg_dsn))
    env = pg_env(pg_dsn)
    piped = sipcdr(tmp_path, "subject", "restrict", "--number", "-", stdin=f"+{SUBJECT}\n", **env)
    assert piped.returncode == 0, piped.stderr
    number_file = tmp_path / "number"
    number_file.write_text(f"+{OTHER}\n")
    from_file = sipcdr(tmp_path, "subject", "restrict", "--number-file", str(number_file), **env)
    assert from_file.returncode == 0, from_file.stderr
    held = sipcdr(
        tmp_path, "hold", "add", "--number", "-", "--reason", "case 7",
        "--until", "2099-01-01", "--tables", "cdrs", stdin=f"{SUBJECT}\n", **env,
    )  # fmt: skip
    assert held.returncode == 0, held.stderr
    empty = sipcdr(tmp_path, "subject", "erase", "--number", "-", stdin="\n", **env)
    assert empty.returncode == 2 and "no number in standard input" in empty.stderr

    async def check() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            restricted = {r[0] for r in await conn.fetch("SELECT number FROM restrictions")}
            assert restricted == {SUBJECT, OTHER}
            assert await conn.fetchval("SELECT subject FROM holds") == SUBJECT
        finally:
            await conn.close()

    asyncio.run(check())


async def test_new_signaling_naming_a_restricted_number_is_flagged_as_written(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    restricted = {SUBJECT}
    messages = {
        "from": sip_message(ago(1), "m-from", caller=SUBJECT, callee=OTHER),
        "to": sip_message(ago(1), "m-to", caller=OTHER, callee=SUBJECT),
        "pai": sip_message(ago(1), "m-pai", caller=OTHER, callee=THIRD, asserted=SUBJECT),
        "none": sip_message(ago(1), "m-none", caller=OTHER, callee=THIRD),
        "longer": sip_message(ago(1), "m-longer", caller="1" + SUBJECT + "1", callee=THIRD),
    }
    async with PostgresSink(pg_dsn, restricted=restricted.__contains__) as sink:
        await sink.deliver(
            STREAM_SIGNALING,
            [
                SpoolRecord(n, KIND_SIP, b"", orjson.dumps(item))
                for n, item in enumerate(messages.values(), 1)
            ],
        )
    flags = dict(await conn.fetch("SELECT call_id, restricted FROM sip_messages"))
    assert flags == {
        "m-from": True,
        "m-to": True,
        "m-pai": True,
        "m-none": False,
        "m-longer": False,
    }
    # What the daemon flagged, `unrestrict` finds by the same digits and clears.
    await restrict(conn, SUBJECT, "dpo")
    await restrict(conn, SUBJECT, "dpo", lift=True)
    assert await conn.fetchval("SELECT count(*) FROM sip_messages WHERE restricted") == 0
