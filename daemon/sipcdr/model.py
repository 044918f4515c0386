"""Records that cross module boundaries. Immutable; cheap to build on the hot path."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NamedTuple, overload

TRANSPORT_UDP = "udp"
TRANSPORT_TCP = "tcp"
TRANSPORT_SCTP = "sctp"
TRANSPORT_TLS = "tls"
TRANSPORT_WS = "ws"


class Packet(NamedTuple):
    """One SIP message as captured, before parsing.

    The endpoints are those of the original signaling: the datagram's for plain SIP,
    HEP's chunks for HEP. `capture_node` names where it was seen (HEP capture id,
    listener name or capture file) and ends up in the CDR.
    """

    timestamp: float
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    transport: str
    payload: bytes
    capture_node: str


class Trunk(NamedTuple):
    """A `[[trunks]]` entry: names the sources of a carrier or account."""

    name: str
    country_code: str | None  # for numbers dialled without an international prefix
    national_prefix: str | None
    rate_plan: str | None


CDR_SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class Cdr:
    """One closed call, CDR record version 1 (field meanings in DESIGN's contract).

    Times are float seconds since the epoch; `to_record` renders the wire form.
    Rating fields stay at their unrated defaults until the rating stage replaces them.
    """

    cdr_id: str
    call_id: str
    caller: str | None
    callee: str | None
    from_uri: str
    to_uri: str
    request_uri: str
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    trunk: str | None
    start_time: float
    ring_time: float | None
    answer_time: float | None
    end_time: float
    pdd_ms: int | None
    disposition: str
    sip_code: int | None
    sip_reason: str | None
    q850_cause: int | None
    hangup_by: str | None
    end_reason: str
    user_agent: str | None
    capture_node: str
    rated: bool = False
    rate_prefix: str | None = None
    rate_name: str | None = None
    rate_per_minute: str | None = None
    billed_seconds: int | None = None
    cost: str | None = None
    currency: str | None = None
    fraud_flags: tuple[str, ...] = ()

    @property
    def duration(self) -> float:
        return round(self.end_time - self.start_time, 3)

    @property
    def billsec(self) -> float:
        if self.answer_time is None:
            return 0.0
        return round(max(0.0, self.end_time - self.answer_time), 3)

    def to_record(self) -> dict[str, object]:
        """The JSON object of CDR v1, identical on Kafka, in PostgreSQL and in JSONL."""
        return {
            "cdr_id": self.cdr_id,
            "call_id": self.call_id,
            "caller": self.caller,
            "callee": self.callee,
            "from_uri": self.from_uri,
            "to_uri": self.to_uri,
            "request_uri": self.request_uri,
            "src_ip": self.src_ip,
            "src_port": self.src_port,
            "dst_ip": self.dst_ip,
            "dst_port": self.dst_port,
            "trunk": self.trunk,
            "start_time": rfc3339(self.start_time),
            "ring_time": rfc3339(self.ring_time),
            "answer_time": rfc3339(self.answer_time),
            "end_time": rfc3339(self.end_time),
            "duration": self.duration,
            "billsec": self.billsec,
            "pdd_ms": self.pdd_ms,
            "disposition": self.disposition,
            "sip_code": self.sip_code,
            "sip_reason": self.sip_reason,
            "q850_cause": self.q850_cause,
            "hangup_by": self.hangup_by,
            "end_reason": self.end_reason,
            "user_agent": self.user_agent,
            "rated": self.rated,
            "rate_prefix": self.rate_prefix,
            "rate_name": self.rate_name,
            "rate_per_minute": self.rate_per_minute,
            "billed_seconds": self.billed_seconds,
            "cost": self.cost,
            "currency": self.currency,
            "fraud_flags": list(self.fraud_flags),
            "capture_node": self.capture_node,
            "schema_version": CDR_SCHEMA_VERSION,
        }


FRAUD_ALERT_SCHEMA_VERSION = 1
# Namespace of alert ids, fixed forever: the same incident must keep its id across
# updates, re-deliveries and versions, since consumers deduplicate on it.
ALERT_ID_NAMESPACE = uuid.UUID("0c6f6f1e-3d8a-4b57-a0a4-7f2e9c1b5d43")


@dataclass(frozen=True, slots=True)
class FraudAlert:
    """One incident of one detector on one subject (fraud alert record version 1).

    An incident is one alert: while it lasts, each update is a new record with the same
    `alert_id` (UUID v5 of detector, subject and when it was raised) and a higher
    `revision`, so a consumer keeps the last revision and a re-delivered record
    deduplicates. `observed` and `threshold` are counts, or money for spend_velocity.
    """

    alert_id: str
    detector: str
    subject: str
    subject_kind: str  # source_ip, trunk, caller or prefix
    severity: str  # warning or critical
    window_s: int
    observed: int | Decimal
    threshold: int | Decimal
    raised_at: float  # when the threshold was first crossed
    first_seen: float  # the earliest activity of the subject that counted
    last_seen: float  # the latest activity that kept it over the threshold
    call_ids: tuple[str, ...] = ()  # Call-IDs of a few of the calls or requests involved
    cdr_ids: tuple[str, ...] = ()  # cdr_id of a few of the closed calls involved
    details: Mapping[str, object] = field(default_factory=dict)
    revision: int = 0

    def to_record(self) -> dict[str, object]:
        """The JSON object of fraud alert v1 (schemas/fraud_alert.v1.schema.json),
        identical on Kafka, in PostgreSQL and in JSONL."""
        return {
            "alert_id": self.alert_id,
            "raised_at": rfc3339(self.raised_at),
            "detector": self.detector,
            "subject": self.subject,
            "severity": self.severity,
            "window_s": self.window_s,
            "count": int(self.observed),  # whole units; `observed` is exact
            "threshold": _ceil(self.threshold),
            "cdr_ids": list(self.cdr_ids),
            "details": dict(self.details),
            "schema_version": FRAUD_ALERT_SCHEMA_VERSION,
            "subject_kind": self.subject_kind,
            "observed": _plain(self.observed),
            "threshold_value": _plain(self.threshold),
            "first_seen": rfc3339(self.first_seen),
            "last_seen": rfc3339(self.last_seen),
            "call_ids": list(self.call_ids),
            "revision": self.revision,
        }


def alert_id(detector: str, subject_kind: str, subject: str, raised_at: float) -> str:
    """UUID v5 of what the incident is and when it began: stable across its updates
    and across re-deliveries."""
    name = f"{detector}\n{subject_kind}\n{subject}\n{rfc3339(raised_at)}"
    return str(uuid.uuid5(ALERT_ID_NAMESPACE, name))


def _plain(value: int | Decimal) -> str:
    return format(value, "f") if isinstance(value, Decimal) else str(value)


def _ceil(value: int | Decimal) -> int:
    whole = int(value)
    return whole if whole == value else whole + 1


@overload
def rfc3339(timestamp: float) -> str: ...
@overload
def rfc3339(timestamp: None) -> None: ...
def rfc3339(timestamp: float | None) -> str | None:
    """RFC 3339 UTC with microseconds: `2026-11-23T14:40:45.123456Z`.

    Four of these per CDR: the formatted second is reused while it does not change.
    """
    if timestamp is None:
        return None
    micros = round(timestamp * 1_000_000)
    second, fraction = divmod(micros, 1_000_000)
    if second != _last_second[0]:
        _last_second[0] = second
        _last_second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_last_second[1]}.{fraction:06d}Z"


_last_second: list[Any] = [None, ""]
