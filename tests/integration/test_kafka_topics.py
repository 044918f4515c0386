"""Topics the Kafka sink makes, against a real Kafka-protocol broker
(tests/support/kafkabroker.py): a configured topic the cluster lacks is created before
the first record with `retention.ms` from `[retention]`, as `sipcdr retention run
--dry-run` prints it; a topic that exists is left as it is, and a retention that differs
from the settings is logged once.

tansu takes CreateTopics with configs and answers DescribeConfigs for a whole topic (it
drops the connection when the request names the configs wanted, so none are named).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from kafkabroker import consume_all, unique_topic
from sipcdr.config import load_config, output_settings
from sipcdr.sinks.base import KIND_CDR, STREAM_RECORDS, SpoolRecord
from sipcdr.sinks.kafka import KafkaSink
from structlog.testing import capture_logs

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000
ADMIN_TIMEOUT_MS = 10_000
CONSUME_TIMEOUT_S = 15.0


@pytest.fixture
async def admin(kafka_bootstrap: str) -> AsyncIterator[Any]:
    client = AIOKafkaAdminClient(
        bootstrap_servers=kafka_bootstrap, request_timeout_ms=ADMIN_TIMEOUT_MS
    )
    await client.start()
    yield client
    await client.close()


async def topic_configs(admin: Any, topic: str) -> dict[str, str]:
    [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    [resource] = response.resources
    assert resource[0] == 0, resource
    return {entry[0]: entry[1] for entry in resource[4]}


def sink_from_config(tmp_path: Path, bootstrap: str, body: str) -> KafkaSink:
    """The sink as the daemon builds it: the config file, then the settings records."""
    path = tmp_path / "sipcdr.toml"
    path.write_text(f'[sinks.kafka]\nbootstrap = "{bootstrap}"\nidempotence = false\n{body}')
    kafka = output_settings(load_config(path, {})).kafka
    assert kafka is not None
    return KafkaSink(
        kafka.bootstrap,
        topic_cdrs=kafka.topic_cdrs,
        topic_fraud=kafka.topic_fraud,
        topic_sip=kafka.topic_sip,
        idempotence=kafka.idempotence,
        create_topics=kafka.create_topics,
        topic_partitions=kafka.topic_partitions,
        topic_replication_factor=kafka.topic_replication_factor,
        topic_retention_ms=kafka.topic_retention_ms,
    )


def cdr(n: int) -> SpoolRecord:
    value = f'{{"cdr_id": "c{n}", "call_id": "call-{n}", "caller": "4940111222"}}'.encode()
    return SpoolRecord(n, KIND_CDR, f"call-{n}".encode(), value)


async def test_missing_topics_are_made_with_the_retention_of_their_records(
    kafka_bootstrap: str, admin: Any, tmp_path: Path
) -> None:
    cdrs, fraud, sip = (unique_topic(kind) for kind in ("cdrs", "fraud", "sip"))
    sink = sink_from_config(
        tmp_path,
        kafka_bootstrap,
        f'topic_cdrs = "{cdrs}"\ntopic_fraud = "{fraud}"\ntopic_sip = "{sip}"\n'
        "topic_partitions = 2\n"
        "[retention]\ncdrs_days = 30\nfraud_alerts_days = 400\nsip_messages_days = 7\n"
        '[[trunks]]\nname = "de"\nsources = ["192.0.2.0/24"]\ncdr_retention_days = 90\n',
    )
    with capture_logs() as logs:
        await sink.prepare()  # the delivery loop's first call, before any record
    try:
        assert {cdrs, fraud, sip} <= set(await admin.list_topics())
        # The CDR topic mixes trunks: it keeps the longest CDR period.
        for topic, days in ((cdrs, 90), (fraud, 400), (sip, 7)):
            assert (await topic_configs(admin, topic))["retention.ms"] == str(days * DAY_MS)
        described = await admin.describe_topics([cdrs])
        assert len(described[0]["partitions"]) == 2
        created = sorted(log["topic"] for log in logs if log["event"] == "kafka_topic_created")
        assert created == sorted([cdrs, fraud, sip])
        await sink.deliver(STREAM_RECORDS, [cdr(1), cdr(2)])
    finally:
        await sink.stop()
    received = await consume_all(kafka_bootstrap, cdrs, 2, CONSUME_TIMEOUT_S)
    assert sorted(message.key for message in received) == [b"call-1", b"call-2"]


async def test_an_existing_topic_is_left_alone_and_another_retention_logged_once(
    kafka_bootstrap: str, admin: Any, tmp_path: Path
) -> None:
    cdrs, fraud = unique_topic("cdrs"), unique_topic("fraud")
    hour_ms = str(3_600_000)
    response = await admin.create_topics(
        [NewTopic(cdrs, 1, 1, topic_configs={"retention.ms": hour_ms})]
    )
    assert [error[1] for error in response.topic_errors] == [0]
    sink = sink_from_config(
        tmp_path, kafka_bootstrap, f'topic_cdrs = "{cdrs}"\ntopic_fraud = "{fraud}"\n'
    )
    with capture_logs() as logs:
        await sink.prepare()
        await sink.deliver(STREAM_RECORDS, [cdr(1)])
        await sink.deliver(STREAM_RECORDS, [cdr(2)])
    await sink.stop()
    assert (await topic_configs(admin, cdrs))["retention.ms"] == hour_ms
    assert len((await admin.describe_topics([cdrs]))[0]["partitions"]) == 1
    differs = [log for log in logs if log["event"] == "kafka_topic_retention_differs"]
    assert [(log["topic"], log["retention_ms"]) for log in differs] == [(cdrs, hour_ms)]
    assert differs[0]["configured_retention_ms"] == str(180 * DAY_MS)
    created = [log["topic"] for log in logs if log["event"] == "kafka_topic_created"]
    assert created == [fraud]
    assert (await topic_configs(admin, fraud))["retention.ms"] == str(365 * DAY_MS)


async def test_with_create_topics_off_the_sink_makes_no_topic(
    kafka_bootstrap: str, admin: Any, tmp_path: Path
) -> None:
    cdrs, fraud = unique_topic("cdrs"), unique_topic("fraud")
    sink = sink_from_config(
        tmp_path,
        kafka_bootstrap,
        f'topic_cdrs = "{cdrs}"\ntopic_fraud = "{fraud}"\ncreate_topics = false\n',
    )
    with capture_logs() as logs:
        await sink.prepare()
    await sink.stop()
    assert not {cdrs, fraud} & set(await admin.list_topics())
    assert not [log for log in logs if log["event"].startswith("kafka_topic")]
