"""Captured signaling as records (schemas/sip_message.v1.schema.json) for `sip_messages`.

Investigations ask "what exactly did this trunk send on that call": the start line
and headers of every message are kept. The body is SDP, which says who talked to
whom on which media address, so it is dropped unless the operator asks for it.

This runs once per parsed message, so it is written for that: one hash, one format,
one dumps, one buffered append; the spool writes the batch on its own schedule.
"""

from __future__ import annotations

import hashlib
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
    digest = hashlib.sha1(_NAMESPACE, usedforsecurity=False)
    digest.update(
        f"{packet.timestamp:.6f}|{packet.src_ip}|{packet.src_port}|"
        f"{packet.dst_ip}|{packet.dst_port}|".encode()
    )
    digest.update(packet.payload)
    raw = bytearray(digest.digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class SignalingRecorder:
    """Appends one record per parsed message to the signaling spool."""

    __slots__ = ("refused", "spool", "store_body")

    def __init__(self, spool: Spool, *, store_body: bool = False) -> None:
        self.spool = spool
        self.store_body = store_body
        self.refused = 0  # the spool said no (full or write error); it counts the reason

    def __call__(self, packet: Packet, msg: SipMessage) -> None:
        payload = packet.payload
        end = payload.find(b"\r\n\r\n")
        if end < 0:
            end = payload.find(b"\n\n")
            if end < 0:
                end = len(payload)
        head = payload[:end]
        if b"\x00" in head:
            head = head.replace(b"\x00", b"\xef\xbf\xbd")  # PostgreSQL text refuses NUL
        body: str | None = None
        if self.store_body and msg.body:
            body = msg.body.replace(b"\x00", b"\xef\xbf\xbd").decode("utf-8", "replace")
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
        if not self.spool.append(KIND_SIP, msg.call_id.encode(), orjson.dumps(record)):
            self.refused += 1
