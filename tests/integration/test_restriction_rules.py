"""Which rows a restriction reaches, against a real PostgreSQL: one rule for "a message
names the subject" in the Kafka filter, the PostgreSQL sink and `restrict`; signaling
tied to a restricted CDR through its call when its numbers are written otherwise; and
the held tables flagged and cleared with the live ones."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from privacydata import alert, cdr, sip_message, write
from sipcdr.privacy.outbound import OutboundFilter
from sipcdr.privacy.subjects import restrict
from sipcdr.sinks.base import KIND_CDR, KIND_SIP, STREAM_RECORDS, STREAM_SIGNALING, SpoolRecord
from sipcdr.sinks.postgres import PostgresSink
from sipcdr.storage.migrations import migrate
from test_subjects import OTHER, SUBJECT, THIRD, ago, populate

pytestmark = pytest.mark.integration


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_dsn)
    await migrate(connection)
    yield connection
    await connection.close()


def message(call_id: str, extra: str = "", **numbers: Any) -> dict[str, Any]:
    """A message of `call_id`, with `extra` header lines after the usual ones."""
    item = sip_message(ago(1), call_id, **numbers)
    item["headers"] += extra
    return item


def records(kind: str, items: list[dict[str, Any]]) -> list[SpoolRecord]:
    return [SpoolRecord(n, kind, b"", orjson.dumps(item)) for n, item in enumerate(items, 1)]


async def sip_flags(conn: asyncpg.Connection, table: str = "sip_messages") -> dict[str, bool]:
    return dict(await conn.fetch(f"SELECT call_id, bool_and(restricted) FROM {table} GROUP BY 1"))


# One message per way of naming (or not naming) the subject.
CASES: dict[str, tuple[bool, dict[str, Any]]] = {
    "from": (True, {"caller": SUBJECT}),
    "to-and-ruri": (True, {"callee": SUBJECT}),
    "pai": (True, {"asserted": SUBJECT}),
    "diversion": (True, {"extra": f"Diversion: <sip:+{SUBJECT}@x>;reason=busy\r\n"}),
    "contact-tel": (True, {"extra": f"Contact: <tel:{SUBJECT}>\r\n"}),
    "bare-header": (True, {"extra": f"X-Billing-Number: {SUBJECT}\r\n"}),
    "longer": (False, {"extra": f"Diversion: <sip:1{SUBJECT}1@x>\r\n"}),
    "separators": (True, {"extra": "Diversion: <tel:+49-40-555-666>;reason=busy\r\n"}),
    "separated-longer": (False, {"extra": "Contact: <tel:+49-40-555-666-7>\r\n"}),
    "national": (False, {"caller": "040555666"}),
    "none": (False, {}),
}


async def test_kafka_postgresql_and_restrict_agree_on_which_messages_name_a_subject(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    """Before, Kafka withheld a message naming the number in any URI while PostgreSQL
    flagged only From, To, Request-URI and P-Asserted-Identity, and `restrict` any
    header: three answers for one message."""
    items = [message(name, **numbers) for name, (_, numbers) in CASES.items()]
    expected = {name: names for name, (names, _) in CASES.items()}
    outbound = OutboundFilter(None, pseudonymize=False)
    outbound.set_restricted(frozenset({SUBJECT}))
    withheld = {
        item["call_id"]: outbound.apply(KIND_SIP, orjson.dumps(item)) is None for item in items
    }
    assert withheld == expected
    async with PostgresSink(pg_dsn, restricted=outbound.is_restricted) as sink:
        await sink.deliver(STREAM_SIGNALING, records(KIND_SIP, items))
    assert await sip_flags(conn) == expected
    # `restrict` run by the privacy officer on the stored rows: the same rows.
    await conn.execute("UPDATE sip_messages SET restricted = false")
    counts = await restrict(conn, SUBJECT, "dpo")
    assert await sip_flags(conn) == expected
    assert counts["sip_messages"] == sum(expected.values())


async def test_a_restricted_cdr_flags_its_calls_signaling_written_in_national_format(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    """The call's messages name `040555666`; its CDR says 4940555666 (the trunk's
    numbering). Messages stored before the CDR are flagged when it is written, those
    after it as they come."""
    restricted = {SUBJECT}
    national = {"caller": "040555666", "callee": THIRD}
    async with PostgresSink(pg_dsn, restricted=restricted.__contains__) as sink:
        await sink.deliver(
            STREAM_SIGNALING,
            records(KIND_SIP, [message("nat@x", **national), message("other@x")]),
        )
        assert await sip_flags(conn) == {"nat@x": False, "other@x": False}
        cdrs = [
            cdr(1, ago(1), caller=SUBJECT, callee=THIRD, call_id="nat@x"),
            cdr(2, ago(1), caller=OTHER, callee=THIRD, call_id="other@x"),
        ]
        await sink.deliver(STREAM_RECORDS, records(KIND_CDR, [item.to_record() for item in cdrs]))
        assert await sip_flags(conn) == {"nat@x": True, "other@x": False}
        late = [message("nat@x", **national), message("other@x")]  # a BYE's 200, say
        await sink.deliver(STREAM_SIGNALING, records(KIND_SIP, late))
    assert await sip_flags(conn) == {"nat@x": True, "other@x": False}
    assert await conn.fetchval("SELECT count(*) FROM sip_messages WHERE call_id = 'nat@x'") == 2


async def copy_to_held(conn: asyncpg.Connection, table: str, hold_id: int) -> None:
    """The rows of `table` moved to its held table, as retention does under a hold."""
    columns = [
        row[0]
        for row in await conn.fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass "
            "AND attnum > 0 AND NOT attisdropped",
            table,
        )
    ]
    listed = ", ".join(f'"{name}"' for name in columns)
    await conn.execute(
        f"INSERT INTO {table}_held ({listed}, hold_id) SELECT {listed}, {hold_id} FROM {table}"
    )
    await conn.execute(f"DELETE FROM {table}")


async def test_restrict_and_unrestrict_reach_the_held_tables(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    await populate(pg_dsn)
    for table in ("cdrs", "sip_messages", "fraud_alerts"):
        await copy_to_held(conn, table, 7)
    counts = await restrict(conn, SUBJECT, "dpo")
    assert counts == {"cdrs": 3, "sip_messages": 3, "fraud_alerts": 1}
    held = {r[0] for r in await conn.fetch("SELECT call_id FROM cdrs_held WHERE restricted")}
    assert held == {"c1", "c2", "c3"}
    assert await sip_flags(conn, "sip_messages_held") == {
        "c1": True,
        "c2": True,
        "c4": False,
        "reg-1": True,
        "c9": False,
    }
    await restrict(conn, OTHER, "dpo")
    await restrict(conn, SUBJECT, "dpo", lift=True)
    held = {r[0] for r in await conn.fetch("SELECT call_id FROM cdrs_held WHERE restricted")}
    assert held == {"c1", "c2", "c4"}  # OTHER's calls stay restricted
    assert await sip_flags(conn, "sip_messages_held") == {
        "c1": True,
        "c2": True,
        "c4": True,
        "reg-1": False,
        "c9": False,
    }
    alerts = dict(await conn.fetch("SELECT subject, restricted FROM fraud_alerts_held"))
    assert alerts == {SUBJECT: False, OTHER: True}


async def test_restrict_flags_an_alert_whose_details_name_the_subject(
    conn: asyncpg.Connection, pg_dsn: str
) -> None:
    """An alert about another subject that names the number (sequential dialing's
    `last_number`) is flagged by `restrict` as the sinks flag it, and cleared by
    `unrestrict` only when no other restricted number is named."""
    about_other = dict(alert(ago(1), OTHER), details={"last_number": SUBJECT})
    both = dict(alert(ago(1), THIRD), details={"numbers": [SUBJECT, OTHER]})
    longer = dict(alert(ago(1), THIRD), details={"last_number": "1" + SUBJECT})
    await write(pg_dsn, alerts=[about_other, both, longer])

    async def flagged() -> dict[str, bool]:
        rows = await conn.fetch("SELECT alert_id, restricted FROM fraud_alerts")
        return {str(row[0]): row[1] for row in rows}

    ids = (about_other["alert_id"], both["alert_id"], longer["alert_id"])
    await restrict(conn, SUBJECT, "dpo")
    await restrict(conn, OTHER, "dpo")
    assert [(await flagged())[i] for i in ids] == [True, True, False]
    await restrict(conn, SUBJECT, "dpo", lift=True)
    # `about_other` is about OTHER, still restricted; `both` names it too.
    assert [(await flagged())[i] for i in ids] == [True, True, False]
    await restrict(conn, OTHER, "dpo", lift=True)
    assert [(await flagged())[i] for i in ids] == [False, False, False]


SAMPLES = [
    f"From: <sip:+{SUBJECT}@x>",
    f"X-Num: {SUBJECT}",
    f"Call-ID: 1{SUBJECT}@x",
    "Diversion: <tel:+49-40-555-666>",
    "From: <sip:+49.40.555.666@x>",
    "From: <sip:+49(40)555666@x>",
    "From: <sip:+49-40-555-666-7@x>",
    "From: <sip:+1-49-40-555-666@x>",
    "From: <sip:49-40-555-666@x>",
    f'{{"last_number": "{SUBJECT}"}}',
    "",
]


async def test_the_rule_in_sql_is_the_rule_in_python(conn: asyncpg.Connection) -> None:
    """`sql_names` (unrestrict, with the number a column) and `header_pattern` (restrict
    and holds, the number a parameter) say of each text what the sinks say."""
    from sipcdr.privacy.naming import header_pattern, names_any, sql_names

    by_column_sql = f"SELECT {sql_names('$1::text', '$2::text')}"
    for text in SAMPLES:
        python = names_any(text, {SUBJECT}.__contains__)
        by_column = await conn.fetchval(by_column_sql, SUBJECT, text)
        by_pattern = await conn.fetchval("SELECT $1::text ~ $2", text, header_pattern(SUBJECT))
        assert (python, by_column, by_pattern) == (python, python, python), text


async def test_a_cdr_whose_uris_name_the_subject_is_flagged_by_sink_and_restrict(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    """A forwarded call: To names the subject, the Request-URI and the callee are the
    new target. The sink, `restrict` and `unrestrict` treat its CDR as the subject's,
    as Kafka does."""
    from dataclasses import replace

    forwarded = replace(
        cdr(1, ago(1), caller=OTHER, callee=THIRD, call_id="fwd@x"),
        to_uri=f"sip:+{SUBJECT}@example.net",
    )
    plain = cdr(2, ago(1), caller=OTHER, callee=THIRD, call_id="plain@x")
    items = [forwarded.to_record(), plain.to_record()]

    async def cdr_flags() -> dict[str, bool]:
        return dict(await conn.fetch("SELECT call_id, restricted FROM cdrs"))

    restricted = {SUBJECT}
    async with PostgresSink(pg_dsn, restricted=restricted.__contains__) as sink:
        await sink.deliver(STREAM_RECORDS, records(KIND_CDR, items))
    assert await cdr_flags() == {"fwd@x": True, "plain@x": False}
    await conn.execute("UPDATE cdrs SET restricted = false")
    counts = await restrict(conn, SUBJECT, "dpo")
    assert await cdr_flags() == {"fwd@x": True, "plain@x": False}
    assert counts["cdrs"] == 1
    await restrict(conn, SUBJECT, "dpo", lift=True)
    assert await cdr_flags() == {"fwd@x": False, "plain@x": False}
