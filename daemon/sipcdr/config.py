"""Typed settings from a TOML file and `SIPCDR_*` environment variables, validated once.

`load_config` reads the file (or starts from the embedded defaults when there is none),
applies the environment on top, and checks every value before anything is started, so
a bad setting stops the start with a `ConfigError` naming the key, the value and what
was expected. Unknown keys are errors: a misspelt key that silently kept its default
could leave a listener open or a sink off without anyone noticing.

Environment variables
---------------------
`SIPCDR_<SECTION>__<KEY>` sets `[section] key`; deeper tables add `__<NAME>` per level:

    SIPCDR_SINKS__KAFKA__BOOTSTRAP=host:9092        [sinks.kafka] bootstrap
    SIPCDR_CAPTURE__HEP_UDP=127.0.0.1:9060,[::1]:9060   a list: comma-separated
    SIPCDR_CAPTURE__HEP_KEYS__2001=s3cret           one entry of a table
    SIPCDR_TRUNKS__0__RATE_PLAN=retail              a key of the first [[trunks]] entry
    SIPCDR_SINKS__KAFKA__IDEMPOTENCE=false          bools: true/false, 1/0, yes/no, on/off

Names are matched in lower case, so table entries set this way (deck names, for one)
are lower case. A variable replaces one value, or adds one table entry; the rest of the
file stays. Trunks set from the environment continue the file's list by index, without
gaps. Every other variable that starts with `SIPCDR_` is an error, except those under
`NON_CONFIG_ENV_PREFIXES`, which are read by other parts of the project.

Relative paths in `rating.decks`, `sinks.kafka.ssl_cafile` and `capture.tls_*` are
inputs that ship next to the config file, so they are taken relative to its directory
(to the working directory when there is no file). `sinks.jsonl.path` and `state.dir` are outputs and
stay relative to the working directory, as the daemon's `./var/` defaults are.
"""

from __future__ import annotations

import difflib
import inspect
import ipaddress
import math
import os
import re
import socket
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Final, NamedTuple, TypeAlias

from asyncpg import connect_utils

from sipcdr import dialogstore, spare
from sipcdr.capture import tls
from sipcdr.dialog.correlator import DialogLimits
from sipcdr.hotpath import PURE_PYTHON_ENV
from sipcdr.model import Trunk
from sipcdr.privacy import settings as privacy_settings
from sipcdr.privacy.settings import PrivacySettings, RetentionSettings
from sipcdr.sinks import kafka_options as kafka
from sipcdr.sinks import spool
from sipcdr.sinks.jsonl import DEFAULT_ROTATE_BYTES
from sipcdr.storage.partitions import DEFAULT_PARTITIONS_AHEAD_DAYS

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

ENV_PREFIX: Final = "SIPCDR_"
# Variables with these prefixes are not settings: the test suite reads SIPCDR_TEST_PG_DSN
# and SIPCDR_TEST_KAFKA (servers to test against), and must be able to set them while a
# daemon under test loads its config from the same environment.
NON_CONFIG_ENV_PREFIXES: Final = ("SIPCDR_TEST_", PURE_PYTHON_ENV)

# What secrets are replaced with in `Config.redacted()` and in error messages.
SECRET_MASK: Final = "***"


