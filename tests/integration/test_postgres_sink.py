"""PostgreSQL delivery against a real server: migrations, partitions, the sink's rows,
idempotent re-delivery and outages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import jsonschema
import orjson
import pytest
from pcapdata import require_shared_data
from pgserver import PrivatePg, with_database
from sipcdr.capture.pcapfile import iter_packets
from sipcdr.delivery import Delivery
from sipcdr.delivery import loop as delivery_module
from sipcdr.model import Cdr
from sipcdr.privacy.naming import named_numbers
from sipcdr.sinks.base import (
    KIND_ALERT,
    KIND_CDR,
    KIND_SIP,
    STREAM_RECORDS,
    STREAM_SIGNALING,
    SpoolRecord,
)
from sipcdr.sinks.postgres import PostgresSink, RecordError
from sipcdr.sip import SipParseError, parse
from sipcdr.sipevent import event_record, spooled
from sipcdr.spool import Spool
from sipcdr.storage.embedded import EmbeddedPostgres, holders_file
from sipcdr.storage.migrations import (
    DatabaseUnavailable,
    MigrationError,
    load_migrations,
    migrate,
    migrations_dir,
)
from sipcdr.storage.partitions import (
    DEFAULT_PARTITIONS_AHEAD_DAYS,
    PARTITIONED_TABLES,
    ensure_partitions,
    list_partitions,
    partition_name,
)

pytestmark = pytest.mark.integration

CDR_SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "schemas" / "cdr.v1.schema.json").read_text()
)
# The package's migrations, on the file system in the editable install the suite runs.
MIGRATIONS_DIR = Path(str(migrations_dir()))
SHIPPED = [migration.name for migration in load_migrations()]
CDR_NAMESPACE = uuid.UUID("6f0e3f4e-7d55-4c1a-9d0e-1c5e2a6b7c01")
# 2026-03-14 09:26:53.589793 UTC: a fixed day, so partition names are known in advance.
T0 = 1773480413.589793


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_dsn)
    yield connection
    await connection.close()


@pytest.fixture
async def sink(pg_dsn: str) -> AsyncIterator[PostgresSink]:
    async with PostgresSink(pg_dsn) as started:
        yield started


def make_cdr(n: int, start: float = T0, **changes: Any) -> Cdr:
    fields: dict[str, Any] = {
        "cdr_id": str(uuid.uuid5(CDR_NAMESPACE, f"call-{n}-{start}")),
        "call_id": f"call-{n}@192.0.2.10",
        "caller": "4940111222",
        "callee": f"49303334{n:02d}",
        "from_uri": "sip:+4940111222@example.com",
        "to_uri": f"sip:+49303334{n:02d}@example.net",
        "request_uri": f"sip:+49303334{n:02d}@example.net;user=phone",
        "src_ip": "192.0.2.10",
        "src_port": 5060,
        "dst_ip": "2001:db8::20",
        "dst_port": 5080,
        "trunk": "carrier-a",
        "start_time": start,
        "ring_time": start + 0.25,
        "answer_time": start + 4.5,
        "end_time": start + 65.123456,
        "pdd_ms": 250,
        "disposition": "answered",
        "sip_code": 200,
        "sip_reason": "OK",
        "q850_cause": 16,
        "hangup_by": "callee",
        "end_reason": "bye",
        "user_agent": "TestUA/1.0",
        "capture_node": "hep-2001",
        "rated": True,
        "rate_prefix": "4930",
        "rate_name": "Germany Berlin",
        "rate_per_minute": Decimal("0.0100"),
        "billed_seconds": 61,
        "cost": Decimal("0.010167"),
        "currency": "EUR",
        "fraud_flags": ("short_calls", "new_destination"),
        "egress_trunk": "vendor-b",
        "vendor_cost": Decimal("0.008000"),
        "margin": Decimal("0.002167"),
        "callee_valid": True,
    }
    fields.update(changes)
    return Cdr(**fields)


def unanswered_cdr(n: int, start: float = T0) -> Cdr:
    """Every optional field at its null."""
    return make_cdr(
        n,
        start,
        caller=None,
        callee=None,
        trunk=None,
        ring_time=None,
        answer_time=None,
        end_time=start + 3.0,
        pdd_ms=None,
        disposition="failed",
        sip_code=None,
        sip_reason=None,
        q850_cause=None,
        hangup_by=None,
        end_reason="timeout_no_final",
        user_agent=None,
        rated=False,
        rate_prefix=None,
        rate_name=None,
        rate_per_minute=None,
        billed_seconds=None,
        cost=None,
        currency=None,
        fraud_flags=(),
        egress_trunk=None,
        vendor_cost=None,
        margin=None,
        callee_valid=None,
    )


def cdr_records(cdrs: Sequence[Cdr], first_seq: int = 1) -> list[SpoolRecord]:
    records = []
    for seq, cdr in enumerate(cdrs, first_seq):
        record = cdr.to_record()
        jsonschema.validate(record, CDR_SCHEMA)
        records.append(SpoolRecord(seq, KIND_CDR, cdr.call_id.encode(), orjson.dumps(record)))
    return records


def sip_record(seq: int, captured_at: str, **changes: Any) -> SpoolRecord:
    value: dict[str, Any] = {
        "message_id": str(uuid.uuid4()),
        "captured_at": captured_at,
        "call_id": "call-1@192.0.2.10",
        "method": "INVITE",
        "status_code": None,
        "cseq_method": "INVITE",
        "cseq": 4294967295,  # beyond RFC 3261's 2**31 - 1, as broken peers send
        "src_ip": "192.0.2.10",
        "src_port": 5060,
        "dst_ip": "198.51.100.1",
        "dst_port": 5060,
        "transport": "udp",
        "capture_node": "hep-2001",
        "headers": "INVITE sip:4930333444@example.net SIP/2.0\r\nCall-ID: call-1@192.0.2.10\r\n",
        "schema_version": 1,
    }
    value.update(changes)
    return SpoolRecord(seq, KIND_SIP, value["call_id"].encode(), orjson.dumps(value))


def alert_value(raised_at: str) -> dict[str, Any]:
    return {
        "alert_id": str(uuid.uuid4()),
        "raised_at": raised_at,
        "detector": "short_calls",
        "subject": "4940111222",
        "severity": "critical",
        "window_s": 300,
        "count": 120,
        "threshold": 100,
        "cdr_ids": [str(uuid.uuid5(CDR_NAMESPACE, str(n))) for n in range(3)],
        "details": {"trunk": "carrier-a", "ratio": 0.93, "top": [{"callee": "4930", "n": 7}]},
        "schema_version": 1,
        "subject_kind": "caller",
        "observed": "120",
        "threshold_value": "100",
        "first_seen": raised_at,
        "last_seen": raised_at,
        "call_ids": ["a84b4c76e66710@pc33.example.com"],
        "revision": 0,
    }


def as_record(row: asyncpg.Record) -> dict[str, Any]:
    """A row read back in the record's JSON form, to compare with what was delivered;
    the columns the sink sets itself (retention class, restriction) are left out."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in ("retention_days", "restricted"):
            continue
        if isinstance(value, uuid.UUID):
            value = str(value)
        elif isinstance(value, datetime):
            value = value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        elif isinstance(value, Decimal):
            value = float(value) if key in ("duration", "billsec") else str(value)
        elif isinstance(value, list) and value and isinstance(value[0], uuid.UUID):
            value = [str(item) for item in value]
        out[key] = value
    return out


