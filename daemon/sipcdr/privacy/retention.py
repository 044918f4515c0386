"""Retention in PostgreSQL: find the partitions, let `plan` choose, copy held rows out,
drop, clear held rows whose hold has ended, expire the audit log, audit the run.

Every record table is expired only by dropping whole partitions. Held tables and the
audit log are small and lose rows by DELETE. Each partition is handled in a
transaction of its own: its held rows are copied and it is dropped together, or not
at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import asyncpg

from sipcdr.privacy import audit, matching
from sipcdr.privacy.plan import (
    RECORD_TABLES,
    Hold,
    Partition,
    RetentionPlan,
    active_holds,
    plan_retention,
)
from sipcdr.privacy.settings import RetentionSettings

# Key of the advisory lock a run holds, so that the daemon's daily run and an
# operator's `sipcdr retention run` do not work on the same partitions ("sipcdr", 4).
RETENTION_LOCK_KEY: Final = 0x7369_7063_6472_0004

_DAY: Final = re.compile(r"^(?P<table>[a-z_]+)_p(?P<day>\d{8})(?:_r(?P<class>\d+))?$")

_CHILDREN: Final = """
SELECT c.relname, c.relkind::text AS relkind, pg_total_relation_size(c.oid) AS bytes,
       p.relname AS parent
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
JOIN pg_class p ON p.oid = i.inhparent
WHERE i.inhparent = to_regclass($1)
   OR i.inhparent IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = to_regclass($1))
