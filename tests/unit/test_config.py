"""Configuration: defaults, a full file, every kind of error, environment overrides,
redaction of secrets."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import ssl
from pathlib import Path

import pytest
from asyncpg import connect_utils
from sipcdr.config import (
    DEFAULT_HEP_TCP_FRAME_TIMEOUT_S,
    DEFAULT_HEP_TCP_IDLE_TIMEOUT_S,
    DEFAULT_HEP_TCP_MAX_BUFFER_BYTES,
    DEFAULT_HEP_TCP_MAX_CONNECTIONS,
    DEFAULT_HEP_TCP_MAX_PER_SOURCE,
    DEFAULT_RATING_DECIMALS,
    DEFAULT_RCVBUF_BYTES,
    SECRET_MASK,
    Config,
    ConfigError,
    Endpoint,
    TrunkConfig,
    load_config,
    parse_endpoint,
    redact_dsn,
)
from sipcdr.dialog import DialogLimits
from sipcdr.model import Trunk
from sipcdr.storage import dsn as dsn_rules
from tlscerts import Pki, encrypted_key, make_pki

# DESIGN.md's sample file without its example trunk and rating plan, which are
# illustrations rather than defaults.
DESIGN_DEFAULTS = """
[capture]
sip_udp = ["127.0.0.1:5060"]
hep_udp = ["127.0.0.1:9060"]
hep_tcp = []
hep_tls = []
allow = ["127.0.0.0/8", "::1/128"]
rcvbuf_bytes = 33554432

[capture.hep_keys]

[dialog]
ring_timeout_s = 180
max_duration_s = 14400
max_open_dialogs = 1000000

[fraud]

[sinks.jsonl]
path = "var/cdrs.jsonl"

[sinks.postgres]
dsn = "embedded"
store_signaling = true

[sinks.kafka]
bootstrap = ""
idempotence = true
topic_cdrs = "sipcdr.cdrs"
topic_fraud = "sipcdr.fraud"

[metrics]
listen = "127.0.0.1:9108"

[state]
dir = "var"
"""

FULL = """
[capture]
sip_udp = ["0.0.0.0:5060", "[2001:db8::10]:5060"]
hep_udp = ["10.0.0.5:9060"]
hep_tcp = ["[::]:9061"]
allow = ["192.0.2.7/24", "2001:db8::/32"]
rcvbuf_bytes = 8388608
interfaces = ["eth1", "eth2"]

[capture.hep_keys]
2001 = "s3cret"
"2002" = "other-key"

[dialog]
ring_timeout_s = 90.5
max_duration_s = 7200
max_open_dialogs = 5000
transaction_timeout_s = 16
answered_sweep_s = 30

[[trunks]]
name = "carrier-a"
sources = ["192.0.2.0/24", "2001:db8:a::/48"]
rate_plan = "wholesale"
cost_plan = "retail"
country_code = "49"
national_prefix = "0"
strip_prefixes = ["1010", "#31#"]

[[trunks]]
name = "pbx-b"
sources = ["198.51.100.17/32"]

[rating]
decks = { wholesale = "rates/wholesale.csv", retail = "/srv/rates/retail.csv" }
default_plan = "retail"
decimals = 6

[fraud]

[sinks.jsonl]
path = ""

[sinks.postgres]
dsn = "postgresql://sipcdr:pg-secret@db.example.net:5432/cdr?sslmode=require"
store_signaling = false

[sinks.kafka]
bootstrap = "kafka-1.example.net:9092,[2001:db8::9]:9093"
idempotence = false
topic_cdrs = "billing.cdrs"
topic_fraud = "security.fraud"
security_protocol = "SASL_SSL"
sasl_mechanism = "SCRAM-SHA-512"
sasl_username = "sipcdr"
sasl_password = "kafka-secret"
ssl_cafile = "ca.pem"

[metrics]
listen = "[::1]:0"

[state]
dir = "/var/lib/sipcdr"
checkpoint_interval_s = 30
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sipcdr.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), environ or {})


def error_for(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text, environ)
    return caught.value


# -- defaults -----------------------------------------------------------------------------------


def test_no_file_gives_the_embedded_defaults() -> None:
    config = load_config(None, {})
    assert config == Config()
    capture = config.capture
    assert capture.sip_udp == (Endpoint("127.0.0.1", 5060),)
    assert capture.hep_udp == (Endpoint("127.0.0.1", 9060),)
    assert capture.hep_tcp == ()
    assert capture.hep_tls == ()
    assert (capture.tls_cert, capture.tls_key, capture.tls_client_ca) == (None, None, None)
    assert (
        (
            capture.hep_tcp_max_connections,
            capture.hep_tcp_max_per_source,
            capture.hep_tcp_idle_timeout_s,
            capture.hep_tcp_frame_timeout_s,
            capture.hep_tcp_max_buffer_bytes,
        )
        == (1024, 64, 300.0, 10.0, 65535)
        == (
            DEFAULT_HEP_TCP_MAX_CONNECTIONS,
            DEFAULT_HEP_TCP_MAX_PER_SOURCE,
            DEFAULT_HEP_TCP_IDLE_TIMEOUT_S,
            DEFAULT_HEP_TCP_FRAME_TIMEOUT_S,
            DEFAULT_HEP_TCP_MAX_BUFFER_BYTES,
        )
    )
    assert capture.allow == (
        ipaddress.IPv4Network("127.0.0.0/8"),
        ipaddress.IPv6Network("::1/128"),
    )
    assert capture.rcvbuf_bytes == 33_554_432 == DEFAULT_RCVBUF_BYTES
    assert dict(capture.hep_keys) == {}
    assert capture.interfaces == ()
    assert config.dialog == DialogLimits(
        ring_timeout_s=180.0, max_duration_s=14400.0, max_open_dialogs=1_000_000
    )
    assert config.trunks == ()
    assert dict(config.rating.decks) == {}
    assert config.rating.default_plan is None
    assert config.rating.decimals == 4 == DEFAULT_RATING_DECIMALS
    assert config.sinks.jsonl.path == "var/cdrs.jsonl"
    assert config.sinks.jsonl.enabled is True
    assert config.sinks.postgres.dsn == "embedded"
    assert config.sinks.postgres.embedded is True
    assert config.sinks.postgres.store_signaling is True
    kafka = config.sinks.kafka
    assert kafka.bootstrap == ()
    assert kafka.enabled is False
    assert kafka.idempotence is True
    assert (kafka.topic_cdrs, kafka.topic_fraud) == ("sipcdr.cdrs", "sipcdr.fraud")
    assert kafka.security_protocol == "PLAINTEXT"
    assert kafka.sasl_password is None
    assert config.metrics.listen == Endpoint("127.0.0.1", 9108)
    assert config.state.dir == Path("var")
    assert config.state.checkpoint_interval_s == 10.0


