"""The configuration's schema: one frozen dataclass per section, every default a named
constant with the reason for its value, and `redacted()` for what may be logged."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Final, NamedTuple, TypeAlias

from sipcdr import dialogstore, spare, spool
from sipcdr.config.cores import usable_cores
from sipcdr.delivery import DEFAULT_DRAIN_TIMEOUT_S
from sipcdr.dialog.correlator import DialogLimits
from sipcdr.fraud.numbering import NumberingPlan, PrefixTable
from sipcdr.fraud.settings import AllowList, FraudSettings
from sipcdr.model import Trunk
from sipcdr.privacy.settings import PrivacySettings, RetentionSettings
from sipcdr.rating import pricing
from sipcdr.sinks import settings as kafka
from sipcdr.sinks.jsonl import DEFAULT_ROTATE_BYTES
from sipcdr.storage.dsn import SECRET_MASK, redact_dsn
from sipcdr.storage.partitions import DEFAULT_PARTITIONS_AHEAD_DAYS

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


class Endpoint(NamedTuple):
    """A `HOST:PORT` address; IPv6 hosts are kept without their brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


# -- defaults -----------------------------------------------------------------------------

# The delivery process's nice increment: its share of a busy machine is a third of the
# capture process's (CFS weights 335 against 1024), enough to catch up once a burst ends.
DEFAULT_DELIVERY_NICE: Final = 5
MAX_NICE: Final = 19
# A stop waiting longer for its sinks than an hour is a hang, not a drain.
MAX_STOP_DRAIN_MS: Final = 3_600_000
# Loopback only: a fresh install captures nothing from the network until an operator
# points a mirror at an address they chose.
DEFAULT_SIP_UDP: Final = (Endpoint("127.0.0.1", 5060),)
# 9060 is the port HEP agents and Homer use by convention; loopback as above.
DEFAULT_HEP_UDP: Final = (Endpoint("127.0.0.1", 9060),)
# Off: a cloud mirror session (AWS VPC Traffic Mirroring sends VXLAN to UDP 4789) is
# pointed at the collector on purpose, and its address chosen then.
DEFAULT_VXLAN_UDP: Final[tuple[Endpoint, ...]] = ()
# Off: HEP agents default to UDP, so a TCP listener is only opened when asked for.
DEFAULT_HEP_TCP: Final[tuple[Endpoint, ...]] = ()
# Off: a TLS listener needs a certificate the operator issues (tls_cert, tls_key).
DEFAULT_HEP_TLS: Final[tuple[Endpoint, ...]] = ()
# The limits below hold for HEP/TCP and HEP/TLS connections together.
# Far above the dozens of agents a site runs, far below the file limit the systemd unit
# sets (65536); the daemon lowers it at start if its own file limit cannot hold it.
DEFAULT_HEP_TCP_MAX_CONNECTIONS: Final = 1024
# An agent keeps one connection, a proxy one per worker process (Kamailio's children);
# one source, misbehaving or not, cannot take every slot.
DEFAULT_HEP_TCP_MAX_PER_SOURCE: Final = 64
# Agents reconnect when closed, so this only costs a silent agent one reconnect; it is
# longer than the lulls of a live trunk and frees the slots of vanished peers.
DEFAULT_HEP_TCP_IDLE_TIMEOUT_S: Final = 300.0
# A frame is at most 64 KiB, which any working link delivers in well under a second;
# 10 s leaves room for a congested WAN and cuts off senders that stall mid-frame.
# The same deadline applies to a TLS handshake and to an unfinished TLS record.
DEFAULT_HEP_TCP_FRAME_TIMEOUT_S: Final = 10.0
# The largest HEPv3 frame (its length field is 16 bits): no valid frame is refused.
# Lower it to bound memory further: larger frames are then skipped and counted.
DEFAULT_HEP_TCP_MAX_BUFFER_BYTES: Final = 65535
_HEP_MAX_FRAME: Final = 65535
_HEP_MIN_BUFFER: Final = 1024  # below this even a bare INVITE would not fit
# Below this the HEP/TCP deadlines only cut off working agents, and the sweep that
# enforces them (four times per timeout) would spin.
_HEP_MIN_TIMEOUT_S: Final = 0.1
# Only local agents until the operator names the sources that may send signaling.
DEFAULT_ALLOW: Final[tuple[Network, ...]] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
DEFAULT_RCVBUF_BYTES: Final = 32 * 1024 * 1024  # absorbs ~0.5 s of a 50k msg/s burst
# Live capture needs privileges and a named interface; off unless asked for.
DEFAULT_INTERFACES: Final[tuple[str, ...]] = ()
# AF_PACKET reads ~15x what pyshark does; pyshark is for hosts without AF_PACKET or root.
LIVE_ENGINES: Final = ("af_packet", "pyshark")
DEFAULT_LIVE_ENGINE: Final = "af_packet"
# None: the capture module's default filter (signaling only, media never reaches Python).
DEFAULT_BPF_FILTER: Final[str | None] = None
# A mirror port's frames are not addressed to the collector's NIC.
DEFAULT_PROMISCUOUS: Final = True
# No agent authentication until keys are issued: loopback-only listeners make that safe.
DEFAULT_HEP_KEYS: Final[Mapping[int, str]] = MappingProxyType({})

