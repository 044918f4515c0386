"""Data-subject rights in PostgreSQL and in JSONL files: export, erase, restrict,
unrestrict, each audited with what it did and what it refused.

Export reads the live tables and the held tables through server-side cursors, so a
subject with millions of calls is streamed, not loaded. Erasure deletes the subject's
signaling and replaces the number in CDRs and alerts by its keyed pseudonym (billing
totals stay as they were), except where an active hold or the statutory retention of
CDRs forbids it: those rows are left as they are and counted as refused, with why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import asyncpg
import orjson

from sipcdr.model import RECORD_FIELDS
from sipcdr.privacy import audit, matching, naming
from sipcdr.privacy.bundle import KINDS, Bundle
from sipcdr.privacy.files import rotated_files
from sipcdr.privacy.pseudonym import key_id, pseudonym
from sipcdr.privacy.retention import load_holds

# Rows fetched per round trip while exporting.
_BATCH: Final = 500

# What an export returns of alerts: those about the number itself (the hold and
# signaling rules also follow its calls, which may name others).
_EXPORT_CLAUSES: Final = {
    "cdrs": matching.where("cdrs", "number"),
    "sip_messages": matching.where("sip_messages", "number"),
    "fraud_alerts": "(subject = $1)",
}


async def export_postgres(
    conn: asyncpg.Connection, number: str, bundle: Bundle, operator: str
) -> dict[str, int]:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        columns = {table: await _live_columns(conn, table) for table in KINDS}
        for table in KINDS:
            bundle.begin(table, columns[table])
            clause = _EXPORT_CLAUSES[table]
            values: tuple[str, ...] = (number, matching.header_pattern(number))
            if "$2" not in clause:
                values = values[:1]
            listed = ", ".join(f'"{name}"' for name in columns[table])
            key = _KEYS[table]
            query = (
                f"SELECT {listed} FROM {table} WHERE {clause} "
                f"UNION ALL SELECT DISTINCT ON ({key}) {listed} FROM {table}_held h "
                f"WHERE {clause} AND NOT EXISTS "
                f"(SELECT 1 FROM {table} l WHERE l.{key} = h.{key})"
            )
            async for row in conn.cursor(query, *values, prefetch=_BATCH):
                bundle.row(table, row)
            bundle.end(table)
    bundle.close()
    await audit.append(
        conn, operator, audit.ACTION_EXPORT, number, {"source": "postgres", "rows": bundle.counts}
    )
    return bundle.counts


_KEYS: Final = {"cdrs": "cdr_id", "sip_messages": "message_id", "fraud_alerts": "alert_id"}
# The record each table stores: its fields are the columns of an export from records.
_RECORD_OF: Final = {"cdrs": "cdr", "sip_messages": "sip_message", "fraud_alerts": "fraud_alert"}


async def _live_columns(conn: asyncpg.Connection, table: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass($1) "
        "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        table,
    )
    return [row["attname"] for row in rows]


def export_jsonl(path: Path, number: str, bundle: Bundle) -> dict[str, int]:
    """The subject's CDRs from the JSONL output (the file and its rotated ones), read a
    line at a time. JSONL holds CDRs only: signaling and alerts are not there."""
    files = [path.with_name(name) for name, _ in sorted(rotated_files(path), key=lambda x: x[1])]
    files.append(path)
    bundle.begin("cdrs", RECORD_FIELDS[_RECORD_OF["cdrs"]])
    for item in files:
        try:
            handle = item.open("rb")
        except FileNotFoundError:
            continue
        with handle:
            for line in handle:
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # a torn last line of a crash; the sink cuts it at start
                if isinstance(record, dict) and number in (
                    record.get("caller"),
                    record.get("callee"),
                ):
                    bundle.row("cdrs", record)
    bundle.end("cdrs")
    for kind in ("sip_messages", "fraud_alerts"):
        bundle.begin(kind, RECORD_FIELDS[_RECORD_OF[kind]])
        bundle.end(kind)
    bundle.close()
    return bundle.counts


def open_output(path: Path) -> Any:
    """A new file only the running user may read; an existing one is not overwritten."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb")


@dataclass(slots=True)
class ErasureReport:
    number: str
    pseudonym: str
    done: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not any(self.refused.values())

    def details(self, key: bytes) -> dict[str, Any]:
        return {
            "pseudonym": self.pseudonym,
            "key_id": key_id(key),
            "done": self.done,
            "refused": self.refused,
            "reasons": self.reasons,
        }


