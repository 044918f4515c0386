"""`load_config`: the file, then the `SIPCDR_*` environment on top, then every section
read and checked, then the checks that span sections."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Final

from sipcdr import dialogstore, spare
from sipcdr.config.calls import (
    DIALOG_KEYS,
    dialog_section,
    rating_section,
    trunks_section,
)
from sipcdr.config.capture import capture_section
from sipcdr.config.fraud import fraud_section
from sipcdr.config.outputs import jsonl_section, kafka_section, postgres_section, spool_section
from sipcdr.config.reading import GAP, ConfigError, Context, EnvStr, Table, join, one_endpoint
from sipcdr.config.schema import (
    DEFAULT_METRICS_LISTEN,
    DEFAULT_STATE_DIR,
    CaptureConfig,
    Config,
    Endpoint,
    JsonlConfig,
    KafkaConfig,
    MetricsConfig,
    PostgresConfig,
    RatingConfig,
    SinksConfig,
    SpoolConfig,
    StateConfig,
)
from sipcdr.hotpath import PURE_PYTHON_ENV
from sipcdr.privacy import settings as privacy_settings

ENV_PREFIX: Final = "SIPCDR_"
# Variables with these prefixes are not settings: the test suite reads SIPCDR_TEST_PG_DSN
# and SIPCDR_TEST_KAFKA (servers to test against), and must be able to set them while a
# daemon under test loads its config from the same environment.
NON_CONFIG_ENV_PREFIXES: Final = ("SIPCDR_TEST_", PURE_PYTHON_ENV)
_MAX_ENV_TRUNK_INDEX: Final = 9999  # bounds the list an index from the environment can grow
_ARRAYS_OF_TABLES: Final = frozenset({"trunks"})


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
    context = Context(path)
    _apply_environment(raw, environ, context)
    base_dir = path.parent.absolute() if path is not None else Path.cwd()
    return _build(raw, context, base_dir)


def _apply_environment(
    raw: dict[str, object], environ: Mapping[str, str], context: Context
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
                    key = join(path, part)
                    context.env_origins[key] = variable
                    expected = f"an index 0-{_MAX_ENV_TRUNK_INDEX}: {path.upper()}__<N>__<KEY>"
                    raise context.problem(key, None, "not an entry index", expected)
                index = int(part)
                path = f"{path}[{index}]"
                node.extend([GAP] * (index + 1 - len(node)))
                if last:
                    context.env_origins[path] = variable
                    raise context.invalid(path, EnvStr(environ[variable]), "a table")
                child = node[index]
                if child is GAP:
                    child = {}
                    node[index] = child
                    context.env_origins[path] = variable
            else:
                path = join(path, part)
                if last:
                    node[part] = EnvStr(environ[variable])
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


def _build(raw: dict[str, object], context: Context, base_dir: Path) -> Config:
    root = Table(context, "", raw, (item.name for item in fields(Config)))
    capture = capture_section(
        root.table("capture", (item.name for item in fields(CaptureConfig))), base_dir
    )
    dialog = dialog_section(root.table("dialog", DIALOG_KEYS))
    rating_table = root.table("rating", (item.name for item in fields(RatingConfig)))
    rating = rating_section(rating_table, base_dir)
    trunks = trunks_section(root, rating)
    fraud = fraud_section(root, trunks, base_dir)
    sinks_table = root.table("sinks", ("jsonl", "postgres", "kafka"))
    sinks = SinksConfig(
        jsonl=jsonl_section(
            sinks_table.table("jsonl", (item.name for item in fields(JsonlConfig)))
        ),
        postgres=postgres_section(
            sinks_table.table("postgres", (item.name for item in fields(PostgresConfig)))
        ),
        kafka=kafka_section(
            sinks_table.table("kafka", (item.name for item in fields(KafkaConfig))), base_dir
        ),
    )
    metrics_table = root.table("metrics", ("listen",))
    metrics = MetricsConfig(listen=one_endpoint(metrics_table, "listen", DEFAULT_METRICS_LISTEN))
    state_table = root.table("state", (item.name for item in fields(StateConfig)))
    state_dir = state_table.string("dir", str(DEFAULT_STATE_DIR))
    if not state_dir:
        raise state_table.invalid("dir", state_dir, "a directory path")
    checkpoint_interval_s = state_table.positive_number(
        "checkpoint_interval_s", dialogstore.DEFAULT_CHECKPOINT_INTERVAL_S
    )
    spare_bytes = state_table.integer("spare_bytes", spare.DEFAULT_SPARE_BYTES, minimum=0)
    journal_batch = state_table.boolean("journal_batch", True)
    config = Config(
        capture=capture,
        dialog=dialog,
        trunks=trunks,
        rating=rating,
        fraud=fraud,
        sinks=sinks,
        spool=spool_section(root.table("spool", (item.name for item in fields(SpoolConfig)))),
        metrics=metrics,
        state=StateConfig(
            dir=Path(state_dir),
            checkpoint_interval_s=checkpoint_interval_s,
            spare_bytes=spare_bytes,
            journal_batch=journal_batch,
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


def _check_listeners(config: Config, context: Context) -> None:
    """Two listeners on one address would fail at bind time, after other sockets are
    already open; say so now. Port 0 is exempt: each bind gets its own port."""
    capture = config.capture
    for protocol, listeners in (
        (
            "UDP",
            (
                ("capture.sip_udp", capture.sip_udp),
                ("capture.hep_udp", capture.hep_udp),
                ("capture.vxlan_udp", capture.vxlan_udp),
            ),
        ),
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
