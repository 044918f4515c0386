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

Layout
------
`schema` (the sections, their defaults and `redacted()`), `loader` (file, environment,
cross-section checks), `reading` (typed values out of TOML tables, error messages),
one module per group of sections (`capture`, `calls`, `outputs`), `secrets` (what is
masked; the PostgreSQL DSN rules are storage's, `sipcdr.storage.dsn`) and `handoff`
(the settings records the layers below take). Everything a caller needs is named here.
"""

from sipcdr.config.handoff import cdr_destinations, output_settings
from sipcdr.config.loader import ENV_PREFIX, NON_CONFIG_ENV_PREFIXES, load_config
from sipcdr.config.reading import ConfigError, parse_endpoint
from sipcdr.config.schema import (
    DEFAULT_ALLOW,
    DEFAULT_BPF_FILTER,
    DEFAULT_DIALOG_LIMITS,
    DEFAULT_HEP_KEYS,
    DEFAULT_HEP_TCP,
    DEFAULT_HEP_TCP_FRAME_TIMEOUT_S,
    DEFAULT_HEP_TCP_IDLE_TIMEOUT_S,
    DEFAULT_HEP_TCP_MAX_BUFFER_BYTES,
    DEFAULT_HEP_TCP_MAX_CONNECTIONS,
    DEFAULT_HEP_TCP_MAX_PER_SOURCE,
    DEFAULT_HEP_TLS,
    DEFAULT_HEP_UDP,
    DEFAULT_INTERFACES,
    DEFAULT_JSONL_PATH,
    DEFAULT_KAFKA_BOOTSTRAP,
    DEFAULT_LIVE_ENGINE,
    DEFAULT_METRICS_LISTEN,
    DEFAULT_POSTGRES_DSN,
    DEFAULT_PROMISCUOUS,
    DEFAULT_RATING_DECIMALS,
    DEFAULT_RCVBUF_BYTES,
    DEFAULT_SIP_UDP,
    DEFAULT_STATE_DIR,
    DEFAULT_STORE_SDP,
    DEFAULT_STORE_SIGNALING,
    LIVE_ENGINES,
    CaptureConfig,
    Config,
    Endpoint,
    FraudConfig,
    JsonlConfig,
    KafkaConfig,
    MetricsConfig,
    Network,
    PostgresConfig,
    RatingConfig,
    SinksConfig,
    SpoolConfig,
    StateConfig,
    TrunkConfig,
)
from sipcdr.storage.dsn import SECRET_MASK, dsn_problem, redact_dsn

__all__ = [
    "DEFAULT_ALLOW",
    "DEFAULT_BPF_FILTER",
    "DEFAULT_DIALOG_LIMITS",
    "DEFAULT_HEP_KEYS",
    "DEFAULT_HEP_TCP",
    "DEFAULT_HEP_TCP_FRAME_TIMEOUT_S",
    "DEFAULT_HEP_TCP_IDLE_TIMEOUT_S",
    "DEFAULT_HEP_TCP_MAX_BUFFER_BYTES",
    "DEFAULT_HEP_TCP_MAX_CONNECTIONS",
    "DEFAULT_HEP_TCP_MAX_PER_SOURCE",
    "DEFAULT_HEP_TLS",
    "DEFAULT_HEP_UDP",
    "DEFAULT_INTERFACES",
    "DEFAULT_JSONL_PATH",
    "DEFAULT_KAFKA_BOOTSTRAP",
    "DEFAULT_LIVE_ENGINE",
    "DEFAULT_METRICS_LISTEN",
    "DEFAULT_POSTGRES_DSN",
    "DEFAULT_PROMISCUOUS",
    "DEFAULT_RATING_DECIMALS",
    "DEFAULT_RCVBUF_BYTES",
    "DEFAULT_SIP_UDP",
    "DEFAULT_STATE_DIR",
    "DEFAULT_STORE_SDP",
    "DEFAULT_STORE_SIGNALING",
    "ENV_PREFIX",
    "LIVE_ENGINES",
    "NON_CONFIG_ENV_PREFIXES",
    "SECRET_MASK",
    "CaptureConfig",
    "Config",
    "ConfigError",
    "Endpoint",
    "FraudConfig",
    "JsonlConfig",
    "KafkaConfig",
    "MetricsConfig",
    "Network",
    "PostgresConfig",
    "RatingConfig",
    "SinksConfig",
    "SpoolConfig",
    "StateConfig",
    "TrunkConfig",
    "cdr_destinations",
    "dsn_problem",
    "load_config",
    "output_settings",
    "parse_endpoint",
    "redact_dsn",
]