def test_design_sample_values_are_the_defaults(tmp_path: Path) -> None:
    assert load_text(tmp_path, DESIGN_DEFAULTS) == load_config(None, {})


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_text(tmp_path, "") == Config()


# -- a full file --------------------------------------------------------------------------------


def test_full_file_gives_typed_values(tmp_path: Path) -> None:
    config = load_text(tmp_path, FULL)
    capture = config.capture
    assert capture.sip_udp == (Endpoint("0.0.0.0", 5060), Endpoint("2001:db8::10", 5060))
    assert capture.hep_udp == (Endpoint("10.0.0.5", 9060),)
    assert capture.hep_tcp == (Endpoint("::", 9061),)
    # strict=False: host bits in a CIDR are dropped rather than refused
    assert capture.allow == (
        ipaddress.IPv4Network("192.0.2.0/24"),
        ipaddress.IPv6Network("2001:db8::/32"),
    )
    assert capture.rcvbuf_bytes == 8_388_608
    assert dict(capture.hep_keys) == {2001: "s3cret", 2002: "other-key"}
    assert capture.interfaces == ("eth1", "eth2")
    assert config.dialog == DialogLimits(
        ring_timeout_s=90.5,
        max_duration_s=7200.0,
        max_open_dialogs=5000,
        transaction_timeout_s=16.0,
        answered_sweep_s=30.0,
    )
    assert config.trunks == (
        TrunkConfig(
            name="carrier-a",
            sources=(
                ipaddress.IPv4Network("192.0.2.0/24"),
                ipaddress.IPv6Network("2001:db8:a::/48"),
            ),
            rate_plan="wholesale",
            cost_plan="retail",
            country_code="49",
            national_prefix="0",
            strip_prefixes=("1010", "#31#"),
        ),
        TrunkConfig(name="pbx-b", sources=(ipaddress.IPv4Network("198.51.100.17/32"),)),
    )
    assert config.trunks[0].to_trunk() == Trunk(
        "carrier-a", "49", "0", "wholesale", "retail", ("1010", "#31#")
    )
    assert config.trunks[1].to_trunk() == Trunk("pbx-b", None, None, None)
    assert dict(config.rating.decks) == {
        "wholesale": tmp_path / "rates" / "wholesale.csv",
        "retail": Path("/srv/rates/retail.csv"),
    }
    assert config.rating.default_plan == "retail"
    assert config.rating.decimals == 6
    assert config.sinks.jsonl.path == ""
    assert config.sinks.jsonl.enabled is False
    postgres = config.sinks.postgres
    assert postgres.dsn == "postgresql://sipcdr:pg-secret@db.example.net:5432/cdr?sslmode=require"
    assert postgres.embedded is False
    assert postgres.store_signaling is False
    kafka = config.sinks.kafka
    assert kafka.bootstrap == (
        Endpoint("kafka-1.example.net", 9092),
        Endpoint("2001:db8::9", 9093),
    )
    assert kafka.bootstrap_servers == "kafka-1.example.net:9092,[2001:db8::9]:9093"
    assert kafka.idempotence is False
    assert (kafka.topic_cdrs, kafka.topic_fraud) == ("billing.cdrs", "security.fraud")
    assert kafka.security_protocol == "SASL_SSL"
    assert kafka.sasl_mechanism == "SCRAM-SHA-512"
    assert (kafka.sasl_username, kafka.sasl_password) == ("sipcdr", "kafka-secret")
    assert kafka.ssl_cafile == tmp_path / "ca.pem"
    assert config.metrics.listen == Endpoint("::1", 0)
    assert config.state.dir == Path("/var/lib/sipcdr")
    assert config.state.checkpoint_interval_s == 30.0


# -- HEP over TCP and TLS -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_file(pki: Pki, cert: Path, key: Path, client_ca: Path | None = None) -> str:
    text = f"""
[capture]
hep_tls = ["0.0.0.0:9061", "[::]:9061"]
tls_cert = "{cert}"
tls_key = "{key}"
hep_tcp_max_connections = 4096
hep_tcp_max_per_source = 8
hep_tcp_idle_timeout_s = 60
hep_tcp_frame_timeout_s = 2.5
hep_tcp_max_buffer_bytes = 16384
"""
    return text + (f'tls_client_ca = "{client_ca}"\n' if client_ca else "")


def test_hep_tls_with_its_files_and_limits(tmp_path: Path, pki: Pki) -> None:
    config = load_text(tmp_path, tls_file(pki, pki.server_cert, pki.server_key, pki.ca))
    capture = config.capture
    assert capture.hep_tls == (Endpoint("0.0.0.0", 9061), Endpoint("::", 9061))
    assert (capture.tls_cert, capture.tls_key, capture.tls_client_ca) == (
        pki.server_cert,
        pki.server_key,
        pki.ca,
    )
    assert capture.hep_tcp_max_connections == 4096
    assert capture.hep_tcp_max_per_source == 8
    assert capture.hep_tcp_idle_timeout_s == 60.0
    assert capture.hep_tcp_frame_timeout_s == 2.5
    assert capture.hep_tcp_max_buffer_bytes == 16384
    redacted = config.redacted()["capture"]
    assert isinstance(redacted, dict)
    assert redacted["hep_tls"] == ["0.0.0.0:9061", "[::]:9061"]
    assert redacted["tls_key"] == str(pki.server_key)  # the path, never the contents
    assert "PRIVATE KEY" not in json.dumps(config.redacted())
    assert redacted["hep_tcp_frame_timeout_s"] == 2.5


