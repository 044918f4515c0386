"""The retention and restriction metrics, registered with the daemon's others
(telemetry.metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from sipcdr.privacy.plan import RECORD_TABLES


class PrivacyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.oldest_partition_age = Gauge(
            "sipcdr_retention_oldest_partition_age_days",
            "Age in days of the oldest partition of each table after the last retention "
            "run: above the table's retention (plus a day) means retention is not working",
            ["table"],
            registry=registry,
        )
        self.bytes_dropped = Counter(
            "sipcdr_retention_bytes_dropped_total",
            "Bytes freed by dropping partitions past retention, by table",
            ["table"],
            registry=registry,
        )
        self.partitions_dropped = Counter(
            "sipcdr_retention_partitions_dropped_total",
            "Partitions dropped past retention, by table",
            ["table"],
            registry=registry,
        )
        self.rows_held = Counter(
            "sipcdr_retention_rows_held_total",
            "Rows copied to the held tables before their partition was dropped",
            ["table"],
            registry=registry,
        )
        self.runs = Counter(
            "sipcdr_retention_runs_total",
            "Retention runs of the daemon, by outcome (ok, failed)",
            ["outcome"],
            registry=registry,
        )
        self.last_success = Gauge(
            "sipcdr_retention_last_success_timestamp_seconds",
            "When retention last completed (Unix time; 0: not yet)",
            registry=registry,
        )
        self.withheld = Counter(
            "sipcdr_kafka_records_withheld_total",
            "Records not published to Kafka, by record kind: their subject's processing "
            "is restricted, or (with pseudonymize_numbers) the record could not be read",
            ["kind"],
            registry=registry,
        )
        self.restricted_subjects = Gauge(
            "sipcdr_restricted_subjects",
            "Numbers whose processing is restricted, as last read from PostgreSQL",
            registry=registry,
        )
        for table in RECORD_TABLES:
            self.oldest_partition_age.labels(table)
            self.bytes_dropped.labels(table)
            self.partitions_dropped.labels(table)
            self.rows_held.labels(table)
        for outcome in ("ok", "failed"):
            self.runs.labels(outcome)
