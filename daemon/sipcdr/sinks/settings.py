"""The settings the sinks layer is built from, as plain typed records, and the Kafka
options' defaults with their reasons.

Whoever builds the outputs (the daemon, `sipcdr import`) makes these from its own
configuration; nothing here reads a file or knows the config's keys. The module imports
nothing heavy, so the config can name the same defaults and choices without loading a
sink's client library.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

DEFAULT_TOPIC_CDRS: Final = "sipcdr.cdrs"  # the name billing consumers are told to expect
DEFAULT_TOPIC_FRAUD: Final = "sipcdr.fraud"  # the name fraud analysts are told to expect
# Off: every parsed message, a hundred times the CDRs' volume, for scale-out correlators.
# "sipcdr.sip" is the name DESIGN.md gives it.
DEFAULT_TOPIC_SIP: Final = ""
# No duplicates from the producer's own retries; brokers without InitProducerId need it off.
DEFAULT_IDEMPOTENCE: Final = True
COMPRESSIONS: Final = ("lz4", "zstd", "gzip", "none")
# zstd: through aiokafka it is both the fastest codec and the smallest on CDRs (8x at
# ~500-700 MB/s, against lz4's 5x at ~100 MB/s: aiokafka runs lz4 at level 9), and the
# fastest producer setting in benchmarks/kafka.py. Brokers and clients read it since
# Kafka 2.1 (2018); "lz4" is there for older consumers.
DEFAULT_COMPRESSION: Final = "zstd"
# deliver hands over a whole spool batch at once: partition batches go out as they fill,
# and lingering only holds back the last, partial ones that deliver then waits for
# (5 ms cost 5-7%, 20 ms 40% in benchmarks/kafka.py).
DEFAULT_LINGER_MS: Final = 0
# Per partition request, ~65 CDRs before compression: fastest or level under every codec
# in benchmarks/kafka.py (16 KiB, aiokafka's default, is 15% slower with zstd; 256 KiB+ lose).
DEFAULT_MAX_BATCH_BYTES: Final = 64 * 1024
# Longer than a Kafka leader election, so a failover is ridden out instead of failed;
# short enough that a dead cluster shows as a failed delivery within half a minute.
DEFAULT_REQUEST_TIMEOUT_MS: Final = 15_000
# Topics the sink creates: six partitions let a consumer group of up to six share a
# topic; more can be added later (keys then move, so a call's copies may split).
DEFAULT_CREATE_TOPICS: Final = True
DEFAULT_TOPIC_PARTITIONS: Final = 6
# Brokers on a trusted network are the common first setup; TLS/SASL are opt-in per site.
DEFAULT_SECURITY_PROTOCOL: Final = "PLAINTEXT"
SECURITY_PROTOCOLS: Final = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
# Mechanisms that authenticate with the username and password this sink is given.
# OAUTHBEARER is left out: it needs a token provider, which a config file cannot give.
SASL_MECHANISMS: Final = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI")
DEFAULT_SASL_MECHANISM: Final = "PLAIN"  # what a SASL listener offers when nothing else is set
# Mechanisms that authenticate with sasl_username and sasl_password.
PASSWORD_MECHANISMS: Final = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True, slots=True)
class JsonlSettings:
    path: Path
    rotate_bytes: int


@dataclass(frozen=True, slots=True)
class PostgresSettings:
    dsn: str  # a postgresql:// DSN, or "embedded": a private server under the state dir
    store_signaling: bool
    partitions_ahead_days: int
    # trunk name -> its `cdr_retention_days`: the retention class its CDRs are stored
    # under (others: the default class); see sipcdr.privacy.
    retention_classes: Mapping[str, int] = field(default_factory=dict)

    @property
    def embedded(self) -> bool:
        return self.dsn == "embedded"


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """`KafkaSink`'s arguments, by name."""

    bootstrap: str  # host:port[,host:port...]
    topic_cdrs: str
    topic_fraud: str
    topic_sip: str  # "" disables
    idempotence: bool
    compression: str
    linger_ms: int
    max_batch_bytes: int
    request_timeout_ms: int
    security_protocol: str
    sasl_mechanism: str | None
    sasl_username: str | None
    sasl_password: str | None
    ssl_cafile: Path | None
    # Numbers leave as keyed pseudonyms (sipcdr.privacy.outbound), under the key in
    # `pseudonym_key_file`, which is then set.
    pseudonymize_numbers: bool = False
    pseudonym_key_file: Path | None = None
    # A configured topic the cluster lacks is created, with retention.ms per topic
    # from the retention settings (sipcdr.privacy.plan.kafka_retention_ms).
    create_topics: bool = DEFAULT_CREATE_TOPICS
    topic_partitions: int = DEFAULT_TOPIC_PARTITIONS
    topic_replication_factor: int | None = None  # None: 3, at most the cluster's brokers
    topic_retention_ms: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SpoolSettings:
    """The spools' sizes and policies (reasons on the defaults in spool/records.py)."""

    max_bytes: int
    signaling_max_bytes: int
    segment_bytes: int
    full_policy: str
    fsync_interval_s: float
    cdr_reserve_records: int
    signaling_min_free_bytes: int


@dataclass(frozen=True, slots=True)
class OutputSettings:
    """Everything `Outputs` builds; a sink that is None is off."""

    state_dir: Path  # the spools and an embedded PostgreSQL live under it
    store_sdp: bool  # signaling records keep the message body (SDP), for every sink
    spool: SpoolSettings
    jsonl: JsonlSettings | None
    postgres: PostgresSettings | None
    kafka: KafkaSettings | None