class Endpoint(NamedTuple):
    """A `HOST:PORT` address; IPv6 hosts are kept without their brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


# -- defaults -----------------------------------------------------------------------------

# Loopback only: a fresh install captures nothing from the network until an operator
# points a mirror at an address they chose.
DEFAULT_SIP_UDP: Final = (Endpoint("127.0.0.1", 5060),)
# 9060 is the port HEP agents and Homer use by convention; loopback as above.
DEFAULT_HEP_UDP: Final = (Endpoint("127.0.0.1", 9060),)
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
# The other Kafka defaults, with their reasons, are the sink's: sinks/kafka_options.py.

# A fixed port so scrape configs can be written ahead; loopback until a scraper is set up.
DEFAULT_METRICS_LISTEN: Final = Endpoint("127.0.0.1", 9108)
# Next to the JSONL default, so one directory holds everything a run writes.
DEFAULT_STATE_DIR: Final = Path("var")


_MAX_CAPTURE_ID: Final = 0xFFFFFFFF  # HEPv3 chunk 0x000c is an unsigned 32-bit integer
_MAX_ENV_TRUNK_INDEX: Final = 9999  # bounds the list an index from the environment can grow

_BOOLEANS: Final = {
    "true": True,
    "1": True,
    "yes": True,
    "on": True,
    "false": False,
    "0": False,
    "no": False,
    "off": False,
}
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_KAFKA_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_COUNTRY_CODE = re.compile(r"[1-9][0-9]{0,2}")  # E.164 country codes: 1-3 digits, no 0 first
_DIGITS = re.compile(r"[0-9]+")
_DSN_SCHEMES: Final = ("postgresql://", "postgres://")
# Parameters with a fixed set of values, as asyncpg takes them (libpq's names; the
# tests compare them with the driver's).
_DSN_CHOICES: Final = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "sslnegotiation": ("postgres", "direct"),
    "target_session_attrs": (
        "any",
        "primary",
        "standby",
        "prefer-standby",
        "read-write",
        "read-only",
    ),
    "gsslib": ("gssapi", "sspi"),
    "ssl_min_protocol_version": ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"),
    "ssl_max_protocol_version": ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"),
}
_DSN_FORM: Final = (
    '"embedded", "" (disabled), or a URL '
    "postgresql://[user[:password]@][host][:port][,host[:port]...][/dbname][?key=value&...] "
    "with reserved characters percent-encoded"
)
_SECRET_KEYS: Final = frozenset({"sinks.kafka.sasl_password", "capture.hep_keys"})
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# A parameter's name and its "=", in the URL's query or the key=value form.
_DSN_PARAMETER = re.compile(r"(?:^|[?&\s])([^=?&\s]+)\s*=")
_DSN_SECRET_PARAMETERS: Final = frozenset({"password", "sslpassword"})
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


class ConfigError(ValueError):
    """A setting that cannot be used. `key` is its dotted path (`sinks.kafka.bootstrap`,
    `trunks[0].name`), `value` how it was given (secrets masked) or None for an unknown or
    missing key, `expected` what would have been accepted."""

    def __init__(self, message: str, *, key: str, value: str | None, expected: str) -> None:
        super().__init__(message)
        self.key = key
        self.value = value
        self.expected = expected


# -- sections -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    sip_udp: tuple[Endpoint, ...] = DEFAULT_SIP_UDP
    hep_udp: tuple[Endpoint, ...] = DEFAULT_HEP_UDP
    hep_tcp: tuple[Endpoint, ...] = DEFAULT_HEP_TCP
    hep_tls: tuple[Endpoint, ...] = DEFAULT_HEP_TLS
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
    country_code: str | None = None
    national_prefix: str | None = None
    cdr_retention_days: int | None = None  # sipcdr.privacy.settings reads it

    def to_trunk(self) -> Trunk:
        return Trunk(
            name=self.name,
            country_code=self.country_code,
            national_prefix=self.national_prefix,
            rate_plan=self.rate_plan,
        )

    def redacted(self) -> dict[str, object]:
        return {
            "name": self.name,
            "sources": [str(network) for network in self.sources],
            "rate_plan": self.rate_plan,
            "country_code": self.country_code,
            "national_prefix": self.national_prefix,
            "cdr_retention_days": self.cdr_retention_days,
        }


@dataclass(frozen=True, slots=True)
class RatingConfig:
    decks: Mapping[str, Path] = field(default_factory=lambda: MappingProxyType({}))
    default_plan: str | None = None

    def redacted(self) -> dict[str, object]:
        return {
            "decks": {name: str(path) for name, path in self.decks.items()},
            "default_plan": self.default_plan,
        }


@dataclass(frozen=True, slots=True)
class FraudConfig:
    """Detectors run with their shipped defaults; settings will be added here."""

    def redacted(self) -> dict[str, object]:
        return {}


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
    """The durable spool every CDR, alert and signaling record passes (sinks/spool.py)."""

    max_bytes: int = spool.DEFAULT_MAX_BYTES
    signaling_max_bytes: int = spool.DEFAULT_SIGNALING_MAX_BYTES
    segment_bytes: int = spool.DEFAULT_SEGMENT_BYTES
    full_policy: str = spool.DEFAULT_FULL_POLICY  # "block" or "drop_newest"
    fsync_interval_ms: int = round(spool.DEFAULT_FSYNC_INTERVAL_S * 1000)
    # Closed CDRs a failing disk refuses, held in memory until it takes them again.
    cdr_reserve_records: int = spool.DEFAULT_CDR_RESERVE_RECORDS
    # Signaling stops while the state disk has less free space, so CDRs keep room.
    signaling_min_free_bytes: int = spool.DEFAULT_SIGNALING_MIN_FREE_BYTES

    def redacted(self) -> dict[str, object]:
        return {item.name: getattr(self, item.name) for item in fields(self)}


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

    def redacted(self) -> dict[str, object]:
        return {
            "dir": str(self.dir),
            "checkpoint_interval_s": self.checkpoint_interval_s,
            "spare_bytes": self.spare_bytes,
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


# -- public helpers ---------------------------------------------------------------------------


def parse_endpoint(text: str, *, min_port: int = 0) -> Endpoint:
    """`host:port`, `1.2.3.4:port` or `[v6]:port`; ValueError says what is wrong."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError("[IPv6]:PORT")
        try:
            host = str(ipaddress.IPv6Address(text[1:close]))
        except ValueError:
            raise ValueError("an IPv6 address inside the brackets of [IPv6]:PORT") from None
        port_text = text[close + 2 :]
    else:
        host_text, colon, port_text = text.rpartition(":")
        if not colon or not host_text:
            raise ValueError("HOST:PORT")
        if ":" in host_text:
            raise ValueError("HOST:PORT with an IPv6 host in brackets: [IPv6]:PORT")
        host = _check_host(host_text)
    if not (port_text.isascii() and port_text.isdigit()) or not (
        min_port <= int(port_text) <= 65535
    ):
        raise ValueError(f"HOST:PORT with a port from {min_port} to 65535")
    return Endpoint(host, int(port_text))


def redact_dsn(dsn: str) -> str:
    """The DSN with its passwords masked: the URL's userinfo, and everything from the
    first `password=` or `sslpassword=` parameter to the end (also in the `key=value`
    form), so that no unescaped separator (`&`, `#`, a space) in a password can leave a
    piece of it showing.

    Takes the last `@` as the end of the userinfo, because passwords are often written
    unescaped; when that guesses wrong it masks too much, never too little.
    """
    scheme = _URL_SCHEME.match(dsn)
    head, rest = (dsn[: scheme.end()], dsn[scheme.end() :]) if scheme else ("", dsn)
    at = rest.rfind("@")
    if scheme and at >= 0 and ":" in rest[:at]:
        user = rest[:at].split(":", 1)[0]
        rest = f"{user}:{SECRET_MASK}@{rest[at + 1 :]}"
    for match in _DSN_PARAMETER.finditer(rest):
        # The driver decodes parameter names: pass%77ord is a password too.
        name = urllib.parse.unquote_plus(match.group(1)).strip().lower()
        if name in _DSN_SECRET_PARAMETERS:
            return head + rest[: match.end()] + SECRET_MASK
    return head + rest


