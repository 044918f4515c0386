"""Records that cross module boundaries. Immutable; cheap to build on the hot path."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Any, Final, NamedTuple, overload

from sipcdr.slotinit import with_slot_init

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


# The metric label of calls whose source matched no configured trunk, in the KPIs and
# the rating counts alike.
UNKNOWN_TRUNK: Final = "unknown"


class Trunk(NamedTuple):
    """A `[[trunks]]` entry: names the sources of a carrier or account."""

    name: str
    country_code: str | None  # for numbers dialled without an international prefix
    national_prefix: str | None
    rate_plan: str | None  # what this trunk's customer pays
    cost_plan: str | None = None  # what this trunk charges when calls leave through it
    strip_prefixes: tuple[str, ...] = ()  # technical prefixes removed before numbering


CDR_SCHEMA_VERSION = 1
# The CDR's money fields: Decimal in the record, a plain decimal string on the wire.
CDR_MONEY_FIELDS = ("rate_per_minute", "cost", "vendor_cost", "margin")
# Fields added to CDR v1 after it was published, last on the wire: optional in the
# schema, so records written before them stay valid; sipcdr always writes them.
CDR_ADDED_FIELDS = ("egress_trunk", "vendor_cost", "margin", "callee_valid")


def money_text(value: Decimal | None) -> str | None:
    """Exact and without an exponent: `Decimal("1E-7")` is "0.0000001"."""
    return None if value is None else format(value, "f")


def money(value: object) -> Decimal | None:
    """A money field read back from its wire form (decimal string) or kept as Decimal."""
    if value is None or isinstance(value, Decimal):
        return value
    if isinstance(value, str):
        return Decimal(value)
    raise TypeError(f"money must be a decimal string, not {type(value).__name__}")


@with_slot_init  # the record of every closed call: set by slot (`sipcdr.slotinit`)
@dataclass(frozen=True, slots=True)
class Cdr:
    """One closed call, CDR record version 1 (field meanings in DESIGN's contract).

    Times are float seconds since the epoch; `to_record` renders the wire form. Money
    (`CDR_MONEY_FIELDS`) is an exact Decimal here and a decimal string on the wire,
    never a float. Rating fields stay at their unrated defaults until the rating stage
    replaces them.

    `egress_trunk` is the trunk the call left through: the enrich stage matches it
    from the destination of the last INVITE leg seen (`egress_ip`). `vendor_cost` is
    that trunk's price of the call (its `cost_plan`), `margin` is `cost - vendor_cost`;
    each None when not known. `callee_valid` is None until the rating stage has read
    the callee.
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
    rate_per_minute: Decimal | None = None
    billed_seconds: int | None = None
    cost: Decimal | None = None
    currency: str | None = None
    fraud_flags: tuple[str, ...] = ()
    egress_trunk: str | None = None
    vendor_cost: Decimal | None = None
    margin: Decimal | None = None
    callee_valid: bool | None = None
    # Where the call left (the last INVITE leg's destination) until the enrich stage
    # has matched `egress_trunk` from it; None on an enriched CDR, never in the record.
    egress_ip: str | None = None

    @property
    def duration(self) -> float:
        return round(self.end_time - self.start_time, 3)

    @property
    def billsec(self) -> float:
        if self.answer_time is None:
            return 0.0
        return round(max(0.0, self.end_time - self.answer_time), 3)

    def to_record(self) -> dict[str, object]:
        """The JSON object of CDR v1, identical on Kafka, in PostgreSQL and in JSONL.
        `duration`, `billsec`, `rfc3339` and `money_text` written out: ~0.9x the time."""
        start, ring, answer, end = self.start_time, self.ring_time, self.answer_time, self.end_time
        if answer is None:
            billsec = 0.0
        else:
            talked = end - answer
            billsec = round(talked if talked > 0.0 else 0.0, 3)  # max(0.0, talked)
        times = _seconds
        fmt = format
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
            "start_time": _time_text(times, start),
            "ring_time": None if ring is None else _time_text(times, ring),
            "answer_time": None if answer is None else _time_text(times, answer),
            "end_time": _time_text(times, end),
            "duration": round(end - start, 3),
            "billsec": billsec,
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
            "rate_per_minute": None if (rate := self.rate_per_minute) is None else fmt(rate, "f"),
            "billed_seconds": self.billed_seconds,
            "cost": None if (cost := self.cost) is None else fmt(cost, "f"),
            "currency": self.currency,
            "fraud_flags": list(self.fraud_flags),
            "capture_node": self.capture_node,
            "schema_version": CDR_SCHEMA_VERSION,
            "egress_trunk": self.egress_trunk,
            "vendor_cost": None if (vendor := self.vendor_cost) is None else fmt(vendor, "f"),
            "margin": None if (margin := self.margin) is None else fmt(margin, "f"),
            "callee_valid": self.callee_valid,
        }


