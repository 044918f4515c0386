"""What a Kafka producer closed with records still in it leaves behind: each record
fails (so its batch stays in the spool and is sent again), is counted, and no future of
aiokafka's is left with an error nobody read ("Future exception was never retrieved"
at exit). A real, never connected producer; no broker is needed for any of it."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import TopicPartition
from sipcdr.sinks import kafka
from sipcdr.sinks.kafka import KafkaSink
from sipcdr.sinks.kafkaconfirm import Confirmations
from structlog.testing import capture_logs

TOPIC = "sipcdr.test.cdrs"


async def held_records(sink: KafkaSink, count: int) -> list[asyncio.Future[Any]]:
    """`count` records in a producer of the sink's, on two partitions (two batches),
    waited for as `deliver` waits for them; never sent."""
    producer = AIOKafkaProducer(bootstrap_servers=sink.bootstrap)
    sink._producer = producer
    futures = []
    counter = Confirmations(sink.sent).counter(TOPIC)
    for n in range(count):
        future = await producer._message_accumulator.add_message(
            TopicPartition(TOPIC, n % 2), b"call", b"{}", timeout=1
        )
        future.add_done_callback(counter)
        futures.append(future)
    return futures


@pytest.mark.parametrize("flush", [True, False])
def test_records_a_closed_producer_held_fail_and_leave_no_unread_error(flush: bool) -> None:
    unread: list[dict[str, Any]] = []

    async def scenario() -> list[asyncio.Future[Any]]:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unread.append(ctx))
        sink = KafkaSink(
            "127.0.0.1:1", topic_cdrs=TOPIC, request_timeout_ms=500, create_topics=False
        )
        futures = await held_records(sink, 5)
        with capture_logs() as logs:
            if flush:
                await sink.stop()  # the daemon stopping
            else:
                sink._discard_producer()  # after a failed batch
                await sink.flush()
        assert all(f.done() and isinstance(f.exception(), KafkaConnectionError) for f in futures)
        assert sink.sent[TOPIC] == 0  # none confirmed: the spool keeps all five
        assert sink.unconfirmed_at_close == 5
        assert [log["records"] for log in logs if "unconfirmed" in log["event"]] == [5]
        # aiokafka's own futures are collected while the loop still runs, so an error
        # left unread would reach the handler above.
        gc.collect()
        await asyncio.sleep(0)
        return futures

    futures = asyncio.run(scenario())
    del futures
    gc.collect()
    assert unread == []


def test_a_producer_that_held_nothing_counts_nothing() -> None:
    async def scenario() -> KafkaSink:
        sink = KafkaSink("127.0.0.1:1", request_timeout_ms=500, create_topics=False)
        sink._producer = AIOKafkaProducer(bootstrap_servers=sink.bootstrap)
        await sink.stop()
        return sink

    assert asyncio.run(scenario()).unconfirmed_at_close == 0


def test_a_producer_laid_out_otherwise_still_closes() -> None:
    """An aiokafka release whose accumulator lacks the fields read here: nothing is
    counted, nothing raises, so the close goes on (deliver's own timeout keeps the batch
    in the spool)."""

    class Accumulator:
        _batches = None

    class Producer:
        _message_accumulator = Accumulator()

    assert kafka._fail_held(Producer()) == 0
