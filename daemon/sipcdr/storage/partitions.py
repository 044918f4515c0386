"""Daily partitions of the time-partitioned tables: naming, creation ahead of time and
on demand, listing.

A partition holds one UTC day, `[day 00:00Z, day+1 00:00Z)`, and is named
`<table>_pYYYYMMDD`, so retention can find and drop a day by name. Creation holds an
advisory lock so that two connections (the two delivery streams of one daemon, or two
daemons) making the same partition wait for each other instead of one failing on the
catalog's unique index.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, timedelta
from typing import Final

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

# Key of the advisory lock partition creation holds; distinct from the migration lock
# ("sipcdr" in ASCII, then 2).
PARTITION_LOCK_KEY: Final = 0x7369_7063_6472_0002

_ONE_DAY: Final = timedelta(days=1)


def partition_name(table: str, day: date) -> str:
    """`cdrs_p20261123`: zero-padded, so names sort by day."""
    return f"{table}_p{day.year:04d}{day.month:02d}{day.day:02d}"


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


async def ensure_partitions(
    conn: asyncpg.Connection, table: str, days: Iterable[date]
) -> list[str]:
    """Create the partitions of `table` for `days` that do not exist yet; returns the
    names created. Runs in its own transaction (or the caller's, when one is open)."""
    _check_table(table)
    wanted = sorted(set(days))
    if not wanted:
        return []
    created: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK_KEY)
        existing = set(await list_partitions(conn, table))
        for day in wanted:
            if day in existing:
                continue
            name = partition_name(table, day)
            # Bounds carry an explicit +00 so they mean UTC whatever the session's
            # TimeZone is.
            await conn.execute(
                f'CREATE TABLE IF NOT EXISTS "{name}" PARTITION OF "{table}" '
                f"FOR VALUES FROM ('{day.isoformat()} 00:00:00+00') "
                f"TO ('{(day + _ONE_DAY).isoformat()} 00:00:00+00')"
            )
            created.append(name)
    return created


async def ensure_ahead(
    conn: asyncpg.Connection, today: date, days_ahead: int = DEFAULT_PARTITIONS_AHEAD_DAYS
) -> list[str]:
    """Partitions of every partitioned table for yesterday (late records right after
    midnight) through `today + days_ahead`; returns the names created."""
    days = [today + timedelta(days=offset) for offset in range(-1, days_ahead + 1)]
    created: list[str] = []
    for table in PARTITIONED_TABLES:
        created += await ensure_partitions(conn, table, days)
    return created


def _check_table(table: str) -> None:
    # Table names end up in DDL text, so only the known ones are accepted.
    if table not in PARTITIONED_TABLES:
        raise ValueError(f"{table!r} is not a partitioned table ({', '.join(PARTITIONED_TABLES)})")
