"""Daily partitions of the time-partitioned tables: naming, creation ahead of time and
on demand, listing.

A partition holds one UTC day, `[day 00:00Z, day+1 00:00Z)`, and is named
`<table>_pYYYYMMDD`, so retention can find and drop a day by name. A day of `cdrs` is
itself LIST-partitioned by `retention_days`, the retention class of the CDR's trunk
(0: the configured default), one sub-partition `cdrs_pYYYYMMDD_r<days>` per class, so
trunks kept for different periods are still expired by dropping whole tables. Creation holds an
advisory lock so that two connections (the two delivery streams of one daemon, or two
daemons) making the same partition wait for each other instead of one failing on the
catalog's unique index.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, timedelta
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:  # annotations only: the config reads this module's defaults
    import asyncpg

# Seven days covers a long weekend plus an outage of the maintenance path, so a daemon
# that cannot create partitions for days still has somewhere to write.
DEFAULT_PARTITIONS_AHEAD_DAYS: Final = 7

# table -> its partition key column. Every table here is range-partitioned by day.
PARTITIONED_TABLES: Final = {
    "cdrs": "start_time",
    "sip_messages": "captured_at",
    "fraud_alerts": "raised_at",
}

# The table whose day partitions are split by retention class, and the class column.
CLASSED_TABLE: Final = "cdrs"
CLASS_COLUMN: Final = "retention_days"
# The class of CDRs that follow the configured default retention.
DEFAULT_CLASS: Final = 0

# Key of the advisory lock partition creation holds; distinct from the migration lock
# ("sipcdr" in ASCII, then 2).
PARTITION_LOCK_KEY: Final = 0x7369_7063_6472_0002

_ONE_DAY: Final = timedelta(days=1)


def partition_name(table: str, day: date) -> str:
    """`cdrs_p20261123`: zero-padded, so names sort by day."""
    return f"{table}_p{day.year:04d}{day.month:02d}{day.day:02d}"


def class_partition_name(day: date, retention_days: int) -> str:
    """`cdrs_p20261123_r180`: the CDRs of one day and one retention class."""
    return f"{partition_name(CLASSED_TABLE, day)}_r{retention_days}"


async def list_partitions(conn: asyncpg.Connection, table: str) -> list[date]:
    """The days `table` has partitions for, ascending (by name; other children ignored)."""
    _check_table(table)
    names = await conn.fetch(
        """
        SELECT child.relname
        FROM pg_inherits
        JOIN pg_class parent ON parent.oid = pg_inherits.inhparent
        JOIN pg_class child ON child.oid = pg_inherits.inhrelid
        WHERE parent.oid = to_regclass($1)
        """,
        table,
    )
    prefix = f"{table}_p"
    days = []
    for (name,) in names:
        suffix = name[len(prefix) :] if name.startswith(prefix) else ""
        if len(suffix) == 8 and suffix.isdigit():
            days.append(date(int(suffix[:4]), int(suffix[4:6]), int(suffix[6:])))
    return sorted(days)


async def list_classes(conn: asyncpg.Connection, day: date) -> set[int] | None:
    """The retention classes the `cdrs` partition of `day` has sub-partitions for; None
    when that partition is plain (made before retention classes) or missing."""
    rows = await conn.fetch(
        """
        SELECT child.relname, parent.relkind::text AS relkind
        FROM pg_class parent
        LEFT JOIN pg_inherits ON pg_inherits.inhparent = parent.oid
        LEFT JOIN pg_class child ON child.oid = pg_inherits.inhrelid
        WHERE parent.oid = to_regclass($1)
        """,
        partition_name(CLASSED_TABLE, day),
    )
    if not rows or rows[0]["relkind"] != "p":
        return None
    prefix = partition_name(CLASSED_TABLE, day) + "_r"
    classes = set()
    for row in rows:
        name = row["relname"] or ""
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            classes.add(int(name[len(prefix) :]))
    return classes


async def ensure_partitions(
    conn: asyncpg.Connection,
    table: str,
    days: Iterable[date],
    classes: Iterable[int] = (DEFAULT_CLASS,),
) -> list[str]:
    """Create the partitions of `table` for `days` that do not exist yet, and for
    `cdrs` the sub-partitions of `classes` in each; returns the names created. Runs in
    its own transaction (or the caller's, when one is open)."""
    _check_table(table)
    wanted = sorted(set(days))
    if not wanted:
        return []
    wanted_classes = sorted({DEFAULT_CLASS, *classes})
    created: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK_KEY)
        existing = set(await list_partitions(conn, table))
        for day in wanted:
            name = partition_name(table, day)
            if day not in existing:
                # Bounds carry an explicit +00 so they mean UTC whatever the session's
                # TimeZone is.
                split = f" PARTITION BY LIST ({CLASS_COLUMN})" if table == CLASSED_TABLE else ""
                await conn.execute(
                    f'CREATE TABLE IF NOT EXISTS "{name}" PARTITION OF "{table}" '
                    f"FOR VALUES FROM ('{day.isoformat()} 00:00:00+00') "
                    f"TO ('{_next_day(day)} 00:00:00+00'){split}"
                )
                created.append(name)
            if table == CLASSED_TABLE:
                have = await list_classes(conn, day)
                if have is None:
                    continue  # a plain partition of an earlier version takes every class
                for retention_days in wanted_classes:
                    if retention_days in have:
                        continue
                    sub = class_partition_name(day, retention_days)
                    await conn.execute(
                        f'CREATE TABLE IF NOT EXISTS "{sub}" PARTITION OF "{name}" '
                        f"FOR VALUES IN ({int(retention_days)})"
                    )
                    created.append(sub)
    return created


async def ensure_ahead(
    conn: asyncpg.Connection,
    today: date,
    days_ahead: int = DEFAULT_PARTITIONS_AHEAD_DAYS,
    classes: Iterable[int] = (DEFAULT_CLASS,),
) -> list[str]:
    """Partitions of every partitioned table for yesterday (late records right after
    midnight) through `today + days_ahead`; returns the names created."""
    days = [today + timedelta(days=offset) for offset in range(-1, days_ahead + 1)]
    created: list[str] = []
    classes = tuple(classes)
    for table in PARTITIONED_TABLES:
        created += await ensure_partitions(conn, table, days, classes)
    return created


def _next_day(day: date) -> str:
    """The day after `day`, as a bound: the last day Python has (9999-12-31, which a
    capture time can name) is followed by one that only PostgreSQL has."""
    return "10000-01-01" if day == date.max else (day + _ONE_DAY).isoformat()


def _check_table(table: str) -> None:
    # Table names end up in DDL text, so only the known ones are accepted.
    if table not in PARTITIONED_TABLES:
        raise ValueError(f"{table!r} is not a partitioned table ({', '.join(PARTITIONED_TABLES)})")
