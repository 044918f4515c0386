"""The Kafka sink against a real Kafka-protocol broker (tests/support/kafkabroker.py).

What billing and the fraud team rely on: CDRs on the CDR topic keyed by Call-ID, alerts
on the alert topic, every record with its schema version, re-deliveries on the same
partition as the original, and nothing lost across a broker outage, since `deliver`
fails in bounded time and the same batch goes out again later.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner
from kafkabroker import (
    MISSING_TOPIC,
    TEST_PARTITIONS,
    TansuFactory,
    consume_all,
    create_topics,
    unique_topic,
)
from sipcalls import Call, feed
from sipcdr import config
from sipcdr.delivery import Delivery
from sipcdr.delivery import loop as delivery_module
from sipcdr.dialog import Correlator
from sipcdr.enrich import EnrichStage
from sipcdr.model import Packet
from sipcdr.privacy.outbound import OutboundFilter
from sipcdr.sinks import kafka
from sipcdr.sinks.base import (
    KIND_ALERT,
    KIND_CDR,
    KIND_SIP,
    STREAM_RECORDS,
    STREAM_SIGNALING,
    SpoolRecord,
)
from sipcdr.sinks.kafka import KafkaDeliveryError, KafkaSink
from sipcdr.sinks.outputs import Outputs
from sipcdr.sinks.settings import DEFAULT_TOPIC_CDRS, DEFAULT_TOPIC_FRAUD
from sipcdr.sip import parse
from sipcdr.sipevent import event_record, spooled
from sipcdr.spool import Spool
from sipcdr.telemetry.metrics import Metrics, Sources
from structlog.testing import capture_logs

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
CDR_SCHEMA = jsonschema.Draft202012Validator(
    json.loads((SCHEMAS / "cdr.v1.schema.json").read_text())
)
ALERT_SCHEMA = jsonschema.Draft202012Validator(
    json.loads((SCHEMAS / "fraud_alert.v1.schema.json").read_text())
)
T0 = 1_700_000_000.0
# Short, so a dead broker costs a test about two seconds.
SHORT_TIMEOUT_MS = 1000
# deliver: two request timeouts; stop: one, plus the forced close; plus a slow machine.
DELIVER_BOUND_S = 2 * SHORT_TIMEOUT_MS / 1000 + 1.5
STOP_BOUND_S = SHORT_TIMEOUT_MS / 1000 + 2.5
CONSUME_TIMEOUT_S = 15.0


def cdr_values(count: int, tag: str) -> list[bytes]:
    """`count` CDRs as the daemon spools them (real calls through the correlator and
    the enrich stage, `orjson.dumps(cdr.to_record())`): answered and busy calls,
    distinct Call-IDs."""
    correlator = Correlator()
    enrich = EnrichStage(())
    cdrs = []
    for i in range(count):
        call = Call(call_id=f"{tag}-{i}@192.0.2.10", caller=f"+4940{i:07d}")
        start = T0 + i
        cdrs += feed(correlator, start, call.request("INVITE"))
        if i % 4 == 3:
            cdrs += feed(correlator, start + 1, call.response(486, "Busy Here"))
            continue
        cdrs += feed(correlator, start + 1, call.response(200, "OK"))
        ack = call.request("ACK", branch="z9hG4bK-ack", to_tag="callee-tag")
        cdrs += feed(correlator, start + 1.1, ack)
        bye = call.request("BYE", cseq=2, branch="z9hG4bK-bye", to_tag="callee-tag")
        cdrs += feed(correlator, start + 30 + i % 7, bye)
    assert len(cdrs) == count
    return [orjson.dumps(enrich.on_cdr(cdr).to_record()) for cdr in cdrs]


def alert_value(subject: str, cdr_ids: Sequence[str]) -> bytes:
    return orjson.dumps(
        {
            "alert_id": str(uuid.uuid4()),
            "raised_at": "2026-11-23T14:40:45.123456Z",
            "detector": "short_calls_burst",
            "subject": subject,
            "severity": "warning",
            "window_s": 300,
            "count": len(cdr_ids),
            "threshold": 2,
            "cdr_ids": list(cdr_ids),
            "details": {},
            "schema_version": 1,
        }
    )


def spool_records(values: Iterable[tuple[str, bytes]], first_seq: int = 1) -> list[SpoolRecord]:
    """Spool records of (kind, value), keyed as the daemon keys them."""
    records = []
    for seq, (kind, value) in enumerate(values, first_seq):
        parsed = orjson.loads(value)
        key = parsed["call_id"] if kind == KIND_CDR else parsed["subject"]
        records.append(SpoolRecord(seq, kind, key.encode(), value))
    return records


def cdr_records(count: int, tag: str, first_seq: int = 1) -> list[SpoolRecord]:
    return spool_records(((KIND_CDR, value) for value in cdr_values(count, tag)), first_seq)


def cdr_ids(records: Iterable[Any]) -> list[str]:
    return [orjson.loads(record.value)["cdr_id"] for record in records]


def sink_for(bootstrap: str, topic_cdrs: str, topic_fraud: str, **options: Any) -> KafkaSink:
    # tansu refuses InitProducerId (kafkabroker's docstring); real Kafka takes the default.
    return KafkaSink(
        bootstrap, topic_cdrs=topic_cdrs, topic_fraud=topic_fraud, idempotence=False, **options
    )


def aiokafka_tasks() -> list[asyncio.Task[Any]]:
    """Tasks still running other than the test itself: a closed producer leaves none."""
    current = asyncio.current_task()
    return [task for task in asyncio.all_tasks() if task is not current and not task.done()]


async def timed(coro: Any) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        await coro
    except Exception as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


@pytest.mark.integration
async def test_cdrs_and_alerts_reach_their_topics_as_published(kafka_bootstrap: str) -> None:
    topic_cdrs, topic_fraud = unique_topic("cdrs"), unique_topic("fraud")
    await create_topics(kafka_bootstrap, [topic_cdrs, topic_fraud])
    values = cdr_values(60, "route")
    ids = [orjson.loads(value)["cdr_id"] for value in values]
    alerts = [alert_value(f"49401{i}", ids[i : i + 2]) for i in range(3)]
    # Alerts between CDRs, as they come out of the spool's shared stream.
    mixed = [(KIND_CDR, value) for value in values]
    for i, alert in enumerate(alerts):
        mixed.insert(10 + 20 * i, (KIND_ALERT, alert))
    records = spool_records(mixed)

    async with sink_for(kafka_bootstrap, topic_cdrs, topic_fraud) as sink:
        await sink.deliver(STREAM_RECORDS, records)
        assert sink.sent == {topic_cdrs: 60, topic_fraud: 3}
        assert sink.connected

    consumed = await consume_all(kafka_bootstrap, topic_cdrs, 60, CONSUME_TIMEOUT_S)
    assert len(consumed) == 60
    assert sorted(cdr_ids(consumed)) == sorted(ids)
    assert sorted(record.value for record in consumed) == sorted(values)  # bytes as spooled
    for record in consumed:
        value = orjson.loads(record.value)
        assert record.key == value["call_id"].encode()
        assert dict(record.headers) == {"schema_version": b"1", "record_kind": b"cdr"}
        assert not list(CDR_SCHEMA.iter_errors(value)), value
    assert len({record.partition for record in consumed}) > 1  # keys are spread
    # The partition aiokafka's own DefaultPartitioner (Java's murmur2 default) gives a
    # key: what consumers and other producers count on.
    partitions = list(range(TEST_PARTITIONS))
    for record in consumed:
        assert record.partition == DefaultPartitioner()(record.key, partitions, partitions)

    fraud = await consume_all(kafka_bootstrap, topic_fraud, 3, CONSUME_TIMEOUT_S)
    assert sorted(record.value for record in fraud) == sorted(alerts)
    for record in fraud:
        value = orjson.loads(record.value)
        assert record.key == value["subject"].encode()
        assert dict(record.headers) == {"schema_version": b"1", "record_kind": b"alert"}
        assert not list(ALERT_SCHEMA.iter_errors(value)), value


@pytest.mark.integration
async def test_billing_consumer_group_gets_every_cdr_and_resumes_at_its_commit(
    kafka_bootstrap: str,
) -> None:
    """Billing's consumer: a group with committed offsets, starting at the earliest
    offset, deduplicating on `cdr_id`. A re-delivered batch lands on the same partitions
    as the first copy, and a restarted consumer reads only what came after its commit."""
    topic_cdrs, topic_fraud = unique_topic("cdrs"), unique_topic("fraud")
    await create_topics(kafka_bootstrap, [topic_cdrs, topic_fraud])
    group = f"billing-{uuid.uuid4().hex[:8]}"
    first = cdr_records(40, "first")
    second = cdr_records(40, "second", first_seq=41)
    later = cdr_records(20, "later", first_seq=81)

    async with sink_for(kafka_bootstrap, topic_cdrs, topic_fraud) as sink:
        await sink.deliver(STREAM_RECORDS, first)
        await sink.deliver(STREAM_RECORDS, second)
        await sink.deliver(STREAM_RECORDS, second)  # the delivery loop retried it
        read = await consume_all(kafka_bootstrap, topic_cdrs, 120, CONSUME_TIMEOUT_S, group)
        assert len(read) == 120
        assert set(cdr_ids(read)) == set(cdr_ids(first + second))
        copies = Counter(cdr_ids(read))
        assert {copies[cdr_id] for cdr_id in cdr_ids(second)} == {2}
        partitions: dict[str, set[int]] = defaultdict(set)
        for record in read:
            partitions[orjson.loads(record.value)["cdr_id"]].add(record.partition)
        assert all(len(found) == 1 for found in partitions.values())

        await sink.deliver(STREAM_RECORDS, later)
        assert sink.sent[topic_cdrs] == 140

    resumed = await consume_all(kafka_bootstrap, topic_cdrs, 20, CONSUME_TIMEOUT_S, group)
    assert sorted(cdr_ids(resumed)) == sorted(cdr_ids(later))


@pytest.mark.integration
@pytest.mark.parametrize("compression", ["lz4", "zstd", "gzip", "none"])
async def test_every_compression_round_trips(kafka_bootstrap: str, compression: str) -> None:
    topic_cdrs, topic_fraud = unique_topic(f"cdrs-{compression}"), unique_topic("fraud")
    await create_topics(kafka_bootstrap, [topic_cdrs, topic_fraud])
    records = cdr_records(200, compression)
    async with sink_for(kafka_bootstrap, topic_cdrs, topic_fraud, compression=compression) as sink:
        await sink.deliver(STREAM_RECORDS, records)
    consumed = await consume_all(kafka_bootstrap, topic_cdrs, 200, CONSUME_TIMEOUT_S)
    assert sorted((r.key, r.value) for r in consumed) == sorted((r.key, r.value) for r in records)


@pytest.mark.integration
async def test_a_broker_that_serves_answers_the_probe(kafka_bootstrap: str) -> None:
    sink = sink_for(kafka_bootstrap, "cdrs", "fraud")
    await asyncio.wait_for(sink.probe(), delivery_module.PROBE_TIMEOUT_S)
    assert aiokafka_tasks() == []  # its connection is closed


@pytest.mark.integration
async def test_a_stuck_bootstrap_server_does_not_hide_one_that_answers(
    kafka_bootstrap: str,
) -> None:
    """A listener that accepts and never answers (a frozen broker) is named first; the
    live broker still answers every probe within the delivery loop's bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as stuck:
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(64)  # connections complete in the backlog; nothing reads them
        stuck_at = f"127.0.0.1:{stuck.getsockname()[1]}"
        # The default request timeout (longer than the probe's bound), as in production.
        sink = sink_for(f"{stuck_at},{kafka_bootstrap}", "cdrs", "fraud")
        for _ in range(5):
            elapsed, error = await timed(
                asyncio.wait_for(sink.probe(), delivery_module.PROBE_TIMEOUT_S)
            )
            assert error is None, error
            assert elapsed < 1.0
        alone = sink_for(stuck_at, "cdrs", "fraud")
        elapsed, error = await timed(
            asyncio.wait_for(alone.probe(), delivery_module.PROBE_TIMEOUT_S)
        )
        assert isinstance(error, TimeoutError), error  # a stuck server alone: no answer
    assert aiokafka_tasks() == []


