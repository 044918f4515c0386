"""Captured signaling as records (schemas/sip_message.v1.schema.json) for `sip_messages`
and the `sipcdr.sip` topic: one `SipEvent` per parsed message (`sipcdr.sipevent`).

Investigations ask "what exactly did this trunk send on that call": the start line
and headers of every message are kept. The body is SDP, which says who talked to
whom on which media address, so it is dropped unless the operator asks for it. The
parsed fields the correlator reads are kept too, so that a correlator fed by the
topic closes the same calls.

This runs once per parsed message, so it is written for that: one hash, one format,
one dict, one dumps, one buffered append; the spool writes the batch on its own
schedule.
"""

from __future__ import annotations

from typing import Final

import orjson

from sipcdr.model import SIP_EVENT_SCHEMA_VERSION, Packet
from sipcdr.sinks.base import KIND_SIP
from sipcdr.sip.message import SipMessage
from sipcdr.sipevent import event_record, message_id
from sipcdr.spool import Spool

__all__ = ["SIP_MESSAGE_SCHEMA_VERSION", "SignalingRecorder", "message_id"]

SIP_MESSAGE_SCHEMA_VERSION: Final = SIP_EVENT_SCHEMA_VERSION


class SignalingRecorder:
    """Appends one record (a `SipEvent`) per parsed message to the signaling spool."""

    __slots__ = ("spool", "store_body")

    def __init__(self, spool: Spool, *, store_body: bool = False) -> None:
        self.spool = spool
        self.store_body = store_body

    def __call__(self, packet: Packet, msg: SipMessage) -> None:
        record = event_record(packet, msg, store_body=self.store_body)
        # A refused append (full, write error) is counted by the spool, with its reason.
        self.spool.append(KIND_SIP, msg.call_id.encode(), orjson.dumps(record))