def dsn_problem(dsn: str) -> str | None:
    """What keeps the PostgreSQL driver from using `dsn`, a postgresql:// URL, as it was
    meant, or None.

    The driver's own parser runs on it (so a value it refuses at every connect, such
    as `target_session_attrs=bogus` or more ports than hosts, is refused here), after
    checks for what it takes silently but wrongly: an unescaped `@`, `#`, `/` or `?` in
    a password shifts the parts after it into the host, the port or the database name.
    The answer quotes no part of the DSN: an unescaped password can end up in any of
    them.
    """
    scheme, separator, rest = dsn.partition("://")
    if not separator or scheme.lower() not in ("postgresql", "postgres"):
        return "the scheme is neither postgresql:// nor postgres://"
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in dsn):
        return "it holds a control character (percent-encode it)"
    if "#" in rest:
        # The driver drops everything from a '#' on, a password's remainder included.
        return "it holds a '#' (percent-encode it as %23, in a password too)"
    try:
        parts = urllib.parse.urlsplit(dsn)
    except ValueError:
        netloc = re.split(r"[/?]", rest, maxsplit=1)[0]
        if "[" in netloc.rpartition("@")[0] or "]" in netloc.rpartition("@")[0]:
            return "a user name or password holds '[' or ']' (percent-encode them as %5B, %5D)"
        return "its host part is malformed (an IPv6 host is written [2001:db8::1]:5432)"
    hostspec = parts.netloc.partition("@")[2] if "@" in parts.netloc else parts.netloc
    if "@" in hostspec:
        return "it holds a second '@' before the host (percent-encode it as %40)"
    if "@" in parts.path:
        return (
            "it holds an '@' after the host: a '/' or '?' in a password must be "
            "percent-encoded (%2F, %3F), and an '@' in the database name as %40"
        )
    try:
        query = {
            key: values[-1]
            for key, values in urllib.parse.parse_qs(parts.query, strict_parsing=True).items()
        }
    except ValueError:
        return (
            "the part after '?' is not key=value pairs joined by '&' (a '?' in a password "
            "must be percent-encoded as %3F)"
        )
    try:
        hosts = _dsn_hosts(hostspec, encoded=True) if hostspec else 0
        query_hosts = _dsn_hosts(query["host"], encoded=False) if "host" in query else 0
        ports = [_dsn_port(port) for port in query["port"].split(",")] if "port" in query else []
    except ValueError as exc:
        return str(exc)
    if not hosts and query_hosts and len(ports) > 1 and len(ports) != query_hosts:
        return f"its host parameter names {query_hosts} hosts, its port parameter {len(ports)}"
    for name, allowed in _DSN_CHOICES.items():
        if name in query and query[name] not in allowed:
            return f"its {name} is not one of {', '.join(allowed)}"
    return _driver_problem(dsn)


def _driver_problem(dsn: str) -> str | None:
    """Why asyncpg's own parser refuses `dsn` (with the PG* environment variables and
    the files it reads: passfile, certificates), in words that quote none of it."""
    parse = getattr(connect_utils, "_parse_connect_dsn_and_args", None)
    if parse is None:  # a driver without it: what it refuses shows at the first connect
        return None
    arguments: dict[str, object] = dict.fromkeys(inspect.signature(parse).parameters)
    arguments["dsn"] = dsn
    try:
        parse(**arguments)
    except Exception as exc:
        return (
            f"the PostgreSQL driver refuses it, or the PG* environment variables and "
            f"files it reads ({_driver_reason(exc)})"
        )
    return None


def _driver_reason(exc: Exception) -> str:
    name = type(exc).__name__
    if isinstance(exc, OSError):
        return f"{name}: {exc.strerror}" if exc.strerror else name
    if type(exc).__name__ != "ClientConfigurationError":
        return name  # a parse error's message (a ValueError of int()) quotes the text
    # Its messages end with the value they refuse (", got 'x'"), or quote a path.
    reason = str(exc).splitlines()[0].partition(", got ")[0]
    return f"{name}: {re.sub(_QUOTED, '...', reason)}"


def _dsn_hosts(hostlist: str, *, encoded: bool) -> int:
    """How many hosts a DSN's comma-separated host list names; ValueError otherwise."""
    specs = hostlist.split(",")
    for spec in specs:
        if spec.startswith("["):
            address, closed, after = spec[1:].partition("]")
            if not closed or (after and not after.startswith(":")):
                raise ValueError("an IPv6 host is malformed (written [2001:db8::1]:5432)")
            try:
                ipaddress.IPv6Address(urllib.parse.unquote(address))
            except ValueError:
                raise ValueError("an IPv6 host in brackets is not a valid IPv6 address") from None
            port = after[1:] if after else None
        elif spec.startswith("/") and not encoded:
            continue  # a socket directory, in the host parameter
        else:
            host, colon, port_text = spec.partition(":")
            port = port_text if colon else None
            if encoded:
                host = urllib.parse.unquote(host)
            if port is not None and ":" in port:
                raise ValueError("an IPv6 host is not in brackets (written [2001:db8::1]:5432)")
            if not host:
                raise ValueError("a host in its host list is empty")
            if not host.startswith("/") and not _dsn_host_ok(host):
                # (else a percent-encoded socket directory)
                raise ValueError("a host is neither a host name nor an IP address")
        if port:  # an empty port ("db:") is the default port, as for the driver
            _dsn_port(urllib.parse.unquote(port) if encoded else port)
    return len(specs)