def test_hep_tcp_deadlines_may_be_as_short_as_a_tenth_of_a_second(tmp_path: Path) -> None:
    text = "[capture]\nhep_tcp_idle_timeout_s = 0.1\nhep_tcp_frame_timeout_s = 0.1\n"
    capture = load_text(tmp_path, text).capture
    assert (capture.hep_tcp_idle_timeout_s, capture.hep_tcp_frame_timeout_s) == (0.1, 0.1)


def test_tls_files_are_relative_to_the_config_file(tmp_path: Path, pki: Pki) -> None:
    """Like the Kafka CA file: inputs that ship beside the config."""
    conf = tmp_path / "etc"
    conf.mkdir()
    for source in (pki.server_cert, pki.server_key):
        (conf / source.name).write_bytes(source.read_bytes())
    text = "[capture]\nhep_tls = ['127.0.0.1:0']\ntls_cert = 'server.crt'\ntls_key = 'server.key'\n"
    config = load_config(write(conf, text), {})
    assert config.capture.tls_cert == conf / "server.crt"
    assert config.capture.tls_key == conf / "server.key"
    assert config.capture.tls_client_ca is None


def test_tls_files_from_the_environment(tmp_path: Path, pki: Pki) -> None:
    config = load_config(
        None,
        {
            "SIPCDR_CAPTURE__HEP_TLS": "127.0.0.1:9061",
            "SIPCDR_CAPTURE__TLS_CERT": str(pki.server_cert),
            "SIPCDR_CAPTURE__TLS_KEY": str(pki.server_key),
            "SIPCDR_CAPTURE__TLS_CLIENT_CA": str(pki.ca),
            "SIPCDR_CAPTURE__HEP_TCP_MAX_CONNECTIONS": "10",
            "SIPCDR_CAPTURE__HEP_TCP_IDLE_TIMEOUT_S": "0.5",
        },
    )
    assert config.capture.tls_client_ca == pki.ca
    assert config.capture.hep_tcp_max_connections == 10
    assert config.capture.hep_tcp_idle_timeout_s == 0.5


def test_tls_and_tcp_cannot_share_a_port(tmp_path: Path, pki: Pki) -> None:
    text = tls_file(pki, pki.server_cert, pki.server_key) + "hep_tcp = ['[::]:9061']\n"
    error = error_for(tmp_path, text)
    assert error.key == "capture.hep_tls"
    assert "TCP address already used by capture.hep_tcp" in str(error)


def test_tls_files_are_read_only_when_a_tls_listener_is_configured(tmp_path: Path) -> None:
    text = "[capture]\ntls_cert = 'missing.crt'\ntls_key = 'missing.key'\n"
    assert load_text(tmp_path, text).capture.tls_cert == tmp_path / "missing.crt"


def test_unusable_tls_files_name_their_key(tmp_path: Path, pki: Pki) -> None:
    secret_key = encrypted_key(pki.server_key, tmp_path / "locked.key", b"pass-phrase")
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("not a certificate\n")
    cases = [
        (pki.server_cert.with_name("absent.crt"), pki.server_key, None,
         "capture.tls_cert", "cannot be read (No such file or directory)"),
        (pki.server_key, pki.server_key, None, "capture.tls_cert", "holds no certificate"),
        (pki.server_cert, pki.agent_key, None,
         "capture.tls_key", "does not match the certificate in tls_cert"),
        (pki.server_cert, secret_key, None, "capture.tls_key", "is encrypted"),
        (pki.server_cert, not_pem, None, "capture.tls_key", "holds no usable private key"),
        (pki.server_cert, pki.server_key, not_pem, "capture.tls_client_ca", "holds no certificate"),
    ]  # fmt: skip
    for cert, key, client_ca, name, problem in cases:
        error = error_for(tmp_path, tls_file(pki, cert, key, client_ca))
        assert error.key == name, str(error)
        message = str(error)
        assert message.startswith(name) and problem in message, message
        assert "PRIVATE KEY" not in message and "pass-phrase" not in message


