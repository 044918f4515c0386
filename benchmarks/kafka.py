"""Kafka sink throughput for a few producer settings, against aiokafka's defaults, in one run.

Each contender is a `KafkaSink` delivering the same N CDR records (CDR v1 JSON as the
daemon spools it, ~1 KB each, distinct calls) in spool batches of 1000, as the
delivery loop does, to a topic of its own, waiting for the broker's acks=all
confirmation of every batch. The baseline is the same sink with aiokafka's own
defaults (linger 0 ms, 16 KiB batches, no compression). Figures are the median of
several interleaved rounds; ratios are against the baseline of the same run. The
broker is a tansu started here on loopback (or --bootstrap), so the network costs
nothing: compression is measured at its CPU price only, and wins more on a real link.
The per-codec size of a 64 KiB batch of CDRs is printed alongside.

    python benchmarks/kafka.py [--records 20000] [--rounds 5] [--bootstrap HOST:PORT]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import NamedTuple

# The tansu launcher the tests use.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

import orjson
import structlog
from kafkabroker import TansuBroker, create_topics
from samples import cdr_values
from sipcdr.sinks import settings as sink_settings
from sipcdr.sinks.base import KIND_CDR, STREAM_RECORDS, SpoolRecord
from sipcdr.sinks.kafka import KafkaSink

SPOOL_BATCH = 1000  # delivery.DEFAULT_BATCH_RECORDS
PARTITIONS = 6  # spreads keys like a production CDR topic; batches are per partition
KIB = 1024


class Setting(NamedTuple):
    linger_ms: int
    max_batch_bytes: int
    compression: str

    @property
    def label(self) -> str:
        batch = f"{self.max_batch_bytes // KIB:>4} KiB"
        return f"linger {self.linger_ms:>2} ms, batch {batch}, {self.compression}"


BASELINE = Setting(0, 16 * KIB, "none")  # aiokafka's defaults
SHIPPED = Setting(
    sink_settings.DEFAULT_LINGER_MS,
    sink_settings.DEFAULT_MAX_BATCH_BYTES,
    sink_settings.DEFAULT_COMPRESSION,
)
CONTENDERS = [
    BASELINE,
    Setting(0, 16 * KIB, "lz4"),
    Setting(0, 64 * KIB, "lz4"),
    Setting(0, 256 * KIB, "lz4"),
    Setting(0, 1024 * KIB, "lz4"),
    Setting(5, 64 * KIB, "lz4"),
    Setting(20, 64 * KIB, "lz4"),
    Setting(0, 16 * KIB, "zstd"),
    Setting(0, 64 * KIB, "zstd"),
    Setting(0, 256 * KIB, "zstd"),
    Setting(0, 64 * KIB, "gzip"),
    Setting(0, 64 * KIB, "none"),
    Setting(0, 256 * KIB, "none"),
]
if SHIPPED not in CONTENDERS:
    CONTENDERS.append(SHIPPED)


def spool_batches(values: list[bytes]) -> list[list[SpoolRecord]]:
    records = [
        SpoolRecord(seq, KIND_CDR, orjson.loads(value)["call_id"].encode(), value)
        for seq, value in enumerate(values, 1)
    ]
    return [records[i : i + SPOOL_BATCH] for i in range(0, len(records), SPOOL_BATCH)]


async def records_per_second(
    bootstrap: str, setting: Setting, batches: list[list[SpoolRecord]], topic: str
) -> float:
    await create_topics(bootstrap, [topic, f"{topic}.fraud"], partitions=PARTITIONS)
    sink = KafkaSink(
        bootstrap,
        topic_cdrs=topic,
        topic_fraud=f"{topic}.fraud",
        idempotence=False,  # tansu refuses InitProducerId
        linger_ms=setting.linger_ms,
        max_batch_bytes=setting.max_batch_bytes,
        compression=setting.compression,
    )
    try:
        await sink.deliver(STREAM_RECORDS, batches[0][:100])  # connect and fetch metadata
        started = time.perf_counter()
        for batch in batches:
            await sink.deliver(STREAM_RECORDS, batch)
        elapsed = time.perf_counter() - started
    finally:
        await sink.stop()
    return sum(len(batch) for batch in batches) / elapsed


async def delete_topics(bootstrap: str, topics: list[str]) -> None:
    """Keep the memory-only broker from holding every round's records."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(topics)
    finally:
        await admin.close()


def compressed_sizes(values: list[bytes]) -> dict[str, tuple[float, float]]:
    """(compression ratio, MB/s on one core) of a 64 KiB run of CDRs, per codec, as
    aiokafka calls it (lz4 at level 9, zstd at 3, gzip at 9)."""
    from aiokafka import codec

    chunk = b""
    for value in values:
        if len(chunk) + len(value) > 64 * KIB:
            break
        chunk += value
    codecs = {"lz4": codec.lz4_encode, "zstd": codec.zstd_encode, "gzip": codec.gzip_encode}
    result = {}
    for name, compress in codecs.items():
        size = len(compress(chunk))
        runs = 20
        started = time.perf_counter()
        for _ in range(runs):
            compress(chunk)
        rate = runs * len(chunk) / (time.perf_counter() - started) / 1e6
        result[name] = (len(chunk) / size, rate)
    return result


async def run(bootstrap: str, opts: argparse.Namespace) -> None:
    values = cdr_values(opts.records)
    batches = spool_batches(values)
    mean_size = sum(map(len, values)) / len(values)
    samples: dict[Setting, list[float]] = {setting: [] for setting in CONTENDERS}
    for round_number in range(opts.rounds):
        # Interleaved rounds: a burst of noise hits every contender, not just one.
        for index, setting in enumerate(CONTENDERS):
            topic = f"bench.{round_number}.{index}.{uuid.uuid4().hex[:6]}"
            samples[setting].append(await records_per_second(bootstrap, setting, batches, topic))
            await delete_topics(bootstrap, [topic, f"{topic}.fraud"])
    median = {setting: statistics.median(values) for setting, values in samples.items()}
    base = median[BASELINE]

    print(
        f"median of {opts.rounds} rounds, {opts.records} CDRs of {mean_size:.0f} B each, "
        f"spool batches of {SPOOL_BATCH}, {PARTITIONS} partitions, acks=all"
    )
    for setting in CONTENDERS:
        marks = " (aiokafka defaults)" if setting == BASELINE else ""
        marks += " (sipcdr default)" if setting == SHIPPED else ""
        print(
            f"  {setting.label:<34} {median[setting]:>10,.0f} records/s "
            f"{median[setting] / base:6.2f}x{marks}"
        )
    print(f"ratio sipcdr defaults / aiokafka defaults: {median[SHIPPED] / base:.2f}x")
    print("a 64 KiB run of CDRs through aiokafka's codecs (size ratio, MB/s on one core):")
    for name, (ratio, rate) in compressed_sizes(values).items():
        print(f"  {name:<5} {ratio:5.2f}x {rate:8.0f} MB/s")


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--records", type=int, default=20000, help="CDRs per contender per round")
    args.add_argument("--rounds", type=int, default=5)
    args.add_argument("--bootstrap", default="", help="an existing broker instead of tansu")
    opts = args.parse_args(argv)
    # One "kafka_connected" line per contender and round would bury the table.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if opts.bootstrap:
        asyncio.run(run(opts.bootstrap, opts))
        return 0
    with (
        tempfile.TemporaryDirectory(prefix="sipcdr-bench-kafka-") as workdir,
        TansuBroker(Path(workdir)) as broker,
    ):
        asyncio.run(run(broker.bootstrap, opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
