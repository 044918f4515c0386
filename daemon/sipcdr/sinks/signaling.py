"""Captured signaling as records (schemas/sip_message.v1.schema.json) for `sip_messages`
and the `sipcdr.sip` topic: one `SipEvent` per parsed message (`sipcdr.sipevent`).

Investigations ask "what exactly did this trunk send on that call": the start line
and headers of every message are kept. The body is SDP, which says who talked to
whom on which media address, so it is dropped unless the operator asks for it. The
parsed fields the correlator reads are kept too, so that a correlator fed by the
topic closes the same calls.

The capture side runs once per parsed message and spools only what the record is
made of (`sipcdr.sipevent.spooled`: a packed header, the id's digest and the captured
bytes without the body unless kept); the sinks build rows and topic records from it
on the delivery side (`sinks.pgrows.sip_message_row`, `published`), re-parsing the
bytes. Values spooled as JSON by earlier versions are sent as they are.
"""

from __future__ import annotations

import struct
from typing import Final

import orjson

from sipcdr.model import SIP_EVENT_SCHEMA_VERSION, Packet
from sipcdr.sinks.base import KIND_SIP
from sipcdr.sip.message import SipMessage
from sipcdr.sipevent import event_record, is_spooled, message_id, spooled
from sipcdr.sipevent import spooled_record as _spooled_record
from sipcdr.spool import Spool

__all__ = [
    "SIP_MESSAGE_SCHEMA_VERSION",
    "SignalingRecorder",
    "is_spooled",
    "message_id",
    "published",
]

SIP_MESSAGE_SCHEMA_VERSION: Final = SIP_EVENT_SCHEMA_VERSION


class SignalingRecorder:
    """Appends one record (a `spooled` message) per parsed message to the signaling
    spool."""

    __slots__ = ("append", "spool", "store_body")

    def __init__(self, spool: Spool, *, store_body: bool = False) -> None:
        self.spool = spool
        self.store_body = store_body
        self.append = spool.append

    def __call__(self, packet: Packet, msg: SipMessage) -> None:
        try:
            value = spooled(packet, msg, self.store_body)
        except struct.error:
            # A field too long for the layout (a capture node named by a long path):
            # the record as JSON, which the sinks send as it is.
            value = orjson.dumps(event_record(packet, msg, store_body=self.store_body))
        # A refused append (full, write error) is counted by the spool, with its reason.
        self.append(KIND_SIP, msg.call_id.encode(), value)


def published(value: bytes) -> bytes:
    """The record's JSON, as the `sipcdr.sip` topic carries it, of a signaling spool
    value. Raises `ValueError` for a value that is no record."""
    if not is_spooled(value):
        return value
    return orjson.dumps(_spooled_record(value))