def test_config_is_immutable(tmp_path: Path) -> None:
    config = load_text(tmp_path, FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.capture.rcvbuf_bytes = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.capture.hep_keys[2001] = "x"  # type: ignore[index]


def test_endpoint_text_form() -> None:
    assert str(Endpoint("127.0.0.1", 5060)) == "127.0.0.1:5060"
    assert str(Endpoint("2001:db8::1", 5060)) == "[2001:db8::1]:5060"
    assert parse_endpoint("[2001:DB8:0::1]:9060") == Endpoint("2001:db8::1", 9060)
    assert parse_endpoint("localhost:0") == Endpoint("localhost", 0)
    with pytest.raises(ValueError, match="from 1 to 65535"):
        parse_endpoint("kafka:0", min_port=1)


# -- errors name the key ------------------------------------------------------------------------

ERRORS = [
    pytest.param("[captur]\n", "captur", "unknown section", id="unknown-section"),
    pytest.param(
        "[capture]\nsip_upd = []\n", "capture.sip_upd", "did you mean 'sip_udp'", id="unknown-key"
    ),
    pytest.param(
        "[sinks.kafka]\nbootstrp = 'k:9092'\n", "sinks.kafka.bootstrp", "unknown", id="nested-key"
    ),
    pytest.param(
        "[[trunks]]\nname = 'a'\nsources = ['192.0.2.0/24']\nrateplan = 'x'\n",
        "trunks[0].rateplan",
        "unknown key",
        id="unknown-trunk-key",
    ),
    pytest.param(
        "[capture]\nsip_udp = ['127.0.0.1:70000']\n",
        "capture.sip_udp[0]",
        "'127.0.0.1:70000'",
        id="bad-port",
    ),
    pytest.param(
        "[capture]\nhep_udp = ['::1:9060']\n",
        "capture.hep_udp[0]",
        "[IPv6]:PORT",
        id="ipv6-without-brackets",
    ),
    pytest.param(
        "[capture]\nallow = ['127.0.0.0/8', '10.0.0.0/33']\n",
        "capture.allow[1]",
        "'10.0.0.0/33'",
        id="bad-cidr",
    ),
    pytest.param(
        "[sinks.postgres]\ndsn = 'mysql://db/cdr'\n",
        "sinks.postgres.dsn",
        "postgresql://",
        id="bad-dsn-scheme",
    ),
    pytest.param(
        "[sinks.kafka]\nbootstrap = 'k1:9092,k2'\n",
        "sinks.kafka.bootstrap",
        "comma-separated list of HOST:PORT",
        id="bad-bootstrap",
    ),
    pytest.param(
        "[[trunks]]\nname = 'a'\nsources = ['192.0.2.0/24']\n"
        "[[trunks]]\nname = 'a'\nsources = ['198.51.100.0/24']\n",
        "trunks[1].name",
        "duplicate trunk name",
        id="duplicate-trunk",
    ),
    pytest.param(
        "[[trunks]]\nname = 'a'\nsources = ['192.0.2.0/24']\n"
        "[[trunks]]\nname = 'b'\nsources = ['192.0.2.0/24']\n",
        "trunks[1].sources[0]",
        "already a source of trunk 'a'",
        id="network-in-two-trunks",
    ),
    pytest.param(
        "[[trunks]]\nname = 'a'\n",
        "trunks[0].sources",
        "missing",
        id="trunk-without-sources",
    ),
    pytest.param(
        "[[trunks]]\nname = 'a'\nsources = ['192.0.2.0/24']\nrate_plan = 'retail'\n"
        "[rating]\ndecks = { wholesale = 'w.csv' }\n",
        "trunks[0].rate_plan",
        "no such deck",
        id="rate-plan-not-in-decks",
    ),
    pytest.param(
        "[[trunks]]\nname = 'a'\nsources = ['192.0.2.0/24']\ncost_plan = 'vendor'\n"
        "[rating]\ndecks = { wholesale = 'w.csv' }\n",
        "trunks[0].cost_plan",
        "no such deck",
        id="cost-plan-not-in-decks",
    ),
    pytest.param(
        "[[trunks]]\nname = 'a'\nsources = ['192.0.2.0/24']\nstrip_prefixes = ['1010', ' 9']\n",
        "trunks[0].strip_prefixes[1]",
        "technical prefix",
        id="padded-strip-prefix",
    ),
    pytest.param(
        "[[trunks]]\nname = 'a'\nsources = ['192.0.2.0/24']\nstrip_prefixes = '1010'\n",
        "trunks[0].strip_prefixes",
        "a list of strings",
        id="strip-prefixes-not-a-list",
    ),
    pytest.param(
        "[rating]\ndecimals = 13\n",
        "rating.decimals",
        "from 0 to 12",
        id="too-many-decimals",
    ),
    pytest.param(
        "[rating]\ndecimals = -1\n",
        "rating.decimals",
        ">= 0",
        id="negative-decimals",
    ),
    pytest.param(
        "[[trunks]]\nname = 'a'\nsources = ['192.0.2.0/24']\ncountry_code = '+49'\n",
        "trunks[0].country_code",
        "1-3 digits",
        id="bad-country-code",
    ),
    pytest.param(
        "[rating]\ndecks = { wholesale = 'w.csv' }\ndefault_plan = 'retail'\n",
        "rating.default_plan",
        "wholesale",
        id="default-plan-not-in-decks",
    ),
    pytest.param(
        "[capture.hep_keys]\nagent-1 = 'k'\n",
        "capture.hep_keys.agent-1",
        "not a capture id",
        id="non-int-hep-key",
    ),
    pytest.param(
        "[capture.hep_keys]\n2001 = ''\n",
        "capture.hep_keys.2001",
        "non-empty string",
        id="empty-hep-key",
    ),
    pytest.param(
        "[capture]\nrcvbuf_bytes = '32M'\n",
        "capture.rcvbuf_bytes",
        "expected an integer >= 1",
        id="string-for-int",
    ),
    pytest.param(
        "[dialog]\nmax_open_dialogs = true\n",
        "dialog.max_open_dialogs",
        "integer",
        id="bool-for-int",
    ),
    pytest.param(
        "[dialog]\nring_timeout_s = 0\n", "dialog.ring_timeout_s", "> 0", id="zero-timeout"
    ),
    pytest.param(
        "[state]\ncheckpoint_interval_s = 0\n",
        "state.checkpoint_interval_s",
        "> 0",
        id="zero-checkpoint-interval",
    ),
    pytest.param(
        "[sinks.postgres]\nstore_signaling = 'yes'\n",
        "sinks.postgres.store_signaling",
        "true or false",
        id="string-for-bool",
    ),
    pytest.param(
        "[capture]\nsip_udp = '127.0.0.1:5060'\n",
        "capture.sip_udp",
        "a list of strings",
        id="string-for-list",
    ),
    pytest.param(
        "[fraud]\nmax_calls = 10\n",
        "fraud.max_calls",
        "unknown key",
        id="fraud-key",
    ),
    pytest.param(
        "[sinks.kafka]\nsasl_username = 'u'\n",
        "sinks.kafka.sasl_username",
        "unused with security_protocol PLAINTEXT",
        id="sasl-without-sasl-protocol",
    ),
    pytest.param(
        "[sinks.kafka]\ntopic_fraud = 'sipcdr.cdrs'\n",
        "sinks.kafka.topic_fraud",
        "same topic as topic_cdrs",
        id="one-topic-for-both",
    ),
    pytest.param(
        "[sinks.kafka]\ntopic_sip = 'sipcdr.fraud'\n",
        "sinks.kafka.topic_sip",
        "same topic as topic_fraud",
        id="signaling-on-the-alert-topic",
    ),
    pytest.param(
        "[capture]\nhep_udp = ['127.0.0.1:5060']\n",
        "capture.hep_udp",
        "already used by capture.sip_udp",
        id="listener-twice",
    ),
    pytest.param("[metrics]\nlisten = 'localhost'\n", "metrics.listen", "HOST:PORT", id="no-port"),
    pytest.param(
        "[capture]\nhep_tls = ['0.0.0.0:9061']\n",
        "capture.tls_cert",
        "missing; expected a PEM file path: capture.hep_tls needs a certificate and its key",
        id="tls-without-certificate",
    ),
    pytest.param(
        "[capture]\nhep_tcp_max_connections = 0\n",
        "capture.hep_tcp_max_connections",
        "an integer >= 1",
        id="no-connections",
    ),
    pytest.param(
        "[capture]\nhep_tcp_max_per_source = -1\n",
        "capture.hep_tcp_max_per_source",
        "an integer >= 1",
        id="negative-per-source",
    ),
    pytest.param(
        "[capture]\nhep_tcp_idle_timeout_s = 0\n",
        "capture.hep_tcp_idle_timeout_s",
        "a number >= 0.1",
        id="zero-idle-timeout",
    ),
    pytest.param(
        "[capture]\nhep_tcp_idle_timeout_s = 0.05\n",
        "capture.hep_tcp_idle_timeout_s",
        "= 0.05 (in",
        id="idle-timeout-below-the-floor",
    ),
    pytest.param(
        "[capture]\nhep_tcp_frame_timeout_s = 'soon'\n",
        "capture.hep_tcp_frame_timeout_s",
        "a number >= 0.1",
        id="text-frame-timeout",
    ),
    pytest.param(
        "[capture]\nhep_tcp_frame_timeout_s = 0.00001\n",
        "capture.hep_tcp_frame_timeout_s",
        "expected a number >= 0.1",
        id="frame-timeout-below-the-floor",
    ),
    pytest.param(
        "[capture]\nhep_tcp_max_buffer_bytes = 512\n",
        "capture.hep_tcp_max_buffer_bytes",
        "an integer >= 1024",
        id="buffer-too-small",
    ),
    pytest.param(
        "[capture]\nhep_tcp_max_buffer_bytes = 65536\n",
        "capture.hep_tcp_max_buffer_bytes",
        "larger than the largest HEPv3 frame (65535 bytes); expected an integer from 1024",
        id="buffer-beyond-a-frame",
    ),
]


@pytest.mark.parametrize(("text", "key", "fragment"), ERRORS)
def test_errors_name_the_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    error = error_for(tmp_path, text)
    assert error.key == key
    message = str(error)
    assert message.startswith(key)
    assert fragment in message
    assert str(tmp_path / "sipcdr.toml") in message


def test_error_shows_value_and_expectation(tmp_path: Path) -> None:
    error = error_for(tmp_path, "[capture]\nrcvbuf_bytes = '32M'\n")
    assert error.value == "'32M'"
    assert error.expected == "an integer >= 1"
    assert str(error) == (
        f"capture.rcvbuf_bytes = '32M' (in {tmp_path / 'sipcdr.toml'}): expected an integer >= 1"
    )


def test_port_zero_is_allowed_for_listeners(tmp_path: Path) -> None:
    config = load_text(
        tmp_path, "[capture]\nsip_udp = ['127.0.0.1:0']\nhep_udp = ['127.0.0.1:0']\n"
    )
    assert config.capture.sip_udp == (Endpoint("127.0.0.1", 0),)
    assert config.capture.hep_udp == (Endpoint("127.0.0.1", 0),)


def test_rate_plans_are_free_while_no_decks_are_given(tmp_path: Path) -> None:
    text = "[[trunks]]\nname = 'a'\nsources = ['192.0.2.0/24']\nrate_plan = 'later'\n"
    assert load_text(tmp_path, text).trunks[0].rate_plan == "later"


def test_invalid_toml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    error = error_for(tmp_path, "[capture\n")
    assert "valid TOML" in str(error)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "absent.toml", {})


