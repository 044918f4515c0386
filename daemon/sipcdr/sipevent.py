"""`SipEvent` to and from what the capture side holds: a captured `Packet` and its
parsed `SipMessage`.

`event_of` is what the sinks send to the `sipcdr.sip` topic of a message; `replay`
turns an event read back from the topic into the pair the dialog correlator takes,
so a correlator fed from the topic closes the same calls, with the same CDRs, as the
one fed by the capture. The correlator reads only the parsed fields the event
carries; the header lines are kept for the rare lookup beyond them (a Reason header
whose Q.850 cause is not its first element).

`spooled` is what the capture side writes to the signaling spool instead of the
event's JSON: a fixed header (layout byte, flags, capture time, ports, lengths), the
message id's digest when the body is cut off, the addresses, and the captured bytes
up to the end of the headers (the whole message when the body is kept). Building and
encoding the record's 27 fields per message cost more than parsing it; the delivery
side pays for that instead, once per record it sends, re-parsing the bytes
(`unspool`) into the same event.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Final, NamedTuple

from sipcdr.model import SIP_EVENT_SCHEMA_VERSION, Packet, SipEvent, rfc3339
from sipcdr.sip.message import SipMessage
from sipcdr.sip.parser import MAX_MESSAGE_BYTES, parse

__all__ = [
    "SPOOLED_LAYOUT",
    "Unspooled",
    "event_of",
    "event_record",
    "head_text",
    "is_spooled",
    "message_id",
    "replay",
    "spooled",
    "spooled_record",
    "unspool",
]

_new_message: Final = SipMessage.__new__
_NO_DEFECTS: Final[list[str]] = []
# Same namespace scheme as cdr_id: a replayed capture gives the same message ids.
_NAMESPACE: Final = bytes.fromhex("8d1c2f0a7b3e4d5f9a6b1c2d3e4f5a6b")
# Every id's hash starts from the namespace: copied, not taken again for each message.
_NAMESPACE_SHA1: Final = hashlib.sha1(_NAMESPACE, usedforsecurity=False)
_TIME_AND_PORTS: Final = struct.Struct("<dHH")
_VARIANT: Final = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def message_id(packet: Packet) -> str:
    """UUID v5-style id of capture time, endpoints and bytes: the two legs through a
    proxy are two messages, a retransmission is another, a replay is the same."""
    return _uuid_text(
        _digest(
            packet.timestamp,
            packet.src_port,
            packet.dst_port,
            packet.src_ip.encode(),
            packet.dst_ip.encode(),
            packet.payload,
        )
    )


def _uuid_text(digest: bytes) -> str:
    h = digest.hex()
    # Version 5 in the 13th hex digit, the RFC 9562 variant in the 17th.
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


def head_text(payload: bytes) -> str:
    """Start line and headers as captured, without the blank line and the body."""
    end = payload.find(b"\r\n\r\n")
    if end < 0:
        end = payload.find(b"\n\n")
        if end < 0:
            end = len(payload)
    # NULs stay: JSON carries them, and the PostgreSQL sink replaces them there.
    return payload[:end].decode("utf-8", "replace")


def event_of(packet: Packet, msg: SipMessage, *, store_body: bool = False) -> SipEvent:
    """The event of one parsed message; the body (SDP) only when `store_body`."""
    body: str | None = None
    if store_body and msg.body:
        body = msg.body.decode("utf-8", "replace")
    request = msg.is_request
    return SipEvent(
        message_id(packet),
        packet.timestamp,
        msg.call_id,
        msg.method if request else None,
        None if request else msg.status_code,
        msg.cseq_method,
        msg.cseq if msg.cseq >= 0 else None,
        packet.src_ip,
        packet.src_port,
        packet.dst_ip,
        packet.dst_port,
        packet.transport,
        packet.capture_node,
        head_text(packet.payload),
        body,
        msg.request_uri if request else None,
        None if request else msg.reason_phrase,
        msg.from_uri,
        msg.from_tag,
        msg.to_uri,
        msg.to_tag,
        msg.via_branch,
        msg.user_agent,
        msg.raw_pai,
        msg.raw_reason,
    )


def event_record(packet: Packet, msg: SipMessage, *, store_body: bool = False) -> dict[str, object]:
    """`event_of(...).to_record()` without the event in between: what the sinks send
    once per message, where the tuple would cost more than the dict
    (tests/unit/test_sip_events.py holds the two equal over the shared captures)."""
    return _record(packet, msg, message_id(packet), store_body, head_text(packet.payload))


def _record(
    packet: Packet, msg: SipMessage, mid: str, store_body: bool, headers: str
) -> dict[str, object]:
    body: str | None = None
    if store_body and msg.body:
        body = msg.body.decode("utf-8", "replace")
    timestamp = packet.timestamp
    if msg.is_request:
        method: str | None = msg.method
        status_code: int | None = None
        request_uri: str | None = msg.request_uri
        reason_phrase: str | None = None
    else:
        method = request_uri = None
        status_code = msg.status_code
        reason_phrase = msg.reason_phrase
    cseq = msg.cseq
    return {
        "message_id": mid,
        "captured_at": rfc3339(timestamp),
        "call_id": msg.call_id,
        "method": method,
        "status_code": status_code,
        "cseq_method": msg.cseq_method,
        "cseq": cseq if cseq >= 0 else None,
        "src_ip": packet.src_ip,
        "src_port": packet.src_port,
        "dst_ip": packet.dst_ip,
        "dst_port": packet.dst_port,
        "transport": packet.transport,
        "capture_node": packet.capture_node,
        "headers": headers,
        "body": body,
        "schema_version": SIP_EVENT_SCHEMA_VERSION,
        "captured_ts": timestamp,
        "request_uri": request_uri,
        "reason_phrase": reason_phrase,
        "from_uri": msg.from_uri,
        "from_tag": msg.from_tag,
        "to_uri": msg.to_uri,
        "to_tag": msg.to_tag,
        "via_branch": msg.via_branch,
        "user_agent": msg.user_agent,
        "p_asserted_identity": msg.raw_pai,
        "reason_header": msg.raw_reason,
    }


# The first byte of a spooled value: the layout. The JSON records the signaling spool
# held before start with "{"; each later layout takes the next number.
SPOOLED_LAYOUT: Final = 1
_JSON_START: Final = 0x7B
# Layout, flags, capture time, ports, the captured message's length, then the lengths
# of source and destination address, transport and capture node.
_SPOOLED: Final = struct.Struct("<BBdHHIBBBH")
_DIGEST_BYTES: Final = 16  # what the message id shows of its SHA-1
# Flags: the body is spooled and goes into the record; the message is cut short after
# its headers and the id's digest follows the fixed header.
_BODY_KEPT: Final = 1
_DIGESTED: Final = 2
_LINE_ENDS: Final = (b"\r", b"\n")
_CR_LF: Final = frozenset(b"\r\n")
_CRLF_CRLF: Final = b"\r\n\r\n"
# `_SPOOLED` in two: the message's own fields, and the lengths of the names that stay
# the same between two addresses (`_ENDS`).
_HEAD: Final = struct.Struct("<BBdHHI")
_LENGTHS: Final = struct.Struct("<BBBH")
# Per source, destination, transport and capture node: their spooled bytes (`_ends`).
# A capture sees few distinct pairs; the bound keeps a flood of spoofed ones in check.
_ENDS: Final[dict[tuple[str, str, str, str], tuple[bytes, bytes, bytes, bytes]]] = {}
_ENDS_KEPT: Final = 4096
# Longer names (together) are encoded per message, not kept: a HEP agent names its
# capture node in up to 64 KB, and 4,096 such would hold most of a gigabyte.
_ENDS_NAME_BYTES: Final = 512
# The capture times a record's `captured_at` can hold: 0001-01-01 to 9999-12-31, UTC.
_FIRST_TIME: Final = -62_135_596_800.0
_LAST_TIME: Final = 253_402_300_800.0


def spooled(packet: Packet, msg: SipMessage, store_body: bool) -> bytes:
    """The signaling spool's value of one parsed message: what `unspool` makes the
    same record of. Raises `struct.error` for a field beyond the layout's bounds (an
    address or capture node of more than 255 or 65,535 bytes).

    Without `store_body` a body (SDP) is not written: the bytes end at the blank line
    `head_text` ends at, and the parser, finding its own blank line there or before
    it, reads nothing beyond but the message's length, which is spooled. Only then is
    the message id's digest taken here, of the whole message; a message spooled whole
    (the body kept, none there, or led by line ends, where `head_text` may end before
    the parser starts) has it taken by the sink.
    """
    timestamp, src_ip, src_port, dst_ip, dst_port, transport, payload, node = packet
    ends = _ENDS.get((src_ip, dst_ip, transport, node))
    if ends is None:
        ends = _ends(src_ip, dst_ip, transport, node)
    if store_body or not msg.body:
        return b"".join(
            (
                _HEAD.pack(
                    SPOOLED_LAYOUT,
                    _BODY_KEPT if store_body else 0,
                    timestamp,
                    src_port,
                    dst_port,
                    len(payload),
                ),
                ends[0],
                payload,
            )
        )
    start = msg.body_start
    if start >= 4 and payload.startswith(_CRLF_CRLF, start - 4) and payload[0] not in _CR_LF:
        # The parser's blank line is a CRLFCRLF: no CRLFCRLF comes before it on any of
        # its paths, so it is the first, where the search below would stop.
        kept = payload[:start]
    else:
        kept = _head_of(payload)
        # By length, not identity: a compiled slice of the whole is a new object.
        if len(kept) == len(payload):
            return b"".join(
                (
                    _HEAD.pack(SPOOLED_LAYOUT, 0, timestamp, src_port, dst_port, len(payload)),
                    ends[0],
                    payload,
                )
            )
    head = _HEAD.pack(SPOOLED_LAYOUT, _DIGESTED, timestamp, src_port, dst_port, len(payload))
    # The digest's time and ports are packed as in the header: its bytes 2 to 14.
    hashing = _NAMESPACE_SHA1.copy()
    hashing.update(head[2:14] + ends[3])
    hashing.update(payload)
    return b"".join((head, ends[1], hashing.digest()[:_DIGEST_BYTES], ends[2], kept))


def _head_of(payload: bytes) -> bytes:
    """`payload` up to the blank line `head_text` ends at, or `payload` itself when it
    is led by line ends or has no blank line."""
    if payload.startswith(_LINE_ENDS):
        return payload
    end = payload.find(b"\r\n\r\n")
    if end >= 0:
        return payload[: end + 4]
    end = payload.find(b"\n\n")
    if end >= 0:
        return payload[: end + 2]
    return payload


def _ends(src_ip: str, dst_ip: str, transport: str, node: str) -> tuple[bytes, bytes, bytes, bytes]:
    """What a record spools of its addresses, transport and capture node, kept for the
    next message between the same two: (lengths and names, the lengths alone, the
    names alone, what the digest takes of the addresses). Raises `struct.error` as
    `spooled` does; a name too long is not kept."""
    src = src_ip.encode()
    dst = dst_ip.encode()
    transport_bytes = transport.encode()
    node_bytes = node.encode()
    lengths = _LENGTHS.pack(len(src), len(dst), len(transport_bytes), len(node_bytes))
    names = b"".join((src, dst, transport_bytes, node_bytes))
    ends = (lengths + names, lengths, names, b"".join((src, b"|", dst, b"|")))
    if len(names) > _ENDS_NAME_BYTES:
        return ends
    if len(_ENDS) >= _ENDS_KEPT:
        # Spoofed sources could grow it without end: started afresh instead.
        _ENDS.clear()
    _ENDS[src_ip, dst_ip, transport, node] = ends
    return ends


def _digest(
    timestamp: float, src_port: int, dst_port: int, src: bytes, dst: bytes, payload: bytes
) -> bytes:
    """What `message_id` formats, of the addresses as bytes; the payload not copied."""
    hashing = _NAMESPACE_SHA1.copy()
    hashing.update(
        b"".join((_TIME_AND_PORTS.pack(timestamp, src_port, dst_port), src, b"|", dst, b"|"))
    )
    hashing.update(payload)
    return hashing.digest()[:_DIGEST_BYTES]


def is_spooled(value: bytes) -> bool:
    """Whether a signaling spool value is `spooled`'s rather than the JSON record that
    earlier versions spooled (and that sinks then send as it is)."""
    return bool(value) and value[0] != _JSON_START


class Unspooled(NamedTuple):
    """A `spooled` value read back: the packet's fields (its payload as long as
    captured, the body zeroed unless kept), the parsed message, the message id, the
    record's `headers` and whether its body is kept."""

    timestamp: float
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    transport: str
    payload: bytes
    capture_node: str
    msg: SipMessage
    message_id: str
    headers: str
    body_kept: bool

    @property
    def packet(self) -> Packet:
        return Packet(*self[:8])