# The dialog timers' reasons are documented on each field of DialogLimits.
DEFAULT_DIALOG_LIMITS: Final = DialogLimits()

# The reasons for the rating defaults are the pricing rule's (rating/pricing.py): four
# places is what carriers' call-level statements use, and twelve is beyond any use.
DEFAULT_RATING_DECIMALS: Final = pricing.DEFAULT_DECIMALS
MAX_RATING_DECIMALS: Final = pricing.MAX_DECIMALS

# A file sink that needs no server, so a first run shows CDRs right away.
DEFAULT_JSONL_PATH: Final = "var/cdrs.jsonl"
# "embedded" starts a private PostgreSQL under state.dir, so no server has to exist yet.
DEFAULT_POSTGRES_DSN: Final = "embedded"
# Header captures are what investigations and the retention promises are about.
DEFAULT_STORE_SIGNALING: Final = True
# SDP says who sent media where; the privacy promise is "not stored by default".
DEFAULT_STORE_SDP: Final = False
# Kafka is off until a broker is named: there is no broker to guess.
DEFAULT_KAFKA_BOOTSTRAP: Final[tuple[Endpoint, ...]] = ()
# The other Kafka defaults, with their reasons, are the sink's: sinks/settings.py.

# A fixed port so scrape configs can be written ahead; loopback until a scraper is set up.
DEFAULT_METRICS_LISTEN: Final = Endpoint("127.0.0.1", 9108)
# Next to the JSONL default, so one directory holds everything a run writes.
DEFAULT_STATE_DIR: Final = Path("var")


# -- sections -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    sip_udp: tuple[Endpoint, ...] = DEFAULT_SIP_UDP
    hep_udp: tuple[Endpoint, ...] = DEFAULT_HEP_UDP
    hep_tcp: tuple[Endpoint, ...] = DEFAULT_HEP_TCP
    hep_tls: tuple[Endpoint, ...] = DEFAULT_HEP_TLS
    vxlan_udp: tuple[Endpoint, ...] = DEFAULT_VXLAN_UDP  # mirrored frames in VXLAN
    tls_cert: Path | None = None  # PEM certificate (chain) of the HEP/TLS listeners
    tls_key: Path | None = None  # its unencrypted PEM private key
    tls_client_ca: Path | None = None  # set: agents must present a certificate it signed
    hep_tcp_max_connections: int = DEFAULT_HEP_TCP_MAX_CONNECTIONS
    hep_tcp_max_per_source: int = DEFAULT_HEP_TCP_MAX_PER_SOURCE
    hep_tcp_idle_timeout_s: float = DEFAULT_HEP_TCP_IDLE_TIMEOUT_S
    hep_tcp_frame_timeout_s: float = DEFAULT_HEP_TCP_FRAME_TIMEOUT_S
    hep_tcp_max_buffer_bytes: int = DEFAULT_HEP_TCP_MAX_BUFFER_BYTES
    allow: tuple[Network, ...] = DEFAULT_ALLOW
    rcvbuf_bytes: int = DEFAULT_RCVBUF_BYTES
    hep_keys: Mapping[int, str] = field(default_factory=lambda: DEFAULT_HEP_KEYS)  # id -> key
    interfaces: tuple[str, ...] = DEFAULT_INTERFACES
    live_engine: str = DEFAULT_LIVE_ENGINE
    bpf_filter: str | None = DEFAULT_BPF_FILTER  # "" in the file: keep every frame
    promiscuous: bool = DEFAULT_PROMISCUOUS

    def redacted(self) -> dict[str, object]:
        return {
            "sip_udp": [str(endpoint) for endpoint in self.sip_udp],
            "hep_udp": [str(endpoint) for endpoint in self.hep_udp],
            "hep_tcp": [str(endpoint) for endpoint in self.hep_tcp],
            "hep_tls": [str(endpoint) for endpoint in self.hep_tls],
            "vxlan_udp": [str(endpoint) for endpoint in self.vxlan_udp],
            # Paths only: a key file's contents are never read into the config.
            "tls_cert": None if self.tls_cert is None else str(self.tls_cert),
            "tls_key": None if self.tls_key is None else str(self.tls_key),
            "tls_client_ca": None if self.tls_client_ca is None else str(self.tls_client_ca),
            "hep_tcp_max_connections": self.hep_tcp_max_connections,
            "hep_tcp_max_per_source": self.hep_tcp_max_per_source,
            "hep_tcp_idle_timeout_s": self.hep_tcp_idle_timeout_s,
            "hep_tcp_frame_timeout_s": self.hep_tcp_frame_timeout_s,
            "hep_tcp_max_buffer_bytes": self.hep_tcp_max_buffer_bytes,
            "allow": [str(network) for network in self.allow],
            "rcvbuf_bytes": self.rcvbuf_bytes,
            "hep_keys": {str(capture_id): SECRET_MASK for capture_id in self.hep_keys},
            "interfaces": list(self.interfaces),
            "live_engine": self.live_engine,
            "bpf_filter": self.bpf_filter,
            "promiscuous": self.promiscuous,
        }