# -- environment --------------------------------------------------------------------------------


def test_env_overrides_scalar_list_table_and_bool(tmp_path: Path) -> None:
    environ = {
        "SIPCDR_CAPTURE__RCVBUF_BYTES": "1048576",
        "SIPCDR_CAPTURE__HEP_UDP": "127.0.0.1:9060, [::1]:9060",
        "SIPCDR_CAPTURE__HEP_KEYS__2001": "s3cret",
        "SIPCDR_SINKS__KAFKA__BOOTSTRAP": "host:9092",
        "SIPCDR_SINKS__KAFKA__IDEMPOTENCE": "false",
        "SIPCDR_SINKS__POSTGRES__STORE_SIGNALING": "no",
        "SIPCDR_DIALOG__RING_TIMEOUT_S": "60.5",
        "SIPCDR_METRICS__LISTEN": "0.0.0.0:9200",
        "SIPCDR_STATE__DIR": "/srv/sipcdr",
    }
    config = load_config(None, environ)
    assert config.capture.rcvbuf_bytes == 1_048_576
    assert config.capture.hep_udp == (Endpoint("127.0.0.1", 9060), Endpoint("::1", 9060))
    assert dict(config.capture.hep_keys) == {2001: "s3cret"}
    assert config.sinks.kafka.bootstrap == (Endpoint("host", 9092),)
    assert config.sinks.kafka.idempotence is False
    assert config.sinks.postgres.store_signaling is False
    assert config.dialog.ring_timeout_s == 60.5
    assert config.metrics.listen == Endpoint("0.0.0.0", 9200)
    assert config.state.dir == Path("/srv/sipcdr")
    # untouched keys keep their defaults
    assert config.capture.sip_udp == (Endpoint("127.0.0.1", 5060),)


