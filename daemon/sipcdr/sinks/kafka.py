"""Kafka sink: CDRs to the CDR topic, fraud alerts to the alert topic, via aiokafka.

Every record goes out as the spool holds it: the value is the record's JSON, the key is
the spool key (a CDR's `call_id`, an alert's subject), so the default (murmur2)
partition (`sinks.kafkapartition`, the same as aiokafka's and Java's) holds every copy
of a call, and the headers say what
the value is (`schema_version`, `record_kind`). `deliver` returns only when the broker
has confirmed every record of the batch with `acks=all`; otherwise it raises and the
delivery loop sends the whole batch again later. Consumers therefore see duplicates
after a failure and deduplicate on `cdr_id` / `alert_id`.

The broker may be down for any length of time without the daemon noticing anything
but failed deliveries: `start` does not connect, the producer is made by the first
`deliver`, and a producer that failed once is closed, dropping what it still held, and
replaced by a fresh one on the next `deliver` (a new connection, fresh metadata, no
records of the failed batch trickling in after it). Records a producer still holds when
it is closed fail, are counted (`unconfirmed_at_close`) and stay in the spool; every
future aiokafka made for them is read, so none is reported unread at exit. Every
network wait is bounded by the request timeout: a dead broker, a refused topic or a
broker that stops answering turn into a `KafkaDeliveryError` within
`2 * request_timeout_ms`, and `stop` returns within about one request timeout.
Meanwhile `probe` lets the delivery loop see the outage sooner: it asks every
bootstrap server at once for metadata, each on a connection of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import structlog

# aiokafka ships no type information; the producer is used through a narrow surface.
from aiokafka import AIOKafkaProducer
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import (
    CorruptRecordException,
    InvalidMessageError,
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.protocol.metadata import MetadataRequest

from sipcdr.model import CDR_SCHEMA_VERSION
from sipcdr.sinks.base import (
    KIND_ALERT,
    KIND_CDR,
    KIND_SIP,
    STREAM_RECORDS,
    STREAM_SIGNALING,
    AsyncLifecycle,
    RecordsRejected,
    SpoolRecord,
)
from sipcdr.sinks.kafkaconfirm import Confirmations, failure_of
from sipcdr.sinks.kafkapartition import KeyPartitioner
from sipcdr.sinks.kafkatopics import TopicPlan, ensure_topics, passing
from sipcdr.sinks.settings import (
    COMPRESSIONS,
    DEFAULT_COMPRESSION,
    DEFAULT_IDEMPOTENCE,
    DEFAULT_LINGER_MS,
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_REQUEST_TIMEOUT_MS,
    DEFAULT_SASL_MECHANISM,
    DEFAULT_SECURITY_PROTOCOL,
    DEFAULT_TOPIC_CDRS,
    DEFAULT_TOPIC_FRAUD,
    DEFAULT_TOPIC_PARTITIONS,
    DEFAULT_TOPIC_SIP,
    SASL_MECHANISMS,
    SECURITY_PROTOCOLS,
)
from sipcdr.sinks.signaling import SIP_MESSAGE_SCHEMA_VERSION, published

FRAUD_ALERT_SCHEMA_VERSION: Final = 1  # schemas/fraud_alert.v1.schema.json
# The broker (or the client's own size check) refuses the record itself: sending it
# again cannot succeed, so the delivery loop sets it aside instead of stalling.
_CONTENT_ERRORS: Final = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    InvalidMessageError,
    CorruptRecordException,
)

# Broker logs and quotas name the client by this.
CLIENT_ID: Final = "sipcdr"
# A deliver may wait one request timeout for connection and metadata, and one more for
# the broker's acknowledgements of what it sent.
_DELIVER_TIMEOUTS: Final = 2
# Each step of closing a producer without the broker (closing sockets, ending a task)
# needs no network, so it gets this long.
_DROP_WAIT_S: Final = 0.5
_CANCEL_ATTEMPTS: Final = 3


_Confirmed = Callable[["asyncio.Future[Any]"], None]


class KafkaDeliveryError(Exception):
    """A batch (or part of it) was not confirmed by the broker; send it again later."""


class KafkaSink(AsyncLifecycle):
    """The `Sink` that writes the records stream (CDRs and fraud alerts) to Kafka."""

    name = "kafka"
    streams: tuple[str, ...] = (STREAM_RECORDS,)  # and signaling when topic_sip is set

    def __init__(
        self,
        bootstrap: str,
        *,
        topic_cdrs: str = DEFAULT_TOPIC_CDRS,
        topic_fraud: str = DEFAULT_TOPIC_FRAUD,
        topic_sip: str = DEFAULT_TOPIC_SIP,
        idempotence: bool = DEFAULT_IDEMPOTENCE,
        compression: str = DEFAULT_COMPRESSION,
        linger_ms: int = DEFAULT_LINGER_MS,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS,
        security_protocol: str = DEFAULT_SECURITY_PROTOCOL,
        sasl_mechanism: str | None = None,
        sasl_username: str | None = None,
        sasl_password: str | None = None,
        ssl_cafile: Path | None = None,
        create_topics: bool = True,
        topic_partitions: int = DEFAULT_TOPIC_PARTITIONS,
        topic_replication_factor: int | None = None,
        topic_retention_ms: Mapping[str, int] | None = None,
    ) -> None:
        """Checks every option and builds the TLS context now, so a bad setting fails
        the start instead of every delivery; no connection is made here.

        With `create_topics`, a configured topic the cluster lacks is created before
        the first record (sinks.kafkatopics), with `topic_retention_ms[topic]`."""
        if not bootstrap.strip():
            raise ValueError("kafka bootstrap: expected 'host:port[,host:port...]', got ''")
        if compression not in COMPRESSIONS:
            raise ValueError(
                f"kafka compression: expected one of {COMPRESSIONS}, got {compression!r}"
            )
        for option, value in (
            ("linger_ms", linger_ms),
            ("max_batch_bytes", max_batch_bytes),
            ("request_timeout_ms", request_timeout_ms),
        ):
            if value < (0 if option == "linger_ms" else 1):
                raise ValueError(f"kafka {option}: expected a positive number, got {value}")
        if topic_partitions < 1 or (
            topic_replication_factor is not None and topic_replication_factor < 1
        ):
            raise ValueError(
                "kafka topic_partitions and topic_replication_factor: expected positive "
                f"numbers, got {topic_partitions} and {topic_replication_factor}"
            )
        self.bootstrap = bootstrap
        self.topic_cdrs = topic_cdrs
        self.topic_fraud = topic_fraud
        self.topic_sip = topic_sip
        self.request_timeout_s = request_timeout_ms / 1000
        self._topics: Mapping[str, str] = {KIND_CDR: topic_cdrs, KIND_ALERT: topic_fraud}
        # Set by the daemon: a record's bytes to publish, or None to withhold it.
        self.outbound: Callable[[str, bytes], bytes | None] | None = None
        # Set by the daemon with pseudonyms: a record's key as published (an alert is
        # keyed by its subject, which may be a number).
        self.outbound_key: Callable[[str, bytes], bytes] | None = None
        if topic_sip:
            self.streams = (STREAM_RECORDS, STREAM_SIGNALING)
            self._topics = {**self._topics, KIND_SIP: topic_sip}
        # aiokafka wants a list; it only reads it, so one list per kind serves every send.
        self._headers: Mapping[str, list[tuple[str, bytes]]] = {
            kind: [("schema_version", str(version).encode()), ("record_kind", kind.encode())]
            for kind, version in (
                (KIND_CDR, CDR_SCHEMA_VERSION),
                (KIND_ALERT, FRAUD_ALERT_SCHEMA_VERSION),
                (KIND_SIP, SIP_MESSAGE_SCHEMA_VERSION),
            )
        }
        # Per kind, what every record of it is sent with, made once: the topic and the
        # headers (a record costs the send, not look-ups of its own).
        self._routes: Mapping[str, tuple[str, list[tuple[str, bytes]]]] = {
            kind: (topic, self._headers[kind]) for kind, topic in self._topics.items()
        }
        self._security = _security_options(
            security_protocol, sasl_mechanism, sasl_username, sasl_password, ssl_cafile
        )
        self._options: dict[str, Any] = {
            "bootstrap_servers": bootstrap,
            "client_id": CLIENT_ID,
            "acks": "all",
            "enable_idempotence": idempotence,
            "compression_type": None if compression == "none" else compression,
            "linger_ms": linger_ms,
            "max_batch_size": max_batch_bytes,
            # A single record larger than a batch must still fit in a request.
            "max_request_size": max(max_batch_bytes, 1024 * 1024),
            "request_timeout_ms": request_timeout_ms,
            # aiokafka's default partition for every key, without hashing each record's
            # key in pure Python (sinks.kafkapartition); kept by every producer the
            # sink makes, so a replaced producer starts with the keys known.
            "partitioner": KeyPartitioner(),
            **self._security,
        }
        self._topic_plan = TopicPlan(
            dict(topic_retention_ms or {}), topic_partitions, topic_replication_factor
        )
        # Topics are checked (and made) once per sink, before the first record.
        self._topics_ready = not create_topics
        self._topics_lock = asyncio.Lock()
        # Confirmed records per topic, including re-sent duplicates: what the broker holds.
        self.sent: dict[str, int] = dict.fromkeys(self._topics.values(), 0)
        self._producer: Any = None  # AIOKafkaProducer once a deliver has connected
        self._closing: set[asyncio.Task[None]] = set()
        # Records a closed producer still held: failed, so they stay in the spool.
        self.unconfirmed_at_close = 0
        self._log = structlog.get_logger("sipcdr.kafka")

    @property
    def connected(self) -> bool:
        """A producer is connected: there was a delivery, and the last one succeeded."""
        return self._producer is not None

    async def start(self) -> None:
        """Nothing to do: the first `deliver` connects, so a broker that is down at
        start leaves the records in the spool instead of stopping the daemon."""

    async def prepare(self) -> None:
        """Make the topics the cluster lacks (with `create_topics`); the producer
        connects on the first `deliver`, which makes them if this could not."""
        await self._ensure_topics()

    async def _ensure_topics(self) -> None:
        async with self._topics_lock:
            if self._topics_ready:
                return
            topics = list(dict.fromkeys(self._topics.values()))
            try:
                await ensure_topics(
                    {"bootstrap_servers": self.bootstrap, "client_id": CLIENT_ID, **self._security},
                    topics,
                    self._topic_plan,
                    self._options["request_timeout_ms"],
                )
            except KafkaError as exc:
                if passing(exc):
                    raise
                # Asked again it would refuse again: said once, and records go out.
                self._log.error("kafka_topics_not_checked", error=_describe(exc))
            self._topics_ready = True

    async def probe(self) -> None:
        """Return when a bootstrap server answers a metadata request (brokers only, no
        topics), raise `KafkaDeliveryError` when none does.

        Every bootstrap server is asked at once and the first answer counts: asked one
        after the other within the caller's time bound, a server that accepts and never
        answers (frozen, or a black hole behind a load balancer) would use up the bound
        and report an outage while another serves. Each is asked on a connection of its
        own (with the sink's TLS and SASL), closed after: the producer's may be queued
        behind a produce request that a frozen broker never answers, and the producer
        reconnects by itself.

        What it cannot see: a partition leader that is frozen but is not a bootstrap
        server (or is one and another answers). A batch waiting for it is reported by
        the delivery loop only when the client gives up, after its request timeouts.
        """
        asks = [
            asyncio.create_task(self._ask_for_metadata(host, port), name="sipcdr-kafka-probe")
            for host, port, _family in collect_hosts(self.bootstrap, randomize=False)
        ]
        errors: list[BaseException] = []
        try:
            pending = set(asks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    error = task.exception()
                    if error is None:
                        return
                    errors.append(error)
        finally:
            for task in asks:
                task.cancel()
            # Their connections are closed before the probe returns, even when the
            # caller's bound cancelled it.
            await asyncio.wait(asks)
            for task in asks:
                if not task.cancelled():
                    task.exception()  # retrieved: no "never retrieved" noise at exit
        raise KafkaDeliveryError(
            f"kafka: no bootstrap server answers: {_describe(errors[0] if errors else None)}"
        )

    async def _ask_for_metadata(self, host: str, port: int) -> None:
        connection = await create_conn(
            host,
            port,
            client_id=CLIENT_ID,
            request_timeout_ms=self._options["request_timeout_ms"],
            **self._security,
        )
        try:
            await connection.send(MetadataRequest([]))
        finally:
            connection.close()

    async def deliver(self, stream: str, records: Sequence[SpoolRecord]) -> None:
        """Send every record, then wait until the broker has confirmed all of them.

        Raises `ValueError` for a stream or record kind this sink has no topic for,
        before anything is sent, and `KafkaDeliveryError` when any record is not
        confirmed within the timeouts.
        """
        if stream not in self.streams:
            raise ValueError(f"kafka sink does not read stream {stream!r}")
        if stream == STREAM_SIGNALING:
            records = _published(records)
        # A record the filters leave as it is (every record, without restrictions or
        # pseudonyms) is kept, not copied.
        if self.outbound is not None:
            # Restricted subjects are withheld, numbers pseudonymized (sipcdr.privacy).
            outbound = self.outbound
            records = [
                record if value is record.value else record._replace(value=value)
                for record in records
                if (value := outbound(record.kind, record.value)) is not None
            ]
        if self.outbound_key is not None:
            outbound_key = self.outbound_key
            records = [
                record if key is record.key else record._replace(key=key)
                for record in records
                for key in (outbound_key(record.kind, record.key),)
            ]
        # Each record's future gets its kind's callback (made once per batch), which
        # counts its confirmation and counts the batch down (sinks.kafkaconfirm).
        confirmations = Confirmations(self.sent)
        routes: dict[str, tuple[str, list[tuple[str, bytes]], _Confirmed]] = {
            kind: (topic, headers, confirmations.counter(topic))
            for kind, (topic, headers) in self._routes.items()
        }
        routed = []
        for record in records:
            route = routes.get(record.kind)
            if route is None:
                raise ValueError(f"kafka sink has no topic for record kind {record.kind!r}")
            routed.append((route, record))
        if not routed:
            return
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.request_timeout_s * _DELIVER_TIMEOUTS):
                if not self._topics_ready:
                    await self._ensure_topics()
                producer = await self._connected_producer()
                futures = []
                for (topic, headers, confirmed), record in routed:
                    future = await producer.send(
                        topic, record.value, key=record.key, headers=headers
                    )
                    future.add_done_callback(confirmed)
                    futures.append(future)
                await confirmations.wait(futures)
        except BaseException as exc:
            # Whatever happened (timeout, refused connection, an aiokafka bug, a cancel
            # from above), this producer may hold half a batch: replace it.
            self._discard_producer()
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, _CONTENT_ERRORS):
                raise RecordsRejected(f"kafka: {_describe(exc)}") from exc
            elapsed = time.monotonic() - started
            raise KafkaDeliveryError(
                f"kafka: {len(routed)} records not confirmed after {elapsed:.1f} s: "
                f"{_describe(exc)}"
            ) from exc
        failures = [failure for future in futures if (failure := failure_of(future)) is not None]
        if failures:
            self._discard_producer()
            refused = [failure for failure in failures if isinstance(failure, _CONTENT_ERRORS)]
            if refused:
                # The delivery loop splits the batch and sets the records at fault aside.
                raise RecordsRejected(f"kafka: {_describe(refused[0])}") from refused[0]
            raise KafkaDeliveryError(
                f"kafka: {len(failures)} of {len(routed)} records not confirmed: "
                f"{_describe(failures[0])}"
            ) from failures[0]

    async def flush(self) -> None:
        """`deliver` returns only after the broker confirmed; nothing waits in between.
        Waits for the closing of producers replaced after a failure."""
        await self._wait_closing()

    async def stop(self) -> None:
        """Idempotent, never raises: closes the producer within about one request
        timeout even when the broker is gone. Whatever a cancelled deliver left in
        flight gets that long to arrive."""
        self._discard_producer(flush=True)
        await self._wait_closing()

    async def _connected_producer(self) -> Any:
        if self._producer is not None:
            return self._producer
        producer = AIOKafkaProducer(**self._options)
        self._producer = producer  # set first, so a failed start is closed like any other
        await producer.start()
        self._log.info("kafka_connected", bootstrap=self.bootstrap)
        return producer

    def _discard_producer(self, *, flush: bool = False) -> None:
        """Detach the producer and close it in the background: the caller's error is
        reported now, and `stop` waits for the close.

        After a failure nothing is flushed: the delivery loop sends the whole batch
        again, so records the old producer still held would only land late, as extra
        duplicates, possibly after newer batches.
        """
        producer, self._producer = self._producer, None
        if producer is None:
            return
        task = asyncio.create_task(self._close(producer, flush), name="sipcdr-kafka-close")
        self._closing.add(task)
        task.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.warning("kafka_close_failed", error=_describe(task.exception()))

    async def _wait_closing(self) -> None:
        while self._closing:
            await asyncio.wait(set(self._closing))

    async def _close(self, producer: Any, flush: bool) -> None:
        """With `flush`, let the producer deliver what it holds and close, within one
        request timeout; otherwise, or past that, close it without waiting."""
        held = -1
        if flush:
            try:
                async with asyncio.timeout(self.request_timeout_s):
                    await producer.stop()
            except TimeoutError:
                self._log.warning("kafka_close_timed_out", timeout_s=self.request_timeout_s)
            except Exception as exc:
                self._log.warning("kafka_close_failed", error=_describe(exc))
            else:
                # Closed with its sender already gone, aiokafka leaves what it held
                # waiting forever; it fails here like any other.
                held = _fail_held(producer)
        if held < 0:
            held = await _close_now(producer)
        if held:
            # Never confirmed, so never confirmed to the spool either: the delivery
            # loop sends them again (a `deliver` waiting for them raised).
            self.unconfirmed_at_close += held
            self._log.info("kafka_records_unconfirmed_at_close", records=held)


def _published(records: Sequence[SpoolRecord]) -> list[SpoolRecord]:
    """The signaling records with the topic's JSON as their values: the capture side
    spools the captured bytes (sinks.signaling)."""
    out = []
    for record in records:
        if record.kind == KIND_SIP:
            try:
                record = record._replace(value=published(record.value))
            except ValueError as exc:
                raise RecordsRejected(
                    f"kafka: signaling record {record.seq} is no message: {exc}"
                ) from exc
        out.append(record)
    return out


async def _close_now(producer: Any) -> int:
    """Fail what the producer holds, drop its connections and end its sender task,
    without waiting for the broker; returns how many records it held.

    aiokafka has no such call: `stop` waits until every pending batch is delivered or
    expired, and its sender answers a cancel by waiting for its requests in flight,
    which on a broker that stopped answering takes a request timeout each.
    """
    held = _fail_held(producer)
    # Closing the connections fails the requests in flight at once, so the sender's
    # produce tasks end, and stops the metadata task.
    await _bounded(producer.client.close())
    task = getattr(getattr(producer, "_sender", None), "sender_task", None)
    for _ in range(_CANCEL_ATTEMPTS):
        if not isinstance(task, asyncio.Task) or task.done():
            break
        task.cancel()  # a second cancel ends its wait for requests in flight
        await asyncio.wait({task}, timeout=_DROP_WAIT_S)
    # Marks the producer closed; with no sender and nothing pending it returns at once.
    await _bounded(producer.stop())
    return held


def _fail_held(producer: Any) -> int:
    """Fail every record the producer still holds; returns how many there were.

    Each record's own future fails, so the `deliver` waiting for it (if any) raises
    and its batch stays in the spool. aiokafka also fails each batch's own futures (one
    for the batch, one for its hand-over to the sender), which only its sender awaits:
    their errors are read here, or each would be reported as "Future exception was
    never retrieved" when collected, as if a record had been lost.
    """
    accumulator = getattr(producer, "_message_accumulator", None)
    if accumulator is None:
        return 0
    try:
        batches = [batch for queue in accumulator._batches.values() for batch in queue]
        batches += list(accumulator._pending_batches)
        held = sum(not future.done() for batch in batches for future, _ in batch._msg_futures)
        accumulator.fail_all(KafkaConnectionError("kafka producer closed before delivery"))
        for batch in batches:
            for future in (batch.future, batch._drain_waiter):
                if future.done() and not future.cancelled():
                    future.exception()
    except (AttributeError, TypeError):
        # An aiokafka release laid out otherwise: a close must still end, and a
        # `deliver` waiting on a record that never completes times out and leaves its
        # batch in the spool all the same.
        return 0
    return held


async def _bounded(step: Coroutine[Any, Any, Any]) -> None:
    """Run one closing step for at most `_DROP_WAIT_S`, whatever it raises.

    A CancelledError that is not addressed to this task comes from aiokafka awaiting a
    task it cancelled itself; a real cancel of this task goes through.
    """
    current = asyncio.current_task()
    try:
        # Errors closing connections to a broker that is gone say nothing new.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_DROP_WAIT_S):
                await step
    except asyncio.CancelledError:
        if current is not None and current.cancelling():
            raise


def _security_options(
    protocol: str,
    mechanism: str | None,
    username: str | None,
    password: str | None,
    cafile: Path | None,
) -> dict[str, Any]:
    """aiokafka's TLS/SASL arguments for the configured protocol; the secrets only go
    into the producer, never into a message."""
    if protocol not in SECURITY_PROTOCOLS:
        raise ValueError(
            f"kafka security_protocol: expected one of {SECURITY_PROTOCOLS}, got {protocol!r}"
        )
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        # Verifies the broker's certificate and host name: against the given CA, or
        # against the system's CAs when none is given.
        try:
            options["ssl_context"] = create_ssl_context(
                cafile=None if cafile is None else str(cafile)
            )
        except OSError as exc:  # ssl.SSLError included: a file that is no certificate
            raise ValueError(f"kafka ssl_cafile {cafile}: {exc}") from exc
    if protocol.startswith("SASL_"):
        mechanism = mechanism or DEFAULT_SASL_MECHANISM
        if mechanism not in SASL_MECHANISMS:
            raise ValueError(
                f"kafka sasl_mechanism: expected one of {SASL_MECHANISMS}, got {mechanism!r}"
            )
        if mechanism == "GSSAPI":
            if importlib.util.find_spec("gssapi") is None:
                raise ValueError("kafka sasl_mechanism GSSAPI needs the 'gssapi' package")
        elif not username or password is None:
            raise ValueError(f"kafka SASL {mechanism} needs sasl_username and sasl_password")
        options.update(
            sasl_mechanism=mechanism,
            sasl_plain_username=username,
            sasl_plain_password=password,
        )
    return options


def _describe(exc: BaseException | None) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
