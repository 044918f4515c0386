"""The personal-data fields of every record kind, and what export and erasure do with
each. Every field of the record schemas (schemas/*.v1.schema.json) is classified here;
`tests/unit/test_privacy_catalogue.py` fails when a field is added to a schema without
being classified, so a new field holding a number or an address cannot slip past
export and erasure.

This catalogue is local to the privacy package until the record model carries one of
its own; it is the one place to change then.
"""

from __future__ import annotations

from typing import Final

# What a field holds, and so what erasure does with it.
NUMBER: Final = "number"  # E.164 digits: replaced by the pseudonym
URI: Final = "uri"  # a SIP/tel URI whose user part is a number: user part replaced
ADDRESS: Final = "address"  # an IP address: kept (a network's, not the subject's)
SIGNALING: Final = "signaling"  # header text naming the parties: the row is deleted
SUBJECT: Final = "subject"  # an alert's subject: a number, a trunk, an address
FREE: Final = "free"  # JSON details that may quote a number: quoted numbers replaced
NONE: Final = "none"  # no personal data

# record schema file -> table -> field -> kind
FIELDS: Final[dict[str, dict[str, str]]] = {
    "cdrs": {
        "cdr_id": NONE,
        "call_id": NONE,  # random per call; names nobody
        "caller": NUMBER,
        "callee": NUMBER,
        "from_uri": URI,
        "to_uri": URI,
        "request_uri": URI,
        "src_ip": ADDRESS,
        "src_port": NONE,
        "dst_ip": ADDRESS,
        "dst_port": NONE,
        "trunk": NONE,
        "start_time": NONE,
        "ring_time": NONE,
        "answer_time": NONE,
        "end_time": NONE,
        "duration": NONE,
        "billsec": NONE,
        "pdd_ms": NONE,
        "disposition": NONE,
        "sip_code": NONE,
        "sip_reason": NONE,
        "q850_cause": NONE,
        "hangup_by": NONE,
        "end_reason": NONE,
        "user_agent": NONE,
        "rated": NONE,
        "rate_prefix": NONE,  # a destination prefix, shared by many numbers
        "rate_name": NONE,
        "rate_per_minute": NONE,
        "billed_seconds": NONE,
        "cost": NONE,
        "currency": NONE,
        "fraud_flags": NONE,
        "capture_node": NONE,
        "schema_version": NONE,
    },
    "sip_messages": {
        "message_id": NONE,
        "captured_at": NONE,
        "call_id": NONE,
        "method": NONE,
        "status_code": NONE,
        "cseq_method": NONE,
        "cseq": NONE,
        "src_ip": ADDRESS,
        "src_port": NONE,
        "dst_ip": ADDRESS,
        "dst_port": NONE,
        "transport": NONE,
        "capture_node": NONE,
        "headers": SIGNALING,
        "body": SIGNALING,
        "schema_version": NONE,
    },
    "fraud_alerts": {
        "alert_id": NONE,
        "raised_at": NONE,
        "detector": NONE,
        "subject": SUBJECT,
        "severity": NONE,
        "window_s": NONE,
        "count": NONE,
        "threshold": NONE,
        "cdr_ids": NONE,
        "details": FREE,
        "schema_version": NONE,
        # In the record (Kafka), not stored in PostgreSQL:
        "subject_kind": NONE,
        "observed": NONE,
        "threshold_value": NONE,
        "first_seen": NONE,
        "last_seen": NONE,
        "call_ids": NONE,  # random per call, like call_id
        "revision": NONE,
    },
}

SCHEMA_OF_TABLE: Final = {
    "cdrs": "cdr.v1.schema.json",
    "sip_messages": "sip_message.v1.schema.json",
    "fraud_alerts": "fraud_alert.v1.schema.json",
}


def fields_of(table: str, kind: str) -> tuple[str, ...]:
    return tuple(name for name, what in FIELDS[table].items() if what == kind)