def test_env_merges_into_the_file(tmp_path: Path) -> None:
    environ = {
        "SIPCDR_CAPTURE__HEP_KEYS__2003": "third",
        "SIPCDR_CAPTURE__HEP_KEYS__2001": "rotated",
        "SIPCDR_CAPTURE__SIP_UDP": "",
        "SIPCDR_TRUNKS__1__RATE_PLAN": "wholesale",
        "SIPCDR_TRUNKS__2__NAME": "carrier-c",
        "SIPCDR_TRUNKS__2__SOURCES": "203.0.113.0/24,2001:db8:c::/48",
        "SIPCDR_TRUNKS__2__COST_PLAN": "wholesale",
        "SIPCDR_TRUNKS__2__STRIP_PREFIXES": "1010,#31#",
        "SIPCDR_RATING__DECIMALS": "2",
        "SIPCDR_SINKS__KAFKA__SASL_PASSWORD": "from-vault",
        "SIPCDR_SINKS__KAFKA__IDEMPOTENCE": "1",
    }
    config = load_text(tmp_path, FULL, environ)
    assert dict(config.capture.hep_keys) == {2001: "rotated", 2002: "other-key", 2003: "third"}
    assert config.capture.sip_udp == ()
    assert config.capture.hep_udp == (Endpoint("10.0.0.5", 9060),)
    assert [trunk.name for trunk in config.trunks] == ["carrier-a", "pbx-b", "carrier-c"]
    assert config.trunks[1].rate_plan == "wholesale"
    assert config.trunks[2].sources == (
        ipaddress.IPv4Network("203.0.113.0/24"),
        ipaddress.IPv6Network("2001:db8:c::/48"),
    )
    assert config.trunks[2].cost_plan == "wholesale"
    assert config.trunks[2].strip_prefixes == ("1010", "#31#")
    assert config.rating.decimals == 2
    assert config.sinks.kafka.sasl_password == "from-vault"
    assert config.sinks.kafka.sasl_username == "sipcdr"
    assert config.sinks.kafka.idempotence is True


def test_unknown_env_var_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"SIPCDR_CAPTURE__RCVBUF": "1"})
    assert caught.value.key == "capture.rcvbuf"
    assert "SIPCDR_CAPTURE__RCVBUF" in str(caught.value)
    assert "did you mean 'rcvbuf_bytes'" in str(caught.value)


def test_env_var_with_one_underscore_is_an_unknown_section() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"SIPCDR_CAPTURE_SIP_UDP": "127.0.0.1:5070"})
    assert caught.value.key == "capture_sip_udp"
    assert "SIPCDR_CAPTURE_SIP_UDP" in str(caught.value)


def test_bad_env_value_names_variable_and_key() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"SIPCDR_SINKS__KAFKA__IDEMPOTENCE": "maybe"})
    error = caught.value
    assert error.key == "sinks.kafka.idempotence"
    assert error.value == "'maybe'"
    assert str(error).startswith(
        "sinks.kafka.idempotence = 'maybe' "
        "(from environment variable SIPCDR_SINKS__KAFKA__IDEMPOTENCE): expected true or false"
    )


def test_env_trunks_must_not_leave_gaps() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"SIPCDR_TRUNKS__1__NAME": "b", "SIPCDR_TRUNKS__1__SOURCES": "::/0"})
    assert caught.value.key == "trunks[0]"


def test_env_cannot_replace_a_table_whole() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"SIPCDR_CAPTURE__HEP_KEYS": "2001=s3cret"})
    assert caught.value.key == "capture.hep_keys"
    assert "SIPCDR_CAPTURE__HEP_KEYS__<KEY>" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_test_suite_variables_and_other_names_are_ignored() -> None:
    environ = {
        "SIPCDR_TEST_PG_DSN": "postgresql://localhost/test",
        "SIPCDR_TEST_KAFKA": "127.0.0.1:9092",
        "PATH": "/usr/bin",
        "sipcdr_capture__typo": "lower case is not ours",
    }
    assert load_config(None, environ) == Config()


# -- secrets --------------------------------------------------------------------------------------


def test_redacted_hides_every_secret(tmp_path: Path) -> None:
    redacted = load_text(tmp_path, FULL).redacted()
    text = json.dumps(redacted)
    for secret in ("s3cret", "other-key", "pg-secret", "kafka-secret"):
        assert secret not in text
    capture = redacted["capture"]
    assert isinstance(capture, dict)
    assert capture["hep_keys"] == {"2001": SECRET_MASK, "2002": SECRET_MASK}
    sinks = redacted["sinks"]
    assert isinstance(sinks, dict)
    assert sinks["postgres"] == {
        "dsn": "postgresql://sipcdr:***@db.example.net:5432/cdr?sslmode=require",
        "store_signaling": False,
        "store_sdp": False,
        "partitions_ahead_days": 7,
    }
    assert sinks["kafka"]["sasl_password"] == SECRET_MASK
    assert sinks["kafka"]["sasl_username"] == "sipcdr"
    assert sinks["kafka"]["bootstrap"] == "kafka-1.example.net:9092,[2001:db8::9]:9093"
    assert redacted["metrics"] == {"listen": "[::1]:0"}
    assert redacted["trunks"] == [
        {
            "name": "carrier-a",
            "sources": ["192.0.2.0/24", "2001:db8:a::/48"],
            "rate_plan": "wholesale",
            "cost_plan": "retail",
            "country_code": "49",
            "national_prefix": "0",
            "cdr_retention_days": None,
            "strip_prefixes": ["1010", "#31#"],
        },
        {
            "name": "pbx-b",
            "sources": ["198.51.100.17/32"],
            "rate_plan": None,
            "cost_plan": None,
            "country_code": None,
            "national_prefix": None,
            "cdr_retention_days": None,
            "strip_prefixes": [],
        },
    ]


def test_errors_never_show_secrets(tmp_path: Path) -> None:
    error = error_for(tmp_path, "[sinks.postgres]\ndsn = 'mysql://app:hunter2@db/cdr'\n")
    assert "hunter2" not in str(error)
    assert error.value == "'mysql://...'"  # a refused DSN: its scheme alone
    error = error_for(tmp_path, "[sinks.kafka]\nsasl_password = 'hunter2'\n")
    assert error.key == "sinks.kafka.sasl_password"
    assert "hunter2" not in str(error)
    error = error_for(tmp_path, "[capture.hep_keys]\n2001 = 42\n")
    assert error.value == SECRET_MASK


