"""`[retention]`, `[privacy]`, a trunk's `cdr_retention_days` and
`[sinks.kafka] pseudonymize_numbers` as the configuration loader reads them."""

from __future__ import annotations

from pathlib import Path

import pytest
from sipcdr.config import Config, ConfigError, load_config, output_settings


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "sipcdr.toml"
    path.write_text(text)
    return load_config(path, {})


def test_defaults() -> None:
    config = load_config(None, {})
    assert (config.retention.cdrs_days, config.retention.sip_messages_days) == (180, 90)
    assert (config.retention.fraud_alerts_days, config.retention.audit_log_days) == (365, 1095)
    assert config.privacy.statutory_cdr_days == 0
    assert config.privacy.signaling_hold_max_days == 365


def test_trunk_retention_and_key(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
[retention]
cdrs_days = 365
[privacy]
statutory_cdr_days = 180
pseudonym_key_file = "keys/pseudonym.key"
[[trunks]]
name = "de"
sources = ["192.0.2.0/24"]
cdr_retention_days = 2557
""",
    )
    assert config.retention.trunk_cdr_days == {"de": 2557}
    assert config.retention.cdr_classes() == {0: 365, 2557: 2557}
    assert config.privacy.pseudonym_key_file == tmp_path / "keys/pseudonym.key"


def test_the_sinks_get_the_privacy_settings_through_their_records(tmp_path: Path) -> None:
    """The sinks do not read the config: the pseudonym key, the promise of pseudonyms
    and the trunks' retention classes reach them in the settings records."""
    config = load(
        tmp_path,
        """
[privacy]
pseudonym_key_file = "pseudonym.key"
[sinks.kafka]
bootstrap = "k:9092"
pseudonymize_numbers = true
[sinks.postgres]
dsn = "postgresql://sipcdr@db/sipcdr"
[[trunks]]
name = "de"
sources = ["192.0.2.0/24"]
cdr_retention_days = 2557
""",
    )
    settings = output_settings(config)
    assert settings.kafka is not None and settings.postgres is not None
    assert settings.kafka.pseudonymize_numbers
    assert settings.kafka.pseudonym_key_file == tmp_path / "pseudonym.key"
    assert settings.postgres.retention_classes == {"de": 2557}
    # Topics the sink makes keep the tables' promise: CDRs for the longest trunk period.
    day_ms = 86_400_000
    assert settings.kafka.topic_retention_ms == {
        "sipcdr.cdrs": 2557 * day_ms,
        "sipcdr.fraud": 365 * day_ms,
    }
    assert settings.kafka.create_topics
    assert (settings.kafka.topic_partitions, settings.kafka.topic_replication_factor) == (6, None)
    plain = output_settings(load_config(None, {}))
    assert plain.kafka is None or not plain.kafka.pseudonymize_numbers
    assert plain.postgres is None or plain.postgres.retention_classes == {}


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[retention]\ncdrs_days = 2558\n", "retention.cdrs_days"),
        ("[retention]\naudit_log_days = 300\n", "retention.audit_log_days"),
        ("[retention]\nsip_messages_days = 0\n", "retention.sip_messages_days"),
        ("[retention]\nkeep = 1\n", "retention.keep"),
        ("[privacy]\nsignaling_hold_max_days = 400\n", "privacy.signaling_hold_max_days"),
        (
            '[[trunks]]\nname = "x"\nsources = ["192.0.2.0/24"]\ncdr_retention_days = 9000\n',
            "trunks[0].cdr_retention_days",
        ),
        (
            '[sinks.kafka]\nbootstrap = "k:9092"\npseudonymize_numbers = true\n',
            "privacy.pseudonym_key_file",
        ),
    ],
)
def test_refused(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert caught.value.key == key