def _cdr_replacer() -> Callable[..., Cdr]:
    """`dataclasses.replace` for `Cdr`, in straight-line code: each closed call is
    copied by every CDR stage that changes it, and the generic replace (a loop over
    the fields, a kwargs call of `__init__`) cost several times the stage's own work.
    Each slot is set by its descriptor. Unknown names raise TypeError, as replace does."""
    names = [f.name for f in fields(Cdr)]
    scope: dict[str, object] = {"_new": object.__new__, "_Cdr": Cdr, "_KEEP": object()}
    lines = ["def replace_cdr(cdr, /, *, " + ", ".join(f"{n}=_KEEP" for n in names) + "):"]
    lines.append("    new = _new(_Cdr)")
    for index, name in enumerate(names):
        scope[f"_set{index}"] = getattr(Cdr, name).__set__
        lines.append(f"    _set{index}(new, cdr.{name} if {name} is _KEEP else {name})")
    lines.append("    return new")
    exec("\n".join(lines), scope)  # our own field names only, as dataclasses does
    return scope["replace_cdr"]  # type: ignore[return-value]


# `replace_cdr(cdr, caller=..., ...)`: a copy of `cdr` with the named fields changed.
replace_cdr: Final[Callable[..., Cdr]] = _cdr_replacer()


def cdr_copier(*changed: str) -> Callable[..., Cdr]:
    """`copy(cdr, value, ...)`: `cdr` with the fields `changed` set to the values given,
    by position: no keyword matching, no test per field of whether it was given (most
    of what `replace_cdr` costs). Unknown or repeated names raise ValueError."""
    names = [f.name for f in fields(Cdr)]
    unknown = set(changed) - set(names)
    if unknown or len(set(changed)) != len(changed):
        raise ValueError(f"not Cdr fields, or repeated: {sorted(unknown) or list(changed)}")
    scope: dict[str, object] = {"_new": object.__new__, "_Cdr": Cdr}
    lines = ["def copy(cdr, " + "".join(f"{n}, " for n in changed) + "/):", "    new = _new(_Cdr)"]
    for index, name in enumerate(names):
        scope[f"_set{index}"] = getattr(Cdr, name).__set__
        lines.append(f"    _set{index}(new, {name if name in changed else 'cdr.' + name})")
    lines.append("    return new")
    exec("\n".join(lines), scope)  # our own field names only, as above
    return scope["copy"]  # type: ignore[return-value]


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


SIP_EVENT_SCHEMA_VERSION = 1
# The fields of SipEvent a correlator reads, added to sip_message v1 after it was
# published: a record written before them is refused by `SipEvent.from_record`.
SIP_EVENT_CORRELATION_FIELDS = (
    "captured_ts",
    "request_uri",
    "reason_phrase",
    "from_uri",
    "from_tag",
    "to_uri",
    "to_tag",
    "via_branch",
    "user_agent",
    "p_asserted_identity",
    "reason_header",
)