def unspool(value: bytes) -> Unspooled:
    """What a `spooled` value holds. Raises `ValueError` (`SipParseError` among them)
    for a value that is none."""
    if len(value) < _SPOOLED.size or value[0] != SPOOLED_LAYOUT:
        raise ValueError(f"not a signaling record of layout {SPOOLED_LAYOUT}")
    _layout, flags, timestamp, src_port, dst_port, size, n_src, n_dst, n_transport, n_node = (
        _SPOOLED.unpack_from(value)
    )
    if not _FIRST_TIME <= timestamp < _LAST_TIME:
        # Spooled as a float, never formatted at capture: a pcapng's 64-bit tick count
        # can put it past what a row's or the topic's timestamp holds.
        raise ValueError(f"signaling record: capture time {timestamp} beyond years 1-9999")
    if size > MAX_MESSAGE_BYTES:  # damaged: no message longer is parsed, none spooled
        raise ValueError(f"signaling record: a message of {size} bytes, longer than any")
    at = _SPOOLED.size
    digested = flags & _DIGESTED
    if digested:
        at += _DIGEST_BYTES
        if len(value) < at:
            raise ValueError("signaling record: shorter than its message id")
    src = value[at : at + n_src]
    at += n_src
    dst = value[at : at + n_dst]
    at += n_dst
    transport = value[at : at + n_transport].decode()
    at += n_transport
    node = value[at : at + n_node].decode()
    at += n_node
    payload = value[at:]
    missing = size - len(payload)
    if digested:
        if missing < 0:
            raise ValueError("signaling record: longer than its message")
        # Cut after the blank line `head_text` ends at: the headers are known without
        # a search (`spooled`), and the parser, checking the body's length against
        # Content-Length, finds zeros where the body was.
        end = len(payload) - (4 if payload.endswith(b"\r\n\r\n") else 2)
        headers = payload[:end].decode("utf-8", "replace")
        payload += bytes(missing)
        mid = _uuid_text(value[_SPOOLED.size : _SPOOLED.size + _DIGEST_BYTES])
    else:
        if missing:
            raise ValueError("signaling record: not as long as its message")
        headers = head_text(payload)
        mid = _uuid_text(_digest(timestamp, src_port, dst_port, src, dst, payload))
    return Unspooled(
        timestamp,
        src.decode(),
        src_port,
        dst.decode(),
        dst_port,
        transport,
        payload,
        node,
        parse(payload),
        mid,
        headers,
        bool(flags & _BODY_KEPT),
    )


