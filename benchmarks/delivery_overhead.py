"""The delivery process's own cost around each batch, before and now, in one run.

Three parts of what the delivery process spends besides the destinations' clients
(aiokafka, asyncpg), each timed as CPU of this process on uvloop, as the delivery
process runs:

- watcher: a delivery loop's `_watched_deliver` of a batch its sink confirms at once.
  before: a watcher task made, scheduled and cancelled for every batch; now: a timer,
  the task made only once the batch is out for `SLOW_BATCH_S`.
- kafka: `KafkaSink.deliver` of a batch of CDRs to a producer that confirms each
  record on the next turn and does nothing else, so only the sink's own work per
  record is timed, the daemon's outbound filter (no restrictions, no pseudonyms)
  included. before: every record copied by the filter step, a topic look-up, a
  headers look-up and a counting callback made for every record, the confirmations
  awaited with `asyncio.gather`; now: a record the filter leaves alone kept as it
  is, the rest made once per kind, one callback per record that counts its
  confirmation and counts the batch down.
- kafka confirm: the same, against the sink just before one callback per record: a
  counting callback and `all_done`'s countdown callback on every record's future.
- kafka send: aiokafka's own `AIOKafkaProducer.send` of every record of a batch of
  signaling (the `sipcdr.sip` topic, 6 partitions, metadata as a broker gave it;
  nothing sent: the batches are dropped from the producer after each spool batch),
  calls of 7 messages each, every key a fresh object as the spool reader makes it.
  before: aiokafka's DefaultPartitioner hashing every key; now: the sink's
  `KeyPartitioner` (sinks.kafkapartition), which keeps each call's hash.
- jsonl: `JsonlSink.deliver` of a batch of CDRs to a file in a temporary folder
  (written and fsynced: the kernel's share of both is in the figure). before: the
  batch copied a second time for its closing newline and handed over with
  `asyncio.to_thread`; now: one copy, straight to the executor.

Batches are what 25 ms of traffic at 15,000 msg/s gives a records loop (62 CDRs) or a
signaling loop (375 messages).
Figures are medians over rounds in which the two forms alternate; the ratio is now /
before of the same run. The machine may be shared: the load average is printed.

    python benchmarks/delivery_overhead.py [--batches 2000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import structlog
import uvloop
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.protocol.metadata import MetadataResponse_v0
from samples import cdr_values
from sipcdr.delivery import loop as delivery_loop
from sipcdr.delivery.loop import Delivery, LoopState
from sipcdr.privacy.outbound import OutboundFilter
from sipcdr.sinks.base import KIND_CDR, KIND_SIP, STREAM_RECORDS, SpoolRecord
from sipcdr.sinks.jsonl import JsonlSink
from sipcdr.sinks.kafka import KafkaSink
from sipcdr.sinks.kafkaconfirm import failure_of
from sipcdr.sinks.kafkapartition import KeyPartitioner
from sipcdr.spool import Spool

CDRS_PER_BATCH = 62  # 25 ms of 6-message calls at 15,000 msg/s
SIP_PER_BATCH = 375  # the messages of the same 25 ms
MESSAGES_PER_CALL = 7
SIP_TOPIC = "sipcdr.sip"
SIP_PARTITIONS = 6


class QuickSink:
    """Confirms every batch at once: what is timed is the loop's work around it."""

    name = "quick"
    streams: tuple[str, ...] = (STREAM_RECORDS,)

    async def deliver(self, stream: str, records: Sequence[SpoolRecord]) -> None:
        # One turn of the event loop, as a reply from a server takes at least.
        await asyncio.sleep(0)

    async def probe(self) -> None:
        return None

    async def start(self) -> None:
        return None

    async def prepare(self) -> None:
        return None

    async def stop(self) -> None:
        return None


class TaskWatchedDelivery(Delivery):
    """The watcher as it was: a task per batch, sleeping `SLOW_BATCH_S` first."""

    async def _watched_deliver(
        self, sink: Any, stream: Any, batch: Any, state: Any, reader: Any
    ) -> int:
        if not state.up:
            return await self._deliver(sink, stream, batch, state, reader)
        watcher = asyncio.create_task(
            self._old_watch(sink, stream, state, reader), name=f"sipcdr-watch-{sink.name}-{stream}"
        )
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watch_ended)
        try:
            return await self._deliver(sink, stream, batch, state, reader)
        finally:
            watcher.cancel()

    async def _old_watch(self, sink: Any, stream: str, state: LoopState, reader: Any) -> None:
        started = self.clock.monotonic()
        watching = asyncio.current_task()
        while state.up:
            await self.clock.sleep(delivery_loop.SLOW_BATCH_S)
            error = await self._probe(sink)
            if watching is not None and watching.cancelling():
                return
            if error is not None:
                self._mark_down(sink, stream, state, reader, error, since=started)


