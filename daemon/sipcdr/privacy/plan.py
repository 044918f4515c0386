"""Pure retention and hold planning: which partitions are past their retention, which
holds are in force, which files have expired. No I/O: `retention` feeds it what the
database and the disk hold and carries the plan out.

A partition holds one UTC day. A record of day `d` kept `n` days must survive until
`n` days after its own time, the latest of which is the end of `d`: the partition is
dropped once `d < today - n`, so no record goes before its period ends and none stays
more than a day (plus the time between runs) beyond it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Final

from sipcdr.privacy.settings import RetentionSettings

RECORD_TABLES: Final = ("cdrs", "sip_messages", "fraud_alerts")
SIGNALING_TABLE: Final = "sip_messages"
HOLD_KINDS: Final = ("number", "trunk", "call_id")


@dataclass(frozen=True, slots=True)
class Partition:
    """A leaf table retention may drop: a day of `sip_messages` or `fraud_alerts`, a
    day and retention class of `cdrs`, or a plain day of `cdrs` (class None: made
    before retention classes, so it may hold any class)."""

    table: str
    name: str
    day: date
    retention_class: int | None = None
    bytes: int = 0
    parent: str | None = None  # the day partition of a class sub-partition


@dataclass(frozen=True, slots=True)
class Drop:
    partition: Partition
    kept_days: int  # the retention that expired it


@dataclass(frozen=True, slots=True)
class Hold:
    hold_id: int
    kind: str  # number, trunk or call_id
    subject: str
    tables: tuple[str, ...]
    starts_at: datetime
    expires_at: datetime
    released_at: datetime | None = None

    def active(self, now: datetime) -> bool:
        return self.released_at is None and self.starts_at <= now < self.expires_at

    def covers(self, table: str) -> bool:
        return table in self.tables


@dataclass(slots=True)
class RetentionPlan:
    drops: list[Drop] = field(default_factory=list)
    # Day partitions of cdrs left without a class sub-partition once `drops` are done.
    empty_parents: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(drop.partition.bytes for drop in self.drops)

    def by_table(self) -> dict[str, list[Drop]]:
        result: dict[str, list[Drop]] = {table: [] for table in RECORD_TABLES}
        for drop in self.drops:
            result[drop.partition.table].append(drop)
        return result


def kept_days(partition: Partition, settings: RetentionSettings) -> int:
    """How long the rows of `partition` are kept: a class is its own period in days
    (0: the configured default), a plain cdrs day the longest period configured."""
    if partition.table != "cdrs":
        return settings.days(partition.table)
    if partition.retention_class is None:
        return settings.longest_cdr_days()
    return partition.retention_class or settings.cdrs_days


def expired(partition: Partition, today: date, settings: RetentionSettings) -> bool:
    return partition.day < today - timedelta(days=kept_days(partition, settings))


def plan_retention(
    partitions: Iterable[Partition],
    today: date,
    settings: RetentionSettings,
    children: dict[str, int] | None = None,
) -> RetentionPlan:
    """The partitions past retention on `today`, oldest first. `children` counts the
    class sub-partitions of each cdrs day partition, so that a day left with none is
    dropped too."""
    plan = RetentionPlan()
    remaining = dict(children or {})
    emptied: set[str] = set()
    for partition in sorted(partitions, key=lambda p: (p.table, p.day, p.name)):
        if expired(partition, today, settings):
            plan.drops.append(Drop(partition, kept_days(partition, settings)))
            if partition.parent is not None:
                remaining[partition.parent] = remaining.get(partition.parent, 1) - 1
                emptied.add(partition.parent)
    # Only days this run emptied: a day partition without classes for another reason
    # (today's, its first class not made yet) is left to the sink.
    plan.empty_parents = sorted(name for name in emptied if remaining.get(name, 0) <= 0)
    return plan


def active_holds(holds: Iterable[Hold], now: datetime) -> list[Hold]:
    return [hold for hold in holds if hold.active(now)]


def oldest_age_days(partitions: Sequence[Partition], today: date) -> dict[str, float]:
    """The age in days of the oldest partition of each table (0 with none)."""
    ages = {table: 0.0 for table in RECORD_TABLES}
    for partition in partitions:
        age = float((today - partition.day).days)
        ages[partition.table] = max(ages[partition.table], age)
    return ages


class HoldRefused(ValueError):
    """A hold that may not be placed; the message says why."""


def check_hold(
    *,
    kind: str,
    subject: str,
    tables: Sequence[str],
    starts_at: datetime,
    expires_at: datetime,
    signaling_max_days: int,
    now: datetime,
) -> None:
    """Raise HoldRefused with the reason when the hold is not allowed: a hold on
    signaling may reach `signaling_max_days` at most past the day it is placed (or its
    start, when that is earlier), the promise made to subjects."""
    if kind not in HOLD_KINDS:
        raise HoldRefused(f"a hold is by {', '.join(HOLD_KINDS)}, not {kind!r}")
    if not subject:
        raise HoldRefused("a hold needs a subject")
    unknown = [table for table in tables if table not in RECORD_TABLES]
    if unknown or not tables:
        raise HoldRefused(f"a hold covers some of {', '.join(RECORD_TABLES)}, not {unknown}")
    if expires_at <= starts_at:
        raise HoldRefused("a hold must end after it starts")
    since = min(now, starts_at)
    if SIGNALING_TABLE in tables and expires_at - since > timedelta(days=signaling_max_days):
        raise HoldRefused(
            f"a hold on signaling lasts at most {signaling_max_days} days "
            f"([privacy] signaling_hold_max_days); this one would last "
            f"{(expires_at - since).days} days: end it sooner, or hold only "
            "cdrs,fraud_alerts for longer"
        )


def jsonl_expired(rotated: Iterable[tuple[str, datetime]], now: datetime, days: int) -> list[str]:
    """Rotated JSONL files (name, the time it was rotated, i.e. its newest record at
    the latest) whose every record is older than `days`."""
    limit = now - timedelta(days=days)
    return sorted(name for name, closed in rotated if closed < limit)


def rotation_time(suffix: str) -> datetime | None:
    """The time in a rotated file's suffix (`20261204T101500Z`, maybe `.2`)."""
    stamp = suffix.split(".", 1)[0]
    try:
        return datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


_MS_PER_DAY: Final = 86_400_000


def kafka_retention_ms(
    settings: RetentionSettings, topic_cdrs: str, topic_fraud: str, topic_sip: str
) -> dict[str, int]:
    """The `retention.ms` each topic should carry to keep the same promise as the
    tables: CDRs for the longest CDR period (a topic mixes trunks), alerts and
    signaling for theirs. A disabled topic ("") is left out."""
    wanted = {
        topic_cdrs: settings.longest_cdr_days(),
        topic_fraud: settings.fraud_alerts_days,
        topic_sip: settings.sip_messages_days,
    }
    return {topic: days * _MS_PER_DAY for topic, days in wanted.items() if topic}


def spool_retention_days(settings: RetentionSettings, stream: str) -> int:
    """How long the records of a spool stream may wait for a sink: signaling as long
    as `sip_messages`, the records stream (CDRs and alerts) as long as the longer of
    the CDR and alert periods."""
    if stream == "signaling":
        return settings.sip_messages_days
    return max(settings.longest_cdr_days(), settings.fraud_alerts_days)
