"""The audit log: every privacy action appended through `sipcdr_audit_append` (the
database computes each row's hash over its fields and the previous row's hash), and
`verify`, which recomputes the chain and names the first row that does not fit.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import orjson

# Rows read per round trip while verifying: the log is read, never held, whole.
_VERIFY_BATCH: Final = 1000

ACTION_RETENTION: Final = "retention.run"
ACTION_HOLD_ADD: Final = "hold.add"
ACTION_HOLD_RELEASE: Final = "hold.release"
ACTION_EXPORT: Final = "subject.export"
ACTION_ERASE: Final = "subject.erase"
ACTION_RESTRICT: Final = "subject.restrict"
ACTION_UNRESTRICT: Final = "subject.unrestrict"


def default_operator() -> str:
    """The OS user running the command."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


async def append(
    conn: asyncpg.Connection,
    operator: str,
    action: str,
    subject: str | None,
    details: dict[str, Any],
) -> int:
    """Append a row (in the caller's transaction, when one is open); its id."""
    row_id = await conn.fetchval(
        "SELECT sipcdr_audit_append($1, $2, $3, $4::jsonb)",
        operator,
        action,
        subject,
        orjson.dumps(details, default=str).decode(),
    )
    return int(row_id)


@dataclass(frozen=True, slots=True)
class Verdict:
    rows: int
    head: str  # hex hash of the last row: note it elsewhere to anchor the chain
    broken_id: int | None = None
    reason: str | None = None

    @property
    def intact(self) -> bool:
        return self.broken_id is None


async def verify(conn: asyncpg.Connection) -> Verdict:
    """Walk the chain in id order from where expiry left it."""
    horizon = await conn.fetchval("SELECT last_hash FROM audit_horizon")
    expected: bytes = bytes(horizon) if horizon is not None else b""
    rows = 0
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        cursor = conn.cursor(
            "SELECT id, prev_hash, row_hash, "
            "sipcdr_audit_hash(id, at, actor, action, subject, details, prev_hash) AS computed "
            "FROM audit_log ORDER BY id",
            prefetch=_VERIFY_BATCH,
        )
        async for row in cursor:
            rows += 1
            if bytes(row["prev_hash"]) != expected:
                return Verdict(
                    rows,
                    expected.hex(),
                    row["id"],
                    "its link does not name the row before it: that row was deleted or "
                    "its hash changed",
                )
            if bytes(row["computed"]) != bytes(row["row_hash"]):
                return Verdict(
                    rows,
                    expected.hex(),
                    row["id"],
                    "its contents do not match its hash: the row was edited",
                )
            expected = bytes(row["row_hash"])
    return Verdict(rows, expected.hex())