@pytest.mark.parametrize(
    ("dsn", "problem"),
    [
        ("postgresql://app:hunter2@db:5432x/cdr", "a port is not a number from 1 to 65535"),
        ("postgresql://app:hunter2@db:70000/cdr", "a port is not a number from 1 to 65535"),
        ("postgresql://app:hunter2@db:0/cdr", "a port is not a number from 1 to 65535"),
        ("postgresql://app:hunter2@db/cdr?port=five", "a port is not a number"),
        ("postgresql://app:hunter2@[2001:db8::1/cdr", "host part is malformed"),
        ("postgresql://app:hunter2@[2001:zz8::1]:5432/cdr", "host part is malformed"),
        ("postgresql://app:hunter2@[2001:db8::1]5432/cdr", "IPv6 host is malformed"),
        ("postgresql://app:hunter2@2001:db8::1/cdr", "IPv6 host is not in brackets"),
        ("postgresql://app:hunter2@db..example/cdr", "neither a host name nor an IP address"),
        ("postgresql://app:hunter2@999.1.2.3/cdr", "neither a host name nor an IP address"),
        ("postgresql://app:hunter2@db1,,db2/cdr", "host list is empty"),
        ("postgresql://app:hunter2@:5432/cdr", "host list is empty"),
        # An unescaped @ or # in the password shifts every part after it.
        ("postgresql://app:hunt@r2@db/cdr", "second '@'"),
        ("postgresql://app:hunt#r2@db/cdr", "'#'"),
        ("postgresql://app:hunter2@db/cdr?sslmode", "key=value pairs"),
        ("postgresql://app:hunter2@db/cdr?sslmode=strict", "sslmode is not one of"),
        ("postgresql:///cdr?host=/run/a,/run/b&port=1,2,3", "names 2 hosts, its port parameter 3"),
        # A '/' in the password: the driver would read host "app", port 12 and the
        # rest as the database name.
        ("postgresql://app:12/hunter2@db/cdr", "'@' after the host"),
        ("postgresql://app:hun[ter2@db/cdr", "password holds '[' or ']'"),
        ("postgresql://app:hun]ter2@db/cdr", "password holds '[' or ']'"),
        ("postgresql://app:hunter2@db/cdr?password=hunter2#x", "'#'"),
        # Values the driver refuses at every connect.
        ("postgresql://app:hunter2@db/cdr?target_session_attrs=hunter2", "is not one of"),
        ("postgresql://app:hunter2@db/cdr?sslnegotiation=hunter2", "is not one of"),
        ("postgresql://app:hunter2@db/cdr?gsslib=hunter2", "is not one of"),
        ("postgresql://app:hunter2@db/cdr?ssl_min_protocol_version=TLSv9", "is not one of"),
        ("postgresql://app:hunter2@db/cdr?ssl_max_protocol_version=hunter2", "is not one of"),
        ("postgresql://app:hunter2@/cdr?port=5432,5433", "could not match 2 port numbers"),
        (
            "postgresql://app:hunter2@db/cdr?sslmode=require&sslrootcert=/nowhere/hunter2.crt",
            "FileNotFoundError: No such file or directory",
        ),
    ],
)
def test_malformed_dsn_is_refused_naming_the_key_not_the_password(
    tmp_path: Path, dsn: str, problem: str
) -> None:
    error = error_for(tmp_path, f"[sinks.postgres]\ndsn = '{dsn}'\n")
    assert error.key == "sinks.postgres.dsn"
    assert problem in str(error)
    assert "postgresql://[user[:password]@][host][:port]" in error.expected
    for secret in ("hunter2", "hunt", "r2@"):
        assert secret not in str(error)
    from_env = error_for(tmp_path, "", {"SIPCDR_SINKS__POSTGRES__DSN": dsn})
    assert "SIPCDR_SINKS__POSTGRES__DSN" in str(from_env)
    assert "hunt" not in str(from_env)


@pytest.mark.parametrize(
    "dsn",
    [
        "embedded",
        "",
        "postgresql://postgres@127.0.0.1:5432/test",
        "postgres://app:p%40ss%23word%5B%5D%25@db.example.net/cdr?sslmode=require",
        "postgresql://app:pa:ss@db/cdr",  # a ':' in a password needs no escaping
        "POSTGRESQL://db/cdr",
        "postgresql://app@[2001:db8::1]:5432/cdr",
        "postgresql://app@[fe80::1%25eth0]/cdr",
        "postgresql://db1:5432,db2:5433,[::1]/cdr?target_session_attrs=read-write",
        "postgresql://app@%2Fvar%2Frun%2Fpostgresql/cdr",
        "postgresql:///cdr?host=/var/run/postgresql&port=5433",
        "postgresql://app@/cdr",
        "postgresql://app@db_1.internal/cdr?application_name=sipcdr",
        # As the driver takes them: an empty port is the default, 127.1 is 127.0.0.1,
        # international names are looked up in their IDNA form.
        "postgresql://app@db:/cdr",
        "postgresql://app@127.1/cdr",
        "postgresql://app@bücher.example/cdr",
        "postgresql://db/cdr?target_session_attrs=prefer-standby&gsslib=gssapi",
        "postgresql://db/cdr?sslnegotiation=postgres&ssl_min_protocol_version=TLSv1.3",
        # Separators inside a password parameter's value belong to it.
        "postgresql://app@db/cdr?password=hunter2 secretpart",
    ],
)
def test_well_formed_dsns_are_taken_as_written(tmp_path: Path, dsn: str) -> None:
    assert load_text(tmp_path, f"[sinks.postgres]\ndsn = '{dsn}'\n").sinks.postgres.dsn == dsn