async def _held_calls(
    conn: asyncpg.Connection, number: str, now: datetime
) -> tuple[bool, list[str], list[str]]:
    """Whether a hold names the number itself, the Call-IDs of its calls other holds
    keep, and the reasons."""
    whole = False
    calls: set[str] = set()
    reasons = []
    for hold in await load_holds(conn):
        if not hold.active(now):
            continue
        if hold.kind == "number" and hold.subject == number:
            whole = True
            reasons.append(f"hold {hold.hold_id} on this number until {hold.expires_at:%Y-%m-%d}")
        elif hold.kind == "call_id":
            found = await conn.fetchval(
                "SELECT count(*) FROM cdrs WHERE call_id = $1 AND (caller = $2 OR callee = $2)",
                hold.subject,
                number,
            )
            if found:
                calls.add(hold.subject)
                reasons.append(f"hold {hold.hold_id} on call {hold.subject}")
        elif hold.kind == "trunk":
            rows = await conn.fetch(
                "SELECT DISTINCT call_id FROM cdrs "
                "WHERE trunk = $1 AND (caller = $2 OR callee = $2)",
                hold.subject,
                number,
            )
            if rows:
                calls.update(row[0] for row in rows)
                reasons.append(f"hold {hold.hold_id} on trunk {hold.subject}")
    return whole, sorted(calls), reasons


async def erase(
    conn: asyncpg.Connection,
    number: str,
    key: bytes,
    *,
    statutory_cdr_days: int,
    operator: str,
    now: datetime | None = None,
) -> ErasureReport:
    now = now or datetime.now(UTC)
    alias = pseudonym(key, number)
    report = ErasureReport(number, alias)
    async with conn.transaction():
        whole, held_calls, reasons = await _held_calls(conn, number, now)
        report.reasons += reasons
        subject_rows = await conn.fetchval(
            "SELECT count(*) FROM cdrs WHERE caller = $1 OR callee = $1", number
        )
        held_rows = sum(
            [
                await conn.fetchval(
                    f"SELECT count(*) FROM {table}_held WHERE {clause}",
                    *values,
                )
                for table in KINDS
                for clause, values in [_bind(table, number)]
            ]
        )
        if held_rows:
            report.reasons.append("rows kept in the held tables by a hold")
        if whole:
            report.refused = {
                "cdrs": subject_rows,
                "sip_messages": await _count(conn, "sip_messages", number),
                "fraud_alerts": await _count(conn, "fraud_alerts", number),
                "held_rows": held_rows,
            }
            report.done = dict.fromkeys(KINDS, 0)
            await audit.append(conn, operator, audit.ACTION_ERASE, number, report.details(key))
            return report
        statutory_since = now - timedelta(days=statutory_cdr_days)
        # Signaling: deleted, except calls under a hold.
        sip_clause, sip_values = _bind("sip_messages", number)
        status = await conn.execute(
            f"DELETE FROM sip_messages WHERE {sip_clause} AND NOT (call_id = ANY($3::text[]))",
            *sip_values,
            held_calls,
        )
        report.done["sip_messages"] = _affected(status)
        report.refused["sip_messages"] = await conn.fetchval(
            f"SELECT count(*) FROM sip_messages WHERE {sip_clause}", *sip_values
        )
        # CDRs: pseudonymized, except calls under a hold or inside statutory retention.
        status = await conn.execute(
            """
            UPDATE cdrs SET
                caller = CASE WHEN caller = $1 THEN $2 ELSE caller END,
                callee = CASE WHEN callee = $1 THEN $2 ELSE callee END,
                from_uri = CASE WHEN caller = $1 THEN regexp_replace(from_uri,
                    '^((sips?|tel):)[^@;>]*', '\\1' || $2) ELSE from_uri END,
                to_uri = CASE WHEN callee = $1 THEN regexp_replace(to_uri,
                    '^((sips?|tel):)[^@;>]*', '\\1' || $2) ELSE to_uri END,
                request_uri = CASE WHEN callee = $1 THEN regexp_replace(request_uri,
                    '^((sips?|tel):)[^@;>]*', '\\1' || $2) ELSE request_uri END
            WHERE (caller = $1 OR callee = $1) AND start_time < $3
              AND NOT (call_id = ANY($4::text[]))
            """,
            number,
            alias,
            statutory_since,
            held_calls,
        )
        report.done["cdrs"] = _affected(status)
        inside = await conn.fetchval(
            "SELECT count(*) FROM cdrs WHERE (caller = $1 OR callee = $1) AND start_time >= $2",
            number,
            statutory_since,
        )
        if inside:
            report.reasons.append(
                f"{inside} CDRs inside the statutory retention of {statutory_cdr_days} days"
            )
        report.refused["cdrs"] = await conn.fetchval(
            "SELECT count(*) FROM cdrs WHERE caller = $1 OR callee = $1", number
        )
        # Alerts about the number: subject and quoted mentions replaced.
        status = await conn.execute(
            "UPDATE fraud_alerts SET subject = $2, "
            "details = replace(details::text, $1, $2)::jsonb WHERE subject = $1",
            number,
            alias,
        )
        report.done["fraud_alerts"] = _affected(status)
        report.refused["fraud_alerts"] = 0
        report.refused["held_rows"] = held_rows
        await audit.append(conn, operator, audit.ACTION_ERASE, number, report.details(key))
    return report