@dataclass(frozen=True, slots=True)
class TrunkConfig:
    """A `[[trunks]]` entry as configured; `to_trunk` gives the record the core uses."""

    name: str
    sources: tuple[Network, ...]
    rate_plan: str | None = None
    cost_plan: str | None = None
    country_code: str | None = None
    national_prefix: str | None = None
    cdr_retention_days: int | None = None  # sipcdr.privacy.settings reads it
    strip_prefixes: tuple[str, ...] = ()

    def to_trunk(self) -> Trunk:
        return Trunk(
            name=self.name,
            country_code=self.country_code,
            national_prefix=self.national_prefix,
            rate_plan=self.rate_plan,
            cost_plan=self.cost_plan,
            strip_prefixes=self.strip_prefixes,
        )

    def redacted(self) -> dict[str, object]:
        return {
            "name": self.name,
            "sources": [str(network) for network in self.sources],
            "rate_plan": self.rate_plan,
            "cost_plan": self.cost_plan,
            "country_code": self.country_code,
            "national_prefix": self.national_prefix,
            "cdr_retention_days": self.cdr_retention_days,
            "strip_prefixes": list(self.strip_prefixes),
        }


@dataclass(frozen=True, slots=True)
class RatingConfig:
    decks: Mapping[str, Path] = field(default_factory=lambda: MappingProxyType({}))
    default_plan: str | None = None
    decimals: int = DEFAULT_RATING_DECIMALS

    def redacted(self) -> dict[str, object]:
        return {
            "decks": {name: str(path) for name, path in self.decks.items()},
            "default_plan": self.default_plan,
            "decimals": self.decimals,
        }


@dataclass(frozen=True, slots=True)
class FraudConfig:
    """`[fraud]`: the detectors' settings record, and the table files it was read from
    (by key), to say so in the redacted form."""

    settings: FraudSettings = field(default_factory=FraudSettings)
    files: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def redacted(self) -> dict[str, object]:
        """Thresholds as set; allow-lists as counts, since they hold numbers and
        addresses; replaced tables by their file."""
        return {"settings": _fraud_redacted(self.settings), "files": dict(self.files)}


def _fraud_redacted(value: object) -> object:
    if isinstance(value, AllowList):
        return {
            "numbers": len(value.numbers),
            "prefixes": len(value.prefixes),
            "sources": len(value.sources),
        }
    if isinstance(value, PrefixTable | NumberingPlan):
        return f"{len(value.entries if isinstance(value, PrefixTable) else value.lengths)} entries"
    if isinstance(value, Mapping):
        return {str(key): _fraud_redacted(item) for key, item in value.items()}
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            item.name: _fraud_redacted(getattr(value, item.name))
            for item in dataclasses.fields(value)
            if not item.name.startswith("_")
        }
    return value