async def count(conn: asyncpg.Connection, table: str) -> int:
    return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))


# --- migrations ------------------------------------------------------------------------


async def test_migrations_apply_once(conn: asyncpg.Connection) -> None:
    assert await migrate(conn) == SHIPPED
    assert SHIPPED[0] == "0001_initial"
    assert await migrate(conn) == []
    rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations ORDER BY 1")
    assert [(r["version"], r["name"]) for r in rows] == [(int(name[:4]), name) for name in SHIPPED]
    assert len(rows[0]["checksum"]) == 64
    for table in ("cdrs", "sip_messages", "fraud_alerts", "holds", "audit_log"):
        assert await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table), table
    # No DEFAULT partition anywhere: it would block making a day's partition later.
    defaults = await conn.fetchval("SELECT count(*) FROM pg_partitioned_table WHERE partdefid <> 0")
    assert defaults == 0


async def test_concurrent_migrations_apply_each_file_once(pg_dsn: str) -> None:
    first, second = await asyncpg.connect(pg_dsn), await asyncpg.connect(pg_dsn)
    try:
        results = await asyncio.gather(migrate(first), migrate(second))
    finally:
        await first.close()
        await second.close()
    # Each file once, by one or the other (each step takes the lock on its own).
    assert sorted(results[0] + results[1]) == SHIPPED


