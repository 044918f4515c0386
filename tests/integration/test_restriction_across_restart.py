"""A restriction holds across a restart of the daemon: started while PostgreSQL (where
restrictions are kept) does not answer, the daemon must not publish a restricted
subject's CDR to Kafka for want of the list."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import asyncpg
import orjson
import pytest
from daemonproc import Daemon, start_daemon, wait_for
from kafkabroker import consume_all, create_topics, unique_topic
from pgserver import PrivatePg, run_sync
from sipcalls import Call, answered_call_messages
from sipcdr.privacy.subjects import restrict
from sipcdr.storage.migrations import migrate

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SUBJECT = "4940555666"


async def restrict_subject(dsn: str, others: int = 0) -> None:
    """The subject restricted as `sipcdr subject restrict` does it, and `others` more
    numbers in the list straight away (one by one would take minutes)."""
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        await restrict(conn, SUBJECT, "dpo")
        await conn.execute(
            "INSERT INTO restrictions (number, operator) "
            "SELECT (493000000000 + n)::text, 'dpo' FROM generate_series(1, $1) n",
            others,
        )
    finally:
        await conn.close()


def send(daemon: Daemon, call: Call) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for data in answered_call_messages(call):
            udp.sendto(data, daemon.endpoint("sip_udp"))


@pytest.mark.parametrize("others", [0, 120_000])
def test_a_restart_while_the_database_is_down_keeps_restricted_subjects_off_kafka(
    tmp_path: Path,
    private_pg: PrivatePg,
    kafka_bootstrap: str,
    daemons: list[Daemon],
    others: int,
) -> None:
    """With a long list too: 120,000 numbers save to over 2 MiB, read back whole."""
    server = private_pg()
    dsn = run_sync(server.start)
    run_sync(lambda: restrict_subject(dsn, others))
    topic = unique_topic()
    asyncio.run(create_topics(kafka_bootstrap, [topic, f"{topic}.fraud"]))
    env = {
        "SIPCDR_SINKS__POSTGRES__DSN": dsn,
        "SIPCDR_SINKS__KAFKA__BOOTSTRAP": kafka_bootstrap,
        "SIPCDR_SINKS__KAFKA__IDEMPOTENCE": "false",  # tansu refuses InitProducerId
        "SIPCDR_SINKS__KAFKA__TOPIC_CDRS": topic,
        "SIPCDR_SINKS__KAFKA__TOPIC_FRAUD": f"{topic}.fraud",
    }
    first = start_daemon(tmp_path, **env)
    daemons.append(first)
    wait_for(lambda: first.metric("sipcdr_restricted_subjects") == 1 + others, timeout=30)
    assert first.metric("sipcdr_restrictions_not_saved") == 0
    assert first.stop() == 0
    run_sync(server.stop)  # down while the daemon starts again

    # `[spool] stop_drain_ms`: the stop below gives PostgreSQL, down, a second rather
    # than the default 20 s.
    second = start_daemon(tmp_path, **env, SIPCDR_SPOOL__STOP_DRAIN_MS="1000")
    daemons.append(second)
    # The list the first run saved is in force; nothing waits for the database.
    assert second.metric("sipcdr_restricted_subjects") == 1 + others
    assert second.metric("sipcdr_delivery_waiting_for_restrictions") == 0
    send(second, Call(call_id="restricted@x", caller="+" + SUBJECT, from_tag="r"))
    send(second, Call(call_id="other@x", from_tag="o"))
    wait_for(lambda: len(second.cdrs()) == 2, timeout=30)
    # Both taken by the Kafka sink (one published, one withheld): whatever was
    # published is in the topic now, so reading waits for the one, not a timeout.
    kafka = {"sink": "kafka", "stream": "records"}
    wait_for(lambda: second.metric("sipcdr_sink_records_total", **kafka) == 2, timeout=30)
    received = asyncio.run(consume_all(kafka_bootstrap, topic, 1, timeout=15))
    published = [orjson.loads(record.value)["call_id"] for record in received]
    assert "other@x" in published
    assert "restricted@x" not in published, "a restricted subject's CDR reached Kafka"
    stopping = time.monotonic()
    assert second.stop() == 0
    assert time.monotonic() - stopping < 12  # its CDRs for PostgreSQL wait in the spool


def test_a_first_start_while_the_database_is_down_publishes_nothing_until_it_answers(
    tmp_path: Path, private_pg: PrivatePg, kafka_bootstrap: str, daemons: list[Daemon]
) -> None:
    """No list saved yet (a first start, a lost state folder): Kafka waits, counted, and
    gets the records once the list is read, the restricted subject's withheld."""
    server = private_pg()
    dsn = run_sync(server.start)
    run_sync(lambda: restrict_subject(dsn))
    run_sync(server.stop)
    topic = unique_topic()
    asyncio.run(create_topics(kafka_bootstrap, [topic, f"{topic}.fraud"]))
    daemon = start_daemon(
        tmp_path,
        SIPCDR_SINKS__POSTGRES__DSN=dsn,
        SIPCDR_SINKS__KAFKA__BOOTSTRAP=kafka_bootstrap,
        SIPCDR_SINKS__KAFKA__IDEMPOTENCE="false",
        SIPCDR_SINKS__KAFKA__TOPIC_CDRS=topic,
        SIPCDR_SINKS__KAFKA__TOPIC_FRAUD=f"{topic}.fraud",
    )
    daemons.append(daemon)
    assert daemon.metric("sipcdr_delivery_waiting_for_restrictions") == 1
    send(daemon, Call(call_id="restricted@x", caller="+" + SUBJECT, from_tag="r"))
    send(daemon, Call(call_id="other@x", from_tag="o"))
    wait_for(lambda: len(daemon.cdrs()) == 2, timeout=30)
    assert asyncio.run(consume_all(kafka_bootstrap, topic, 1, timeout=3)) == []
    assert daemon.metric("sipcdr_sink_lag_records", sink="kafka", stream="records") >= 2

    assert run_sync(server.start) == dsn
    wait_for(lambda: daemon.metric("sipcdr_delivery_waiting_for_restrictions") == 0, 90)
    received = asyncio.run(consume_all(kafka_bootstrap, topic, 1, timeout=15))
    assert [orjson.loads(record.value)["call_id"] for record in received] == ["other@x"]
    assert daemon.metric("sipcdr_restricted_subjects") == 1
    assert (tmp_path / "var" / "restrictions.json").stat().st_mode & 0o777 == 0o600
    assert daemon.stop() == 0
