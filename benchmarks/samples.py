"""Typical carrier traffic for the benchmarks: an INVITE and its 200 OK with SDP, a BYE;
and CDR records as the daemon spools them."""

from __future__ import annotations

import random
import uuid
from decimal import Decimal

import orjson
from sipcdr.model import Cdr


def _crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


_SDP = _crlf(
    """v=0
o=- 3712838012 3712838012 IN IP4 198.51.100.10
s=-
c=IN IP4 198.51.100.10
t=0 0
m=audio 30000 RTP/AVP 8 0 18 101
a=rtpmap:8 PCMA/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:18 G729/8000
a=fmtp:18 annexb=no
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
a=ptime:20
a=sendrecv
"""
)

INVITE = (
    _crlf(
        f"""INVITE sip:+4930901820@203.0.113.5:5060;user=phone SIP/2.0
Via: SIP/2.0/UDP 198.51.100.10:5060;branch=z9hG4bK-524287-1---a1b2c3d4e5f60718;rport
Via: SIP/2.0/UDP 192.0.2.44:5060;received=192.0.2.44;branch=z9hG4bK776asdhds
Max-Forwards: 69
Contact: <sip:+4940123456@198.51.100.10:5060;transport=udp>
To: <sip:+4930901820@203.0.113.5;user=phone>
From: "Alice Example" <sip:+4940123456@198.51.100.10;user=phone>;tag=3fa1b2c4
Call-ID: 8f2d3c4b5a69@198.51.100.10
CSeq: 102 INVITE
Allow: INVITE, ACK, CANCEL, OPTIONS, BYE, REFER, NOTIFY, MESSAGE, SUBSCRIBE, INFO, UPDATE
Supported: replaces, timer, 100rel
Session-Expires: 1800;refresher=uac
Min-SE: 90
P-Asserted-Identity: "Alice Example" <sip:+4940123456@carrier.example;user=phone>
User-Agent: ExampleSBC/4.2.1
Content-Type: application/sdp
Content-Length: {len(_SDP)}

"""
    )
    + _SDP
)

OK_200 = (
    _crlf(
        f"""SIP/2.0 200 OK
Via: SIP/2.0/UDP 198.51.100.10:5060;branch=z9hG4bK-524287-1---a1b2c3d4e5f60718;rport=5060
Via: SIP/2.0/UDP 192.0.2.44:5060;received=192.0.2.44;branch=z9hG4bK776asdhds
Record-Route: <sip:203.0.113.5;lr>
Contact: <sip:+4930901820@203.0.113.77:5060>
To: <sip:+4930901820@203.0.113.5;user=phone>;tag=as6b1c1a2e
From: "Alice Example" <sip:+4940123456@198.51.100.10;user=phone>;tag=3fa1b2c4
Call-ID: 8f2d3c4b5a69@198.51.100.10
CSeq: 102 INVITE
Server: ExamplePBX 18.2
Allow: INVITE, ACK, CANCEL, OPTIONS, BYE, REFER, SUBSCRIBE, NOTIFY, INFO, PUBLISH, MESSAGE
Supported: replaces, timer
Session-Expires: 1800;refresher=uac
Content-Type: application/sdp
Content-Length: {len(_SDP)}

"""
    )
    + _SDP
)

BYE = _crlf(
    """BYE sip:+4930901820@203.0.113.77:5060 SIP/2.0
Via: SIP/2.0/UDP 198.51.100.10:5060;branch=z9hG4bK-524287-1---ffee0011aa22;rport
Max-Forwards: 70
Route: <sip:203.0.113.5;lr>
To: <sip:+4930901820@203.0.113.5;user=phone>;tag=as6b1c1a2e
From: "Alice Example" <sip:+4940123456@198.51.100.10;user=phone>;tag=3fa1b2c4
Call-ID: 8f2d3c4b5a69@198.51.100.10
CSeq: 103 BYE
Reason: Q.850;cause=16;text="Normal call clearing"
User-Agent: ExampleSBC/4.2.1
Content-Length: 0

"""
)

MESSAGES = {"INVITE": INVITE, "200 OK": OK_200, "BYE": BYE}


def cdr_values(count: int, seed: int = 7) -> list[bytes]:
    """Distinct, realistic CDRs as spooled: numbers, addresses, times and outcomes vary."""
    return [orjson.dumps(cdr.to_record()) for cdr in cdrs(count, seed)]


def cdrs(count: int, seed: int = 7) -> list[Cdr]:
    """Distinct, realistic CDRs: numbers, addresses, times and outcomes vary per call."""
    rng = random.Random(seed)
    values = []
    start = 1_790_000_000.0
    dispositions = [
        ("answered", 200, "OK", "bye"),
        ("busy", 486, "Busy Here", "final_response"),
        ("no_answer", 480, "Temporarily Unavailable", "final_response"),
        ("cancelled", 487, "Request Terminated", "cancel"),
    ]
    for i in range(count):
        disposition, code, reason, end_reason = dispositions[0 if i % 3 else rng.randrange(4)]
        answered = disposition == "answered"
        begin = start + i * 0.37
        ring = begin + rng.uniform(0.2, 4.0)
        answer = ring + rng.uniform(1, 20) if answered else None
        end = (answer or ring) + rng.uniform(1, 600)
        caller = f"49{rng.randrange(10**9, 10**10)}"
        callee = f"{rng.choice(['49', '33', '44', '1'])}{rng.randrange(10**8, 10**10)}"
        cdr = Cdr(
            cdr_id=str(uuid.UUID(int=rng.getrandbits(128), version=5)),
            call_id=f"{rng.getrandbits(64):016x}-{i}@198.51.100.{i % 250}",
            caller=caller,
            callee=callee,
            from_uri=f"sip:+{caller}@sbc-a.carrier.example",
            to_uri=f"sip:+{callee}@core.example.net",
            request_uri=f"sip:+{callee}@10.20.{i % 200}.7:5060;user=phone",
            src_ip=f"198.51.100.{i % 250}",
            src_port=5060,
            dst_ip="203.0.113.5",
            dst_port=5060,
            trunk="carrier-a",
            start_time=begin,
            ring_time=ring,
            answer_time=answer,
            end_time=end,
            pdd_ms=round((ring - begin) * 1000),
            disposition=disposition,
            sip_code=code,
            sip_reason=reason,
            q850_cause=16 if answered else None,
            hangup_by="caller" if answered else None,
            end_reason=end_reason,
            user_agent="Sonus SBC 9.2",
            capture_node="2001",
            rated=answered,
            rate_prefix="4930" if answered else None,
            rate_name="Germany Berlin" if answered else None,
            rate_per_minute=Decimal("0.0120") if answered else None,
            billed_seconds=round(end - answer) if answer else None,
            cost=Decimal(f"{(end - answer) / 60 * 0.012:.6f}") if answer else None,
            currency="EUR" if answered else None,
        )
        values.append(cdr)
    return values
