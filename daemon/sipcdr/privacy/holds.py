"""Legal holds in PostgreSQL: placed, listed and released, each change audited in the
same transaction as the change itself."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from sipcdr.privacy import audit
from sipcdr.privacy.matching import normalize_number
from sipcdr.privacy.plan import check_hold


async def add_hold(
    conn: asyncpg.Connection,
    *,
    kind: str,
    subject: str,
    reason: str,
    starts_at: datetime | None,
    expires_at: datetime,
    tables: Sequence[str],
    signaling_max_days: int,
    operator: str,
    now: datetime | None = None,
) -> int:
    """Place a hold; raises HoldRefused (with the reason) when it is not allowed."""
    now = now or datetime.now(UTC)
    if kind == "number":
        subject = normalize_number(subject)
    starts = starts_at or now
    check_hold(
        kind=kind,
        subject=subject,
        tables=tables,
        starts_at=starts,
        expires_at=expires_at,
        signaling_max_days=signaling_max_days,
        now=now,
    )
    async with conn.transaction():
        hold_id = await conn.fetchval(
            "INSERT INTO holds (kind, subject, reason, created_at, starts_at, expires_at, "
            "tables, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING hold_id",
            kind,
            subject,
            reason,
            now,
            starts,
            expires_at,
            list(tables),
            operator,
        )
        await audit.append(
            conn,
            operator,
            audit.ACTION_HOLD_ADD,
            subject,
            {
                "hold_id": hold_id,
                "kind": kind,
                "reason": reason,
                "from": starts.isoformat(),
                "until": expires_at.isoformat(),
                "tables": list(tables),
            },
        )
    return int(hold_id)


async def release_hold(
    conn: asyncpg.Connection, hold_id: int, operator: str, now: datetime | None = None
) -> bool:
    """End a hold now; False when there is no such hold in force. Its held rows go at
    the next retention run."""
    now = now or datetime.now(UTC)
    async with conn.transaction():
        row = await conn.fetchrow(
            "UPDATE holds SET released_at = $2, released_by = $3 "
            "WHERE hold_id = $1 AND released_at IS NULL RETURNING subject",
            hold_id,
            now,
            operator,
        )
        if row is None:
            return False
        await audit.append(
            conn, operator, audit.ACTION_HOLD_RELEASE, row["subject"], {"hold_id": hold_id}
        )
    return True


async def list_holds(
    conn: asyncpg.Connection, *, include_ended: bool, now: datetime | None = None
) -> list[dict[str, Any]]:
    now = now or datetime.now(UTC)
    rows = await conn.fetch(
        "SELECT hold_id, kind, subject, reason, tables, created_by, created_at, starts_at, "
        "expires_at, released_at, released_by FROM holds "
        "WHERE $1 OR (released_at IS NULL AND expires_at > $2) ORDER BY hold_id",
        include_ended,
        now,
    )
    return [dict(row) for row in rows]