def _dsn_host_ok(host: str) -> bool:
    """Whether the resolver takes `host` as the driver hands it over: an IPv4 address
    in any form inet_aton reads (127.1 included) or a host name, international ones
    included. A dotted number it cannot read (999.1.2.3) is a typo, not a name."""
    try:
        socket.inet_aton(host)
        return True
    except OSError:
        pass
    if host.replace(".", "").isdigit():
        return False
    try:
        ascii_name = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    labels = ascii_name.removesuffix(".").split(".")
    return len(ascii_name) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


def _dsn_port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise ValueError("a port is not a number from 1 to 65535")
    return int(text)


def trunk_resolver(config: Config) -> Callable[[str], Trunk | None]:
    """A function from a source IP to the trunk whose most specific network holds it.

    Networks are grouped by prefix length, so a lookup is one dict probe per distinct
    length, longest first. IPv4-mapped IPv6 sources match IPv4 networks, since dual-stack
    sockets report IPv4 peers that way. Anything that is not an IP address gives None.
    """
    groups: dict[tuple[int, int], dict[int, Trunk]] = {}
    for trunk_config in config.trunks:
        trunk = trunk_config.to_trunk()
        for network in trunk_config.sources:
            shift = network.max_prefixlen - network.prefixlen
            table = groups.setdefault((network.version, network.prefixlen), {})
            table[int(network.network_address) >> shift] = trunk

    def by_length(version: int, bits: int) -> tuple[tuple[int, dict[int, Trunk]], ...]:
        lengths = sorted((length for v, length in groups if v == version), reverse=True)
        return tuple((bits - length, groups[version, length]) for length in lengths)

    ipv4 = by_length(4, 32)
    ipv6 = by_length(6, 128)

    def resolve(source: str) -> Trunk | None:
        try:
            address = ipaddress.ip_address(source)
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        value = int(address)
        for shift, table in ipv4 if address.version == 4 else ipv6:
            trunk = table.get(value >> shift)
            if trunk is not None:
                return trunk
        return None

    return resolve


