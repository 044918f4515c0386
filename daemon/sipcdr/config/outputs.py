"""The sections about where records go: `[sinks.jsonl]`, `[sinks.postgres]`,
`[sinks.kafka]` and `[spool]`."""

from __future__ import annotations

import re
from pathlib import Path

from sipcdr import spool
from sipcdr.config.reading import Table, parse_endpoint
from sipcdr.config.schema import (
    DEFAULT_JSONL_PATH,
    DEFAULT_POSTGRES_DSN,
    DEFAULT_STORE_SDP,
    DEFAULT_STORE_SIGNALING,
    MAX_NICE,
    MAX_STOP_DRAIN_MS,
    JsonlConfig,
    KafkaConfig,
    PostgresConfig,
    SpoolConfig,
)
from sipcdr.sinks import settings as kafka
from sipcdr.sinks.jsonl import DEFAULT_ROTATE_BYTES
from sipcdr.storage.dsn import DSN_FORM, DSN_SCHEMES, dsn_problem
from sipcdr.storage.partitions import DEFAULT_PARTITIONS_AHEAD_DAYS

_KAFKA_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


def jsonl_section(table: Table) -> JsonlConfig:
    return JsonlConfig(
        path=table.string("path", DEFAULT_JSONL_PATH),
        rotate_bytes=table.integer("rotate_bytes", DEFAULT_ROTATE_BYTES, minimum=4096),
    )


def spool_section(table: Table) -> SpoolConfig:
    policy = table.string("full_policy", spool.DEFAULT_FULL_POLICY)
    if policy not in spool.FULL_POLICIES:
        raise table.invalid("full_policy", policy, f"one of {spool.FULL_POLICIES}")
    defaults = SpoolConfig()
    return SpoolConfig(
        max_bytes=table.integer("max_bytes", defaults.max_bytes, minimum=1024 * 1024),
        signaling_max_bytes=table.integer(
            "signaling_max_bytes", defaults.signaling_max_bytes, minimum=1024 * 1024
        ),
        segment_bytes=table.integer("segment_bytes", defaults.segment_bytes, minimum=64 * 1024),
        full_policy=policy,
        fsync_interval_ms=table.integer("fsync_interval_ms", defaults.fsync_interval_ms, minimum=1),
        cdr_reserve_records=table.integer(
            "cdr_reserve_records", defaults.cdr_reserve_records, minimum=1
        ),
        signaling_min_free_bytes=table.integer(
            "signaling_min_free_bytes", defaults.signaling_min_free_bytes, minimum=0
        ),
        delivery_processes=_delivery_processes(table),
        stop_drain_ms=table.integer(
            "stop_drain_ms", defaults.stop_drain_ms, minimum=0, maximum=MAX_STOP_DRAIN_MS
        ),
        delivery_nice=table.integer(
            "delivery_nice", defaults.delivery_nice, minimum=0, maximum=MAX_NICE
        ),
    )


def _delivery_processes(table: Table) -> int:
    """ "auto" (-1), 0 (delivery in the capture process) or 1 (a process of its own)."""
    value = table.value("delivery_processes")
    if value is None or value == "auto":
        return -1
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value)  # from the environment, where every value is a string
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return value
    raise table.invalid("delivery_processes", value, '"auto", 0 or 1')


def postgres_section(table: Table) -> PostgresConfig:
    dsn = table.string("dsn", DEFAULT_POSTGRES_DSN)
    if dsn not in ("", "embedded"):
        if not dsn.lower().startswith(DSN_SCHEMES):
            raise table.invalid("dsn", dsn, DSN_FORM)
        problem = dsn_problem(dsn)
        if problem is not None:
            raise table.problem("dsn", dsn, problem, DSN_FORM)
    return PostgresConfig(
        dsn=dsn,
        store_signaling=table.boolean("store_signaling", DEFAULT_STORE_SIGNALING),
        store_sdp=table.boolean("store_sdp", DEFAULT_STORE_SDP),
        partitions_ahead_days=table.integer(
            "partitions_ahead_days", DEFAULT_PARTITIONS_AHEAD_DAYS, minimum=1
        ),
    )