"""


@dataclass(slots=True)
class DroppedPartition:
    table: str
    name: str
    day: date
    kept_days: int
    bytes: int
    held_rows: int


@dataclass(slots=True)
class RetentionReport:
    dry_run: bool
    dropped: list[DroppedPartition] = field(default_factory=list)
    held_rows_removed: dict[str, int] = field(default_factory=dict)
    audit_rows_expired: int = 0
    oldest_age_days: dict[str, float] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(item.bytes for item in self.dropped)

    def bytes_by_table(self) -> dict[str, int]:
        result = {table: 0 for table in RECORD_TABLES}
        for item in self.dropped:
            result[item.table] += item.bytes
        return result

    def summary(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "partitions_dropped": {
                table: [item.name for item in self.dropped if item.table == table]
                for table in RECORD_TABLES
            },
            "rows_held_back": {
                table: sum(item.held_rows for item in self.dropped if item.table == table)
                for table in RECORD_TABLES
            },
            "bytes_freed": self.bytes,
            "held_rows_removed": self.held_rows_removed,
            "audit_rows_expired": self.audit_rows_expired,
        }


async def list_partitions(conn: asyncpg.Connection) -> tuple[list[Partition], dict[str, int]]:
    """Every leaf partition of the record tables, and the number of class
    sub-partitions of each cdrs day partition."""
    leaves: list[Partition] = []
    children: dict[str, int] = {}
    for table in RECORD_TABLES:
        for row in await conn.fetch(_CHILDREN, table):
            match = _DAY.match(row["relname"])
            if match is None or match["table"] != table:
                continue  # not a partition sipcdr made
            day = datetime.strptime(match["day"], "%Y%m%d").date()
            if row["relkind"] == "p":
                children.setdefault(row["relname"], 0)
                continue
            klass = match["class"]
            parent = row["parent"] if klass is not None else None
            if parent is not None:
                children[parent] = children.get(parent, 0) + 1
            leaves.append(
                Partition(
                    table=table,
                    name=row["relname"],
                    day=day,
                    retention_class=None if klass is None and table == "cdrs" else _int(klass),
                    bytes=int(row["bytes"]),
                    parent=parent,
                )
            )
    return leaves, children


def _int(text: str | None) -> int | None:
    return None if text is None else int(text)


async def load_holds(conn: asyncpg.Connection) -> list[Hold]:
    rows = await conn.fetch(
        "SELECT hold_id, kind, subject, tables, starts_at, expires_at, released_at "
        "FROM holds ORDER BY hold_id"
    )
    return [
        Hold(
            hold_id=row["hold_id"],
            kind=row["kind"],
            subject=row["subject"],
            tables=tuple(row["tables"]),
            starts_at=row["starts_at"],
            expires_at=row["expires_at"],
            released_at=row["released_at"],
        )
        for row in rows
    ]


async def _columns(conn: asyncpg.Connection, table: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass($1) "
        "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        table,
    )
    return [row["attname"] for row in rows]


async def run_retention(
    conn: asyncpg.Connection,
    settings: RetentionSettings,
    *,
    dry_run: bool,
    operator: str,
    now: datetime | None = None,
) -> RetentionReport:
    """One run; `now` (UTC) is the time retention is judged at."""
    now = now or datetime.now(UTC)
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK_KEY):
        raise RetentionBusy("another retention run holds the lock; try again when it ends")
    try:
        return await _run(conn, settings, dry_run=dry_run, operator=operator, now=now)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK_KEY)


async def _run(
    conn: asyncpg.Connection,
    settings: RetentionSettings,
    *,
    dry_run: bool,
    operator: str,
    now: datetime,
) -> RetentionReport:
    today = now.astimezone(UTC).date()
    report = RetentionReport(dry_run=dry_run)
    leaves, children = await list_partitions(conn)
    plan = plan_retention(leaves, today, settings, children)
    holds = active_holds(await load_holds(conn), now)
    columns = {table: await _columns(conn, table) for table in RECORD_TABLES}
    for drop in plan.drops:
        partition = drop.partition
        held = [hold for hold in holds if hold.covers(partition.table)]
        if dry_run:
            count = 0
            for hold in held:
                clause, values = matching.bind(partition.table, hold.kind, hold.subject)
                count += await conn.fetchval(
                    f'SELECT count(*) FROM "{partition.name}" WHERE {clause}', *values
                )
            moved = count
        else:
            moved = await _move_and_drop(conn, partition, held, columns[partition.table])
        report.dropped.append(
            DroppedPartition(
                partition.table,
                partition.name,
                partition.day,
                drop.kept_days,
                partition.bytes,
                moved,
            )
        )
    if not dry_run:
        await _drop_empty_parents(conn, plan)
        report.held_rows_removed = await _release_held(conn, [h.hold_id for h in holds])
        report.audit_rows_expired = await _expire_audit(conn, settings, now)
    else:
        report.held_rows_removed = await _count_releasable(conn, [h.hold_id for h in holds])
    remaining = [p for p in leaves if p.name not in {d.partition.name for d in plan.drops}]
    report.oldest_age_days = {
        table: max([float((today - p.day).days) for p in remaining if p.table == table] or [0.0])
        for table in RECORD_TABLES
    }
    if not dry_run:
        await audit.append(conn, operator, audit.ACTION_RETENTION, None, report.summary())
    return report


class RetentionBusy(RuntimeError):
    """Another run is under way."""


async def _move_and_drop(
    conn: asyncpg.Connection, partition: Partition, holds: list[Hold], columns: list[str]
) -> int:
    listed = ", ".join(f'"{name}"' for name in columns)
    moved = 0
    async with conn.transaction():
        for hold in holds:
            clause, values = matching.bind(partition.table, hold.kind, hold.subject)
            status = await conn.execute(
                f'INSERT INTO "{partition.table}_held" ({listed}, hold_id) '
                f'SELECT {listed}, {int(hold.hold_id)} FROM "{partition.name}" '
                f"WHERE {clause} ON CONFLICT DO NOTHING",
                *values,
            )
            moved += int(status.rsplit(" ", 1)[-1])
        await conn.execute(f'DROP TABLE IF EXISTS "{partition.name}"')
    return moved


async def _drop_empty_parents(conn: asyncpg.Connection, plan: RetentionPlan) -> None:
    for name in plan.empty_parents:
        async with conn.transaction():
            left = await conn.fetchval(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = to_regclass($1)", name
            )
            if left == 0:
                await conn.execute(f'DROP TABLE IF EXISTS "{name}"')


async def _release_held(conn: asyncpg.Connection, active: list[int]) -> dict[str, int]:
    removed = {}
    for table in RECORD_TABLES:
        status = await conn.execute(
            f'DELETE FROM "{table}_held" WHERE NOT (hold_id = ANY($1::bigint[]))', active
        )
        removed[table] = int(status.rsplit(" ", 1)[-1])
    return removed


async def _count_releasable(conn: asyncpg.Connection, active: list[int]) -> dict[str, int]:
    return {
        table: int(
            await conn.fetchval(
                f'SELECT count(*) FROM "{table}_held" WHERE NOT (hold_id = ANY($1::bigint[]))',
                active,
            )
        )
        for table in RECORD_TABLES
    }


async def _expire_audit(
    conn: asyncpg.Connection, settings: RetentionSettings, now: datetime
) -> int:
    before = now - timedelta(days=settings.audit_log_days)
    return int(await conn.fetchval("SELECT sipcdr_audit_expire($1)", before))
