"""`sip_messages` rows at the edges of what a spooled value holds, against a real
server: capture times at the first and last day a row can hold and at UTC midnights
(in a session whose TimeZone is not UTC), a batch the server refuses for one of its
rows (the delivery loop setting that row aside alone), and a call found restricted
while its messages' COPY is on its way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from sipcdr.delivery import Delivery
from sipcdr.model import Packet
from sipcdr.privacy.outbound import RestrictedCalls
from sipcdr.sinks.base import (
    KIND_SIP,
    STREAM_RECORDS,
    STREAM_SIGNALING,
    RecordsRejected,
    SpoolRecord,
)
from sipcdr.sinks.pgrows import SIP_MESSAGES, SipCopy
from sipcdr.sinks.postgres import PostgresSink
from sipcdr.sip import parse
from sipcdr.sipevent import spooled
from sipcdr.spool import Spool

pytestmark = pytest.mark.integration

_MESSAGE = (
    b"OPTIONS sip:4930333444@example.net SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
    b"From: <sip:4940111222@example.com>;tag=1\r\nTo: <sip:4930333444@example.net>\r\n"
    b"Call-ID: %s\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
)


def record(seq: int, when: float, call_id: bytes = b"edge") -> SpoolRecord:
    payload = _MESSAGE % call_id
    packet = Packet(when, "192.0.2.1", 5060, "192.0.2.2", 5060, "udp", payload, "n1")
    return SpoolRecord(seq, KIND_SIP, call_id, spooled(packet, parse(payload), False))


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_dsn)
    yield connection
    await connection.close()


# 0001-01-01 00:00Z, the first instant a spooled value holds; 9999-12-31 and the last
# microsecond before 10000-01-01 that a float capture time can name.
_FIRST = -62_135_596_800.0
_LAST_DAY = 253_402_214_400.0
_LAST = 253_402_300_799.99997


async def test_rows_of_the_first_and_last_days_are_stored(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    records = [
        record(1, _FIRST, b"first"),
        record(2, _LAST_DAY + 43_200.5, b"last-day"),
        record(3, _LAST, b"last"),
    ]
    async with PostgresSink(pg_dsn) as sink:
        await sink.deliver(STREAM_SIGNALING, records)
        assert sink.rows_inserted["sip_messages"] == 3
        await sink.deliver(STREAM_SIGNALING, records)  # again: through the staging table
        assert sink.duplicates_skipped["sip_messages"] == 3
    rows = await conn.fetch("SELECT call_id, captured_at FROM sip_messages ORDER BY captured_at")
    assert [(r["call_id"], r["captured_at"].astimezone(UTC).date()) for r in rows] == [
        ("first", date(1, 1, 1)),
        ("last-day", date(9999, 12, 31)),
        ("last", date(9999, 12, 31)),
    ]


async def test_rows_at_midnight_land_in_their_utc_day_whatever_the_timezone(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    database = await conn.fetchval("SELECT current_database()")
    # The sessions' TimeZone far from UTC: partitions are still UTC days.
    await conn.execute(f"ALTER DATABASE \"{database}\" SET timezone TO 'Pacific/Kiritimati'")
    midnight = datetime(2026, 3, 15, tzinfo=UTC).timestamp()
    whens = [midnight - 0.0000006, midnight - 0.0000004, midnight, midnight + 86_399.9999996]
    records = [record(n, when, b"m%d" % n) for n, when in enumerate(whens, 1)]
    copy = SipCopy()
    for each in records:
        copy.add(each.value, None)
    assert copy.dates() == {date(2026, 3, 14), date(2026, 3, 15), date(2026, 3, 16)}
    async with PostgresSink(pg_dsn, partitions_ahead_days=0, clock=lambda: 0.0) as sink:
        await sink.deliver(STREAM_SIGNALING, records)
    rows = await conn.fetch(
        "SELECT call_id, tableoid::regclass::text AS part FROM sip_messages ORDER BY call_id"
    )
    assert [(r["call_id"], r["part"]) for r in rows] == [
        ("m1", "sip_messages_p20260314"),
        ("m2", "sip_messages_p20260315"),
        ("m3", "sip_messages_p20260315"),
        ("m4", "sip_messages_p20260316"),
    ]


async def test_a_row_the_server_refuses_rejects_the_batch_for_its_content(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    records = [record(n, 1_773_480_413.5 + n, b"ok%d" % n) for n in range(1, 6)]
    refused = record(9, 1_773_480_413.5, b"refused-by-a-check")
    async with PostgresSink(pg_dsn) as sink:
        await sink.deliver(STREAM_SIGNALING, records[:1])
        await conn.execute(
            "ALTER TABLE sip_messages ADD CONSTRAINT short_call_ids CHECK (length(call_id) < 10)"
        )
        for batch in ([*records[1:3], refused, *records[3:]], [refused]):
            assert isinstance(sink._encoded(STREAM_SIGNALING, batch)[SIP_MESSAGES], SipCopy)
            with pytest.raises(RecordsRejected):
                await sink.deliver(STREAM_SIGNALING, batch)
        assert sink.rows_inserted["sip_messages"] == 1
        await sink.deliver(STREAM_SIGNALING, records)  # one there already: staging
        assert sink.rows_inserted["sip_messages"] == 5
        assert sink.duplicates_skipped["sip_messages"] == 1
    assert await conn.fetchval("SELECT count(*) FROM sip_messages") == 5


async def test_a_call_found_restricted_during_the_copy_flags_its_rows(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    """Its restricted CDR is written on the other stream while the messages' COPY is
    on its way: the messages left unflagged are flagged by their Call-ID after it."""
    calls = RestrictedCalls()

    class Racing(PostgresSink):
        async def _ensure_partitions(self, connection: Any, rows: Any) -> None:
            await super()._ensure_partitions(connection, rows)
            calls.add("late", ("4930333444",))

    records = [record(1, 1_773_480_413.5, b"late"), record(2, 1_773_480_414.5, b"other")]
    async with Racing(pg_dsn, restricted=lambda number: False, restricted_calls=calls) as sink:
        assert isinstance(sink._encoded(STREAM_SIGNALING, records)[SIP_MESSAGES], SipCopy)
        await sink.deliver(STREAM_SIGNALING, records)
    rows = await conn.fetch("SELECT call_id, restricted FROM sip_messages ORDER BY call_id")
    assert [(r["call_id"], r["restricted"]) for r in rows] == [("late", True), ("other", False)]


async def test_the_delivery_loop_sets_aside_only_the_row_the_server_refuses(
    pg_dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    async with PostgresSink(pg_dsn) as sink:
        await sink.prepare()
        await conn.execute(
            "ALTER TABLE sip_messages ADD CONSTRAINT short_call_ids CHECK (length(call_id) < 10)"
        )
        records = [record(n, 1_773_480_413.5 + n, b"ok%d" % n) for n in range(1, 40)]
        records[17] = record(18, 1_773_480_413.5, b"refused-by-a-check")
        signaling = Spool(tmp_path / "signaling", (sink.name,), buffered=True)
        with signaling, Spool(tmp_path / "records", (sink.name,)) as cdrs:
            for each in records:
                signaling.append(each.kind, each.key, each.value)
            signaling.flush()
            spools = {STREAM_SIGNALING: signaling, STREAM_RECORDS: cdrs}
            delivery = Delivery(spools, [sink], batch_records=16)
            await delivery.start()
            async with asyncio.timeout(60):
                while not delivery.caught_up():
                    await asyncio.sleep(0.01)
            (state,) = [
                state for state, _ in delivery.readers() if state.stream == STREAM_SIGNALING
            ]
            await delivery.stop()
        assert (state.delivered, state.rejected) == (38, 1)
        assert sink.rows_inserted["sip_messages"] == 38
        assert sink.duplicates_skipped["sip_messages"] == 0
    lines = (tmp_path / "signaling" / "rejected" / f"{sink.name}.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["key"] for line in lines] == ["refused-by-a-check"]
    assert await conn.fetchval("SELECT count(*) FROM sip_messages") == 38


async def test_a_redelivered_message_now_known_restricted_flags_the_row_already_there(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    """Its first delivery was committed unflagged, and the session lost before the
    sink could flag it by its call (the call's restricted CDR written meanwhile, its
    own flag finding no row yet): the batch delivered again, the message's row is
    flagged now, and it stays flagged in the row already there."""
    calls = RestrictedCalls()
    records = [record(1, 1_773_480_413.5, b"late"), record(2, 1_773_480_414.5, b"other")]
    async with PostgresSink(
        pg_dsn, restricted=lambda number: False, restricted_calls=calls
    ) as sink:
        await sink.deliver(STREAM_SIGNALING, records)
        calls.add("late", ("4930333444",))
        await sink.deliver(STREAM_SIGNALING, records)
        assert sink.duplicates_skipped["sip_messages"] == 2
    rows = await conn.fetch("SELECT call_id, restricted FROM sip_messages ORDER BY call_id")
    assert [(r["call_id"], r["restricted"]) for r in rows] == [("late", True), ("other", False)]