class SipEvent(NamedTuple):
    """One captured SIP message as the `sipcdr.sip` topic carries it (sip_message
    record version 1, schemas/sip_message.v1.schema.json): where and when it was seen,
    the start line and headers as captured, and the parsed fields the dialog
    correlator reads, so a correlator elsewhere rebuilds the same calls from the topic
    (`sipcdr.sipevent.replay`) without a SIP parser.

    Requests have `method` and `request_uri`, responses `status_code` and
    `reason_phrase`; the others are None. `captured_ts` is the exact capture time,
    `captured_at` on the wire is it to the microsecond. A tuple, as `Packet`: the
    recorder makes one per parsed message.
    """

    message_id: str
    captured_ts: float
    call_id: str
    method: str | None
    status_code: int | None
    cseq_method: str
    cseq: int | None
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    transport: str
    capture_node: str
    headers: str
    body: str | None
    request_uri: str | None
    reason_phrase: str | None
    from_uri: str
    from_tag: str | None
    to_uri: str
    to_tag: str | None
    via_branch: str | None
    user_agent: str | None
    p_asserted_identity: str | None  # the header's value as captured
    reason_header: str | None  # the Reason header's value as captured

    def to_record(self) -> dict[str, object]:
        """The JSON object of sip_message v1, on Kafka and (its v1 core) in PostgreSQL."""
        return {
            "message_id": self.message_id,
            "captured_at": rfc3339(self.captured_ts),
            "call_id": self.call_id,
            "method": self.method,
            "status_code": self.status_code,
            "cseq_method": self.cseq_method,
            "cseq": self.cseq,
            "src_ip": self.src_ip,
            "src_port": self.src_port,
            "dst_ip": self.dst_ip,
            "dst_port": self.dst_port,
            "transport": self.transport,
            "capture_node": self.capture_node,
            "headers": self.headers,
            "body": self.body,
            "schema_version": SIP_EVENT_SCHEMA_VERSION,
            "captured_ts": self.captured_ts,
            "request_uri": self.request_uri,
            "reason_phrase": self.reason_phrase,
            "from_uri": self.from_uri,
            "from_tag": self.from_tag,
            "to_uri": self.to_uri,
            "to_tag": self.to_tag,
            "via_branch": self.via_branch,
            "user_agent": self.user_agent,
            "p_asserted_identity": self.p_asserted_identity,
            "reason_header": self.reason_header,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> SipEvent:
        """The event of a decoded topic record. `ValueError` when it is not a
        sip_message v1 record with the correlation fields and their types."""
        if record.get("schema_version") != SIP_EVENT_SCHEMA_VERSION:
            raise ValueError(f"not a sip_message v{SIP_EVENT_SCHEMA_VERSION} record")
        missing = [name for name in SIP_EVENT_CORRELATION_FIELDS if name not in record]
        if missing:
            raise ValueError(f"sip_message record without {', '.join(missing)}")
        values: dict[str, Any] = {}
        for name, kinds in _SIP_EVENT_TYPES.items():
            if name not in record:
                raise ValueError(f"sip_message record without {name}")
            value = record[name]
            if name == "captured_ts" and type(value) is int:
                value = float(value)  # a whole second may be written without a point
            if not isinstance(value, kinds) or type(value) is bool:
                raise ValueError(f"sip_message {name}: unexpected {type(value).__name__}")
            values[name] = value
        if (values["method"] is None) == (values["status_code"] is None):
            raise ValueError("sip_message: exactly one of method and status_code is set")
        return cls(**values)


_STR = (str,)
_OPT_STR = (str, type(None))
_OPT_INT = (int, type(None))
# Every SipEvent field in declaration order, with the JSON types it may have.
_SIP_EVENT_TYPES: dict[str, tuple[type, ...]] = {
    "message_id": _STR,
    "captured_ts": (float,),
    "call_id": _STR,
    "method": _OPT_STR,
    "status_code": _OPT_INT,
    "cseq_method": _STR,
    "cseq": _OPT_INT,
    "src_ip": _STR,
    "src_port": (int,),
    "dst_ip": _STR,
    "dst_port": (int,),
    "transport": _STR,
    "capture_node": _STR,
    "headers": _STR,
    "body": _OPT_STR,
    "request_uri": _OPT_STR,
    "reason_phrase": _OPT_STR,
    "from_uri": _STR,
    "from_tag": _OPT_STR,
    "to_uri": _STR,
    "to_tag": _OPT_STR,
    "via_branch": _OPT_STR,
    "user_agent": _OPT_STR,
    "p_asserted_identity": _OPT_STR,
    "reason_header": _OPT_STR,
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

    Four of these per CDR, each in a second of its own (start, ring, answer, end), so
    a one-second cache missed on nearly every call; under load many calls share each
    second, so each second's text is remembered, up to a bound.
    """
    if timestamp is None:
        return None
    return _time_text(_seconds, timestamp)


def _time_text(seconds: dict[int, str], timestamp: float) -> str:
    """`rfc3339` of a time that is there, with its cache of seconds' text handed in."""
    second, fraction = divmod(round(timestamp * 1_000_000), 1_000_000)
    text = seconds.get(second)
    if text is None:
        if len(seconds) >= _SECONDS_KEPT:
            seconds.clear()
        text = seconds[second] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return "%s.%06dZ" % (text, fraction)  # noqa: UP031 - a fifth faster than the f-string


# A little over an hour of seconds (the span of a long call's four times): a few
# hundred KiB at most, cleared rather than grown.
_SECONDS_KEPT: Final = 4096
_seconds: dict[int, str] = {}


# Record name (schemas/<name>.v<version>.schema.json) -> the version sipcdr writes.
SCHEMA_VERSIONS: Final[Mapping[str, int]] = {
    "cdr": CDR_SCHEMA_VERSION,
    "fraud_alert": FRAUD_ALERT_SCHEMA_VERSION,
    "sip_message": SIP_EVENT_SCHEMA_VERSION,
}

# The fields of each record as `to_record` writes them, in that order (the properties of
# schemas/<name>.v1.schema.json): the columns of an export that reads records, not tables.
RECORD_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "cdr": tuple(
        "cdr_id call_id caller callee from_uri to_uri request_uri src_ip src_port "
        "dst_ip dst_port trunk start_time ring_time answer_time end_time duration "
        "billsec pdd_ms disposition sip_code sip_reason q850_cause hangup_by end_reason "
        "user_agent rated rate_prefix rate_name rate_per_minute billed_seconds cost "
        "currency fraud_flags capture_node schema_version egress_trunk vendor_cost margin "
        "callee_valid".split()
    ),
    "sip_message": tuple(
        "message_id captured_at call_id method status_code cseq_method cseq src_ip "
        "src_port dst_ip dst_port transport capture_node headers body schema_version "
        "captured_ts request_uri reason_phrase from_uri from_tag to_uri to_tag "
        "via_branch user_agent p_asserted_identity reason_header".split()
    ),
    "fraud_alert": tuple(
        "alert_id raised_at detector subject severity window_s count threshold cdr_ids "
        "details schema_version subject_kind observed threshold_value first_seen "
        "last_seen call_ids revision".split()
    ),
}


# -- Personal data ---------------------------------------------------------------------
# What each record and table field holds that identifies a person, for export and
# erasure: a subject's rows are found by these fields, and erasure blanks them.
PHONE_NUMBER: Final = "phone_number"  # a dialled or calling number, E.164 or as dialled
IP_ADDRESS: Final = "ip_address"
SIP_URI: Final = "sip_uri"  # user part is often a number or a name
HEADER_TEXT: Final = "header_text"  # SIP header or body text: numbers, names, addresses
SUBJECT: Final = "subject"  # a number, an address or an account, by the row's kind
OPERATOR: Final = "operator"  # the staff account that acted (holds, audit log)
FREE_TEXT: Final = "free_text"  # written by an operator, may name anyone
PERSONAL_KINDS: Final = frozenset(
    {PHONE_NUMBER, IP_ADDRESS, SIP_URI, HEADER_TEXT, SUBJECT, OPERATOR, FREE_TEXT}
)

# The sip_message fields the sip_messages table keeps (the rest are on Kafka only).
_SIP_MESSAGES_COLUMNS: Final = frozenset(
    "message_id captured_at call_id method status_code cseq_method cseq src_ip src_port "
    "dst_ip dst_port transport capture_node headers body schema_version".split()
)
_CDR_PERSONAL: Final = {
    "call_id": HEADER_TEXT,  # often host@address of the caller's device
    "caller": PHONE_NUMBER,
    "callee": PHONE_NUMBER,
    "from_uri": SIP_URI,
    "to_uri": SIP_URI,
    "request_uri": SIP_URI,
    "src_ip": IP_ADDRESS,
    "dst_ip": IP_ADDRESS,
    "user_agent": HEADER_TEXT,  # device and version, sometimes an account name
}
_SIP_PERSONAL: Final = {
    "call_id": HEADER_TEXT,
    "src_ip": IP_ADDRESS,
    "dst_ip": IP_ADDRESS,
    "headers": HEADER_TEXT,
    "body": HEADER_TEXT,  # SDP: media addresses
    "request_uri": SIP_URI,
    "from_uri": SIP_URI,
    "to_uri": SIP_URI,
    "user_agent": HEADER_TEXT,
    "p_asserted_identity": HEADER_TEXT,
    "reason_header": HEADER_TEXT,
}
_ALERT_PERSONAL: Final = {
    "subject": SUBJECT,  # subject_kind says which: source_ip, caller, trunk or prefix
    "call_ids": HEADER_TEXT,
    "details": SUBJECT,  # the prefixes or sources that counted
}

# Per record (the names of schemas/*.schema.json) and per PostgreSQL table.
PERSONAL_FIELDS: Final[Mapping[str, Mapping[str, str]]] = {
    # `egress_ip` is no record field: it lives in the dialog state files only, between
    # the correlator and the enrich stage.
    "cdr": {**_CDR_PERSONAL, "egress_ip": IP_ADDRESS},
    "sip_message": _SIP_PERSONAL,
    "fraud_alert": _ALERT_PERSONAL,
}
_SIP_COLUMNS: Final = {
    name: kind for name, kind in _SIP_PERSONAL.items() if name in _SIP_MESSAGES_COLUMNS
}
_ALERT_COLUMNS: Final = {"subject": SUBJECT, "details": SUBJECT, "call_ids": HEADER_TEXT}
PERSONAL_COLUMNS: Final[Mapping[str, Mapping[str, str]]] = {
    "cdrs": _CDR_PERSONAL,
    "sip_messages": _SIP_COLUMNS,
    "fraud_alerts": _ALERT_COLUMNS,
    # Rows a legal hold keeps past their partition: the same columns, and a hold_id.
    "cdrs_held": _CDR_PERSONAL,
    "sip_messages_held": _SIP_COLUMNS,
    "fraud_alerts_held": _ALERT_COLUMNS,
    "holds": {
        "subject": SUBJECT,
        "reason": FREE_TEXT,
        "created_by": OPERATOR,
        "released_by": OPERATOR,
    },
    "restrictions": {"number": PHONE_NUMBER, "operator": OPERATOR},
    "audit_log": {"subject": SUBJECT, "details": SUBJECT, "actor": OPERATOR},
}
