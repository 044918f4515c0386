"""How spool records become rows of PostgreSQL's tables: each table's columns in the
order of the migrations (storage/sql/), the conversion of each record field, the
partition key, and what a conflicting row does."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import orjson

from sipcdr.model import SIP_EVENT_SCHEMA_VERSION
from sipcdr.sinks.base import KIND_ALERT, KIND_CDR, KIND_SIP
from sipcdr.sip.parser import MAX_MESSAGE_BYTES, parse
from sipcdr.sipevent import (
    _BODY_KEPT,
    _DIGEST_BYTES,
    _DIGESTED,
    _FIRST_TIME,
    _LAST_TIME,
    _SPOOLED,
    SPOOLED_LAYOUT,
    _digest,
    _uuid_text,
    head_text,
    unspool,
)

Row = tuple[Any, ...]
Converter = Callable[[Any], Any]
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_SPOOLED_BYTES: Final = _SPOOLED.size
_unpack_spooled: Final = _SPOOLED.unpack_from


def _text(value: str | None) -> str | None:
    # PostgreSQL text cannot hold NUL; captured signaling can. Replaced by U+FFFD so that
    # one such message cannot stop its stream's delivery.
    if value is not None and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def _no_nul(value: str) -> str:
    return value.replace("\x00", "\ufffd")


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _decimal(value: str | None) -> Decimal | None:
    # Decimal strings stay decimal: a float would change cost and rate digits.
    return None if value is None else Decimal(value)


def _same(value: Any) -> Any:
    return value


def _texts(value: list[str]) -> list[str | None]:
    return [_text(item) for item in value]


def _texts_or_empty(value: list[str] | None) -> list[str | None]:
    return [] if value is None else _texts(value)


def _revision(value: int | None) -> int:
    return 0 if value is None else value  # a record from before revisions: the first


def _json(value: Any) -> str:
    text = orjson.dumps(value).decode()
    if "\\u0000" in text:  # jsonb refuses the NUL escape as well
        text = orjson.dumps(_strip_nul(value)).decode()
    return text


def _strip_nul(value: Any) -> Any:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, list):
        return [_strip_nul(item) for item in value]
    if isinstance(value, dict):
        return {_text(str(key)): _strip_nul(item) for key, item in value.items()}
    return value


# Compared and hashed by identity: each table is one constant, looked up per record.
@dataclass(frozen=True, slots=True, eq=False)
class Table:
    """How records of one kind become rows of one table."""

    name: str
    columns: tuple[str, ...]
    converters: tuple[Converter, ...]
    day_column: int  # index of the partition key in `columns`
    # A column whose higher value replaces a row already there (ON CONFLICT DO UPDATE);
    # None: a row already there stays as it is (DO NOTHING).
    latest: str | None = None
    key: tuple[str, ...] = ()  # the primary key, for the conflict target of `latest`

    @property
    def staging(self) -> str:
        return f"{self.name}_staging"

    def row(self, record: dict[str, Any]) -> Row:
        return tuple(
            convert(record.get(column))
            for column, convert in zip(self.columns, self.converters, strict=True)
        )


def _table(
    name: str,
    day_column: str,
    spec: Sequence[tuple[str, Converter]],
    *,
    latest: str | None = None,
) -> Table:
    columns = tuple(column for column, _ in spec)
    key = (columns[0], day_column)  # every table's key: its id and its partition column
    return Table(name, columns, tuple(c for _, c in spec), columns.index(day_column), latest, key)


# Columns in the order of the record's fields (and of the migrations in storage/sql/).
CDRS: Final = _table(
    "cdrs",
    "start_time",
    [
        ("cdr_id", _same),
        ("call_id", _text),
        ("caller", _text),
        ("callee", _text),
        ("from_uri", _text),
        ("to_uri", _text),
        ("request_uri", _text),
        ("src_ip", _text),
        ("src_port", _same),
        ("dst_ip", _text),
        ("dst_port", _same),
        ("trunk", _text),
        ("start_time", _time),
        ("ring_time", _time),
        ("answer_time", _time),
        ("end_time", _time),
        ("duration", _same),
        ("billsec", _same),
        ("pdd_ms", _same),
        ("disposition", _text),
        ("sip_code", _same),
        ("sip_reason", _text),
        ("q850_cause", _same),
        ("hangup_by", _text),
        ("end_reason", _text),
        ("user_agent", _text),
        ("rated", _same),
        ("rate_prefix", _text),
        ("rate_name", _text),
        ("rate_per_minute", _decimal),
        ("billed_seconds", _same),
        ("cost", _decimal),
        ("currency", _text),
        ("fraud_flags", _texts),
        ("capture_node", _text),
        ("schema_version", _same),
        # Added within CDR v1 (storage/sql/0003_cdrs_vendor_cost.sql); a record
        # written before them has none: NULL.
        ("egress_trunk", _text),
        ("vendor_cost", _decimal),
        ("margin", _decimal),
        ("callee_valid", _same),
        # Not record fields: set by the sink (the trunk's retention class, restriction).
        ("retention_days", _same),
        ("restricted", _same),
    ],
)
SIP_MESSAGES: Final = _table(
    "sip_messages",
    "captured_at",
    [
        ("message_id", _same),
        ("captured_at", _time),
        ("call_id", _text),
        ("method", _text),
        ("status_code", _same),
        ("cseq_method", _text),
        ("cseq", _same),
        ("src_ip", _text),
        ("src_port", _same),
        ("dst_ip", _text),
        ("dst_port", _same),
        ("transport", _text),
        ("capture_node", _text),
        ("headers", _text),
        ("body", _text),  # absent unless the operator keeps SDP: NULL
        ("schema_version", _same),
        ("restricted", _same),  # set by the sink
    ],
)
FRAUD_ALERTS: Final = _table(
    "fraud_alerts",
    "raised_at",
    [
        ("alert_id", _same),
        ("raised_at", _time),
        ("detector", _text),
        ("subject", _text),
        ("severity", _text),
        ("window_s", _same),
        ("count", _same),
        ("threshold", _same),
        ("cdr_ids", _same),
        ("details", _json),
        ("schema_version", _same),
        # Added by 0004_fraud_alert_incidents.sql.
        ("subject_kind", _text),
        ("revision", _revision),
        ("observed", _decimal),
        ("threshold_value", _decimal),
        ("first_seen", _time),
        ("last_seen", _time),
        ("call_ids", _texts_or_empty),
        ("restricted", _same),  # set by the sink
    ],
    # An incident's update replaces its row; an older or repeated revision does not.
    latest="revision",
)
TABLE_OF_KIND: Final = {KIND_CDR: CDRS, KIND_ALERT: FRAUD_ALERTS, KIND_SIP: SIP_MESSAGES}
TABLES: Final = (CDRS, SIP_MESSAGES, FRAUD_ALERTS)


def _checked_fields(value: bytes) -> tuple[int, float, int, int, int, int, int, int, int, int]:
    """A spooled value's fixed fields past its layout byte, and where its addresses
    begin; ValueError for a value no row may be made of (another layout, a time beyond
    the table's years, a length beyond any message, cut short before its message id)."""
    if len(value) < _SPOOLED_BYTES or value[0] != SPOOLED_LAYOUT:
        raise ValueError(f"not a signaling record of layout {SPOOLED_LAYOUT}")
    _layout, flags, timestamp, src_port, dst_port, size, n_src, n_dst, n_transport, n_node = (
        _unpack_spooled(value)
    )
    if not _FIRST_TIME <= timestamp < _LAST_TIME:
        raise ValueError(f"signaling record: capture time {timestamp} beyond years 1-9999")
    if size > MAX_MESSAGE_BYTES:  # a damaged length: no body of gigabytes padded back
        raise ValueError(f"signaling record: a message of {size} bytes, longer than any")
    at = _SPOOLED_BYTES
    if flags & _DIGESTED:
        at += _DIGEST_BYTES
        if len(value) < at:
            raise ValueError("signaling record: shorter than its message id")
    return flags, timestamp, src_port, dst_port, size, n_src, n_dst, n_transport, n_node, at


def sip_message_row(value: bytes, names_restricted: Callable[[str, str], bool] | None) -> Row:
    """The `sip_messages` row (its columns in the order of `SIP_MESSAGES`) of a
    `spooled` value: what the record's JSON would give, without the JSON.
    `names_restricted(call_id, headers)`: whether the message belongs to a restricted
    subject, to flag the row (the sink's rule, `sipcdr.privacy.naming`); None when no
    subject is restricted.

    `unspool` read back the whole packet and event; a row needs only the fields of its
    columns, so this reads them straight from the value: no tuple of the packet's
    fields, the padding the parser needs in one copy, and one search for a NUL in the
    value instead of one per text column (`tests/unit/test_signaling_spool.py` holds
    it equal to `sip_message_row_unspooled` over every corpus). The sink sends a batch
    of spooled values alone as `SipCopy`'s encoding of these rows instead; this builds
    them in a batch mixed with JSON values (spooled before an upgrade)."""
    flags, timestamp, src_port, dst_port, size, n_src, n_dst, n_transport, n_node, at = (
        _checked_fields(value)
    )
    digested = flags & _DIGESTED
    # Text columns are whole runs of the value: none holds a NUL when the value has
    # none from the addresses on (the zeros the parser is padded with are no column's).
    clean = value.find(b"\x00", at) < 0
    src = value[at : at + n_src].decode()
    at += n_src
    dst = value[at : at + n_dst].decode()
    at += n_dst
    transport = value[at : at + n_transport].decode()
    at += n_transport
    node = value[at : at + n_node].decode()
    at += n_node
    kept = len(value) - at
    missing = size - kept
    if digested:
        if missing < 0:
            raise ValueError("signaling record: longer than its message")
        end = len(value) - (4 if value.endswith(b"\r\n\r\n") else 2)
        headers = value[at:end].decode("utf-8", "replace")
        payload = b"".join((value[at:], _zeros(missing))) if missing else value[at:]
        mid = _uuid_text(value[_SPOOLED_BYTES : _SPOOLED_BYTES + _DIGEST_BYTES])
    else:
        if missing:
            raise ValueError("signaling record: not as long as its message")
        payload = value[at:]
        headers = head_text(payload)
        mid = _uuid_text(
            _digest(timestamp, src_port, dst_port, src.encode(), dst.encode(), payload)
        )
    msg = parse(payload)
    body: str | None = None
    if flags & _BODY_KEPT and msg.body:
        body = _text(msg.body.decode("utf-8", "replace"))
    call_id = msg.call_id
    cseq = msg.cseq
    if msg.is_request:
        method: str | None = msg.method
        status_code: int | None = None
    else:
        method = None
        status_code = msg.status_code
    cseq_method: str | None = msg.cseq_method
    restricted = names_restricted is not None and names_restricted(call_id, headers)
    if not clean:
        method, cseq_method = _text(method), _text(cseq_method)
        call_id, src, dst = _no_nul(call_id), _no_nul(src), _no_nul(dst)
        transport, node, headers = _no_nul(transport), _no_nul(node), _no_nul(headers)
    return (
        mid,
        # rfc3339's rounding, as the record's captured_at read back would give.
        _EPOCH + timedelta(microseconds=round(timestamp * 1_000_000)),
        call_id,
        method,
        status_code,
        cseq_method,
        cseq if cseq >= 0 else None,
        src,
        src_port,
        dst,
        dst_port,
        transport,
        node,
        headers,
        body,
        SIP_EVENT_SCHEMA_VERSION,
        restricted,
    )


_ZERO_PAD: Final = bytes(1 << 16)


def _zeros(count: int) -> bytes | memoryview:
    """`count` zero bytes where the body was, without a new buffer of them each time."""
    return memoryview(_ZERO_PAD)[:count] if count <= len(_ZERO_PAD) else bytes(count)


def sip_message_row_unspooled(
    value: bytes, names_restricted: Callable[[str, str], bool] | None
) -> Row:
    """`sip_message_row` by way of `unspool` (the whole packet and event read back):
    the reference the sink's row is held to (tests/unit/test_signaling_spool.py) and
    timed against (benchmarks/signaling.py)."""
    read = unspool(value)
    msg = read.msg
    body: str | None = None
    if read.body_kept and msg.body:
        body = _text(msg.body.decode("utf-8", "replace"))
    cseq = msg.cseq
    if msg.is_request:
        method: str | None = _text(msg.method)
        status_code: int | None = None
    else:
        method = None
        status_code = msg.status_code
    return (
        read.message_id,
        # rfc3339's rounding, as the record's captured_at read back would give.
        _EPOCH + timedelta(microseconds=round(read.timestamp * 1_000_000)),
        _text(msg.call_id),
        method,
        status_code,
        _text(msg.cseq_method),
        cseq if cseq >= 0 else None,
        _text(read.src_ip),
        read.src_port,
        _text(read.dst_ip),
        read.dst_port,
        _text(read.transport),
        _text(read.capture_node),
        _text(read.headers),
        body,
        SIP_EVENT_SCHEMA_VERSION,
        names_restricted is not None and names_restricted(msg.call_id, read.headers),
    )


# PostgreSQL's binary COPY: a signature, flags and the length of a header extension
# (none); each row its field count and each field its length (-1: NULL) and bytes in
# the column type's binary form; -1 as the field count ends the stream.
_COPY_HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_TRAILER: Final = b"\xff\xff"
_NULL: Final = b"\xff\xff\xff\xff"
# timestamptz: microseconds since 2000-01-01 UTC.
_PG_EPOCH_US: Final = 946_684_800_000_000
_DAY_US: Final = 86_400_000_000
_EPOCH_ORDINAL: Final = _EPOCH.date().toordinal()
# The message id's UUID from its digest, as `_uuid_text` spells it: version 5 in the
# high nibble of byte 6, the RFC 9562 variant in the two high bits of byte 8.
_UUID_KEEP: Final = ~((0xF0 << 72) | (0xC0 << 56)) & ((1 << 128) - 1)
_UUID_SET: Final = (0x50 << 72) | (0x80 << 56)
# Field count, message_id, captured_at, then the length of call_id.
_SIP_HEAD: Final = struct.Struct("!hi16siqi")
_LENGTH: Final = struct.Struct("!i")
# method NULL, status_code, then the length of cseq_method.
_RESPONSE: Final = struct.Struct("!4siii")
_CSEQ: Final = struct.Struct("!iq")
# A port, then the length of the next text.
_PORT: Final = struct.Struct("!iii")
_SIP_TAIL: Final = struct.Struct("!ihib")
_SIP_FIELDS: Final = len(SIP_MESSAGES.columns)
# schema_version and restricted, after the body; after a NULL body (unless kept).
_TAILS: Final = tuple(_SIP_TAIL.pack(2, SIP_EVENT_SCHEMA_VERSION, 1, r) for r in (0, 1))
_NO_BODY_TAILS: Final = tuple(_NULL + tail for tail in _TAILS)
# Encoded fields that repeat from message to message: a request's method, status_code
# (NULL) and CSeq method by its method; the addresses, ports, transport and capture node
# by the captured bytes they are read from. Emptied when full: hostile traffic can make
# any number of them. Kept only for names of the usual length: a method can be as long
# as a datagram and a HEP agent's node name nearly as long, and 4,096 of them would
# hold about a gigabyte.
_CACHED: Final = 4096
_CACHED_METHOD: Final = 64
_CACHED_BLOCK: Final = 512
_requests: Final[dict[str, bytes]] = {}
_endpoints: Final[dict[tuple[int, int, int, int, int, bytes], bytes]] = {}


def _request_fields(method: str) -> bytes:
    """method, status_code (NULL) and cseq_method of a request whose CSeq names its
    method (the parser refuses one that names another)."""
    text = _no_nul(method).encode()
    length = _LENGTH.pack(len(text))
    return b"".join((length, text, _NULL, length, text))


def _endpoint_fields(
    block: bytes, n_src: int, n_dst: int, n_transport: int, src_port: int, dst_port: int
) -> bytes:
    """src_ip to capture_node: the texts as the row's columns have them (strict UTF-8,
    NULs replaced), the captured bytes themselves when ASCII without a NUL."""
    end_dst = n_src + n_dst
    end_transport = end_dst + n_transport
    texts = [block[:n_src], block[n_src:end_dst], block[end_dst:end_transport]]
    texts.append(block[end_transport:])
    if not block.isascii() or b"\x00" in block:
        texts = [_no_nul(text.decode()).encode() for text in texts]
    src, dst, transport, node = texts
    return b"".join(
        (
            _LENGTH.pack(len(src)),
            src,
            _PORT.pack(4, src_port, len(dst)),
            dst,
            _PORT.pack(4, dst_port, len(transport)),
            transport,
            _LENGTH.pack(len(node)),
            node,
        )
    )


class SipCopy:
    """`sip_messages` rows of spooled values, encoded for a binary COPY as they are
    added: the row `sip_message_row` gives, without a tuple, a datetime, the id's text
    or the driver's encoding of each field in between (the captured bytes of the
    addresses and the headers go out as they are when they are ASCII and hold no NUL).
    Beside them, what the sink reads of the rows: their days (partitions) and the
    Call-IDs of the rows not flagged restricted (`tests/unit/test_pg_copy.py` holds
    the decoded rows equal to `sip_message_row`'s)."""

    __slots__ = ("_day", "_parts", "calls", "days", "rows")

    def __init__(self) -> None:
        self._parts: list[bytes] = [_COPY_HEADER]
        self._day = -(1 << 62)  # none yet
        self.rows = 0
        self.days: set[int] = set()  # days since 1970-01-01 UTC
        self.calls: list[str] = []

    def __len__(self) -> int:
        return self.rows

    def data(self) -> bytes:
        """The COPY stream of the rows added."""
        return b"".join((*self._parts, _COPY_TRAILER))

    def dates(self) -> set[date]:
        return {date.fromordinal(_EPOCH_ORDINAL + day) for day in self.days}

    def add(self, value: bytes, names_restricted: Callable[[str, str], bool] | None) -> None:
        """The row of one spooled value (see `sip_message_row`); raises ValueError for
        a value it would refuse, and then adds nothing."""
        flags, timestamp, src_port, dst_port, size, n_src, n_dst, n_transport, n_node, at = (
            _checked_fields(value)
        )
        digested = flags & _DIGESTED
        clean = value.find(b"\x00", at) < 0
        end_node = at + n_src + n_dst + n_transport + n_node
        block = value[at:end_node]
        key = (src_port, dst_port, n_src, n_dst, n_transport, block)
        endpoints = _endpoints.get(key)
        if endpoints is None:
            endpoints = _endpoint_fields(block, n_src, n_dst, n_transport, src_port, dst_port)
            if len(block) <= _CACHED_BLOCK:
                if len(_endpoints) >= _CACHED:
                    _endpoints.clear()
                _endpoints[key] = endpoints
        kept = len(value) - end_node
        missing = size - kept
        if digested:
            if missing < 0:
                raise ValueError("signaling record: longer than its message")
            head = value[end_node : len(value) - (4 if value.endswith(b"\r\n\r\n") else 2)]
            payload = b"".join((value[end_node:], _zeros(missing))) if missing else value[end_node:]
            digest = value[_SPOOLED_BYTES : _SPOOLED_BYTES + _DIGEST_BYTES]
        else:
            if missing:
                raise ValueError("signaling record: not as long as its message")
            payload = value[end_node:]
            end = payload.find(b"\r\n\r\n")
            if end < 0:
                end = payload.find(b"\n\n")
                if end < 0:
                    end = len(payload)
            head = payload[:end]  # `head_text`'s
            end_src = at + n_src
            digest = _digest(
                timestamp,
                src_port,
                dst_port,
                value[at:end_src],
                value[end_src : end_src + n_dst],
                payload,
            )
        msg = parse(payload)
        call_id = msg.call_id
        text: str | None = None
        restricted = False
        if names_restricted is not None:
            text = head.decode("utf-8", "replace")
            restricted = names_restricted(call_id, text)
        if clean and head.isascii():
            headers = head
        else:
            if text is None:
                text = head.decode("utf-8", "replace")
            headers = _no_nul(text).encode()
        method = msg.method
        cseq_method = msg.cseq_method
        if msg.is_request and cseq_method == method:  # but for a request without CSeq
            fields = _requests.get(method)
            if fields is None:
                fields = _request_fields(method)
                if len(method) <= _CACHED_METHOD:
                    if len(_requests) >= _CACHED:
                        _requests.clear()
                    _requests[method] = fields
        else:
            named = _no_nul(cseq_method).encode()
            if msg.is_request:
                spelled = _no_nul(method).encode()
                fields = b"".join(
                    (_LENGTH.pack(len(spelled)), spelled, _NULL, _LENGTH.pack(len(named)), named)
                )
            else:
                fields = _RESPONSE.pack(_NULL, 4, msg.status_code, len(named)) + named
        if not clean:
            call_id = _no_nul(call_id)
        call_id_bytes = call_id.encode()
        us = round(timestamp * 1_000_000)
        day = us // _DAY_US
        uid = ((int.from_bytes(digest) & _UUID_KEEP) | _UUID_SET).to_bytes(16)
        cseq = msg.cseq
        if flags & _BODY_KEPT and msg.body:
            body = _no_nul(msg.body.decode("utf-8", "replace")).encode()
            tail = b"".join((_LENGTH.pack(len(body)), body, _TAILS[restricted]))
        else:
            tail = _NO_BODY_TAILS[restricted]
        self._parts += (
            _SIP_HEAD.pack(_SIP_FIELDS, 16, uid, 8, us - _PG_EPOCH_US, len(call_id_bytes)),
            call_id_bytes,
            fields,
            _CSEQ.pack(8, cseq) if cseq >= 0 else _NULL,
            endpoints,
            _LENGTH.pack(len(headers)),
            headers,
            tail,
        )
        if not restricted:
            self.calls.append(call_id)
        if day != self._day:
            self._day = day
            self.days.add(day)
        self.rows += 1
