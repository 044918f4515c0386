"""What `KafkaSink.deliver` hands the producer, record by record, and what it counts:
a fake producer stands for aiokafka's (no broker)."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import pytest
from sipcdr.model import CDR_SCHEMA_VERSION
from sipcdr.sinks.base import KIND_ALERT, KIND_CDR, KIND_SIP, STREAM_RECORDS, SpoolRecord
from sipcdr.sinks.kafka import FRAUD_ALERT_SCHEMA_VERSION, KafkaDeliveryError, KafkaSink

CDRS, FRAUD = "sipcdr.test.cdrs", "sipcdr.test.fraud"


class Watched(asyncio.Future[None]):
    """A future that keeps a list of the callbacks it was given."""

    def __init__(self, callbacks: list[Any]) -> None:
        super().__init__()
        self.callbacks = callbacks

    def add_done_callback(self, callback: Any, *, context: Any = None) -> None:
        self.callbacks.append(callback)
        super().add_done_callback(callback, context=context)


class FakeProducer:
    """Confirms every record on the event loop's next turn, but `refuse`d values."""

    def __init__(self, refuse: bytes = b"") -> None:
        self.sent: list[tuple[str, bytes, bytes, list[tuple[str, bytes]]]] = []
        self.callbacks: list[Any] = []
        self.refuse = refuse

    async def send(
        self, topic: str, value: bytes, *, key: bytes, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[None]:
        self.sent.append((topic, key, value, headers))
        future = Watched(self.callbacks)
        if value == self.refuse:
            future.get_loop().call_soon(future.set_exception, ConnectionError("gone"))
        else:
            future.get_loop().call_soon(future.set_result, None)
        return future


def records() -> list[SpoolRecord]:
    return [
        SpoolRecord(1, KIND_CDR, b"call-1", b'{"cdr_id":"a"}'),
        SpoolRecord(2, KIND_ALERT, b"subject", b'{"alert_id":"b"}'),
        SpoolRecord(3, KIND_CDR, b"call-2", b'{"cdr_id":"c"}'),
    ]


def sink_with(producer: FakeProducer) -> KafkaSink:
    sink = KafkaSink("127.0.0.1:1", topic_cdrs=CDRS, topic_fraud=FRAUD, create_topics=False)
    sink._producer = producer
    return sink


async def test_every_record_goes_to_its_kinds_topic_with_its_headers_and_is_counted() -> None:
    producer = FakeProducer()
    sink = sink_with(producer)
    await sink.deliver(STREAM_RECORDS, records())
    cdr_headers = [("schema_version", str(CDR_SCHEMA_VERSION).encode()), ("record_kind", b"cdr")]
    alert_headers = [
        ("schema_version", str(FRAUD_ALERT_SCHEMA_VERSION).encode()),
        ("record_kind", KIND_ALERT.encode()),
    ]
    assert producer.sent == [
        (CDRS, b"call-1", b'{"cdr_id":"a"}', cdr_headers),
        (FRAUD, b"subject", b'{"alert_id":"b"}', alert_headers),
        (CDRS, b"call-2", b'{"cdr_id":"c"}', cdr_headers),
    ]
    assert sink.sent == {CDRS: 2, FRAUD: 1}
    # One callback per record, counting and waiting at once; one per topic and batch,
    # made once, not one per record.
    assert len(producer.callbacks) == 3
    counting = [callback for callback in producer.callbacks if isinstance(callback, partial)]
    assert len(counting) == 3
    assert counting[0] is counting[2]
    assert len({id(callback) for callback in counting}) == 2
    await sink.deliver(STREAM_RECORDS, records())
    assert sink.sent == {CDRS: 4, FRAUD: 2}


async def test_a_record_not_confirmed_fails_the_batch_and_is_not_counted() -> None:
    producer = FakeProducer(refuse=b'{"cdr_id":"c"}')
    sink = sink_with(producer)
    with pytest.raises(Exception, match="1 of 3 records not confirmed: ConnectionError: gone"):
        await sink.deliver(STREAM_RECORDS, records())
    assert sink.sent == {CDRS: 1, FRAUD: 1}


async def test_a_kind_without_a_topic_fails_before_anything_is_sent() -> None:
    producer = FakeProducer()
    sink = sink_with(producer)
    batch = [*records(), SpoolRecord(4, KIND_SIP, b"call-3", b"{}")]
    with pytest.raises(ValueError, match="no topic for record kind 'sip'"):
        await sink.deliver(STREAM_RECORDS, batch)
    assert producer.sent == []


class Copies(SpoolRecord):
    """A record that counts the copies made of it."""

    made: list[str] = []  # noqa: RUF012 (shared on purpose: a NamedTuple has no slots for it)

    def _replace(self, **changes: Any) -> SpoolRecord:  # type: ignore[override]
        Copies.made.extend(changes)
        return SpoolRecord(*self)._replace(**changes)


async def test_the_outbound_filters_copy_only_the_records_they_change() -> None:
    producer = FakeProducer()
    sink = sink_with(producer)
    sink.outbound = lambda kind, value: (
        None if value == b'{"cdr_id":"c"}' else b'{"alert_id":"x"}' if kind == KIND_ALERT else value
    )
    sink.outbound_key = lambda kind, key: b"alias" if kind == KIND_ALERT else key
    Copies.made.clear()
    await sink.deliver(STREAM_RECORDS, [Copies(*record) for record in records()])
    assert [(topic, key, value) for topic, key, value, _ in producer.sent] == [
        (CDRS, b"call-1", b'{"cdr_id":"a"}'),
        (FRAUD, b"alias", b'{"alert_id":"x"}'),
    ]
    assert Copies.made == ["value"]  # the alert's value; its key on the copy made then
    assert sink.sent == {CDRS: 1, FRAUD: 1}


class SilentProducer:
    """Takes every record and confirms none (a broker that stopped answering); closes
    at once, as a producer with nothing in flight does."""

    def __init__(self, answered: int = 0) -> None:
        self.futures: list[asyncio.Future[None]] = []
        self.answered = answered  # the first few are confirmed, at once
        self.client = self
        self.stopped = False

    async def send(
        self, topic: str, value: bytes, *, key: bytes, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if len(self.futures) < self.answered:
            future.set_result(None)
        self.futures.append(future)
        return future

    async def close(self) -> None:
        return None

    async def stop(self) -> None:
        self.stopped = True


async def test_a_batch_unconfirmed_in_time_cancels_its_records_and_counts_only_the_confirmed() -> (
    None
):
    producer = SilentProducer(answered=1)
    sink = KafkaSink(
        "127.0.0.1:1",
        topic_cdrs=CDRS,
        topic_fraud=FRAUD,
        create_topics=False,
        request_timeout_ms=50,
    )
    sink._producer = producer
    with pytest.raises(KafkaDeliveryError, match=r"3 records not confirmed after .* TimeoutError"):
        await sink.deliver(STREAM_RECORDS, records())
    assert producer.futures[0].done() and not producer.futures[0].cancelled()
    assert all(future.cancelled() for future in producer.futures[1:])
    await sink.flush()  # the producer replaced, closed
    assert producer.stopped and not sink.connected
    assert sink.sent == {CDRS: 1, FRAUD: 0}


async def test_records_failed_before_the_wait_fail_the_batch_in_their_order() -> None:
    producer = SilentProducer()
    sink = sink_with(producer)  # type: ignore[arg-type]

    async def send_failed(topic: str, value: bytes, **_: Any) -> asyncio.Future[None]:
        future = await SilentProducer.send(producer, topic, value, key=b"", headers=[])
        future.set_exception(ConnectionError(value.decode()))
        return future

    producer.send = send_failed  # type: ignore[method-assign]
    with pytest.raises(KafkaDeliveryError, match=r'3 of 3 records not confirmed: .*cdr_id":"a'):
        await sink.deliver(STREAM_RECORDS, records())
    assert sink.sent == {CDRS: 0, FRAUD: 0}


async def test_records_confirmed_as_they_are_sent_are_counted_when_deliver_returns() -> None:
    producer = SilentProducer(answered=3)
    sink = sink_with(producer)  # type: ignore[arg-type]
    await sink.deliver(STREAM_RECORDS, records())
    assert sink.sent == {CDRS: 2, FRAUD: 1}


class YieldingProducer(SilentProducer):
    """Confirms every record at once and lets the event loop run while it takes the
    next (aiokafka waiting for room in a full batch): the callbacks of the first
    records run before the batch is waited for."""

    async def send(
        self, topic: str, value: bytes, *, key: bytes, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[None]:
        for _ in range(3):
            await asyncio.sleep(0)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if value == b'{"alert_id":"b"}':
            future.set_exception(ConnectionError("refused"))
        else:
            future.set_result(None)
        self.futures.append(future)
        return future


async def test_confirmations_counted_before_the_wait_began_end_it_too() -> None:
    producer = YieldingProducer()
    sink = sink_with(producer)  # type: ignore[arg-type]
    batch = [SpoolRecord(n, KIND_CDR, b"k", b'{"cdr_id":"%d"}' % n) for n in range(20)]
    async with asyncio.timeout(5):  # a wait that missed early callbacks would hang
        await sink.deliver(STREAM_RECORDS, batch)
    assert sink.sent == {CDRS: 20, FRAUD: 0}
    with pytest.raises(KafkaDeliveryError, match=r"1 of 3 records not confirmed: .*refused"):
        async with asyncio.timeout(5):
            await sink.deliver(STREAM_RECORDS, records())
    assert sink.sent == {CDRS: 22, FRAUD: 0}


async def test_a_deliver_cancelled_from_above_cancels_what_is_unconfirmed_and_counts_once() -> None:
    """A cancel of the delivery loop stays a cancel (not a delivery error), leaves no
    record waiting for a confirmation nobody reads, and a confirmation that comes
    late is no confirmation of the batch."""
    producer = SilentProducer(answered=1)
    sink = sink_with(producer)  # type: ignore[arg-type]
    delivering = asyncio.create_task(sink.deliver(STREAM_RECORDS, records()))
    while len(producer.futures) < 3:
        await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not delivering.done()
    delivering.cancel()
    with pytest.raises(asyncio.CancelledError):
        await delivering
    assert all(future.cancelled() for future in producer.futures[1:])
    for _ in range(5):
        await asyncio.sleep(0)
    await sink.flush()
    assert sink.sent == {CDRS: 1, FRAUD: 0}
    assert producer.stopped and not sink.connected


async def test_one_refused_record_among_many_fails_the_batch_and_the_rest_count_once() -> None:
    refused = b'{"cdr_id":"c"}'
    producer = FakeProducer(refuse=refused)
    sink = sink_with(producer)
    batch = [SpoolRecord(n, KIND_CDR, b"k", b'{"cdr_id":"%d"}' % n) for n in range(50)]
    batch.insert(25, SpoolRecord(99, KIND_CDR, b"k", refused))
    with pytest.raises(KafkaDeliveryError, match=r"1 of 51 records not confirmed: .*gone"):
        await sink.deliver(STREAM_RECORDS, batch)
    await sink.flush()
    assert sink.sent == {CDRS: 50, FRAUD: 0}