def spooled_record(value: bytes) -> dict[str, object]:
    """The sip_message v1 record (as `event_record`) of a `spooled` value."""
    read = unspool(value)
    return _record(read.packet, read.msg, read.message_id, read.body_kept, read.headers)


def replay(event: SipEvent) -> tuple[Packet, SipMessage]:
    """The packet and parsed message the event was made of, as far as the correlator
    reads them. The packet's payload is the captured head (and body when kept)."""
    body = event.body.encode() if event.body is not None else b""
    head = event.headers
    packet = Packet(
        event.captured_ts,
        event.src_ip,
        event.src_port,
        event.dst_ip,
        event.dst_port,
        event.transport,
        head.encode() + b"\r\n\r\n" + body,
        event.capture_node,
    )
    msg: SipMessage = _new_message(SipMessage)
    msg._lines = head.replace("\r\n", "\n").split("\n")[1:]
    msg._index = None
    msg._defects = _NO_DEFECTS
    request = event.method is not None
    msg.is_request = request
    msg.method = event.method or ""
    msg.request_uri = event.request_uri or ""
    msg.status_code = event.status_code or 0
    msg.reason_phrase = event.reason_phrase or ""
    msg.call_id = event.call_id
    msg.cseq = -1 if event.cseq is None else event.cseq
    msg.cseq_method = event.cseq_method
    msg.from_uri = event.from_uri
    msg.from_tag = event.from_tag
    msg.to_uri = event.to_uri
    msg.to_tag = event.to_tag
    msg.via_branch = event.via_branch
    msg.user_agent = event.user_agent
    msg.raw_pai = event.p_asserted_identity
    msg._pai_read = False
    msg.raw_reason = event.reason_header
    msg.raw_from = msg.header("from") or ""
    msg.raw_to = msg.header("to") or ""
    content_type = msg.header("content-type")
    msg.content_type = content_type
    msg.body = body
    msg.body_start = -1  # the head may hold a blank line of its own: left to a search
    msg.content_length = len(body) if body else None
    return packet, msg
