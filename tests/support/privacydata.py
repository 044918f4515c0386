"""Records with chosen times, numbers and trunks, written through the real PostgreSQL
sink, for the retention, hold and subject-rights tests."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from sipcdr.model import Cdr
from sipcdr.sinks.base import (
    KIND_ALERT,
    KIND_CDR,
    KIND_SIP,
    STREAM_RECORDS,
    STREAM_SIGNALING,
    SpoolRecord,
)
from sipcdr.sinks.postgres import PostgresSink

# 2026-12-04 12:00 UTC: the "now" retention is judged at.
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
_NAMESPACE = uuid.UUID("0b6f8a52-7f1d-4f57-9a3c-5d1f0e2a9b11")


def cdr(
    n: int,
    at: datetime,
    *,
    caller: str = "4940111222",
    callee: str = "4930333444",
    trunk: str | None = "carrier-a",
    call_id: str | None = None,
) -> Cdr:
    start = at.timestamp()
    return Cdr(
        cdr_id=str(uuid.uuid5(_NAMESPACE, f"cdr-{n}-{start}")),
        call_id=call_id or f"call-{n}@192.0.2.10",
        caller=caller,
        callee=callee,
        from_uri=f"sip:+{caller}@example.com",
        to_uri=f"sip:+{callee}@example.net",
        request_uri=f"sip:+{callee}@example.net;user=phone",
        src_ip="192.0.2.10",
        src_port=5060,
        dst_ip="198.51.100.20",
        dst_port=5060,
        trunk=trunk,
        start_time=start,
        ring_time=start + 0.5,
        answer_time=start + 2.0,
        end_time=start + 62.0,
        pdd_ms=500,
        disposition="answered",
        sip_code=200,
        sip_reason="OK",
        q850_cause=16,
        hangup_by="caller",
        end_reason="bye",
        user_agent="TestUA/1.0",
        capture_node="node-1",
        rated=True,
        rate_prefix="4930",
        rate_name="Germany Berlin",
        rate_per_minute=Decimal("0.0100"),
        billed_seconds=60,
        cost=Decimal("0.010000"),
        currency="EUR",
    )


def sip_message(
    at: datetime,
    call_id: str,
    *,
    caller: str = "4940111222",
    callee: str = "4930333444",
    asserted: str | None = None,
) -> dict[str, Any]:
    return {
        "message_id": str(uuid.uuid4()),
        "captured_at": at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "call_id": call_id,
        "method": "INVITE",
        "status_code": None,
        "cseq_method": "INVITE",
        "cseq": 1,
        "src_ip": "192.0.2.10",
        "src_port": 5060,
        "dst_ip": "198.51.100.20",
        "dst_port": 5060,
        "transport": "udp",
        "capture_node": "node-1",
        "headers": (
            f"INVITE sip:+{callee}@example.net SIP/2.0\r\n"
            f"From: <sip:+{caller}@example.com>;tag=1\r\nTo: <sip:+{callee}@example.net>\r\n"
            f"Call-ID: {call_id}\r\n"
            + ("" if asserted is None else f'P-Asserted-Identity: "A" <tel:+{asserted}>\r\n')
        ),
        "schema_version": 1,
        "request_uri": f"sip:+{callee}@example.net",
        "from_uri": f"sip:+{caller}@example.com",
        "to_uri": f"sip:+{callee}@example.net",
        "p_asserted_identity": None if asserted is None else f'"A" <tel:+{asserted}>',
    }


def alert(at: datetime, subject: str, cdr_ids: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "alert_id": str(uuid.uuid4()),
        "raised_at": at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "detector": "cps_burst",
        "subject": subject,
        "severity": "warning",
        "window_s": 60,
        "count": 50,
        "threshold": 40,
        "cdr_ids": list(cdr_ids),
        "details": {"subject_kind": "caller"},
        "schema_version": 1,
    }


async def write(
    dsn: str,
    cdrs: Sequence[Cdr] = (),
    messages: Sequence[Mapping[str, Any]] = (),
    alerts: Sequence[Mapping[str, Any]] = (),
    *,
    retention_classes: Mapping[str, int] | None = None,
) -> None:
    """Deliver through the sink, as the daemon does."""
    records = [
        SpoolRecord(seq, KIND_CDR, item.call_id.encode(), orjson.dumps(item.to_record()))
        for seq, item in enumerate(cdrs, 1)
    ]
    records += [
        SpoolRecord(seq, KIND_ALERT, b"", orjson.dumps(dict(item)))
        for seq, item in enumerate(alerts, len(records) + 1)
    ]
    signaling = [
        SpoolRecord(seq, KIND_SIP, str(item["call_id"]).encode(), orjson.dumps(dict(item)))
        for seq, item in enumerate(messages, 1)
    ]
    async with PostgresSink(dsn, retention_classes=retention_classes) as sink:
        if records:
            await sink.deliver(STREAM_RECORDS, records)
        if signaling:
            await sink.deliver(STREAM_SIGNALING, signaling)
