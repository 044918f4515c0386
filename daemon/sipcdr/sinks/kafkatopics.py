"""The Kafka sink's topics made before its first record: a configured topic the cluster
does not have is created with `retention.ms` from the retention settings, so the topic
keeps the same promise as the tables; one it has is left as it is.

It must run before the producer asks for a topic's metadata: aiokafka's metadata
requests allow auto-creation, and a broker with `auto.create.topics.enable` (Kafka's
default) would create the topic with its own defaults, keeping records for as long as
the broker's `log.retention.*` says.

Errors that pass (no connection, a timeout, a broker electing a controller) are raised,
so the sink tries again with its next batch. A refusal of the broker (no right to
create topics, too few brokers for the replication factor, a policy) is logged at ERROR
once and not asked again: the records still go out, to whatever topic the broker has.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import structlog

# aiokafka ships no type information.
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError, for_code

RETENTION_MS: Final = "retention.ms"
# The replication a topic gets when none is configured: three copies survive a broker
# lost while another is down for maintenance, and acks=all then waits for the ones in
# sync. A cluster with fewer brokers (a lab, the compose file in deploy/) gets one copy
# per broker instead of a refused topic.
PREFERRED_REPLICATION: Final = 3


@dataclass(frozen=True, slots=True)
class TopicPlan:
    """What a missing topic is created with."""

    retention_ms: Mapping[str, int]  # topic -> retention.ms; a topic not named: broker's
    partitions: int
    replication_factor: int | None  # None: PREFERRED_REPLICATION, at most the brokers


async def ensure_topics(
    client_options: Mapping[str, Any],
    topics: list[str],
    plan: TopicPlan,
    timeout_ms: int,
) -> dict[str, str]:
    """Create those of `topics` the cluster does not have; returns what happened to
    each topic ("created", "exists", "refused"), logged as it went."""
    log = structlog.get_logger("sipcdr.kafka")
    admin = AIOKafkaAdminClient(request_timeout_ms=timeout_ms, **client_options)
    outcome: dict[str, str] = {}
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [topic for topic in topics if topic not in existing]
        present = [topic for topic in topics if topic in existing]
        if missing:
            replication = plan.replication_factor
            if replication is None:
                brokers = len((await admin.describe_cluster()).get("brokers") or ())
                replication = max(1, min(PREFERRED_REPLICATION, brokers))
            response = await admin.create_topics(
                [
                    NewTopic(
                        topic, plan.partitions, replication, topic_configs=_configs(plan, topic)
                    )
                    for topic in missing
                ],
                timeout_ms=timeout_ms,
            )
            for topic, code, message in response.topic_errors:
                error = for_code(code) if code else None
                if error is None:
                    outcome[topic] = "created"
                    log.info(
                        "kafka_topic_created",
                        topic=topic,
                        partitions=plan.partitions,
                        replication_factor=replication,
                        retention_ms=plan.retention_ms.get(topic),
                    )
                elif error is TopicAlreadyExistsError:
                    present.append(topic)  # made meanwhile, by another producer
                elif error.retriable:
                    raise error(message)
                else:
                    outcome[topic] = "refused"
                    log.error(
                        "kafka_topic_not_created",
                        topic=topic,
                        error=f"{error.__name__}: {message or error.description}",
                        note="records go to whatever topic the broker makes or has",
                    )
        for topic in present:
            outcome[topic] = "exists"
        await _compare_retention(admin, [t for t in present if t in plan.retention_ms], plan)
    finally:
        await admin.close()
    return outcome


def passing(exc: KafkaError) -> bool:
    """An error that ends by itself (no connection, a timeout, an election)."""
    return bool(exc.retriable) or isinstance(exc, KafkaTimeoutError)


def _configs(plan: TopicPlan, topic: str) -> dict[str, str]:
    retention = plan.retention_ms.get(topic)
    return {} if retention is None else {RETENTION_MS: str(retention)}


async def _compare_retention(admin: Any, topics: list[str], plan: TopicPlan) -> None:
    """Log each existing topic whose retention.ms is not the one the settings give: it
    is the operator's topic, so it is only reported, not changed."""
    if not topics:
        return
    log = structlog.get_logger("sipcdr.kafka")
    try:
        # Every config of the topic: some brokers (tansu) drop the connection when the
        # request names the configs wanted.
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic) for topic in topics]
        )
    except (KafkaError, OSError) as exc:
        # Only a report: a broker that cannot answer it (or drops the connection on it)
        # must not hold up the records.
        log.warning("kafka_topic_config_not_read", error=f"{type(exc).__name__}: {exc}")
        return
    for response in responses:
        for error_code, _message, _kind, topic, entries in (
            resource[:5] for resource in response.resources
        ):
            if error_code:
                continue
            value = next((entry[1] for entry in entries if entry[0] == RETENTION_MS), None)
            wanted = str(plan.retention_ms[topic])
            if value != wanted:
                log.warning(
                    "kafka_topic_retention_differs",
                    topic=topic,
                    retention_ms=value,
                    configured_retention_ms=wanted,
                    note="an existing topic is left as it is",
                )
