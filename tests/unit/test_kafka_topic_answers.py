"""What the Kafka sink does with the broker's answers to CreateTopics that the test
broker (tansu, which creates whatever it is asked) never gives: a refusal is logged at
ERROR once and the records still go out; an error that passes is raised, so the next
batch asks again. The broker is a stand-in here; tests/integration/test_kafka_topics.py
has the real one."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from aiokafka.errors import KafkaConnectionError, NotControllerError
from sipcdr.sinks import kafkatopics
from sipcdr.sinks.kafka import KafkaSink
from sipcdr.sinks.kafkatopics import TopicPlan, ensure_topics
from structlog.testing import capture_logs

INVALID_REPLICATION_FACTOR = 38
NOT_CONTROLLER = 41


class FakeAdmin:
    """Answers as a cluster of `brokers` brokers that has `existing` topics and answers
    CreateTopics with `codes` (topic -> error code; 0 when not named)."""

    instances: ClassVar[list[FakeAdmin]] = []

    def __init__(
        self, existing: set[str], codes: dict[str, int], brokers: int = 1, **options: Any
    ) -> None:
        self.existing = existing
        self.codes = codes
        self.brokers = brokers
        self.created: list[Any] = []
        self.closed = False
        FakeAdmin.instances.append(self)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self.closed = True

    async def list_topics(self) -> list[str]:
        return sorted(self.existing)

    async def describe_cluster(self) -> dict[str, Any]:
        return {"brokers": [{"node_id": n} for n in range(self.brokers)]}

    async def create_topics(self, topics: list[Any], timeout_ms: int) -> Any:
        self.created += topics
        return SimpleNamespace(
            topic_errors=[(t.name, self.codes.get(t.name, 0), None) for t in topics]
        )

    async def describe_configs(self, resources: list[Any]) -> list[Any]:
        return []


def use_admin(monkeypatch: pytest.MonkeyPatch, **answers: Any) -> None:
    monkeypatch.setattr(
        kafkatopics, "AIOKafkaAdminClient", lambda **options: FakeAdmin(**answers, **options)
    )


PLAN = TopicPlan({"cdrs": 86_400_000}, partitions=6, replication_factor=None)


async def test_replication_is_three_or_one_per_broker_when_fewer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for brokers, expected in ((1, 1), (2, 2), (5, 3)):
        use_admin(monkeypatch, existing=set(), codes={}, brokers=brokers)
        assert await ensure_topics({}, ["cdrs"], PLAN, 1000) == {"cdrs": "created"}
        [topic] = FakeAdmin.instances[-1].created
        assert (topic.replication_factor, topic.num_partitions) == (expected, 6)
        assert topic.topic_configs == {"retention.ms": "86400000"}
    use_admin(monkeypatch, existing=set(), codes={}, brokers=5)
    await ensure_topics({}, ["cdrs"], TopicPlan({}, 2, 5), 1000)
    [topic] = FakeAdmin.instances[-1].created
    assert (topic.replication_factor, topic.topic_configs) == (5, {})


async def test_a_refused_topic_is_logged_once_and_records_still_go_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_admin(monkeypatch, existing={"fraud"}, codes={"cdrs": INVALID_REPLICATION_FACTOR})
    sink = KafkaSink("127.0.0.1:9", topic_cdrs="cdrs", topic_fraud="fraud")
    with capture_logs() as logs:
        await sink.prepare()
        await sink.prepare()  # asked once per sink
    refused = [log for log in logs if log["event"] == "kafka_topic_not_created"]
    assert [(log["topic"], log["log_level"]) for log in refused] == [("cdrs", "error")]
    assert "InvalidReplicationFactor" in refused[0]["error"]
    assert len(FakeAdmin.instances[-1].created) == 1 and FakeAdmin.instances[-1].closed
    assert sink._topics_ready


async def test_an_error_that_passes_is_raised_and_asked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_admin(monkeypatch, existing=set(), codes={"cdrs": NOT_CONTROLLER})
    sink = KafkaSink("127.0.0.1:9", topic_cdrs="cdrs", topic_fraud="fraud")
    with pytest.raises(NotControllerError):
        await sink.prepare()
    assert not sink._topics_ready and FakeAdmin.instances[-1].closed
    use_admin(monkeypatch, existing=set(), codes={})
    await sink.prepare()
    assert sink._topics_ready
    assert {t.name for t in FakeAdmin.instances[-1].created} == {"cdrs", "fraud"}


async def test_a_broker_that_cannot_be_reached_is_asked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Unreachable(FakeAdmin):
        async def start(self) -> None:
            raise KafkaConnectionError("Unable to bootstrap")

    monkeypatch.setattr(
        kafkatopics, "AIOKafkaAdminClient", lambda **options: Unreachable(set(), {})
    )
    sink = KafkaSink("127.0.0.1:9", topic_cdrs="cdrs", topic_fraud="fraud")
    with pytest.raises(KafkaConnectionError):
        await sink.prepare()
    assert not sink._topics_ready