class FakeProducer:
    async def send(
        self, topic: str, value: bytes, *, key: bytes, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.get_loop().call_soon(future.set_result, None)
        return future


class PerRecordKafkaSink(KafkaSink):
    """The sink's work per record as it was (no outbound filters: none is set here)."""

    async def deliver(self, stream: str, records: Sequence[SpoolRecord]) -> None:
        if self.outbound is not None:
            records = [
                record._replace(value=value)
                for record in records
                if (value := self.outbound(record.kind, record.value)) is not None
            ]
        routed = [(self._old_topic_of(record.kind), record) for record in records]
        if not routed:
            return
        async with asyncio.timeout(self.request_timeout_s * 2):
            producer = await self._connected_producer()
            futures = []
            for topic, record in routed:
                future = await producer.send(
                    topic, record.value, key=record.key, headers=self._headers[record.kind]
                )
                future.add_done_callback(partial(self._confirmed, topic))
                futures.append(future)
            results = await asyncio.gather(*futures, return_exceptions=True)
        if any(isinstance(result, BaseException) for result in results):
            raise RuntimeError("not confirmed")

    def _old_topic_of(self, kind: str) -> str:
        topic = self._topics.get(kind)
        if topic is None:
            raise ValueError(kind)
        return topic

    def _confirmed(self, topic: str, future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.sent[topic] += 1


async def all_done(futures: list[asyncio.Future[Any]]) -> None:
    """The wait as it was: a callback of its own on every future, counting down."""
    left = len(futures)
    if not left:
        return
    finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def one_done(_future: asyncio.Future[Any]) -> None:
        nonlocal left
        left -= 1
        if not left and not finished.done():
            finished.set_result(None)

    for future in futures:
        future.add_done_callback(one_done)
    try:
        await finished
    except asyncio.CancelledError:
        for future in futures:
            future.cancel()
        raise


class TwoCallbacksKafkaSink(PerRecordKafkaSink):
    """The sink before one callback per record: a counting callback made once per
    kind, and `all_done`'s own on every future."""

    async def deliver(self, stream: str, records: Sequence[SpoolRecord]) -> None:
        if self.outbound is not None:
            outbound = self.outbound
            records = [
                record if value is record.value else record._replace(value=value)
                for record in records
                if (value := outbound(record.kind, record.value)) is not None
            ]
        routes = {
            kind: (topic, headers, partial(self._confirmed, topic))
            for kind, (topic, headers) in self._routes.items()
        }
        routed = [(routes[record.kind], record) for record in records]
        async with asyncio.timeout(self.request_timeout_s * 2):
            producer = await self._connected_producer()
            futures = []
            for (topic, headers, confirmed), record in routed:
                future = await producer.send(topic, record.value, key=record.key, headers=headers)
                future.add_done_callback(confirmed)
                futures.append(future)
            await all_done(futures)
        if any(failure_of(future) is not None for future in futures):
            raise RuntimeError("not confirmed")


class NewKafkaSink(KafkaSink):
    """The sink as it is, minus the error handling PerRecordKafkaSink leaves out too."""


class ToThreadJsonlSink(JsonlSink):
    """The hand-off and the join as they were."""

    async def deliver(self, stream: str, records: Sequence[SpoolRecord]) -> None:
        kinds = self.kinds
        lines = [record.value for record in records if record.kind in kinds]
        if lines:
            await asyncio.to_thread(self._write, lines)

    def _write_lines(self, handle: Any, lines: list[bytes]) -> None:
        data = memoryview(b"\n".join(lines) + b"\n")
        while data:
            written = handle.write(data)
            data = data[written:]
        os.fsync(handle.fileno())
        self.written += len(lines)
        self._size += len(lines)


def producer_with_metadata(partitioner: Any) -> AIOKafkaProducer:
    """An aiokafka producer that knows the signaling topic's partitions and is never
    started: `send` puts records into its batches and nothing takes them out."""
    producer = AIOKafkaProducer(
        bootstrap_servers="127.0.0.1:1",
        partitioner=partitioner,
        max_batch_size=1 << 24,  # a spool batch never waits for one to drain
        linger_ms=5,
    )
    partitions = [(0, n, 0, [0], [0]) for n in range(SIP_PARTITIONS)]
    producer.client.cluster.update_metadata(
        MetadataResponse_v0(brokers=[(0, "127.0.0.1", 1)], topics=[(0, SIP_TOPIC, partitions)])
    )
    return producer


def signaling_keys(batches: int, seed: int) -> list[list[bytes]]:
    """Each batch's keys: calls of `MESSAGES_PER_CALL` messages, a few hundred calls
    open at once, every key its own bytes object (its hash not yet computed)."""
    open_calls = SIP_PER_BATCH * 2 // MESSAGES_PER_CALL
    keys: list[list[bytes]] = []
    message = 0
    for _ in range(batches):
        batch = []
        for _ in range(SIP_PER_BATCH):
            call = message // MESSAGES_PER_CALL
            # Spread over the open calls as their messages interleave on the wire.
            call = call - call % open_calls + (message % open_calls)
            batch.append(f"{seed:x}{call:014x}-{call % 97}@198.51.100.{call % 250}".encode())
            message += 1
        keys.append(batch)
    return keys


async def send_batches(producer: AIOKafkaProducer, keys: list[list[bytes]], value: bytes) -> float:
    """CPU µs per spool batch of the sink's send of every record of each batch."""
    headers = [("schema_version", b"1"), ("record_kind", KIND_SIP.encode())]
    send = producer.send
    held = producer._message_accumulator._batches
    spent = 0.0
    for batch in keys:
        start = time.process_time()
        for key in batch:
            await send(SIP_TOPIC, value, key=key, headers=headers)
        spent += time.process_time() - start
        held.clear()  # as if the sender took them
    return spent / len(keys) * 1e6


def batch_of(values: list[bytes], start: int) -> list[SpoolRecord]:
    return [
        SpoolRecord(start + n, KIND_CDR, f"call-{start + n}".encode(), value)
        for n, value in enumerate(values)
    ]


async def per_batch(step: Callable[[], Awaitable[Any]], batches: int) -> float:
    """CPU µs per batch of `batches` calls of `step`."""
    for _ in range(min(20, batches)):  # warm: pools, caches
        await step()
    start = time.process_time()
    for _ in range(batches):
        await step()
    return (time.process_time() - start) / batches * 1e6


async def run(batches: int, rounds: int) -> None:
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    values = cdr_values(CDRS_PER_BATCH)
    batch = batch_of(values, 1)
    spent: dict[str, dict[str, list[float]]] = {
        part: {"before": [], "now": []}
        for part in ("watcher", "kafka", "kafka confirm", "kafka send", "jsonl")
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.chmod(folder, 0o700)
        with Spool(folder / "spool", ("quick",)) as spool:
            sink = QuickSink()
            for round_ in range(rounds):
                order = ("before", "now") if round_ % 2 == 0 else ("now", "before")
                for form in order:
                    kind = TaskWatchedDelivery if form == "before" else Delivery
                    delivery = kind({STREAM_RECORDS: spool}, [sink])
                    state = LoopState(sink.name, STREAM_RECORDS)
                    reader = spool.reader(sink.name)
                    watched = delivery._watched_deliver
                    spent["watcher"][form].append(
                        await per_batch(
                            partial(watched, sink, STREAM_RECORDS, batch, state, reader),
                            batches,
                        )
                    )
                    await asyncio.sleep(0)  # cancelled watchers end
                for form in order:
                    kafka = (PerRecordKafkaSink if form == "before" else NewKafkaSink)(
                        "127.0.0.1:1", create_topics=False
                    )
                    kafka._producer = FakeProducer()
                    # What the daemon sets, without restrictions or pseudonyms.
                    kafka.outbound = OutboundFilter(None, pseudonymize=False).apply
                    spent["kafka"][form].append(
                        await per_batch(partial(kafka.deliver, STREAM_RECORDS, batch), batches)
                    )
                for form in order:
                    kafka = (TwoCallbacksKafkaSink if form == "before" else NewKafkaSink)(
                        "127.0.0.1:1", create_topics=False
                    )
                    kafka._producer = FakeProducer()
                    kafka.outbound = OutboundFilter(None, pseudonymize=False).apply
                    spent["kafka confirm"][form].append(
                        await per_batch(partial(kafka.deliver, STREAM_RECORDS, batch), batches)
                    )
                for form in order:
                    keys = signaling_keys(max(1, batches // 4), seed=round_ * 2 + (form == "now"))
                    partitioner = DefaultPartitioner() if form == "before" else KeyPartitioner()
                    producer = producer_with_metadata(partitioner)
                    spent["kafka send"][form].append(await send_batches(producer, keys, values[0]))
                    await producer.stop()  # never started: only marks it closed
                    del keys
                for form in order:
                    jsonl = (ToThreadJsonlSink if form == "before" else JsonlSink)(
                        folder / f"cdrs-{form}.jsonl"
                    )
                    await jsonl.start()
                    spent["jsonl"][form].append(
                        await per_batch(
                            partial(jsonl.deliver, STREAM_RECORDS, batch),
                            max(1, batches // 4),
                        )
                    )
                    await jsonl.stop()
                    (folder / f"cdrs-{form}.jsonl").unlink()
    load = os.getloadavg()[0]
    print(
        f"delivery overhead per batch of {CDRS_PER_BATCH} CDRs, CPU of this process, "
        f"medians of {rounds} rounds, load average {load:.2f} on {os.cpu_count()} CPUs"
    )
    print(f"  {'part':<12}{'before µs':>12}{'now µs':>10}{'now/before':>12}")
    for part, forms in spent.items():
        before, now = statistics.median(forms["before"]), statistics.median(forms["now"])
        print(f"  {part:<12}{before:>12.1f}{now:>10.1f}{now / before:>12.2f}")
    print(
        f"  (kafka send: a batch of {SIP_PER_BATCH} messages, calls of {MESSAGES_PER_CALL}; "
        "the others: a batch of CDRs)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2000, help="batches per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    uvloop.run(run(args.batches, args.rounds))


if __name__ == "__main__":
    main()