@dataclass(frozen=True, slots=True)
class JsonlConfig:
    path: str = DEFAULT_JSONL_PATH  # "" disables
    rotate_bytes: int = DEFAULT_ROTATE_BYTES

    @property
    def enabled(self) -> bool:
        return bool(self.path)

    def redacted(self) -> dict[str, object]:
        return {"path": self.path, "rotate_bytes": self.rotate_bytes}


@dataclass(frozen=True, slots=True)
class PostgresConfig:
    dsn: str = DEFAULT_POSTGRES_DSN  # "embedded", a postgresql:// DSN, or "" to disable
    store_signaling: bool = DEFAULT_STORE_SIGNALING
    store_sdp: bool = DEFAULT_STORE_SDP
    partitions_ahead_days: int = DEFAULT_PARTITIONS_AHEAD_DAYS

    @property
    def enabled(self) -> bool:
        return bool(self.dsn)

    @property
    def embedded(self) -> bool:
        return self.dsn == "embedded"

    def redacted(self) -> dict[str, object]:
        return {
            "dsn": redact_dsn(self.dsn),
            "store_signaling": self.store_signaling,
            "store_sdp": self.store_sdp,
            "partitions_ahead_days": self.partitions_ahead_days,
        }


@dataclass(frozen=True, slots=True)
class KafkaConfig:
    bootstrap: tuple[Endpoint, ...] = DEFAULT_KAFKA_BOOTSTRAP  # () disables
    idempotence: bool = kafka.DEFAULT_IDEMPOTENCE
    topic_cdrs: str = kafka.DEFAULT_TOPIC_CDRS
    topic_fraud: str = kafka.DEFAULT_TOPIC_FRAUD
    topic_sip: str = kafka.DEFAULT_TOPIC_SIP  # "" disables
    security_protocol: str = kafka.DEFAULT_SECURITY_PROTOCOL
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: Path | None = None
    compression: str = kafka.DEFAULT_COMPRESSION
    linger_ms: int = kafka.DEFAULT_LINGER_MS
    max_batch_bytes: int = kafka.DEFAULT_MAX_BATCH_BYTES
    request_timeout_ms: int = kafka.DEFAULT_REQUEST_TIMEOUT_MS
    pseudonymize_numbers: bool = False  # see sipcdr.privacy.settings
    create_topics: bool = kafka.DEFAULT_CREATE_TOPICS  # with retention.ms from [retention]
    topic_partitions: int = kafka.DEFAULT_TOPIC_PARTITIONS
    topic_replication_factor: int | None = None  # None: 3, at most the cluster's brokers

    @property
    def enabled(self) -> bool:
        return bool(self.bootstrap)

    @property
    def bootstrap_servers(self) -> str:
        """The form the Kafka client takes: `host:9092,host2:9092`."""
        return ",".join(str(endpoint) for endpoint in self.bootstrap)

    def redacted(self) -> dict[str, object]:
        return {
            "bootstrap": self.bootstrap_servers,
            "idempotence": self.idempotence,
            "topic_cdrs": self.topic_cdrs,
            "topic_fraud": self.topic_fraud,
            "topic_sip": self.topic_sip,
            "security_protocol": self.security_protocol,
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_username": self.sasl_username,
            "sasl_password": None if self.sasl_password is None else SECRET_MASK,
            "ssl_cafile": None if self.ssl_cafile is None else str(self.ssl_cafile),
            "compression": self.compression,
            "linger_ms": self.linger_ms,
            "max_batch_bytes": self.max_batch_bytes,
            "request_timeout_ms": self.request_timeout_ms,
            "pseudonymize_numbers": self.pseudonymize_numbers,
            "create_topics": self.create_topics,
            "topic_partitions": self.topic_partitions,
            "topic_replication_factor": self.topic_replication_factor,
        }