def test_redact_dsn_forms() -> None:
    assert redact_dsn("embedded") == "embedded"
    assert redact_dsn("postgres://db/cdr") == "postgres://db/cdr"
    assert redact_dsn("postgresql://u@db/cdr") == "postgresql://u@db/cdr"
    # an unescaped @ in the password is masked with it
    assert redact_dsn("postgresql://u:p@ss@db/cdr") == "postgresql://u:***@db/cdr"
    assert (
        redact_dsn("postgresql://db/cdr?user=u&sslpassword=kp&password=pw")
        == "postgresql://db/cdr?user=u&sslpassword=***"
    )
    # from the password on, everything: whatever separator it may hold unescaped
    assert redact_dsn("host=db password='a b' user=u") == "host=db password=***"
    for dsn in (
        "postgresql://db/cdr?password=hunter#secretpart",
        "postgresql://db/cdr?password=hun&ter2secret",
        "postgresql://db/cdr?password=hunter2 secretpart",
        "postgresql://db/cdr?x=1 password=hunter2 secretpart",
        "postgresql://db/cdr?pass%77ord=hunter2&secretpart",
        "postgresql://db/cdr?SSLPASSWORD = hunter2&secretpart",
    ):
        shown = redact_dsn(dsn)
        assert shown.endswith("=***"), shown
        assert "hunter" not in shown and "ter2" not in shown and "secretpart" not in shown


def test_a_dsn_that_would_fail_every_connect_is_refused_with_the_drivers_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify-full needs a CA: without sslrootcert the driver looks in ~/.postgresql."""
    monkeypatch.setenv("HOME", str(tmp_path))
    dsn = "postgresql://app:hunter2@db/cdr?sslmode=verify-full"
    error = error_for(tmp_path, f"[sinks.postgres]\ndsn = '{dsn}'\n")
    assert error.key == "sinks.postgres.dsn"
    assert "root certificate file ... does not exist" in str(error)
    assert "hunter2" not in str(error) and ".postgresql" not in str(error)
    pki = make_pki(tmp_path / "pki")
    with_ca = f"{dsn}&sslrootcert={pki.ca}"
    assert load_text(tmp_path, f"[sinks.postgres]\ndsn = '{with_ca}'\n").sinks.postgres.dsn == (
        with_ca
    )


def test_the_dsn_choices_are_the_drivers() -> None:
    """The values the config takes for these parameters are the ones asyncpg takes."""
    choices = dsn_rules._DSN_CHOICES
    assert set(choices["target_session_attrs"]) == {m.value for m in connect_utils.SessionAttribute}
    assert set(choices["sslnegotiation"]) == {m.value for m in connect_utils.SSLNegotiation}
    assert {mode.replace("-", "_") for mode in choices["sslmode"]} == {
        m.name for m in connect_utils.SSLMode
    }
    for version in choices["ssl_min_protocol_version"]:
        assert version.replace(".", "_") in ssl.TLSVersion.__members__


def test_the_full_disk_keys_of_the_spool(tmp_path: Path) -> None:
    defaults = Config().spool
    assert defaults.cdr_reserve_records == 50_000
    assert defaults.signaling_min_free_bytes == 1024**3
    text = "[spool]\ncdr_reserve_records = 200\nsignaling_min_free_bytes = 0\n"
    spool = load_text(tmp_path, text).spool
    assert (spool.cdr_reserve_records, spool.signaling_min_free_bytes) == (200, 0)
    environ = {"SIPCDR_SPOOL__SIGNALING_MIN_FREE_BYTES": "2097152"}
    assert load_text(tmp_path, "", environ).spool.signaling_min_free_bytes == 2 * 1024 * 1024
    # A reserve of none would lose the first CDR a failing disk refuses.
    error = error_for(tmp_path, "[spool]\ncdr_reserve_records = 0\n")
    assert error.key == "spool.cdr_reserve_records"
    assert error.expected == "an integer >= 1"
    error = error_for(tmp_path, "[spool]\nsignaling_min_free_bytes = -1\n")
    assert error.key == "spool.signaling_min_free_bytes"


def test_the_delivery_process_priority(tmp_path: Path) -> None:
    assert Config().spool.delivery_nice == 5
    assert load_text(tmp_path, "[spool]\ndelivery_nice = 0\n").spool.delivery_nice == 0
    environ = {"SIPCDR_SPOOL__DELIVERY_NICE": "19"}
    assert load_text(tmp_path, "", environ).spool.delivery_nice == 19
    for wrong in ("-1", "20", '"low"'):
        error = error_for(tmp_path, f"[spool]\ndelivery_nice = {wrong}\n")
        assert error.key == "spool.delivery_nice"
        assert error.expected == "an integer 0-19"


def test_how_long_a_stop_waits_for_the_sinks(tmp_path: Path) -> None:
    assert Config().spool.stop_drain_ms == 20_000
    assert load_text(tmp_path, "[spool]\nstop_drain_ms = 0\n").spool.stop_drain_ms == 0
    environ = {"SIPCDR_SPOOL__STOP_DRAIN_MS": "45000"}
    assert load_text(tmp_path, "", environ).spool.stop_drain_ms == 45_000
    for wrong in ("-1", "3600001", '"long"'):
        error = error_for(tmp_path, f"[spool]\nstop_drain_ms = {wrong}\n")
        assert error.key == "spool.stop_drain_ms"
        assert error.expected == "an integer 0-3600000"


def test_the_spare_file_size(tmp_path: Path) -> None:
    assert Config().state.spare_bytes == 64 * 1024 * 1024
    config = load_text(tmp_path, "[state]\nspare_bytes = 0\n")  # none kept
    assert config.state.spare_bytes == 0
    assert config.redacted()["state"] == {
        "dir": "var",
        "checkpoint_interval_s": 10.0,
        "spare_bytes": 0,
        "journal_batch": True,
    }
    environ = {"SIPCDR_STATE__SPARE_BYTES": "1048576"}
    assert load_text(tmp_path, "", environ).state.spare_bytes == 1024 * 1024
    error = error_for(tmp_path, "[state]\nspare_bytes = -1\n")
    assert error.key == "state.spare_bytes"
    assert error.expected == "an integer >= 0"


def test_the_journal_is_batched_unless_asked_otherwise(tmp_path: Path) -> None:
    assert Config().state.journal_batch is True
    assert load_text(tmp_path, "[state]\njournal_batch = false\n").state.journal_batch is False
    environ = {"SIPCDR_STATE__JOURNAL_BATCH": "false"}
    assert load_text(tmp_path, "", environ).state.journal_batch is False
    assert error_for(tmp_path, "[state]\njournal_batch = 3\n").key == "state.journal_batch"
