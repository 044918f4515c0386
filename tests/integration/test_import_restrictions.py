"""`sipcdr import` applies the restriction list as the daemon does: a restricted
subject's CDRs and signaling stay off Kafka and are flagged in PostgreSQL, whatever
format its number is written in; with no list to be had it refuses to publish."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import orjson
import pytest
from daemonproc import daemon_environ
from kafkabroker import consume_all, create_topics, free_tcp_port, unique_topic
from pgserver import PrivatePg, run_sync
from sipcalls import Call, write_calls_pcap
from sipcdr.privacy.restriction_file import save_restrictions
from sipcdr.privacy.subjects import restrict
from sipcdr.private import private_dir
from sipcdr.storage.migrations import migrate
from test_delivery_end_to_end import MESSAGES_PER_CALL
from test_import_delivery import APART, run_import

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SUBJECT = "4940555666"
# Trunk "de" numbers national calls: `040555666` from it is the subject too.
CONFIG = """
[[trunks]]
name = "de"
sources = ["192.0.2.0/24"]
country_code = "49"
national_prefix = "0"
"""
CALLS = (
    Call(call_id="restricted@x", caller="+" + SUBJECT, from_tag="r"),
    Call(call_id="national@x", caller="040555666", from_tag="n"),
    Call(call_id="other@x", from_tag="o"),
)


def write_capture(path: Path) -> None:
    """The calls one after the other, from 192.0.2.10 (trunk "de")."""
    write_calls_pcap(path, CALLS, 0.5)


def kafka_env(bootstrap: str, topic: str) -> dict[str, str]:
    asyncio.run(create_topics(bootstrap, [topic, f"{topic}.fraud", f"{topic}.sip"]))
    return {
        "SIPCDR_SINKS__KAFKA__BOOTSTRAP": bootstrap,
        "SIPCDR_SINKS__KAFKA__IDEMPOTENCE": "false",  # tansu refuses InitProducerId
        "SIPCDR_SINKS__KAFKA__TOPIC_CDRS": topic,
        "SIPCDR_SINKS__KAFKA__TOPIC_FRAUD": f"{topic}.fraud",
        "SIPCDR_SINKS__KAFKA__TOPIC_SIP": f"{topic}.sip",
    }


def published(bootstrap: str, topic: str, at_least: int) -> list[str]:
    """The Call-IDs of what reached `topic`, waiting for `at_least` records."""
    received = asyncio.run(consume_all(bootstrap, topic, at_least, timeout=15))
    return [orjson.loads(record.value)["call_id"] for record in received]


async def restrict_subject(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        await restrict(conn, SUBJECT, "dpo")
    finally:
        await conn.close()


async def flags(dsn: str, table: str) -> dict[str, set[bool]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(f"SELECT call_id, restricted FROM {table}")
    finally:
        await conn.close()
    found: dict[str, set[bool]] = {}
    for row in rows:
        found.setdefault(row["call_id"], set()).add(row["restricted"])
    return found


@APART
def test_an_import_withholds_a_restricted_subject_from_kafka_and_flags_it(
    tmp_path: Path, pg_dsn: str, kafka_bootstrap: str, apart: str
) -> None:
    run_sync(lambda: restrict_subject(pg_dsn))
    capture = tmp_path / "calls.pcap"
    write_capture(capture)
    (tmp_path / "sipcdr.toml").write_text(CONFIG)
    topic = unique_topic()
    done = run_import(
        tmp_path,
        capture,
        "--config",
        "sipcdr.toml",
        SIPCDR_SINKS__POSTGRES__DSN=pg_dsn,
        SIPCDR_SPOOL__DELIVERY_PROCESSES=apart,
        **kafka_env(kafka_bootstrap, topic),
    )
    assert done.returncode == 0, done.stderr
    assert ("import_delivery_process_started" in done.stderr) == (apart == "1")
    # Kafka: the other call only, its CDR and all its messages.
    assert published(kafka_bootstrap, topic, 1) == ["other@x"]
    signaling = published(kafka_bootstrap, f"{topic}.sip", MESSAGES_PER_CALL)
    assert signaling.count("other@x") == MESSAGES_PER_CALL
    assert "restricted@x" not in signaling, "signaling naming the subject reached Kafka"
    # PostgreSQL: everything stored, the subject's calls flagged whole, the national
    # one's signaling through its CDR (its messages name 040555666, not the number).
    assert run_sync(lambda: flags(pg_dsn, "cdrs")) == {
        "restricted@x": {True},
        "national@x": {True},
        "other@x": {False},
    }
    assert run_sync(lambda: flags(pg_dsn, "sip_messages")) == {
        "restricted@x": {True},
        "national@x": {True},
        "other@x": {False},
    }


@pytest.mark.parametrize("others", [0, 120_000])
def test_without_postgresql_the_list_the_daemon_saved_applies(
    tmp_path: Path, kafka_bootstrap: str, others: int
) -> None:
    """However long the list: 120,000 numbers take over 2 MiB."""
    numbers = {str(4930_0000_0000 + n) for n in range(others)} | {SUBJECT}
    save_restrictions(private_dir(tmp_path / "var"), frozenset(numbers))
    capture = tmp_path / "calls.pcap"
    write_capture(capture)
    (tmp_path / "sipcdr.toml").write_text(CONFIG)
    topic = unique_topic()
    done = run_import(
        tmp_path, capture, "--config", "sipcdr.toml", **kafka_env(kafka_bootstrap, topic)
    )
    assert done.returncode == 0, done.stderr
    assert published(kafka_bootstrap, topic, 1) == ["other@x"]


@APART
def test_an_import_refuses_to_publish_without_a_restriction_list(
    tmp_path: Path, kafka_bootstrap: str, apart: str
) -> None:
    """PostgreSQL (where restrictions are kept) does not answer, and no list was saved:
    nothing is imported, and the one line says why and what to do."""
    capture = tmp_path / "calls.pcap"
    write_capture(capture)
    topic = unique_topic()
    down = f"postgresql://sipcdr@127.0.0.1:{free_tcp_port()}/sipcdr"
    done = run_import(
        tmp_path,
        capture,
        SIPCDR_SINKS__POSTGRES__DSN=down,
        SIPCDR_SPOOL__DELIVERY_PROCESSES=apart,
        **kafka_env(kafka_bootstrap, topic),
    )
    assert done.returncode == 1
    assert ("import_delivery_process_started" in done.stderr) == (apart == "1")
    refusal = [line for line in done.stderr.splitlines() if line.startswith("sipcdr: import:")]
    assert len(refusal) == 1, done.stderr
    assert "restriction list cannot be read" in refusal[0]
    assert "would reach Kafka" in refusal[0] and "once PostgreSQL answers" in refusal[0]
    assert not (tmp_path / "s.json").exists()
    assert asyncio.run(consume_all(kafka_bootstrap, topic, 1, timeout=3)) == []
    assert asyncio.run(consume_all(kafka_bootstrap, f"{topic}.sip", 1, timeout=3)) == []


@APART
def test_with_postgresql_alone_the_import_waits_for_the_list_then_flags(
    tmp_path: Path, private_pg: PrivatePg, apart: str
) -> None:
    """The database (list and destination both) is down when the import starts: its
    records wait, and none is written before the list is read, so none goes in
    unflagged."""
    server = private_pg()
    dsn = run_sync(server.start)
    run_sync(lambda: restrict_subject(dsn))
    run_sync(server.stop)
    capture = tmp_path / "calls.pcap"
    write_capture(capture)
    (tmp_path / "sipcdr.toml").write_text(CONFIG)
    command = [sys.executable, "-m", "sipcdr.cli", "import", str(capture), "-c", "sipcdr.toml"]
    with subprocess.Popen(
        command,
        cwd=tmp_path,
        env=daemon_environ(
            SIPCDR_SINKS__POSTGRES__DSN=dsn,
            SIPCDR_SINKS__JSONL__PATH="",
            SIPCDR_SPOOL__DELIVERY_PROCESSES=apart,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as importing:
        time.sleep(3)
        assert importing.poll() is None, importing.communicate()
        assert run_sync(server.start) == dsn
        _, stderr = importing.communicate(timeout=120)
    assert importing.returncode == 0, stderr
    assert run_sync(lambda: flags(dsn, "cdrs")) == {
        "restricted@x": {True},
        "national@x": {True},
        "other@x": {False},
    }
