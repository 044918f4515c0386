"""`sip_messages` rows sent as one binary COPY the sink encodes itself (`SipCopy`),
against a real server: the rows stored are those of the driver's encoding of
`sip_message_row`'s tuples, column for column (odd addresses and node names, NULs,
invalid UTF-8, bodies kept, days far apart); a re-delivered batch goes through the
staging table; a session cut mid-COPY leaves all of the batch or none."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import asyncpg
import pytest
from pcapdata import require_shared_data
from sipcdr.capture.pcapfile import iter_packets
from sipcdr.model import Packet
from sipcdr.privacy.naming import named_numbers
from sipcdr.sinks.base import KIND_SIP, STREAM_SIGNALING, SpoolRecord
from sipcdr.sinks.pgrows import SIP_MESSAGES, SipCopy, Table
from sipcdr.sinks.postgres import PostgresSink, TableRows
from sipcdr.sip import SipMessage, SipParseError, parse
from sipcdr.sipevent import spooled

pytestmark = pytest.mark.integration

T0 = 1773480413.589793  # 2026-03-14
_HEAD = (
    b"INVITE sip:4930333444@example.net SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
    b"From: <sip:4940111222@example.com>;tag=1\r\nTo: <sip:4930333444@example.net>\r\n"
    b"CSeq: 7 INVITE\r\n"
)
_SDP = b"v=0\r\no=- 1 1 IN IP4 192.0.2.9\r\ns=\xc3\xa9\r\n"


def _odd() -> list[bytes]:
    length = b"Content-Length: %d\r\n" % len(_SDP)
    return [
        _HEAD + b"Call-ID: a\x00b\r\n" + length + b"\r\n" + _SDP,  # NUL in the Call-ID
        _HEAD + b"Call-ID: utf\r\nSubject: \xc3\xa9t\xc3\xa9\r\n" + length + b"\r\n" + _SDP,
        _HEAD + b"Call-ID: bad\r\nSubject: \xff\xfe\r\n" + length + b"\r\n" + _SDP,
        _HEAD.replace(b"CSeq: 7 INVITE\r\n", b"") + b"Call-ID: no-cseq\r\n\r\n",
        b"SIP/2.0 486 Busy Here\r\nCall-ID: busy\r\nCSeq: 7 INVITE\r\nFrom: <sip:a@b>;tag=1\r\n"
        b"To: <sip:c@d>;tag=2\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nContent-Length: 0\r\n\r\n",
    ]


def messages() -> list[tuple[Packet, SipMessage]]:
    pairs = []
    for path in sorted((require_shared_data() / "pcaps").glob("*.pcap*"))[:6]:
        for packet in iter_packets(path):
            with contextlib.suppress(SipParseError):
                pairs.append((packet, parse(packet.payload)))
    ends = [("::1", "tcp", "n\x00de"), ("fe80::1%eth0", "tls", "nöde"), ("192.0.2.7", "udp", "")]
    for n, payload in enumerate(_odd() * 3):
        src, transport, node = ends[n % 3]
        # Days far apart, before 1970 among them: partitions made on demand.
        when = (T0, -86_400.25, 946_684_799.9999996, 2_000_000_000.5)[n % 4]
        packet = Packet(when, src, 5060 + n, "203.0.113.20", 5061, transport, payload, node)
        pairs.append((packet, parse(payload)))
    return pairs


class TupleSink(PostgresSink):
    """Rows as tuples of Python values, encoded by the driver."""

    def _encoded(self, stream: str, records: Sequence[SpoolRecord]) -> dict[Table, TableRows]:
        return dict(self._rows(stream, records))


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_dsn)
    yield connection
    await connection.close()


async def stored(conn: asyncpg.Connection) -> list[dict[str, object]]:
    rows = await conn.fetch("SELECT * FROM sip_messages ORDER BY message_id, captured_at")
    await conn.execute("TRUNCATE sip_messages")
    return [dict(row) for row in rows]


@pytest.mark.parametrize("store_body", [False, True])
async def test_the_encoded_rows_are_those_of_the_driver(
    pg_dsn: str, conn: asyncpg.Connection, store_body: bool
) -> None:
    pairs = messages()
    assert len(pairs) >= 100
    numbers = sorted({n for _, msg in pairs for n in named_numbers(msg.from_uri)})
    restricted = frozenset(numbers[::2]).__contains__
    records = [
        SpoolRecord(seq, KIND_SIP, msg.call_id.encode(), spooled(packet, msg, store_body))
        for seq, (packet, msg) in enumerate(pairs, 1)
    ]
    async with PostgresSink(pg_dsn, restricted=restricted) as sink:
        assert isinstance(sink._encoded(STREAM_SIGNALING, records)[SIP_MESSAGES], SipCopy)
        await sink.deliver(STREAM_SIGNALING, records)
        assert sink.rows_inserted["sip_messages"] == len(records)
    encoded = await stored(conn)
    async with TupleSink(pg_dsn, restricted=restricted) as sink:
        await sink.deliver(STREAM_SIGNALING, records)
    driven = await stored(conn)
    assert len(encoded) == len(records)
    assert encoded == driven
    flags = [row["restricted"] for row in encoded]
    assert any(flags) and not all(flags)
    assert any(row["body"] for row in encoded) == store_body
    assert any("\ufffd" in str(row["call_id"]) for row in encoded)


async def test_an_encoded_batch_partly_there_adds_only_the_rest(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    pairs = messages()[:40]
    records = [
        SpoolRecord(seq, KIND_SIP, b"k", spooled(packet, msg, False))
        for seq, (packet, msg) in enumerate(pairs, 1)
    ]
    async with PostgresSink(pg_dsn) as sink:
        await sink.deliver(STREAM_SIGNALING, records[:7])
        await sink.deliver(STREAM_SIGNALING, records)  # seven already there: staging
        assert sink.rows_inserted["sip_messages"] == len(records)
        assert sink.duplicates_skipped["sip_messages"] == 7
    assert len(await stored(conn)) == len(records)


async def test_a_session_cut_mid_copy_leaves_all_or_nothing(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    pairs = messages()
    cut_short = 0
    async with PostgresSink(pg_dsn) as sink:
        for attempt in range(4):
            records = [
                SpoolRecord(
                    n, KIND_SIP, b"k", spooled(packet._replace(timestamp=T0 + n), msg, True)
                )
                for n, (packet, msg) in (
                    (n, pairs[n % len(pairs)])
                    for n in range(attempt * 20_000, (attempt + 1) * 20_000)
                )
            ]
            await sink.deliver(STREAM_SIGNALING, records[:1])
            before = await conn.fetchval("SELECT count(*) FROM sip_messages") - 1
            pid = await sink._connections[STREAM_SIGNALING].fetchval("SELECT pg_backend_pid()")

            async def cut(pid: int, delay_s: float) -> None:
                await asyncio.sleep(delay_s)
                await conn.execute("SELECT pg_terminate_backend($1)", pid)

            async def deliver_within(records: list[SpoolRecord]) -> None:
                async with asyncio.timeout(20):
                    await sink.deliver(STREAM_SIGNALING, records)

            results = await asyncio.gather(
                deliver_within(records), cut(pid, 0.003 * attempt), return_exceptions=True
            )
            added = await conn.fetchval("SELECT count(*) FROM sip_messages") - before
            assert added in (1, len(records)), (attempt, added, results)
            assert not isinstance(results[0], TimeoutError), attempt
            cut_short += added == 1
            await sink.deliver(STREAM_SIGNALING, records)
            assert await conn.fetchval("SELECT count(*) FROM sip_messages") - before == len(records)
    assert cut_short
