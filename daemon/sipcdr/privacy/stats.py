"""What retention and the Kafka restriction filter count, read by the telemetry
exporter at each scrape (`telemetry.metrics`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sipcdr.privacy.plan import RECORD_TABLES


def _by_table() -> dict[str, int]:
    # Every table has its series from the start: an alert compares against them.
    return dict.fromkeys(RECORD_TABLES, 0)


@dataclass(slots=True)
class PrivacyStats:
    # Age in days of each table's oldest partition after the last run.
    oldest_partition_age_days: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(RECORD_TABLES, 0.0)
    )
    bytes_dropped: dict[str, int] = field(default_factory=_by_table)
    partitions_dropped: dict[str, int] = field(default_factory=_by_table)
    rows_held: dict[str, int] = field(default_factory=_by_table)
    runs: dict[str, int] = field(default_factory=lambda: {"ok": 0, "failed": 0})
    last_success: float = 0.0  # Unix time of the last completed run; 0: not yet
    restricted_subjects: int = 0  # as last read from PostgreSQL
    # 1 while the list in force could not be saved in the state folder (too long to
    # keep a copy of, or a write failed): a restart during an outage would miss it.
    restrictions_unsaved: int = 0
