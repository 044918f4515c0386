"""`SipEvent` to and from what the capture side holds: a captured `Packet` and its
parsed `SipMessage`.

`event_of` is what the signaling recorder writes to the `sipcdr.sip` topic; `replay`
turns an event read back from the topic into the pair the dialog correlator takes,
so a correlator fed from the topic closes the same calls, with the same CDRs, as the
one fed by the capture. The correlator reads only the parsed fields the event
carries; the header lines are kept for the rare lookup beyond them (a Reason header
whose Q.850 cause is not its first element).
"""

from __future__ import annotations

import hashlib
import struct
from typing import Final

from sipcdr.model import SIP_EVENT_SCHEMA_VERSION, Packet, SipEvent, rfc3339
from sipcdr.sip.message import SipMessage

__all__ = ["event_of", "event_record", "head_text", "message_id", "replay"]

_new_message: Final = SipMessage.__new__
_NO_DEFECTS: Final[list[str]] = []
# Same namespace scheme as cdr_id: a replayed capture gives the same message ids.
_NAMESPACE: Final = bytes.fromhex("8d1c2f0a7b3e4d5f9a6b1c2d3e4f5a6b")
_sha1: Final = hashlib.sha1
_TIME_AND_PORTS: Final = struct.Struct("<dHH")
_VARIANT: Final = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def message_id(packet: Packet) -> str:
    """UUID v5-style id of capture time, endpoints and bytes: the two legs through a
    proxy are two messages, a retransmission is another, a replay is the same."""
    h = _sha1(
        _NAMESPACE
        + _TIME_AND_PORTS.pack(packet.timestamp, packet.src_port, packet.dst_port)
        + f"{packet.src_ip}|{packet.dst_ip}|".encode()
        + packet.payload,
        usedforsecurity=False,
    ).hexdigest()
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
    """`event_of(...).to_record()` without the event in between: what the recorder
    writes once per parsed message, where the tuple would cost more than the dict
    (tests/unit/test_sip_events.py holds the two equal over the shared captures)."""
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
        "message_id": message_id(packet),
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
        "headers": head_text(packet.payload),
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
    msg.raw_reason = event.reason_header
    msg.raw_from = msg.header("from") or ""
    msg.raw_to = msg.header("to") or ""
    content_type = msg.header("content-type")
    msg.content_type = content_type
    msg.body = body
    msg.content_length = len(body) if body else None
    return packet, msg
