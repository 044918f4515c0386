"""Records that name a restricted or pseudonymized number in places the Kafka filter
must also cover: the parsed URI fields of a signaling record, an alert's details, and
E.164 numbers written with the visual separators RFC 3966 allows."""

from __future__ import annotations

import orjson
import pytest
from sipcalls import Call
from sipcdr.model import Packet
from sipcdr.privacy.outbound import OutboundFilter
from sipcdr.privacy.pseudonym import pseudonym
from sipcdr.sinks.base import KIND_ALERT, KIND_CDR, KIND_SIP
from sipcdr.sip import parse
from sipcdr.sipevent import event_record

KEY = b"k" * 32
SUBJECT = "4940555666"


def signaling_record(call: Call) -> bytes:
    """The INVITE of `call` as the signaling recorder writes it to the spool."""
    payload = call.request("INVITE")
    packet = Packet(1_795_000_000.0, "192.0.2.10", 5060, "203.0.113.20", 5060, "udp", payload, "t")
    message = parse(payload)
    assert message is not None
    return orjson.dumps(event_record(packet, message))


def test_a_pseudonymized_signaling_record_carries_no_number() -> None:
    """The record holds the parsed From, To, Request-URI and P-Asserted-Identity next
    to its headers: each of them is a number the topic must not carry."""
    outbound = OutboundFilter(KEY, pseudonymize=True)
    value = signaling_record(Call(caller="+" + SUBJECT, callee="4930333444", pai="tel:+4940555666"))
    sent = outbound.apply(KIND_SIP, value)
    assert sent is not None
    assert SUBJECT.encode() not in sent and b"4930333444" not in sent, sent


def test_an_alert_naming_a_restricted_number_in_its_details_is_withheld() -> None:
    outbound = OutboundFilter(None, pseudonymize=False)
    outbound.set_restricted(frozenset({SUBJECT}))
    alert = {
        "alert_id": "a1",
        "detector": "sequential_dialing",
        "subject_kind": "caller",
        "subject": "4940111222",
        "call_ids": ["restricted@x"],
        "details": {"last_number": SUBJECT},
    }
    assert outbound.apply(KIND_ALERT, orjson.dumps(alert)) is None


@pytest.mark.parametrize("written", ["+49-40-555-666", "+49.40.555666", "+49(40)555666"])
def test_signaling_naming_the_subject_with_visual_separators_is_withheld(written: str) -> None:
    outbound = OutboundFilter(None, pseudonymize=False)
    outbound.set_restricted(frozenset({SUBJECT}))
    value = signaling_record(Call(call_id="sep@x", caller=written, callee="4930333444"))
    assert outbound.apply(KIND_SIP, value) is None


def test_a_pseudonymized_alert_key_is_its_subjects_pseudonym() -> None:
    outbound = OutboundFilter(KEY, pseudonymize=True)
    assert outbound.key(KIND_ALERT, SUBJECT.encode()) == pseudonym(KEY, SUBJECT).encode()
    assert outbound.key(KIND_ALERT, b"trunk-a") == b"trunk-a"
    assert outbound.key(KIND_SIP, b"c1@x") == b"c1@x"


@pytest.mark.parametrize(
    "header",
    [
        f'From: "+{SUBJECT}" <sip:anonymous@x>;tag=1',
        f"X-Billing-Number: {SUBJECT}",
        "Diversion: <tel:+49-40-555-666>;reason=busy",
    ],
)
def test_pseudonymized_headers_carry_no_number_anywhere(header: str) -> None:
    outbound = OutboundFilter(KEY, pseudonymize=True)
    record = {"headers": f"INVITE sip:x@y SIP/2.0\r\n{header}\r\n", "call_id": "c1@x"}
    sent = outbound.apply(KIND_SIP, orjson.dumps(record))
    assert sent is not None
    assert SUBJECT.encode() not in sent.replace(b"-", b""), sent


@pytest.mark.parametrize("field", ["from_uri", "to_uri"])
def test_a_cdr_whose_uris_name_the_subject_is_withheld(field: str) -> None:
    outbound = OutboundFilter(None, pseudonymize=False)
    outbound.set_restricted(frozenset({SUBJECT}))
    cdr = {
        "call_id": "fwd@x",
        "caller": "4940111222",
        "callee": "4930333444",
        "from_uri": "sip:+4940111222@example.com",
        "to_uri": "sip:+4930333444@example.net",
        "request_uri": "sip:+4930333444@example.net",
    }
    cdr[field] = f"sip:+{SUBJECT}@example.net"
    assert outbound.apply(KIND_CDR, orjson.dumps(cdr)) is None