def _bind(table: str, number: str) -> tuple[str, tuple[str, ...]]:
    return matching.bind(table, "number", number)


async def _count(conn: asyncpg.Connection, table: str, number: str) -> int:
    clause, values = _bind(table, number)
    return int(await conn.fetchval(f"SELECT count(*) FROM {table} WHERE {clause}", *values))


def _affected(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])


# After a lift: whether a message still belongs to another restricted number, by the
# rules of `matching` (a call of that number, or a header naming it).
_SIGNALING_STILL: Final = (
    "(call_id IN (SELECT c.call_id FROM cdrs c JOIN restrictions r "
    "ON r.number IN (c.caller, c.callee) "
    "UNION SELECT c.call_id FROM cdrs_held c JOIN restrictions r "
    "ON r.number IN (c.caller, c.callee)) "
    f"OR EXISTS (SELECT 1 FROM restrictions r WHERE {naming.sql_names('r.number')}))"
)
# A CDR the sinks flag: caller or callee, or a URI naming the number (`naming`).
_CDR_NAMES: Final = naming.sql_cdr_names("$1")
_CDR_STILL: Final = (
    f"EXISTS (SELECT 1 FROM restrictions r WHERE {naming.sql_cdr_names('r.number')})"
)
# An alert about the number, or whose details name it (`naming`, as the sinks flag).
_ALERT_NAMES: Final = "(subject = $1 OR details::text ~ $2)"
_ALERT_STILL: Final = (
    "EXISTS (SELECT 1 FROM restrictions r WHERE r.number = subject "
    f"OR {naming.sql_names('r.number', 'details::text')})"
)


async def restrict(
    conn: asyncpg.Connection, number: str, operator: str, *, lift: bool = False
) -> dict[str, int]:
    """Flag (or unflag) the number's rows, live and held, and record the restriction
    the daemon reads. The counts are per table, its held rows included."""
    async with conn.transaction():
        if lift:
            await conn.execute("DELETE FROM restrictions WHERE number = $1", number)
        else:
            await conn.execute(
                "INSERT INTO restrictions (number, operator) VALUES ($1, $2) "
                "ON CONFLICT (number) DO NOTHING",
                number,
                operator,
            )
        # Held rows are the same records kept past their retention (an export returns
        # them): they carry the flag as the live ones do.
        flags = {
            "cdrs": _CDR_STILL if lift else "true",
            "sip_messages": _SIGNALING_STILL if lift else "true",
            "fraud_alerts": _ALERT_STILL if lift else "true",
        }
        clauses = {
            "cdrs": (_CDR_NAMES, (number,)),
            "sip_messages": _bind("sip_messages", number),
            "fraud_alerts": (_ALERT_NAMES, (number, matching.header_pattern(number))),
        }
        counts = {}
        for table in KINDS:
            clause, values = clauses[table]
            counts[table] = 0
            for target in (table, f"{table}_held"):
                counts[table] += _affected(
                    await conn.execute(
                        f"UPDATE {target} SET restricted = {flags[table]} WHERE {clause}", *values
                    )
                )
        action = audit.ACTION_UNRESTRICT if lift else audit.ACTION_RESTRICT
        await audit.append(conn, operator, action, number, {"rows": counts})
    return counts


async def restricted_numbers(conn: asyncpg.Connection) -> frozenset[str]:
    return frozenset(row[0] for row in await conn.fetch("SELECT number FROM restrictions"))
