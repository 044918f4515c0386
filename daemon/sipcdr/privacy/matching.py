"""Which rows of each table belong to a subject: the WHERE clauses holds, exports and
erasure share, so "what a hold keeps" and "what an export returns" cannot drift apart.

Each clause takes `$1` (the subject) and `$2` (for numbers: the pattern of the number
in a header section); the table (or partition) it filters is the query's own. CDRs and
alerts name numbers in columns; a signaling message belongs to a number when its
Call-ID is one of that number's calls, or when its headers name the number
(`sipcdr.privacy.naming`, the rule the Kafka filter and the PostgreSQL sink apply too).
"""

from __future__ import annotations

from typing import Final

from sipcdr.privacy.naming import header_pattern
from sipcdr.privacy.plan import HOLD_KINDS

__all__ = ["bind", "header_pattern", "normalize_number", "where"]

_CALLS_OF_NUMBER: Final = (
    "SELECT call_id FROM cdrs WHERE caller = $1 OR callee = $1 "
    "UNION SELECT call_id FROM cdrs_held WHERE caller = $1 OR callee = $1"
)
_CALLS_OF_TRUNK: Final = (
    "SELECT call_id FROM cdrs WHERE trunk = $1 UNION SELECT call_id FROM cdrs_held WHERE trunk = $1"
)
_CDR_IDS_OF_NUMBER: Final = (
    "ARRAY(SELECT cdr_id FROM cdrs WHERE caller = $1 OR callee = $1 "
    "UNION SELECT cdr_id FROM cdrs_held WHERE caller = $1 OR callee = $1)"
)
_CDR_IDS_OF_CALL: Final = (
    "ARRAY(SELECT cdr_id FROM cdrs WHERE call_id = $1 "
    "UNION SELECT cdr_id FROM cdrs_held WHERE call_id = $1)"
)

_CLAUSES: Final = {
    ("cdrs", "number"): "(caller = $1 OR callee = $1)",
    ("cdrs", "trunk"): "(trunk = $1)",
    ("cdrs", "call_id"): "(call_id = $1)",
    ("sip_messages", "number"): f"(call_id IN ({_CALLS_OF_NUMBER}) OR headers ~ $2)",
    ("sip_messages", "trunk"): f"(call_id IN ({_CALLS_OF_TRUNK}))",
    ("sip_messages", "call_id"): "(call_id = $1)",
    ("fraud_alerts", "number"): f"(subject = $1 OR cdr_ids && {_CDR_IDS_OF_NUMBER})",
    ("fraud_alerts", "trunk"): "(subject = $1)",
    ("fraud_alerts", "call_id"): f"(cdr_ids && {_CDR_IDS_OF_CALL})",
}


def where(table: str, kind: str) -> str:
    """The clause selecting the rows of `table` (or one of its partitions or its held
    table) that belong to a subject of `kind`."""
    base = table.removesuffix("_held")
    if kind not in HOLD_KINDS or (base, kind) not in _CLAUSES:
        raise ValueError(f"no rule for {kind} in {table}")
    return _CLAUSES[(base, kind)]


def bind(table: str, kind: str, subject: str) -> tuple[str, tuple[str, ...]]:
    """`where(table, kind)` and the values of its parameters."""
    clause = where(table, kind)
    if "$2" in clause:
        return clause, (subject, header_pattern(subject))
    return clause, (subject,)


def normalize_number(text: str) -> str:
    """An operator's `+49 30 1234-567` as stored: E.164 digits without `+`."""
    digits = "".join(ch for ch in text if ch not in " -.()/")
    digits = digits.removeprefix("+")
    # ASCII only: the naming rule (privacy.naming) matches [0-9], as signaling writes them.
    if (
        not (digits.isascii() and digits.isdigit())
        or not 7 <= len(digits) <= 15
        or digits.startswith("0")
    ):
        raise ValueError(
            f"{text!r} is not an E.164 number (7 to 15 digits, country code first, "
            "e.g. +4930123456)"
        )
    return digits
