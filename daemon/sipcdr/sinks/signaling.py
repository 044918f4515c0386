"""Captured signaling as records (schemas/sip_message.v1.schema.json) for `sip_messages`.

Investigations ask "what exactly did this trunk send on that call": the start line
and headers of every message are kept. The body is SDP, which says who talked to
whom on which media address, so it is dropped unless the operator asks for it.

This runs once per parsed message, so it is written for that: one hash, one format,
one dumps, one buffered append; the spool writes the batch on its own schedule.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Final

import orjson

from sipcdr.model import Packet, rfc3339
from sipcdr.sinks.base import KIND_SIP
from sipcdr.sinks.spool import Spool
from sipcdr.sip.message import SipMessage

SIP_MESSAGE_SCHEMA_VERSION: Final = 1
# Same namespace scheme as cdr_id: a replayed capture gives the same message ids.
_NAMESPACE: Final = bytes.fromhex("8d1c2f0a7b3e4d5f9a6b1c2d3e4f5a6b")


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


_sha1 = hashlib.sha1
_TIME_AND_PORTS: Final = struct.Struct("<dHH")
_VARIANT: Final = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


class SignalingRecorder:
    """Appends one record per parsed message to the signaling spool."""

    __slots__ = ("spool", "store_body")

    def __init__(self, spool: Spool, *, store_body: bool = False) -> None:
        self.spool = spool
        self.store_body = store_body

    def __call__(self, packet: Packet, msg: SipMessage) -> None:
        payload = packet.payload
        end = payload.find(b"\r\n\r\n")
        if end < 0:
            end = payload.find(b"\n\n")
            if end < 0:
                end = len(payload)
        head = payload[:end]
        # NULs stay: JSON carries them, and the PostgreSQL sink replaces them there.
        body: str | None = None
        if self.store_body and msg.body:
            body = msg.body.decode("utf-8", "replace")
        record = {
            "message_id": message_id(packet),
            "captured_at": rfc3339(packet.timestamp),
            "call_id": msg.call_id,
            "method": msg.method if msg.is_request else None,
            "status_code": None if msg.is_request else msg.status_code,
            "cseq_method": msg.cseq_method,
            "cseq": msg.cseq if msg.cseq >= 0 else None,
            "src_ip": packet.src_ip,
            "src_port": packet.src_port,
            "dst_ip": packet.dst_ip,
            "dst_port": packet.dst_port,
            "transport": packet.transport,
            "capture_node": packet.capture_node,
            "headers": head.decode("utf-8", "replace"),
            "body": body,
            "schema_version": SIP_MESSAGE_SCHEMA_VERSION,
        }
        # A refused append (full, write error) is counted by the spool, with its reason.
        self.spool.append(KIND_SIP, msg.call_id.encode(), orjson.dumps(record))