@dataclass(frozen=True, slots=True)
class SinksConfig:
    jsonl: JsonlConfig = field(default_factory=JsonlConfig)
    postgres: PostgresConfig = field(default_factory=PostgresConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)

    def redacted(self) -> dict[str, object]:
        return {
            "jsonl": self.jsonl.redacted(),
            "postgres": self.postgres.redacted(),
            "kafka": self.kafka.redacted(),
        }


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    """The durable spool every CDR, alert and signaling record passes (spool/)."""

    max_bytes: int = spool.DEFAULT_MAX_BYTES
    signaling_max_bytes: int = spool.DEFAULT_SIGNALING_MAX_BYTES
    segment_bytes: int = spool.DEFAULT_SEGMENT_BYTES
    full_policy: str = spool.DEFAULT_FULL_POLICY  # "block" or "drop_newest"
    fsync_interval_ms: int = round(spool.DEFAULT_FSYNC_INTERVAL_S * 1000)
    # Closed CDRs a failing disk refuses, held in memory until it takes them again.
    cdr_reserve_records: int = spool.DEFAULT_CDR_RESERVE_RECORDS
    # Signaling stops while the state disk has less free space, so CDRs keep room.
    signaling_min_free_bytes: int = spool.DEFAULT_SIGNALING_MIN_FREE_BYTES
    # Delivery (the sinks, an embedded PostgreSQL, retention) in a process of its own,
    # fed by the spool: -1 ("auto") when this process may use two cores or more
    # (`config.cores`: its CPU affinity and cgroup CPU quota), 1 always,
    # 0 never (one process does all). An import's "auto" also wants a sink keeping
    # signaling and 64 MiB of capture (`import_delivery.delivers_apart`): without
    # them the second start costs more than it saves.
    delivery_processes: int = -1
    # How long a stop (SIGTERM) waits for the sinks to take what the spool holds;
    # what is left then is delivered after the next start. Inside systemd's stop
    # timeout with room for the rest of the stop (the shipped unit allows 60 s).
    stop_drain_ms: int = round(DEFAULT_DRAIN_TIMEOUT_S * 1000)
    # How far below the capture process the delivery process runs (a nice increment,
    # 0-19): when both want more than the machine has, a datagram the capture process
    # is late for is lost in the kernel, while a record delivery is late for waits in
    # the spool on disk.
    delivery_nice: int = DEFAULT_DELIVERY_NICE

    def redacted(self) -> dict[str, object]:
        return {item.name: getattr(self, item.name) for item in fields(self)}

    @property
    def delivery_apart(self) -> bool:
        """Whether delivery may run in a process of its own: `sipcdr run`'s answer,
        and what an import's also asks of its capture's size."""
        if self.delivery_processes < 0:
            return usable_cores() >= 2
        return self.delivery_processes > 0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: Endpoint = DEFAULT_METRICS_LISTEN

    def redacted(self) -> dict[str, object]:
        return {"listen": str(self.listen)}


@dataclass(frozen=True, slots=True)
class StateConfig:
    dir: Path = DEFAULT_STATE_DIR
    # The reason is on the constant: how stale a call's last-message time and how long
    # the journal replayed at start may be after a crash.
    checkpoint_interval_s: float = dialogstore.DEFAULT_CHECKPOINT_INTERVAL_S
    # Room kept for a full disk (sipcdr/spare.py); 0: none.
    spare_bytes: int = spare.DEFAULT_SPARE_BYTES
    # The dialog journal's records of one event loop turn in one write (true), or each
    # record in its own write before the next message (false): what a kill may take.
    journal_batch: bool = True

    def redacted(self) -> dict[str, object]:
        return {
            "dir": str(self.dir),
            "checkpoint_interval_s": self.checkpoint_interval_s,
            "spare_bytes": self.spare_bytes,
            "journal_batch": self.journal_batch,
        }


@dataclass(frozen=True, slots=True)
class Config:
    """The whole effective configuration; `Config()` is the embedded defaults."""

    capture: CaptureConfig = field(default_factory=CaptureConfig)
    dialog: DialogLimits = DEFAULT_DIALOG_LIMITS
    trunks: tuple[TrunkConfig, ...] = ()
    rating: RatingConfig = field(default_factory=RatingConfig)
    fraud: FraudConfig = field(default_factory=FraudConfig)
    sinks: SinksConfig = field(default_factory=SinksConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    state: StateConfig = field(default_factory=StateConfig)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)

    def redacted(self) -> dict[str, object]:
        """The effective settings as plain JSON-able data, with every secret masked:
        this is what may be logged."""
        return {
            "capture": self.capture.redacted(),
            "dialog": {item.name: getattr(self.dialog, item.name) for item in fields(self.dialog)},
            "trunks": [trunk.redacted() for trunk in self.trunks],
            "rating": self.rating.redacted(),
            "fraud": self.fraud.redacted(),
            "sinks": self.sinks.redacted(),
            "spool": self.spool.redacted(),
            "metrics": self.metrics.redacted(),
            "state": self.state.redacted(),
            "retention": self.retention.redacted(),
            "privacy": self.privacy.redacted(),
        }
