"""The settings records the layers below the config take, made from a `Config`.

The sinks and the storage do not import the config (it sits above them): whoever
builds them (the daemon, `sipcdr import`) hands them these plain records instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from sipcdr.config.schema import Config
from sipcdr.privacy.plan import kafka_retention_ms
from sipcdr.sinks.settings import (
    JsonlSettings,
    KafkaSettings,
    OutputSettings,
    PostgresSettings,
    SpoolSettings,
)
from sipcdr.storage.embedded import EMBEDDED_DATA_SUBDIR


def output_settings(config: Config) -> OutputSettings:
    """What `sinks.outputs.Outputs` builds: the spools and the enabled sinks."""
    sinks = config.sinks
    jsonl, postgres, kafka = sinks.jsonl, sinks.postgres, sinks.kafka
    spool = config.spool
    return OutputSettings(
        state_dir=Path(config.state.dir),
        # The config names it under [sinks.postgres], but it decides what every
        # signaling record holds, whichever sink takes it.
        store_sdp=postgres.store_sdp,
        spool=SpoolSettings(
            max_bytes=spool.max_bytes,
            signaling_max_bytes=spool.signaling_max_bytes,
            segment_bytes=spool.segment_bytes,
            full_policy=spool.full_policy,
            fsync_interval_s=spool.fsync_interval_ms / 1000,
            cdr_reserve_records=spool.cdr_reserve_records,
            signaling_min_free_bytes=spool.signaling_min_free_bytes,
        ),
        jsonl=(
            JsonlSettings(path=Path(jsonl.path), rotate_bytes=jsonl.rotate_bytes)
            if jsonl.enabled
            else None
        ),
        postgres=(
            PostgresSettings(
                dsn=postgres.dsn,
                store_signaling=postgres.store_signaling,
                partitions_ahead_days=postgres.partitions_ahead_days,
                retention_classes=config.retention.trunk_cdr_days,
            )
            if postgres.enabled
            else None
        ),
        kafka=(
            KafkaSettings(
                bootstrap=kafka.bootstrap_servers,
                topic_cdrs=kafka.topic_cdrs,
                topic_fraud=kafka.topic_fraud,
                topic_sip=kafka.topic_sip,
                idempotence=kafka.idempotence,
                compression=kafka.compression,
                linger_ms=kafka.linger_ms,
                max_batch_bytes=kafka.max_batch_bytes,
                request_timeout_ms=kafka.request_timeout_ms,
                security_protocol=kafka.security_protocol,
                sasl_mechanism=kafka.sasl_mechanism,
                sasl_username=kafka.sasl_username,
                sasl_password=kafka.sasl_password,
                ssl_cafile=kafka.ssl_cafile,
                pseudonymize_numbers=config.privacy.pseudonymize_kafka,
                pseudonym_key_file=config.privacy.pseudonym_key_file,
                create_topics=kafka.create_topics,
                topic_partitions=kafka.topic_partitions,
                topic_replication_factor=kafka.topic_replication_factor,
                topic_retention_ms=kafka_retention_ms(
                    config.retention, kafka.topic_cdrs, kafka.topic_fraud, kafka.topic_sip
                ),
            )
            if kafka.enabled
            else None
        ),
    )


def cdr_destinations(config: Config) -> dict[str, str]:
    """Where CDRs go, for the daemon's `started` line: the JSONL file, the database
    (its password masked), the broker and topic; by sink name, enabled sinks only."""
    sinks = config.sinks
    where: dict[str, str] = {}
    if sinks.jsonl.enabled:
        where["jsonl"] = os.path.abspath(sinks.jsonl.path)
    if sinks.postgres.embedded:
        pg_dir = os.path.abspath(Path(config.state.dir) / EMBEDDED_DATA_SUBDIR)
        where["postgres"] = f"embedded, under {pg_dir}"
    elif sinks.postgres.enabled:
        where["postgres"] = str(sinks.postgres.redacted()["dsn"])
    if sinks.kafka.enabled:
        kafka = sinks.kafka
        where["kafka"] = f"{kafka.bootstrap_servers}, topic {kafka.topic_cdrs}"
    return where
