"""Privacy in the running parts: the daemon's retention task against a real
PostgreSQL (metrics, a failed run logged and counted), and restriction and
pseudonymization of the Kafka output against a real broker."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import orjson
import pytest
from kafkabroker import consume_all, create_topics, unique_topic
from privacydata import NOW, cdr, sip_message, write
from sipcdr.config import Config, PostgresConfig, SinksConfig, StateConfig
from sipcdr.privacy.outbound import OutboundFilter
from sipcdr.privacy.pseudonym import pseudonym
from sipcdr.privacy.stats import PrivacyStats
from sipcdr.privacy.subjects import restrict
from sipcdr.privacy.task import PrivacyTask
from sipcdr.sinks.base import KIND_CDR, KIND_SIP, STREAM_RECORDS, STREAM_SIGNALING, SpoolRecord
from sipcdr.sinks.kafka import KafkaSink
from sipcdr.spool import Spool
from sipcdr.storage.migrations import migrate
from sipcdr.telemetry.metrics import Metrics, Sources
from structlog.testing import capture_logs

pytestmark = pytest.mark.integration

SUBJECT = "4940555666"
OTHER = "4940111222"
KEY = b"0123456789abcdef0123456789abcdef"


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_dsn)
    await migrate(connection)
    yield connection
    await connection.close()


def config(dsn: str, tmp_path: Path) -> Config:
    return Config(
        sinks=SinksConfig(postgres=PostgresConfig(dsn=dsn)), state=StateConfig(dir=tmp_path)
    )


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


async def test_the_daemon_task_runs_retention_and_exports_its_metrics(
    pg_dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    old = NOW.replace(year=2020)  # far past every retention, whatever today is
    await write(pg_dsn, [cdr(1, old)], [sip_message(old, "call-1@192.0.2.10")])
    stats = PrivacyStats()
    metrics = Metrics(lambda: Sources(privacy=stats))
    task = PrivacyTask(config(pg_dsn, tmp_path), stats, lambda: pg_dsn, None)
    report = await task.run_once()
    assert report is not None and report.bytes > 0
    assert await conn.fetchval("SELECT count(*) FROM cdrs") == 0
    assert value(metrics, "sipcdr_retention_runs_total", outcome="ok") == 1
    assert value(metrics, "sipcdr_retention_bytes_dropped_total", table="cdrs") > 0
    assert value(metrics, "sipcdr_retention_partitions_dropped_total", table="sip_messages") >= 1
    assert value(metrics, "sipcdr_retention_last_success_timestamp_seconds") > 0
    # What is left is the partitions made ahead of today: none older than a day.
    assert value(metrics, "sipcdr_retention_oldest_partition_age_days", table="cdrs") <= 1
    assert await conn.fetchval("SELECT actor FROM audit_log") == "sipcdr daemon"


async def test_a_failed_run_is_logged_at_error_and_counted(tmp_path: Path) -> None:
    stats = PrivacyStats()
    metrics = Metrics(lambda: Sources(privacy=stats))
    dsn = "postgresql://nobody@127.0.0.1:1/none"
    task = PrivacyTask(config(dsn, tmp_path), stats, lambda: dsn, None)
    with capture_logs() as logs:
        assert await task.run_once() is None
    assert value(metrics, "sipcdr_retention_runs_total", outcome="failed") == 1
    assert [entry["log_level"] for entry in logs if entry["event"] == "retention_failed"] == [
        "error"
    ]


async def test_the_first_run_on_a_fresh_database_does_not_race_the_migrations(
    pg_dsn: str, tmp_path: Path
) -> None:
    """A first start on a fresh (embedded) database: the task may run before the
    PostgreSQL sink has migrated; it migrates itself rather than fail for a table
    that is not there yet."""
    stats = PrivacyStats()
    outbound = OutboundFilter(None, pseudonymize=False)
    task = PrivacyTask(config(pg_dsn, tmp_path), stats, lambda: pg_dsn, outbound)
    with capture_logs() as logs:
        await task.refresh_restrictions()
        assert await task.run_once() is not None
    assert stats.runs == {"ok": 1, "failed": 0}
    assert outbound.known
    assert [entry for entry in logs if entry["log_level"] in ("warning", "error")] == []


def cdr_record(seq: int, caller: str) -> SpoolRecord:
    item = cdr(seq, NOW - timedelta(minutes=seq), caller=caller, call_id=f"k-{uuid.uuid4()}")
    return SpoolRecord(seq, KIND_CDR, item.call_id.encode(), orjson.dumps(item.to_record()))


async def test_restricted_subjects_are_not_published_until_lifted(
    pg_dsn: str, conn: asyncpg.Connection, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = unique_topic()
    await create_topics(kafka_bootstrap, [topic])
    outbound = OutboundFilter(None, pseudonymize=False)
    stats = PrivacyStats()
    metrics = Metrics(lambda: Sources(privacy=stats, outbound=outbound))
    task = PrivacyTask(config(pg_dsn, tmp_path), stats, lambda: pg_dsn, outbound)
    await restrict(conn, SUBJECT, "dpo")
    await task.refresh_restrictions()
    assert value(metrics, "sipcdr_restricted_subjects") == 1
    sink = KafkaSink(kafka_bootstrap, topic_cdrs=topic, idempotence=False)
    sink.outbound = outbound.apply
    sent = [cdr_record(1, SUBJECT), cdr_record(2, OTHER), cdr_record(3, SUBJECT)]
    async with sink:
        await sink.deliver(STREAM_RECORDS, sent[:2])
        await restrict(conn, SUBJECT, "dpo", lift=True)
        await task.refresh_restrictions()
        await sink.deliver(STREAM_RECORDS, sent[2:])
    received = await consume_all(kafka_bootstrap, topic, 2, timeout=20)
    # The subject's record sent while restricted never arrives; the one after does.
    assert sorted(record.key for record in received) == sorted([sent[1].key, sent[2].key])
    assert value(metrics, "sipcdr_kafka_records_withheld_total", kind="cdr") == 1


async def test_pseudonymized_kafka_output_carries_no_number(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = unique_topic()
    await create_topics(kafka_bootstrap, [topic])
    sink = KafkaSink(kafka_bootstrap, topic_cdrs=topic, idempotence=False)
    sink.outbound = OutboundFilter(KEY, pseudonymize=True).apply
    async with sink:
        await sink.deliver(STREAM_RECORDS, [cdr_record(1, SUBJECT)])
    (received,) = await consume_all(kafka_bootstrap, topic, 1, timeout=20)
    assert SUBJECT.encode() not in received.value
    assert orjson.loads(received.value)["caller"] == pseudonym(KEY, SUBJECT)


async def test_the_daemon_task_expires_spool_segments_a_sink_never_took(tmp_path: Path) -> None:
    stats = PrivacyStats()
    with Spool(tmp_path / "signaling", ("postgres",), segment_bytes=400) as spool:
        for n in range(30):
            spool.append(KIND_SIP, b"k", b'{"n":%d,"pad":"%s"}' % (n, b"x" * 40))
        oldest = min(tmp_path.glob("signaling/*.seg"))
        os.utime(oldest, (0, 0))
        task = PrivacyTask(
            Config(sinks=SinksConfig(postgres=PostgresConfig(dsn=""))),
            stats,
            lambda: None,
            None,
            spools=lambda: {STREAM_SIGNALING: spool},
        )
        with capture_logs() as logs:
            await task.run_once()
        assert not oldest.exists()
        assert spool.stats.dropped["retention"] > 0
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
            "spool_records_expired"
        ]