def kafka_section(table: Table, base_dir: Path) -> KafkaConfig:
    bootstrap_text = table.string("bootstrap", "")
    bootstrap = []
    if bootstrap_text.strip():
        for server in bootstrap_text.split(","):
            try:
                bootstrap.append(parse_endpoint(server.strip(), min_port=1))
            except ValueError:
                expected = '"" (disabled) or a comma-separated list of HOST:PORT'
                raise table.invalid("bootstrap", bootstrap_text, expected) from None
    topics: dict[str, str] = {}
    for name, default in (
        ("topic_cdrs", kafka.DEFAULT_TOPIC_CDRS),
        ("topic_fraud", kafka.DEFAULT_TOPIC_FRAUD),
        ("topic_sip", kafka.DEFAULT_TOPIC_SIP),
    ):
        topic = table.string(name, default)
        if name == "topic_sip" and not topic:
            topics[name] = topic  # disabled
            continue
        if not _KAFKA_TOPIC.fullmatch(topic) or topic in (".", ".."):
            raise table.invalid(name, topic, "a Kafka topic name: 1-249 of [A-Za-z0-9._-]")
        for other_name, other in topics.items():
            if topic == other:
                raise table.problem(
                    name,
                    topic,
                    f"same topic as {other_name}",
                    "a topic of its own: consumers tell the record kinds apart by topic",
                )
        topics[name] = topic
    protocol = table.string("security_protocol", kafka.DEFAULT_SECURITY_PROTOCOL).upper()
    if protocol not in kafka.SECURITY_PROTOCOLS:
        raise table.invalid("security_protocol", protocol, f"one of {kafka.SECURITY_PROTOCOLS}")
    mechanism = table.optional_string("sasl_mechanism")
    if mechanism is not None:
        mechanism = mechanism.upper()
        if mechanism not in kafka.SASL_MECHANISMS:
            expected = f"one of {kafka.SASL_MECHANISMS}"
            raise table.invalid("sasl_mechanism", mechanism, expected)
    username = table.optional_string("sasl_username")
    password = table.optional_string("sasl_password")
    cafile = table.optional_string("ssl_cafile")
    # Settings the chosen protocol would ignore are refused: a sasl_password or CA file
    # that is silently unused means the connection is not secured the way the file says.
    sasl = protocol.startswith("SASL_")
    for name, value in (
        ("sasl_mechanism", mechanism),
        ("sasl_username", username),
        ("sasl_password", password),
    ):
        if value is not None and not sasl:
            raise table.problem(
                name,
                value,
                f"unused with security_protocol {protocol}",
                "SASL_SSL or SASL_PLAINTEXT",
            )
    if cafile is not None and not protocol.endswith("SSL"):
        raise table.problem(
            "ssl_cafile", cafile, f"unused with security_protocol {protocol}", "SSL or SASL_SSL"
        )
    if sasl and (mechanism is None or mechanism in kafka.PASSWORD_MECHANISMS):
        for name, value in (("sasl_username", username), ("sasl_password", password)):
            if value is None:
                raise table.problem(
                    name, None, f"missing for SASL {mechanism or 'PLAIN'}", "a non-empty string"
                )
    return KafkaConfig(
        bootstrap=tuple(bootstrap),
        idempotence=table.boolean("idempotence", kafka.DEFAULT_IDEMPOTENCE),
        topic_cdrs=topics["topic_cdrs"],
        topic_fraud=topics["topic_fraud"],
        topic_sip=topics["topic_sip"],
        security_protocol=protocol,
        sasl_mechanism=mechanism,
        sasl_username=username,
        sasl_password=password,
        ssl_cafile=None if cafile is None else base_dir / cafile,
        compression=_kafka_compression(table),
        linger_ms=table.integer("linger_ms", kafka.DEFAULT_LINGER_MS, minimum=0),
        max_batch_bytes=table.integer(
            "max_batch_bytes", kafka.DEFAULT_MAX_BATCH_BYTES, minimum=1024
        ),
        request_timeout_ms=table.integer(
            "request_timeout_ms", kafka.DEFAULT_REQUEST_TIMEOUT_MS, minimum=100
        ),
        pseudonymize_numbers=table.boolean("pseudonymize_numbers", False),
        create_topics=table.boolean("create_topics", kafka.DEFAULT_CREATE_TOPICS),
        topic_partitions=table.integer(
            "topic_partitions", kafka.DEFAULT_TOPIC_PARTITIONS, minimum=1
        ),
        topic_replication_factor=(
            table.integer("topic_replication_factor", 1, minimum=1)
            if table.has("topic_replication_factor")
            else None
        ),
    )


def _kafka_compression(table: Table) -> str:
    compression = table.string("compression", kafka.DEFAULT_COMPRESSION).lower()
    if compression not in kafka.COMPRESSIONS:
        raise table.invalid("compression", compression, f"one of {kafka.COMPRESSIONS}")
    return compression