async def test_changed_applied_migration_is_refused(
    conn: asyncpg.Connection, tmp_path: Path
) -> None:
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, directory)
    assert await migrate(conn, directory) == SHIPPED
    path = directory / "0001_initial.sql"
    path.write_text(path.read_text() + "\n-- edited after being applied\n")
    with pytest.raises(MigrationError, match=r"0001_initial\.sql was changed"):
        await migrate(conn, directory)
    (directory / "9999_later.sql").write_text("CREATE TABLE later (id int);")
    with pytest.raises(MigrationError):
        await migrate(conn, directory)
    assert not await conn.fetchval("SELECT to_regclass('later') IS NOT NULL")


async def test_failed_migration_rolls_back_and_names_its_file(
    conn: asyncpg.Connection, tmp_path: Path
) -> None:
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, directory)
    (directory / "9998_broken.sql").write_text("CREATE TABLE half (id int); SELEC 1;")
    with pytest.raises(MigrationError, match=r"9998_broken\.sql"):
        await migrate(conn, directory)
    # The shipped ones before it are applied; the broken one left nothing behind.
    shipped = int(SHIPPED[-1][:4])
    assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == shipped
    assert not await conn.fetchval("SELECT to_regclass('half') IS NOT NULL")


async def test_hold_longer_than_12_months_is_refused(conn: asyncpg.Connection) -> None:
    await migrate(conn)
    insert = (
        "INSERT INTO holds (subject, reason, created_at, expires_at, created_by) "
        "VALUES ('4940111222', 'case 7', $1, $2, 'analyst')"
    )
    created = datetime(2026, 1, 31, tzinfo=UTC)
    await conn.execute(insert, created, created + timedelta(days=365))
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(insert, created, created + timedelta(days=367))


# --- partitions ------------------------------------------------------------------------


async def test_partition_bounds_are_utc_days(conn: asyncpg.Connection) -> None:
    await migrate(conn)
    await conn.execute("SET TimeZone = 'America/New_York'")
    day = date(2026, 3, 14)
    # A cdrs day is split by retention class; the default class always has its table.
    assert await ensure_partitions(conn, "cdrs", [day, day]) == [
        "cdrs_p20260314",
        "cdrs_p20260314_r0",
    ]
    assert await ensure_partitions(conn, "cdrs", [day]) == []
    await conn.execute("SET TimeZone = 'UTC'")
    bounds = await conn.fetchval(
        "SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname = $1",
        partition_name("cdrs", day),
    )
    assert bounds == "FOR VALUES FROM ('2026-03-14 00:00:00+00') TO ('2026-03-15 00:00:00+00')"
    assert await list_partitions(conn, "cdrs") == [day]


