"""Records that cross module boundaries. Immutable; cheap to build on the hot path."""

from __future__ import annotations

import time
from dataclasses import dataclass
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