# -- loading ----------------------------------------------------------------------------------


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read `path` (embedded defaults when None), apply `SIPCDR_*` from `environ`
    (`os.environ` when None), validate everything, or raise ConfigError."""
    if environ is None:
        environ = os.environ
    raw: dict[str, object] = {}
    if path is not None:
        try:
            with path.open("rb") as file:
                raw = tomllib.load(file)
        except OSError as exc:
            expected = "a readable TOML file"
            message = f"config file {path}: cannot be read ({exc.strerror}); expected {expected}"
            raise ConfigError(message, key="", value=str(path), expected=expected) from None
        except tomllib.TOMLDecodeError as exc:
            expected = "valid TOML"
            message = f"config file {path}: {exc}; expected {expected}"
            raise ConfigError(message, key="", value=None, expected=expected) from None
    context = _Context(path)
    _apply_environment(raw, environ, context)
    base_dir = path.parent.absolute() if path is not None else Path.cwd()
    return _build(raw, context, base_dir)


class _EnvStr(str):
    """A value from the environment: always text, converted by the type its key expects."""

    __slots__ = ()


class _Gap:
    """A trunk index the environment skipped; reported if nothing fills it."""


_GAP: Final = _Gap()
_ARRAYS_OF_TABLES: Final = frozenset({"trunks"})


class _Context:
    """Where values came from, to say so in error messages."""

    def __init__(self, file: Path | None) -> None:
        self.file = file
        self.env_origins: dict[str, str] = {}  # dotted key -> variable that set or created it

    def origin(self, key: str) -> str:
        probe = key
        while probe:
            variable = self.env_origins.get(probe)
            if variable is not None:
                return f"from environment variable {variable}"
            probe = _parent(probe)
        return f"in {self.file}" if self.file is not None else "in the embedded defaults"

    def invalid(self, key: str, value: object, expected: str) -> ConfigError:
        shown = _shown(key, value)
        if isinstance(value, _EnvStr) and expected.startswith(("a table", "an array")):
            variable = self.env_origins.get(key, "the variable")
            expected += f"; {variable} cannot set it whole, set its keys with {variable}__<KEY>"
        message = f"{key} = {shown} ({self.origin(key)}): expected {expected}"
        return ConfigError(message, key=key, value=shown, expected=expected)

    def unknown(self, key: str, known: Iterable[str]) -> ConfigError:
        known = sorted(known)
        what = "section" if "." not in key else "key"
        expected = f"one of {', '.join(known)}" if known else "no keys here"
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        message = f"{key} ({self.origin(key)}): unknown {what}{hint}; expected {expected}"
        return ConfigError(message, key=key, value=None, expected=expected)

    def problem(self, key: str, value: object, problem: str, expected: str) -> ConfigError:
        """A value that is wrong in context; `value` None is a key that is missing."""
        shown = None if value is None else _shown(key, value)
        named = key if shown is None else f"{key} = {shown}"
        message = f"{named} ({self.origin(key)}): {problem}; expected {expected}"
        return ConfigError(message, key=key, value=shown, expected=expected)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _parent(key: str) -> str:
    if key.endswith("]"):
        return key[: key.rindex("[")]
    return key.rpartition(".")[0]


def _is_secret(key: str) -> bool:
    return key in _SECRET_KEYS or key.startswith("capture.hep_keys.")


def _shown(key: str, value: object) -> str:
    if _is_secret(key):
        return SECRET_MASK
    if key == "sinks.postgres.dsn" and isinstance(value, str):
        # A refused DSN is shown by its scheme alone: where its password ends is
        # exactly what may be wrong with it.
        scheme = _URL_SCHEME.match(value)
        return repr(f"{scheme.group()}..." if scheme else "...")
    text = repr(str(value)) if isinstance(value, str) else repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _apply_environment(
    raw: dict[str, object], environ: Mapping[str, str], context: _Context
) -> None:
    """Merge `SIPCDR_*` variables into the parsed file, keeping a note of each origin."""
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX) or variable.startswith(NON_CONFIG_ENV_PREFIXES):
            continue
        parts = variable[len(ENV_PREFIX) :].lower().split("__")
        if not all(parts):
            expected = "SIPCDR_<SECTION>__<KEY>, parts separated by exactly two underscores"
            message = f"environment variable {variable}: malformed name; expected {expected}"
            raise ConfigError(message, key=variable, value=None, expected=expected)
        node: dict[str, object] | list[object] = raw
        path = ""
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not (part.isascii() and part.isdigit()) or int(part) > _MAX_ENV_TRUNK_INDEX:
                    key = _join(path, part)
                    context.env_origins[key] = variable
                    expected = f"an index 0-{_MAX_ENV_TRUNK_INDEX}: {path.upper()}__<N>__<KEY>"
                    raise context.problem(key, None, "not an entry index", expected)
                index = int(part)
                path = f"{path}[{index}]"
                node.extend([_GAP] * (index + 1 - len(node)))
                if last:
                    context.env_origins[path] = variable
                    raise context.invalid(path, _EnvStr(environ[variable]), "a table")
                child = node[index]
                if child is _GAP:
                    child = {}
                    node[index] = child
                    context.env_origins[path] = variable
            else:
                path = _join(path, part)
                if last:
                    node[part] = _EnvStr(environ[variable])
                    context.env_origins[path] = variable
                    break
                child = node.get(part)
                if child is None:
                    child = [] if path in _ARRAYS_OF_TABLES else {}
                    node[part] = child
                    context.env_origins[path] = variable
            if not isinstance(child, dict) and not (
                isinstance(child, list) and path in _ARRAYS_OF_TABLES
            ):
                expected = "a table in the config file, for a variable to set a key inside it"
                raise context.problem(path, child, f"{variable} sets a key inside it", expected)
            node = child


class _Table:
    """One TOML table being read. Keys it does not know are rejected before any value is
    used, so a misspelt key is reported as such rather than through a later cross-check."""

    __slots__ = ("_raw", "context", "path")

    def __init__(self, context: _Context, path: str, raw: object, known: Iterable[str]) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise context.invalid(path, raw, "a table")
        known = tuple(known)
        for key in raw:
            if key not in known:
                raise context.unknown(_join(path, key), known)
        self.context = context
        self._raw: dict[str, object] = raw
        self.path = path

    def key(self, name: str) -> str:
        return _join(self.path, name)

    def invalid(self, name: str, value: object, expected: str) -> ConfigError:
        return self.context.invalid(self.key(name), value, expected)

    def problem(self, name: str, value: object, problem: str, expected: str) -> ConfigError:
        return self.context.problem(self.key(name), value, problem, expected)

    def has(self, name: str) -> bool:
        return name in self._raw

    def table(self, name: str, known: Iterable[str]) -> _Table:
        return _Table(self.context, self.key(name), self._raw.get(name), known)

    def entries(self, name: str) -> dict[str, object]:
        """A table whose keys are data (capture ids, plan names), not settings."""
        value = self._raw.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.invalid(name, value, "a table")
        return value

    def array_of_tables(self, name: str) -> list[object]:
        value = self._raw.get(name)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.invalid(name, value, "an array of tables ([[trunks]] entries)")
        return value

    def string(self, name: str, default: str) -> str:
        value = self._raw.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.invalid(name, value, "a string")
        return str(value)

    def optional_string(self, name: str) -> str | None:
        """Absent and "" both mean unset."""
        return self.string(name, "") or None

    def boolean(self, name: str, default: bool) -> bool:
        value = self._raw.get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, _EnvStr) and value.strip().lower() in _BOOLEANS:
            return _BOOLEANS[value.strip().lower()]
        raise self.invalid(name, value, "true or false (from the environment: 1/0, yes/no)")

    def integer(self, name: str, default: int, *, minimum: int) -> int:
        value = self._raw.get(name)
        if value is None:
            return default
        expected = f"an integer >= {minimum}"
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, _EnvStr):
            try:
                number = int(value)
            except ValueError:
                number = None
        if number is None or number < minimum:
            raise self.invalid(name, value, expected)
        return number

    def positive_number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        """A finite number above 0, and at least `minimum` when that is given."""
        value = self._raw.get(name)
        if value is None:
            return default
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, _EnvStr):
            try:
                number = float(value)
            except ValueError:
                number = None
        if number is None or not math.isfinite(number) or number <= 0 or number < minimum:
            raise self.invalid(name, value, f"a number >= {minimum}" if minimum else "a number > 0")
        return number

    def strings(self, name: str) -> tuple[tuple[str, str], ...] | None:
        """The items of a list of strings with their dotted keys, or None if absent.
        From the environment a list is comma-separated; "" is the empty list."""
        value = self._raw.get(name)
        if value is None:
            return None
        key = self.key(name)
        if isinstance(value, _EnvStr):
            items: list[object] = [item.strip() for item in value.split(",")] if value else []
        elif isinstance(value, list):
            items = value
        else:
            raise self.invalid(name, value, "a list of strings")
        result = []
        for index, item in enumerate(items):
            item_key = f"{key}[{index}]"
            if not isinstance(item, str) or not item:
                raise self.context.invalid(item_key, item, "a non-empty string")
            result.append((item_key, str(item)))
        return tuple(result)


def _check_host(text: str) -> str:
    if text.replace(".", "").isdigit():
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise ValueError("HOST:PORT with a valid IPv4 address") from None
    labels = text.removesuffix(".").split(".")
    if len(text) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError("HOST:PORT with a host name or IP address")
    return text


def _endpoints(
    table: _Table, name: str, default: tuple[Endpoint, ...], *, min_port: int = 0
) -> tuple[Endpoint, ...]:
    items = table.strings(name)
    if items is None:
        return default
    result = []
    for key, item in items:
        try:
            result.append(parse_endpoint(item, min_port=min_port))
        except ValueError as exc:
            raise table.context.invalid(key, item, str(exc)) from None
    return tuple(result)


def _networks(table: _Table, name: str, default: tuple[Network, ...]) -> tuple[Network, ...]:
    items = table.strings(name)
    if items is None:
        return default
    result = []
    for key, item in items:
        try:
            result.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            expected = "a network in CIDR form, e.g. 192.0.2.0/24 or 2001:db8::/32"
            raise table.context.invalid(key, item, expected) from None
    return tuple(result)


def _build(raw: dict[str, object], context: _Context, base_dir: Path) -> Config:
    root = _Table(context, "", raw, (item.name for item in fields(Config)))
    capture = _capture(
        root.table("capture", (item.name for item in fields(CaptureConfig))), base_dir
    )
    dialog = _dialog(root.table("dialog", _DIALOG_KEYS))
    rating = _rating(root.table("rating", ("decks", "default_plan")), base_dir)
    trunks = _trunks(root, rating)
    fraud = _fraud(root)
    sinks_table = root.table("sinks", ("jsonl", "postgres", "kafka"))
    sinks = SinksConfig(
        jsonl=_jsonl(sinks_table.table("jsonl", (item.name for item in fields(JsonlConfig)))),
        postgres=_postgres(
            sinks_table.table("postgres", (item.name for item in fields(PostgresConfig)))
        ),
        kafka=_kafka(
            sinks_table.table("kafka", (item.name for item in fields(KafkaConfig))), base_dir
        ),
    )
    metrics_table = root.table("metrics", ("listen",))
    metrics = MetricsConfig(listen=_endpoint(metrics_table, "listen", DEFAULT_METRICS_LISTEN))
    state_table = root.table("state", (item.name for item in fields(StateConfig)))
    state_dir = state_table.string("dir", str(DEFAULT_STATE_DIR))
    if not state_dir:
        raise state_table.invalid("dir", state_dir, "a directory path")
    checkpoint_interval_s = state_table.positive_number(
        "checkpoint_interval_s", dialogstore.DEFAULT_CHECKPOINT_INTERVAL_S
    )
    spare_bytes = state_table.integer("spare_bytes", spare.DEFAULT_SPARE_BYTES, minimum=0)
    config = Config(
        capture=capture,
        dialog=dialog,
        trunks=trunks,
        rating=rating,
        fraud=fraud,
        sinks=sinks,
        spool=_spool(root.table("spool", (item.name for item in fields(SpoolConfig)))),
        metrics=metrics,
        state=StateConfig(
            dir=Path(state_dir),
            checkpoint_interval_s=checkpoint_interval_s,
            spare_bytes=spare_bytes,
        ),
    )
    # -- privacy hook: sipcdr.privacy.settings owns [retention] and [privacy] ----------
    config = replace(
        config,
        retention=privacy_settings.parse_retention(
            root.table("retention", privacy_settings.RETENTION_KEYS),
            ((trunk.name, trunk.cdr_retention_days) for trunk in trunks),
        ),
        privacy=privacy_settings.parse_privacy(
            root.table("privacy", privacy_settings.PRIVACY_KEYS),
            base_dir,
            pseudonymize=sinks.kafka.enabled and sinks.kafka.pseudonymize_numbers,
        ),
    )
    # -- end of privacy hook -----------------------------------------------------------
    _check_listeners(config, context)
    return config


def _endpoint(table: _Table, name: str, default: Endpoint) -> Endpoint:
    if not table.has(name):
        return default
    text = table.string(name, "")
    try:
        return parse_endpoint(text)
    except ValueError as exc:
        raise table.invalid(name, text, str(exc)) from None


def _capture(table: _Table, base_dir: Path) -> CaptureConfig:
    hep_keys: dict[int, str] = {}
    for capture_id, key in table.entries("hep_keys").items():
        entry = _join(table.key("hep_keys"), capture_id)
        if not (capture_id.isascii() and capture_id.isdigit()):
            expected = f"a capture id: an integer 0-{_MAX_CAPTURE_ID}"
            raise table.context.problem(entry, capture_id, "not a capture id", expected)
        number = int(capture_id)
        if number > _MAX_CAPTURE_ID:
            expected = f"a capture id: an integer 0-{_MAX_CAPTURE_ID}"
            raise table.context.problem(entry, capture_id, "out of range", expected)
        if number in hep_keys:
            raise table.context.problem(
                entry, capture_id, f"capture id {number} is given twice", "one key per capture id"
            )
        if not isinstance(key, str) or not key:
            raise table.context.invalid(entry, key, "a non-empty string")
        hep_keys[number] = str(key)
    interfaces: list[str] = []
    for key, name in table.strings("interfaces") or ():
        if any(char.isspace() or char == "," for char in name):
            raise table.context.invalid(key, name, "an interface name (no spaces or commas)")
        if name in interfaces:
            raise table.context.problem(key, name, "listed twice", "each interface once")
        interfaces.append(name)
    live_engine = table.string("live_engine", DEFAULT_LIVE_ENGINE)
    if live_engine not in LIVE_ENGINES:
        raise table.invalid("live_engine", live_engine, " or ".join(LIVE_ENGINES))
    hep_tls = _endpoints(table, "hep_tls", DEFAULT_HEP_TLS)
    tls_files = _tls_files(table, base_dir, hep_tls)
    max_buffer = table.integer(
        "hep_tcp_max_buffer_bytes", DEFAULT_HEP_TCP_MAX_BUFFER_BYTES, minimum=_HEP_MIN_BUFFER
    )
    if max_buffer > _HEP_MAX_FRAME:
        raise table.problem(
            "hep_tcp_max_buffer_bytes",
            max_buffer,
            f"larger than the largest HEPv3 frame ({_HEP_MAX_FRAME} bytes)",
            f"an integer from {_HEP_MIN_BUFFER} to {_HEP_MAX_FRAME}",
        )
    return CaptureConfig(
        sip_udp=_endpoints(table, "sip_udp", DEFAULT_SIP_UDP),
        hep_udp=_endpoints(table, "hep_udp", DEFAULT_HEP_UDP),
        hep_tcp=_endpoints(table, "hep_tcp", DEFAULT_HEP_TCP),
        hep_tls=hep_tls,
        tls_cert=tls_files.get("tls_cert"),
        tls_key=tls_files.get("tls_key"),
        tls_client_ca=tls_files.get("tls_client_ca"),
        hep_tcp_max_connections=table.integer(
            "hep_tcp_max_connections", DEFAULT_HEP_TCP_MAX_CONNECTIONS, minimum=1
        ),
        hep_tcp_max_per_source=table.integer(
            "hep_tcp_max_per_source", DEFAULT_HEP_TCP_MAX_PER_SOURCE, minimum=1
        ),
        hep_tcp_idle_timeout_s=table.positive_number(
            "hep_tcp_idle_timeout_s", DEFAULT_HEP_TCP_IDLE_TIMEOUT_S, minimum=_HEP_MIN_TIMEOUT_S
        ),
        hep_tcp_frame_timeout_s=table.positive_number(
            "hep_tcp_frame_timeout_s", DEFAULT_HEP_TCP_FRAME_TIMEOUT_S, minimum=_HEP_MIN_TIMEOUT_S
        ),
        hep_tcp_max_buffer_bytes=max_buffer,
        allow=_networks(table, "allow", DEFAULT_ALLOW),
        rcvbuf_bytes=table.integer("rcvbuf_bytes", DEFAULT_RCVBUF_BYTES, minimum=1),
        hep_keys=MappingProxyType(hep_keys) if hep_keys else DEFAULT_HEP_KEYS,
        interfaces=tuple(interfaces),
        live_engine=live_engine,
        bpf_filter=table.string("bpf_filter", "") if table.has("bpf_filter") else None,
        promiscuous=table.boolean("promiscuous", DEFAULT_PROMISCUOUS),
    )


_TLS_FILE_KEYS: Final = ("tls_cert", "tls_key", "tls_client_ca")


def _tls_files(table: _Table, base_dir: Path, hep_tls: tuple[Endpoint, ...]) -> dict[str, Path]:
    """The TLS files, checked by loading them the way the listener will, so a bad
    certificate stops the start here, naming its key. Read only when hep_tls lists a
    listener: until then they are not used."""
    given = {name: table.optional_string(name) for name in _TLS_FILE_KEYS}
    files = {name: base_dir / text for name, text in given.items() if text is not None}
    if not hep_tls:
        return files
    for name in ("tls_cert", "tls_key"):
        if name not in files:
            expected = "a PEM file path: capture.hep_tls needs a certificate and its key"
            raise table.context.problem(table.key(name), None, "missing", expected)
    try:
        tls.server_context(files["tls_cert"], files["tls_key"], files.get("tls_client_ca"))
    except tls.TlsSetupError as exc:
        raise table.problem(exc.setting, given[exc.setting], exc.problem, exc.expected) from None
    return files


# Listed rather than taken from DialogLimits' fields: a field added there must not be
# accepted here before this module reads it.
_DIALOG_KEYS: Final = (
    "ring_timeout_s",
    "max_duration_s",
    "max_open_dialogs",
    "transaction_timeout_s",
    "auth_retry_wait_s",
    "answered_sweep_s",
)


def _dialog(table: _Table) -> DialogLimits:
    defaults = DEFAULT_DIALOG_LIMITS
    return DialogLimits(
        ring_timeout_s=table.positive_number("ring_timeout_s", defaults.ring_timeout_s),
        max_duration_s=table.positive_number("max_duration_s", defaults.max_duration_s),
        max_open_dialogs=table.integer("max_open_dialogs", defaults.max_open_dialogs, minimum=1),
        transaction_timeout_s=table.positive_number(
            "transaction_timeout_s", defaults.transaction_timeout_s
        ),
        auth_retry_wait_s=table.positive_number("auth_retry_wait_s", defaults.auth_retry_wait_s),
        answered_sweep_s=table.positive_number("answered_sweep_s", defaults.answered_sweep_s),
    )


def _rating(table: _Table, base_dir: Path) -> RatingConfig:
    decks: dict[str, Path] = {}
    for name, location in table.entries("decks").items():
        entry = _join(table.key("decks"), name)
        if not name:
            raise table.context.problem(entry, name, "empty plan name", "a plan name")
        if not isinstance(location, str) or not location:
            raise table.context.invalid(entry, location, "the path of a CSV rate deck")
        decks[name] = base_dir / location
    default_plan = table.optional_string("default_plan")
    if decks and default_plan is not None and default_plan not in decks:
        expected = f"one of the plans in rating.decks: {', '.join(sorted(decks))}"
        raise table.problem("default_plan", default_plan, "no such deck", expected)
    return RatingConfig(decks=MappingProxyType(decks), default_plan=default_plan)


_TRUNK_KEYS: Final = tuple(item.name for item in fields(TrunkConfig))


def _trunks(root: _Table, rating: RatingConfig) -> tuple[TrunkConfig, ...]:
    context = root.context
    names: set[str] = set()
    owners: dict[Network, str] = {}  # network -> trunk name, to refuse ambiguous sources
    result = []
    for index, item in enumerate(root.array_of_tables("trunks")):
        path = f"trunks[{index}]"
        if item is _GAP:
            expected = "trunks from the environment numbered on from the file's, without gaps"
            raise context.problem(path, None, "missing", expected)
        table = _Table(context, path, item, _TRUNK_KEYS)
        if not table.has("name"):
            raise context.problem(table.key("name"), None, "missing", "a unique trunk name")
        name = table.string("name", "")
        if not name:
            raise table.invalid("name", name, "a non-empty trunk name")
        if name in names:
            raise table.problem("name", name, "duplicate trunk name", "a unique trunk name")
        names.add(name)
        sources = _networks(table, "sources", ())
        if not sources:
            expected = "a non-empty list of CIDR networks"
            raise context.problem(table.key("sources"), None, "missing or empty", expected)
        for offset, network in enumerate(sources):
            owner = owners.get(network)
            if owner is not None:
                raise context.problem(
                    f"{table.key('sources')}[{offset}]",
                    str(network),
                    f"already a source of trunk {owner!r}",
                    "each network in one trunk only, so a source names one trunk",
                )
            owners[network] = name
        rate_plan = table.optional_string("rate_plan")
        if rating.decks and rate_plan is not None and rate_plan not in rating.decks:
            expected = f"one of the plans in rating.decks: {', '.join(sorted(rating.decks))}"
            raise table.problem("rate_plan", rate_plan, "no such deck", expected)
        country_code = table.optional_string("country_code")
        if country_code is not None and not _COUNTRY_CODE.fullmatch(country_code):
            raise table.invalid("country_code", country_code, "a country code of 1-3 digits")
        national_prefix = table.optional_string("national_prefix")
        cdr_retention_days = privacy_settings.trunk_cdr_days(table)  # privacy hook
        if national_prefix is not None and not _DIGITS.fullmatch(national_prefix):
            raise table.invalid("national_prefix", national_prefix, "digits, e.g. '0'")
        result.append(
            TrunkConfig(
                name=name,
                sources=sources,
                rate_plan=rate_plan,
                country_code=country_code,
                national_prefix=national_prefix,
                cdr_retention_days=cdr_retention_days,
            )
        )
    return tuple(result)


def _fraud(root: _Table) -> FraudConfig:
    # The section is accepted so files can carry it (DESIGN's sample does), but any key
    # in it would be a setting that silently does nothing.
    for name, value in root.entries("fraud").items():
        raise root.context.problem(
            _join("fraud", name),
            value,
            "fraud detectors are not configurable in this version",
            "an empty [fraud] section",
        )
    return FraudConfig()


def _jsonl(table: _Table) -> JsonlConfig:
    return JsonlConfig(
        path=table.string("path", DEFAULT_JSONL_PATH),
        rotate_bytes=table.integer("rotate_bytes", DEFAULT_ROTATE_BYTES, minimum=4096),
    )


def _spool(table: _Table) -> SpoolConfig:
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
    )


def _postgres(table: _Table) -> PostgresConfig:
    dsn = table.string("dsn", DEFAULT_POSTGRES_DSN)
    if dsn not in ("", "embedded"):
        if not dsn.lower().startswith(_DSN_SCHEMES):
            raise table.invalid("dsn", dsn, _DSN_FORM)
        problem = dsn_problem(dsn)
        if problem is not None:
            raise table.problem("dsn", dsn, problem, _DSN_FORM)
    return PostgresConfig(
        dsn=dsn,
        store_signaling=table.boolean("store_signaling", DEFAULT_STORE_SIGNALING),
        store_sdp=table.boolean("store_sdp", DEFAULT_STORE_SDP),
        partitions_ahead_days=table.integer(
            "partitions_ahead_days", DEFAULT_PARTITIONS_AHEAD_DAYS, minimum=1
        ),
    )


def _kafka(table: _Table, base_dir: Path) -> KafkaConfig:
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
    )


def _kafka_compression(table: _Table) -> str:
    compression = table.string("compression", kafka.DEFAULT_COMPRESSION).lower()
    if compression not in kafka.COMPRESSIONS:
        raise table.invalid("compression", compression, f"one of {kafka.COMPRESSIONS}")
    return compression


def _check_listeners(config: Config, context: _Context) -> None:
    """Two listeners on one address would fail at bind time, after other sockets are
    already open; say so now. Port 0 is exempt: each bind gets its own port."""
    capture = config.capture
    for protocol, listeners in (
        ("UDP", (("capture.sip_udp", capture.sip_udp), ("capture.hep_udp", capture.hep_udp))),
        (
            "TCP",
            (
                ("capture.hep_tcp", capture.hep_tcp),
                ("capture.hep_tls", capture.hep_tls),
                ("metrics.listen", (config.metrics.listen,)),
            ),
        ),
    ):
        seen: dict[Endpoint, str] = {}
        for key, endpoints in listeners:
            for endpoint in endpoints:
                if endpoint.port == 0:
                    continue
                other = seen.get(endpoint)
                if other is not None:
                    raise context.problem(
                        key,
                        str(endpoint),
                        f"{protocol} address already used by {other}",
                        "each listening address once",
                    )
                seen[endpoint] = key