async def test_partitions_made_ahead_on_connect(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    today = datetime.now(UTC).date()
    await sink.deliver(STREAM_RECORDS, cdr_records([make_cdr(1, datetime.now(UTC).timestamp())]))
    wanted = {today + timedelta(days=n) for n in range(-1, DEFAULT_PARTITIONS_AHEAD_DAYS + 1)}
    for table in PARTITIONED_TABLES:
        assert wanted <= set(await list_partitions(conn, table)), table


async def test_partitions_follow_the_day(pg_dsn: str, conn: asyncpg.Connection) -> None:
    now = [T0]
    async with PostgresSink(pg_dsn, partitions_ahead_days=2, clock=lambda: now[0]) as sink:
        await sink.deliver(STREAM_RECORDS, cdr_records([make_cdr(1)]))
        days = await list_partitions(conn, "sip_messages")
        assert days == [date(2026, 3, 13) + timedelta(days=n) for n in range(4)]
        now[0] += 86400
        await sink.deliver(STREAM_RECORDS, cdr_records([make_cdr(2)], first_seq=2))
        assert max(await list_partitions(conn, "sip_messages")) == date(2026, 3, 17)


# --- the sink --------------------------------------------------------------------------


def test_streams_follow_store_signaling() -> None:
    assert PostgresSink("postgresql://x/y").streams == (STREAM_RECORDS, STREAM_SIGNALING)
    assert PostgresSink("postgresql://x/y", store_signaling=False).streams == (STREAM_RECORDS,)


async def test_cdrs_stored_with_typed_values(sink: PostgresSink, conn: asyncpg.Connection) -> None:
    cdrs = [make_cdr(1), unanswered_cdr(2), make_cdr(3, T0 + 3600.000001)]
    await sink.deliver(STREAM_RECORDS, cdr_records(cdrs))
    rows = {str(r["cdr_id"]): r for r in await conn.fetch("SELECT * FROM cdrs")}
    assert len(rows) == 3
    for cdr in cdrs:
        row = rows[cdr.cdr_id]
        assert as_record(row) == cdr.to_record()
    row = rows[cdrs[0].cdr_id]
    assert isinstance(row["cdr_id"], uuid.UUID)
    assert row["start_time"] == datetime(2026, 3, 14, 9, 26, 53, 589793, tzinfo=UTC)
    assert row["duration"] == Decimal("65.123")
    assert row["cost"] == Decimal("0.010167")
    assert row["rate_per_minute"] == Decimal("0.0100")
    assert (row["vendor_cost"], row["margin"]) == (Decimal("0.008000"), Decimal("0.002167"))
    assert str(row["vendor_cost"]) == "0.008000"  # NUMERIC keeps the rater's places
    assert (row["egress_trunk"], row["callee_valid"]) == ("vendor-b", True)
    assert row["fraud_flags"] == ["short_calls", "new_destination"]
    assert rows[cdrs[1].cdr_id]["billsec"] == Decimal("0.000")
    assert sink.rows_inserted["cdrs"] == 3
    # Each row sits in the partition of its UTC start day.
    where = await conn.fetchval(
        "SELECT tableoid::regclass::text FROM cdrs WHERE cdr_id = $1", row["cdr_id"]
    )
    assert where == "cdrs_p20260314_r0"  # the day's default retention class


async def test_redelivery_inserts_nothing(sink: PostgresSink, conn: asyncpg.Connection) -> None:
    batch = cdr_records([make_cdr(n) for n in range(5)])
    await sink.deliver(STREAM_RECORDS, batch)
    await sink.deliver(STREAM_RECORDS, batch)
    # A batch holding the same CDR twice (a replay) also gives one row.
    await sink.deliver(STREAM_RECORDS, batch[:1] + batch[:1] + cdr_records([make_cdr(9)], 6))
    assert await count(conn, "cdrs") == 6
    assert sink.rows_inserted["cdrs"] == 6
    assert sink.duplicates_skipped["cdrs"] == 7


async def test_a_signaling_batch_partly_there_adds_only_the_rest(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    """A batch of one COPY goes in without a transaction of its own; one that meets
    rows already there (a re-delivery after a crash) is written again through the
    staging table, and so is a batch of CDRs and alerts together."""
    at = "2026-03-14T09:26:53.589793Z"
    messages = [sip_record(n, at, call_id=f"c{n}") for n in range(1, 9)]
    await sink.deliver(STREAM_SIGNALING, messages[:3])
    await sink.deliver(STREAM_SIGNALING, messages)  # three of eight already there
    assert await count(conn, "sip_messages") == 8
    assert sink.rows_inserted["sip_messages"] == 8
    assert sink.duplicates_skipped["sip_messages"] == 3
    cdrs = cdr_records([make_cdr(n) for n in range(3)])
    alert = SpoolRecord(9, KIND_ALERT, b"s", orjson.dumps(alert_value(at)))
    await sink.deliver(STREAM_RECORDS, cdrs[:1])
    await sink.deliver(STREAM_RECORDS, [*cdrs, alert])
    assert await count(conn, "cdrs") == 3
    assert await count(conn, "fraud_alerts") == 1
    assert (sink.rows_inserted["cdrs"], sink.duplicates_skipped["cdrs"]) == (3, 1)


async def test_old_capture_gets_its_partition(sink: PostgresSink, conn: asyncpg.Connection) -> None:
    start_2005 = datetime(2005, 7, 1, 23, 59, 59, 999999, tzinfo=UTC).timestamp()
    await sink.deliver(STREAM_RECORDS, cdr_records([make_cdr(1, start_2005)]))
    assert date(2005, 7, 1) in await list_partitions(conn, "cdrs")
    row = await conn.fetchrow("SELECT tableoid::regclass::text AS part, * FROM cdrs")
    assert row["part"] == "cdrs_p20050701_r0"
    assert row["start_time"] == datetime(2005, 7, 1, 23, 59, 59, 999999, tzinfo=UTC)


async def test_sip_messages_stored(sink: PostgresSink, conn: asyncpg.Connection) -> None:
    sdp = "v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\n"
    records = [
        sip_record(1, "2026-03-14T09:26:53.589793Z", body=sdp),
        sip_record(
            2,
            "2026-03-14T09:26:53.839793Z",
            method=None,
            status_code=180,
            cseq=1,
            src_ip="198.51.100.1",
            dst_ip="192.0.2.10",
            headers="SIP/2.0 180 Ringing\r\nX-Odd: a\x00b\r\n",
        ),
    ]
    await sink.deliver(STREAM_SIGNALING, records)
    rows = await conn.fetch("SELECT * FROM sip_messages ORDER BY captured_at")
    assert len(rows) == 2
    sent = [orjson.loads(r.value) for r in records]
    assert as_record(rows[0]) == sent[0]
    assert rows[1]["body"] is None
    # NUL cannot be stored in text; it is replaced, not allowed to stop the stream.
    assert rows[1]["headers"] == "SIP/2.0 180 Ringing\r\nX-Odd: a\ufffdb\r\n"
    assert as_record(rows[1]) | {"headers": sent[1]["headers"]} == sent[1] | {"body": None}
    assert rows[0]["cseq"] == 4294967295
    assert sink.rows_inserted["sip_messages"] == 2


async def test_alerts_stored(sink: PostgresSink, conn: asyncpg.Connection) -> None:
    alert = alert_value("2026-03-14T09:30:00.000000Z")
    record = SpoolRecord(1, KIND_ALERT, alert["subject"].encode(), orjson.dumps(alert))
    await sink.deliver(STREAM_RECORDS, [record])
    await sink.deliver(STREAM_RECORDS, [record])
    rows = await conn.fetch("SELECT * FROM fraud_alerts")
    assert len(rows) == 1
    stored = as_record(rows[0])
    stored["details"] = json.loads(stored["details"])
    assert stored == alert
    assert sink.rows_inserted["fraud_alerts"] == 1
    assert sink.duplicates_skipped["fraud_alerts"] == 1


async def test_an_updated_alert_replaces_its_row_and_an_older_revision_does_not(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    raised = alert_value("2026-03-14T09:30:00.000000Z")
    update = raised | {
        "severity": "critical",
        "count": 900,
        "observed": "900",
        "last_seen": "2026-03-14T09:41:00.000000Z",
        "revision": 2,
    }
    middle = raised | {"count": 400, "observed": "400", "revision": 1}

    def record(seq: int, value: dict[str, Any]) -> SpoolRecord:
        return SpoolRecord(seq, KIND_ALERT, value["subject"].encode(), orjson.dumps(value))

    await sink.deliver(STREAM_RECORDS, [record(1, raised)])
    # An update and an older one in the same batch: the newest wins.
    await sink.deliver(STREAM_RECORDS, [record(2, update), record(3, middle)])
    # The older one re-delivered alone (after a crash): the row stays at the newest.
    await sink.deliver(STREAM_RECORDS, [record(3, middle)])
    rows = await conn.fetch("SELECT * FROM fraud_alerts")
    assert len(rows) == 1
    stored = as_record(rows[0])
    stored["details"] = json.loads(stored["details"])
    assert stored == update
    assert sink.rows_inserted["fraud_alerts"] == 2  # raised, then replaced once
    assert sink.duplicates_skipped["fraud_alerts"] == 2


async def test_both_streams_deliver_concurrently(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    cdrs = cdr_records([make_cdr(n) for n in range(3)])
    sips = [sip_record(n, f"2031-01-0{n}T00:00:00.000000Z") for n in range(1, 4)]
    await asyncio.gather(sink.deliver(STREAM_RECORDS, cdrs), sink.deliver(STREAM_SIGNALING, sips))
    assert await count(conn, "cdrs") == 3
    assert await count(conn, "sip_messages") == 3


async def test_unknown_kind_is_counted_not_stored(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    records = [*cdr_records([make_cdr(1)]), SpoolRecord(2, "future", b"k", b"{}")]
    await sink.deliver(STREAM_RECORDS, records)
    assert sink.records_ignored == {"future": 1}
    assert await count(conn, "cdrs") == 1


async def test_malformed_record_raises_naming_it(sink: PostgresSink) -> None:
    with pytest.raises(RecordError, match="records record 7"):
        await sink.deliver(STREAM_RECORDS, [SpoolRecord(7, KIND_CDR, b"k", b"{not json")])


async def test_start_succeeds_with_the_database_down() -> None:
    sink = PostgresSink("postgresql://postgres@127.0.0.1:1/none", connect_timeout_s=2.0)
    await sink.start()
    with pytest.raises(DatabaseUnavailable, match="cannot connect"):
        await sink.deliver(STREAM_RECORDS, cdr_records([make_cdr(1)]))
    await sink.stop()
    await sink.stop()


@pytest.mark.parametrize(
    "dsn",
    ["postgresql://app:s3cret@db:54x2/cdr", "postgresql://app:s3cret@[::1/cdr"],
)
async def test_a_dsn_the_driver_cannot_read_is_unavailable_without_its_password(
    dsn: str,
) -> None:
    """The config refuses such a DSN; should one get here anyway, it is one line."""
    with pytest.raises(DatabaseUnavailable, match=r"cannot use postgresql://app:\*\*\*@") as error:
        await PostgresSink(dsn).probe()
    assert "s3cret" not in str(error.value)


async def test_a_server_that_serves_answers_the_probe(sink: PostgresSink) -> None:
    await sink.probe()


def _with_user(dsn: str, user: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.netloc.rpartition('@')[2]}"))


async def test_a_server_that_refuses_the_login_answers_the_probe(pg_server_dsn: str) -> None:
    """An unknown database or role is the server's answer: not an outage that ends by
    itself, so the delivery loop waits its backoff instead of logging in every second."""
    await PostgresSink(with_database(pg_server_dsn, "sipcdr_no_such_database")).probe()
    await PostgresSink(_with_user(pg_server_dsn, "sipcdr_no_such_role")).probe()
    with pytest.raises(DatabaseUnavailable, match="cannot connect"):
        await PostgresSink("postgresql://postgres@127.0.0.1:1/none").probe()


@pytest.mark.parametrize(
    ("error", "answers"),
    [
        (asyncpg.exceptions.InvalidPasswordError("password authentication failed"), True),
        (asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"), True),
        (asyncpg.exceptions.CannotConnectNowError("the database system is starting up"), False),
        (asyncpg.exceptions.AdminShutdownError("terminating connection"), False),
        (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"), False),
        (ConnectionResetError("reset by peer"), False),
        (TimeoutError(), False),
    ],
)
async def test_only_a_server_that_does_not_serve_fails_the_probe(
    monkeypatch: pytest.MonkeyPatch, error: Exception, answers: bool
) -> None:
    async def connect(*_args: Any, **_kwargs: Any) -> asyncpg.Connection:
        raise error

    monkeypatch.setattr(asyncpg, "connect", connect)
    probe = PostgresSink("postgresql://app@db.example.net/cdr").probe()
    if answers:
        await probe
    else:
        with pytest.raises(DatabaseUnavailable):
            await probe


async def test_a_refused_login_waits_the_whole_backoff_between_logins(
    pg_server_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery_module, "MIN_BACKOFF_S", 30.0)
    monkeypatch.setattr(delivery_module, "PROBE_INTERVAL_S", 0.05)
    logins = 0

    class CountingSink(PostgresSink):
        async def probe(self) -> None:
            nonlocal logins
            logins += 1
            await super().probe()

    sink = CountingSink(
        with_database(pg_server_dsn, "sipcdr_no_such_database"), store_signaling=False
    )
    with Spool(tmp_path / "spool", ("postgres",)) as spool:
        delivery = Delivery({STREAM_RECORDS: spool}, [sink])
        await delivery.start()
        ((state, _reader),) = delivery.readers()
        for record in cdr_records([make_cdr(1)]):
            spool.append(record.kind, record.key, record.value)
        deadline = time.monotonic() + 10
        while logins < 1:  # the batch failed, and the loop asks whether anyone answers
            assert time.monotonic() < deadline, "the refused login did not fail the batch"
            await asyncio.sleep(0.02)
        failures = state.failures
        await asyncio.sleep(1.0)  # twenty probe intervals
        assert logins == 1  # once, to tell the refusal from an outage
        assert state.failures == failures  # and no new attempt inside the backoff
        await delivery.stop(drain_timeout_s=0)
    assert "does not exist" in state.last_error


@pytest.mark.parametrize(
    "query",
    ["password=hunter2 secretpart", "password=hun&ter2secret", "password=hunter#secretpart"],
)
async def test_no_piece_of_a_password_parameter_is_shown_when_the_server_is_down(
    query: str,
) -> None:
    """Whatever the password holds unescaped, the error (logged as sink_unavailable
    and printed by `db migrate`) shows none of it."""
    with pytest.raises(DatabaseUnavailable) as error:
        await PostgresSink(f"postgresql://app@127.0.0.1:1/cdr?{query}").probe()
    assert "127.0.0.1:1/cdr?password=***" in str(error.value)
    for piece in ("hunter", "hun", "ter2", "secretpart"):
        assert piece not in str(error.value)


async def test_outage_then_recovery(private_pg: PrivatePg) -> None:
    server = private_pg()
    dsn = await server.start()
    first, second = cdr_records([make_cdr(1)]), cdr_records([make_cdr(2)], first_seq=2)
    async with PostgresSink(dsn, connect_timeout_s=2.0) as sink:
        await sink.deliver(STREAM_RECORDS, first)
        await server.stop()
        await server.stop()  # idempotent
        with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
            await sink.deliver(STREAM_RECORDS, second)
        with pytest.raises(DatabaseUnavailable):
            await sink.deliver(STREAM_RECORDS, second)
        assert await server.start() == dsn
        await sink.deliver(STREAM_RECORDS, second)
        await sink.deliver(STREAM_RECORDS, first)  # a retried batch that had gone in
    conn = await asyncpg.connect(dsn)
    try:
        ids = {str(r["cdr_id"]) for r in await conn.fetch("SELECT cdr_id FROM cdrs")}
    finally:
        await conn.close()
    assert ids == {make_cdr(1).cdr_id, make_cdr(2).cdr_id}
    assert sink.rows_inserted["cdrs"] == 2
    assert sink.duplicates_skipped["cdrs"] == 1


async def test_delivery_resumes_within_seconds_of_the_server_answering_again(
    private_pg: PrivatePg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long outage has doubled the backoff to many seconds (set here from the first
    failure on, rather than waited for); the loop still notices a server that answers
    again within a probe interval (1 s) and delivers at once."""
    backoff_s = 15.0
    monkeypatch.setattr(delivery_module, "MIN_BACKOFF_S", backoff_s)
    server = private_pg()
    dsn = await server.start()
    sink = PostgresSink(dsn, store_signaling=False, connect_timeout_s=2.0)
    with Spool(tmp_path / "spool", ("postgres",)) as spool:
        delivery = Delivery({STREAM_RECORDS: spool}, [sink])
        await delivery.start()
        ((state, reader),) = delivery.readers()

        async def until(condition: Any, timeout: float, what: str) -> float:
            started = time.monotonic()
            while not condition():
                assert time.monotonic() - started < timeout, what
                await asyncio.sleep(0.02)
            return time.monotonic() - started

        for record in cdr_records([make_cdr(1)]):
            spool.append(record.kind, record.key, record.value)
        await until(delivery.caught_up, 10, "first CDR not delivered")
        await server.stop()
        for record in cdr_records([make_cdr(2), make_cdr(3)], first_seq=2):
            spool.append(record.kind, record.key, record.value)
        await until(lambda: not state.up, 10, "outage not noticed")
        await asyncio.sleep(1.5)  # several probes that find no server
        assert state.failures == 1  # the batch was not sent again meanwhile
        await server.start()
        resumed_after = await until(delivery.caught_up, backoff_s - 5, "waited for the backoff")
        assert state.up
        await delivery.stop()
    assert resumed_after < 2.0
    assert reader.lag_records == 0
    assert sink.rows_inserted["cdrs"] == 3


async def test_embedded_server_as_context_manager(open_tmp_path: Path) -> None:
    server = EmbeddedPostgres(open_tmp_path / "pg")
    async with server as dsn:
        conn = await asyncpg.connect(dsn)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        assert await server.start() == dsn  # a second start of a running server
    assert server.dsn is None
    assert not (open_tmp_path / "pg" / "postmaster.pid").exists()


async def test_embedded_server_stops_despite_a_killed_holder(open_tmp_path: Path) -> None:
    """A daemon killed with SIGKILL stays in the list of holders; that must not keep
    the server running after the last live holder stops it."""
    server = EmbeddedPostgres(open_tmp_path / "pg")
    await server.start()
    gone = subprocess.Popen(["true"])
    gone.wait()
    handles = holders_file(open_tmp_path / "pg")
    handles.write_text(json.dumps([gone.pid, *json.loads(handles.read_text())]))
    await server.stop()
    assert not (open_tmp_path / "pg" / "postmaster.pid").exists()


async def test_signaling_rows_are_the_same_whichever_way_it_was_spooled(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    """The rows of the captured bytes the spool holds now are those of the JSON it held
    before, column for column, restriction flag included; and JSON spooled before an
    upgrade, delivered again after it, is the same rows already there."""
    pairs = []
    for path in sorted((require_shared_data() / "pcaps").glob("*.pcap*"))[:8]:
        for packet in iter_packets(path):
            with contextlib.suppress(SipParseError):
                pairs.append((packet, parse(packet.payload)))
    assert len(pairs) >= 200
    numbers = sorted({n for _, msg in pairs for n in named_numbers(msg.from_uri)})
    restricted = frozenset(numbers[::2])
    async with PostgresSink(pg_dsn, restricted=restricted.__contains__) as sink:
        for store_body in (False, True):
            now = [
                SpoolRecord(seq, KIND_SIP, msg.call_id.encode(), spooled(packet, msg, store_body))
                for seq, (packet, msg) in enumerate(pairs, 1)
            ]
            before = [
                record._replace(
                    value=orjson.dumps(event_record(packet, msg, store_body=store_body))
                )
                for record, (packet, msg) in zip(now, pairs, strict=True)
            ]
            await sink.deliver(STREAM_SIGNALING, now)
            from_bytes = await conn.fetch("SELECT * FROM sip_messages ORDER BY message_id")
            inserted = sink.rows_inserted["sip_messages"]
            await sink.deliver(STREAM_SIGNALING, before)  # a re-delivery: nothing new
            assert sink.rows_inserted["sip_messages"] == inserted
            await conn.execute("TRUNCATE sip_messages")
            await sink.deliver(STREAM_SIGNALING, before)
            from_json = await conn.fetch("SELECT * FROM sip_messages ORDER BY message_id")
            await conn.execute("TRUNCATE sip_messages")
            assert len(from_bytes) >= 200
            assert [dict(row) for row in from_bytes] == [dict(row) for row in from_json]
            flags = [row["restricted"] for row in from_bytes]
            assert any(flags) and not all(flags)
            assert any(row["body"] for row in from_bytes) == store_body


async def test_a_connection_cut_mid_copy_leaves_all_or_nothing_and_redelivery_the_rest(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    """A batch of one COPY goes in without a transaction of its own: the statement is
    one. The server ending the session while it streams leaves none of the batch or
    all of it, and the batch delivered again leaves each row once. The cut ends the
    COPY at once, even one waiting for the socket to take more (which asyncpg alone
    would wait on until the delivery loop's timeout, here a shorter one)."""
    at = "2026-03-14T09:26:53.589793Z"
    cut_short = 0
    async with PostgresSink(pg_dsn) as sink:

        async def deliver_within(records: list[SpoolRecord]) -> None:
            async with asyncio.timeout(20):
                await sink.deliver(STREAM_SIGNALING, records)

        for attempt in range(4):
            messages = [sip_record(n, at, call_id=f"cut{attempt}-{n}") for n in range(20_000)]
            await sink.deliver(STREAM_SIGNALING, messages[:1])  # connected, partitions made
            before = await count(conn, "sip_messages") - 1
            pid = await sink._connections[STREAM_SIGNALING].fetchval("SELECT pg_backend_pid()")

            async def cut(pid: int, delay_s: float) -> None:
                await asyncio.sleep(delay_s)
                await conn.execute("SELECT pg_terminate_backend($1)", pid)

            results = await asyncio.gather(
                deliver_within(messages), cut(pid, 0.003 * attempt), return_exceptions=True
            )
            added = await count(conn, "sip_messages") - before
            assert added in (1, len(messages)), (attempt, added, results)
            assert not isinstance(results[0], TimeoutError), attempt  # noticed the cut
            cut_short += added == 1
            await sink.deliver(STREAM_SIGNALING, messages)  # what the loop does next
            assert await count(conn, "sip_messages") - before == len(messages)
    assert cut_short  # some cut reached a COPY before it ended