@pytest.mark.integration
async def test_a_slow_batch_to_a_broker_that_answers_is_no_outage(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch held back by the producer (linger) outlasts the slow-batch mark many
    times; every probe meanwhile is answered, so the loop stays up."""
    monkeypatch.setattr(delivery_module, "SLOW_BATCH_S", 0.1)
    topic = unique_topic("slow")
    await create_topics(kafka_bootstrap, [topic])
    probes = 0

    class CountingSink(KafkaSink):
        async def probe(self) -> None:
            nonlocal probes
            probes += 1
            await super().probe()

    sink = CountingSink(kafka_bootstrap, topic_cdrs=topic, idempotence=False, linger_ms=1500)
    with Spool(tmp_path / "spool", ("kafka",)) as spool, capture_logs() as logs:
        delivery = Delivery({STREAM_RECORDS: spool}, [sink])
        await delivery.start()
        for record in cdr_records(5, "slow"):
            spool.append(record.kind, record.key, record.value)
        assert await delivery.drain(15)
        ((state, _reader),) = delivery.readers()
        assert state.up
        await delivery.stop()
    assert probes >= 3
    assert sink.sent[topic] == 5
    assert [entry for entry in logs if entry["event"].startswith("sink_")] == []


@pytest.mark.integration
async def test_start_and_stop_with_the_broker_down_and_deliver_fails_in_bounded_time(
    tansu_factory: TansuFactory,
) -> None:
    broker = tansu_factory()
    broker.kill()  # a port that certainly refuses: nothing else took it in between
    sink = sink_for(broker.bootstrap, "cdrs", "fraud", request_timeout_ms=SHORT_TIMEOUT_MS)
    elapsed, error = await timed(sink.start())
    assert error is None
    assert elapsed < 0.5
    elapsed, error = await timed(sink.probe())
    assert isinstance(error, KafkaDeliveryError), error
    assert "no bootstrap server answers" in str(error)
    assert elapsed < 0.5  # a refused connection is an answer at once
    for _ in range(2):  # the second attempt uses a fresh producer, and fails the same way
        elapsed, error = await timed(sink.deliver(STREAM_RECORDS, cdr_records(5, "down")))
        assert isinstance(error, KafkaDeliveryError), error
        assert elapsed < DELIVER_BOUND_S
        assert not sink.connected
    elapsed, error = await timed(sink.stop())
    assert error is None
    assert elapsed < STOP_BOUND_S
    await sink.stop()  # idempotent
    assert sink.sent == {"cdrs": 0, "fraud": 0}
    assert aiokafka_tasks() == []


@pytest.mark.integration
async def test_batch_failed_while_the_broker_was_gone_delivers_after_restart(
    tansu_factory: TansuFactory,
) -> None:
    broker = tansu_factory()
    topic_cdrs, topic_fraud = unique_topic("cdrs"), unique_topic("fraud")
    await create_topics(broker.bootstrap, [topic_cdrs, topic_fraud])
    sink = sink_for(broker.bootstrap, topic_cdrs, topic_fraud, request_timeout_ms=SHORT_TIMEOUT_MS)
    await sink.start()
    await sink.deliver(STREAM_RECORDS, cdr_records(10, "before"))
    batch = cdr_records(1000, "outage", first_seq=11)  # one batch of the delivery loop

    broker.kill()
    elapsed, error = await timed(sink.deliver(STREAM_RECORDS, batch))
    assert isinstance(error, KafkaDeliveryError), error
    assert elapsed < DELIVER_BOUND_S

    broker.restart()  # memory storage: it comes back empty
    await create_topics(broker.bootstrap, [topic_cdrs, topic_fraud])
    await sink.deliver(STREAM_RECORDS, batch)
    await sink.stop()
    consumed = await consume_all(broker.bootstrap, topic_cdrs, 1000, CONSUME_TIMEOUT_S)
    # Every CDR once: nothing of the failed attempt arrived late as an extra copy.
    assert sorted(cdr_ids(consumed)) == sorted(cdr_ids(batch))
    assert sink.sent[topic_cdrs] == 1010


@pytest.mark.integration
async def test_broker_that_stops_answering_fails_deliver_and_stop_still_returns(
    tansu_factory: TansuFactory,
) -> None:
    """SIGSTOP: connections are accepted and nothing answers, the case in which a
    client without its own deadlines hangs."""
    broker = tansu_factory()
    sink = sink_for(broker.bootstrap, "cdrs", "fraud", request_timeout_ms=SHORT_TIMEOUT_MS)
    await sink.start()
    await sink.deliver(STREAM_RECORDS, cdr_records(5, "warm"))
    broker.freeze()
    try:
        elapsed, error = await timed(sink.deliver(STREAM_RECORDS, cdr_records(300, "frozen")))
        assert isinstance(error, KafkaDeliveryError), error
        assert elapsed < DELIVER_BOUND_S
        elapsed, error = await timed(sink.stop())
        assert error is None
        assert elapsed < STOP_BOUND_S
        assert aiokafka_tasks() == []
    finally:
        broker.thaw()


@pytest.mark.integration
async def test_missing_topic_fails_deliver_in_bounded_time(kafka_bootstrap: str) -> None:
    # Topics not made by the sink: as with `create_topics = false`, or a refused creation.
    sink = sink_for(
        kafka_bootstrap,
        MISSING_TOPIC,
        "fraud",
        request_timeout_ms=SHORT_TIMEOUT_MS,
        create_topics=False,
    )
    elapsed, error = await timed(sink.deliver(STREAM_RECORDS, cdr_records(3, "missing")))
    await sink.stop()
    assert isinstance(error, KafkaDeliveryError), error
    assert "UnknownTopicOrPartition" in str(error)
    assert elapsed < DELIVER_BOUND_S
    assert sink.sent[MISSING_TOPIC] == 0


@pytest.mark.integration
async def test_tls_sink_does_not_fall_back_to_plaintext(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    cafile = make_ca(tmp_path)
    sink = sink_for(
        kafka_bootstrap,
        "cdrs",
        "fraud",
        request_timeout_ms=SHORT_TIMEOUT_MS,
        security_protocol="SSL",
        ssl_cafile=cafile,
    )
    elapsed, error = await timed(sink.deliver(STREAM_RECORDS, cdr_records(3, "tls")))
    await sink.stop()
    assert isinstance(error, KafkaDeliveryError), error
    assert elapsed < DELIVER_BOUND_S


async def test_unknown_kind_or_stream_is_refused_before_anything_is_sent() -> None:
    # Nothing listens on port 9: had the sink tried to send, it would fail differently.
    sink = KafkaSink("127.0.0.1:9", idempotence=False)
    good = cdr_records(2, "kind")
    with pytest.raises(ValueError, match="record kind 'sip'"):
        await sink.deliver(STREAM_RECORDS, [*good, SpoolRecord(3, KIND_SIP, b"k", b"{}")])
    with pytest.raises(ValueError, match="stream"):
        await sink.deliver("signaling", good)
    await sink.deliver(STREAM_RECORDS, [])  # nothing to do: no connection attempt
    assert not sink.connected
    assert sink.sent == {DEFAULT_TOPIC_CDRS: 0, DEFAULT_TOPIC_FRAUD: 0}
    await sink.stop()


class HangingProducer:
    """Stands in for AIOKafkaProducer: connects, confirms sends only when told to, and
    never finishes closing, the client bug the sink's own deadlines are there for."""

    def __init__(self, confirm: bool) -> None:
        self.client = self  # the sink closes `producer.client` when it gives up
        self.confirm = confirm

    async def start(self) -> None:
        pass

    async def send(self, topic: str, value: bytes, **options: Any) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.confirm:
            future.set_result(None)
        return future

    async def stop(self) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        await asyncio.Event().wait()


@pytest.mark.timeout(20)  # a missing deadline would hang here, not fail
async def test_deadlines_hold_when_the_client_itself_hangs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    confirm = False
    monkeypatch.setattr(kafka, "AIOKafkaProducer", lambda **options: HangingProducer(confirm))
    timeout_s = 0.2
    sink = KafkaSink(
        "127.0.0.1:9",
        idempotence=False,
        request_timeout_ms=round(timeout_s * 1000),
        create_topics=False,  # no broker behind the stand-in producer to make them on
    )
    elapsed, error = await timed(sink.deliver(STREAM_RECORDS, cdr_records(3, "hang")))
    assert isinstance(error, KafkaDeliveryError), error
    assert 2 * timeout_s <= elapsed < 2 * timeout_s + 0.5

    confirm = True  # the next producer confirms, then hangs in stop: stop still returns
    await sink.deliver(STREAM_RECORDS, cdr_records(3, "hang"))
    assert sink.sent[DEFAULT_TOPIC_CDRS] == 3
    elapsed, error = await timed(sink.stop())
    assert error is None
    assert elapsed < timeout_s + 1.5  # one request timeout, then two bounded close steps
    assert aiokafka_tasks() == []


def make_ca(directory: Path) -> Path:
    """A throwaway self-signed CA certificate (PEM), made with the openssl program."""
    cafile = directory / "ca.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=sipcdr test CA",
            "-keyout", str(directory / "ca.key"), "-out", str(cafile),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cafile


def test_tls_options_verify_the_broker_against_the_given_ca(tmp_path: Path) -> None:
    sink = KafkaSink(
        "broker.example:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="sipcdr",
        sasl_password="s3cret",
        ssl_cafile=make_ca(tmp_path),
    )
    context = sink._options["ssl_context"]
    assert context.check_hostname
    assert [dict(item[0] for item in ca["subject"]) for ca in context.get_ca_certs()] == [
        {"commonName": "sipcdr test CA"}
    ]
    assert sink._options["sasl_mechanism"] == "SCRAM-SHA-512"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"compression": "snappy"}, "compression"),
        ({"linger_ms": -1}, "linger_ms"),
        ({"max_batch_bytes": 0}, "max_batch_bytes"),
        ({"security_protocol": "TLS"}, "security_protocol"),
        ({"security_protocol": "SASL_PLAINTEXT"}, "sasl_username and sasl_password"),
        (
            {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "OAUTHBEARER"},
            "sasl_mechanism",
        ),
        ({"security_protocol": "SSL", "ssl_cafile": Path("/nonexistent/ca.pem")}, "ssl_cafile"),
    ],
)
def test_bad_options_fail_at_construction(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KafkaSink("broker.example:9092", **options)


def test_a_sink_built_from_the_default_config_has_the_sinks_own_defaults() -> None:
    """outputs.py hands every KafkaConfig field to the sink: a default changed on one
    side only, or a field not passed on, shows here."""
    defaults = config.KafkaConfig()
    signature = inspect.signature(KafkaSink)
    for name, parameter in signature.parameters.items():
        if name == "topic_retention_ms":
            continue  # from [retention], not [sinks.kafka]: test_privacy_settings.py
        if parameter.default is not inspect.Parameter.empty:
            assert getattr(defaults, name) == parameter.default, name


async def test_a_record_too_large_for_kafka_is_set_aside_and_the_rest_delivered(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = unique_topic()
    sink = sink_for(kafka_bootstrap, topic, f"{topic}.fraud")
    small = cdr_values(2, "small")
    huge = orjson.dumps({"cdr_id": str(uuid.uuid4()), "pad": "x" * (1100 * 1024)})
    with Spool(tmp_path, ("kafka",)) as spool:
        for value in (small[0], huge, small[1]):
            spool.append(KIND_CDR, b"call", value)
        delivery = Delivery({STREAM_RECORDS: spool}, [sink])
        await delivery.start()
        deadline = time.monotonic() + 60
        while not delivery.caught_up():
            assert time.monotonic() < deadline, "the big record held up the stream"
            await asyncio.sleep(0.05)
        ((state, _reader),) = delivery.readers()
        await delivery.stop()
    assert state.rejected == 1
    kept = orjson.loads((tmp_path / "rejected" / "kafka.jsonl").read_bytes())
    assert kept["seq"] == 2
    assert "MessageSizeTooLarge" in kept["reason"]
    consumed = await consume_all(kafka_bootstrap, topic, 2, 30)
    # The first record may come twice (sent before the failure): consumers dedupe.
    assert {record.value for record in consumed} == set(small)


# Well inside the default request timeout (15 s), which aiokafka rides out by itself:
# without the loop's probe, such an outage left no trace.
SHORT_OUTAGE_S = 8.0
# Slow batch (2 s) plus a probe that times out (2 s), plus a slow, busy machine.
NOTICED_WITHIN_S = 6.5


@pytest.mark.integration
@pytest.mark.parametrize("outage", ["freeze", "kill"])
async def test_an_outage_the_client_rides_out_is_reported_within_seconds(
    tansu_factory: TansuFactory, tmp_path: Path, outage: str
) -> None:
    broker = tansu_factory()
    topic = unique_topic()
    host, port = broker.bootstrap.rsplit(":", 1)
    settings = config.Config(
        sinks=config.SinksConfig(
            jsonl=config.JsonlConfig(path=""),
            postgres=config.PostgresConfig(dsn=""),
            kafka=config.KafkaConfig(
                bootstrap=(config.Endpoint(host, int(port)),),
                idempotence=False,
                topic_cdrs=topic,
            ),
        )
    )
    outputs = Outputs(config.output_settings(settings), spool_dir=tmp_path / "spool")
    metrics = Metrics(lambda: Sources(outputs=outputs))
    values = cdr_values(40, outage)

    def sink_up() -> float | None:
        labels = {"sink": "kafka", "stream": "records"}
        return metrics.registry.get_sample_value("sipcdr_sink_up", labels)

    async def until(condition: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.05)

    with capture_logs() as logs:
        await outputs.open()
        assert outputs.cdr_writer is not None and outputs.delivery is not None
        spool = outputs.cdr_writer.spool
        for value in values[:20]:
            spool.append(KIND_CDR, b"call", value)
        await until(outputs.delivery.caught_up, 15, "delivered before the outage")
        assert sink_up() == 1

        getattr(broker, outage)()
        began = time.monotonic()
        try:
            for value in values[20:]:
                spool.append(KIND_CDR, b"call", value)
            await until(lambda: sink_up() == 0, NOTICED_WITHIN_S, "outage not reported")
            noticed = time.monotonic() - began
            await asyncio.sleep(max(0.0, SHORT_OUTAGE_S - noticed))
        finally:
            if outage == "freeze":
                broker.thaw()
            else:
                broker.start()  # on the same port, empty (memory storage)
        await until(outputs.delivery.caught_up, 20, "not delivered after the outage")
        assert sink_up() == 1
        await outputs.close()

    events = [entry for entry in logs if entry["event"].startswith("sink_")]
    assert [(e["event"], e["log_level"]) for e in events] == [
        ("sink_unavailable", "warning"),
        ("sink_recovered", "info"),
    ], events
    assert "does not answer" in events[0]["error"]
    # Counted from the first unconfirmed batch; over when the broker confirms again
    # (a killed broker's restart and the client's reconnect take seconds more on a
    # busy 2-core machine).
    assert SHORT_OUTAGE_S - 0.5 <= events[1]["down_s"] <= SHORT_OUTAGE_S + 8
    (sink,) = outputs.sinks
    assert isinstance(sink, KafkaSink)
    assert sink.sent[topic] >= len(values)  # confirmed by the broker, re-sends included
    if outage == "freeze":
        # (A killed broker comes back empty: memory storage.)
        consumed = await consume_all(broker.bootstrap, topic, len(values), CONSUME_TIMEOUT_S)
        assert set(cdr_ids(consumed)) == {orjson.loads(value)["cdr_id"] for value in values}


@pytest.mark.integration
async def test_signaling_goes_out_as_the_topic_json_whichever_way_it_was_spooled(
    kafka_bootstrap: str,
) -> None:
    """The signaling spool holds the captured bytes now and held JSON before: both go
    out as the same sip_message records, and a restricted caller's are withheld."""
    topic_sip = unique_topic("sip")
    await create_topics(kafka_bootstrap, [topic_sip])
    pairs = []
    for i in range(6):
        call = Call(call_id=f"sigbin-{i}@192.0.2.10", caller=f"+4940{i:07d}")
        for offset, data in enumerate(
            (call.request("INVITE"), call.response(180, "Ringing"), call.response(200, "OK"))
        ):
            packet = Packet(
                T0 + i + offset / 10, "192.0.2.10", 5060, "203.0.113.20", 5060, "udp", data, "n1"
            )
            pairs.append((packet, parse(data)))
    spooled_now = [spooled(packet, msg, False) for packet, msg in pairs[:9]]
    spooled_before = [orjson.dumps(event_record(packet, msg)) for packet, msg in pairs[9:]]
    records = [
        SpoolRecord(seq, KIND_SIP, msg.call_id.encode(), value)
        for seq, ((_packet, msg), value) in enumerate(
            zip(pairs, spooled_now + spooled_before, strict=True), 1
        )
    ]
    expected = [orjson.dumps(event_record(packet, msg)) for packet, msg in pairs]
    outbound = OutboundFilter(None, pseudonymize=False)
    # The callers of a call spooled now and of one spooled before.
    outbound.set_restricted(frozenset({"49400000001", "49400000004"}))
    async with sink_for(
        kafka_bootstrap, unique_topic("cdrs"), unique_topic("fraud"), topic_sip=topic_sip
    ) as sink:
        sink.outbound = outbound.apply
        await sink.deliver(STREAM_SIGNALING, records)
        assert sink.sent[topic_sip] == 12
    consumed = await consume_all(kafka_bootstrap, topic_sip, 12, CONSUME_TIMEOUT_S)
    withheld = [value for value in expected if b"sigbin-1@" in value or b"sigbin-4@" in value]
    assert len(withheld) == 6 and outbound.withheld == {KIND_SIP: 6}
    assert sorted(record.value for record in consumed) == sorted(
        value for value in expected if value not in withheld
    )
    for record in consumed:
        value = orjson.loads(record.value)
        assert record.key == value["call_id"].encode()
        assert dict(record.headers) == {"schema_version": b"1", "record_kind": b"sip"}
