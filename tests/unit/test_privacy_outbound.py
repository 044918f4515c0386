"""The Kafka filter: restricted subjects withheld, numbers pseudonymized, records
untouched (and unparsed) when neither applies."""

from __future__ import annotations

import orjson
import pytest
from sipcdr.privacy.outbound import OutboundFilter
from sipcdr.privacy.pseudonym import pseudonym
from sipcdr.sinks.base import KIND_ALERT, KIND_CDR, KIND_SIP

KEY = b"k" * 32
CDR = {
    "caller": "4940555666",
    "callee": "4930333444",
    "from_uri": "sip:+4940555666@example.com",
    "to_uri": "sip:4930333444@example.net",
    "request_uri": "tel:+4930333444;npdi",
    "cost": "0.01",
}
SIP = {"headers": "INVITE sip:+4930333444@x SIP/2.0\r\nFrom: <sip:+4940555666@y>;tag=1\r\n"}
ALERT = {"subject": "4940555666", "details": {"top": ["+4930333444 x7"], "n": 7}}


def test_idle_filter_passes_bytes_through_unparsed() -> None:
    outbound = OutboundFilter(None, pseudonymize=False)
    assert outbound.apply(KIND_CDR, b"not json at all") == b"not json at all"


def test_restricted_subjects_are_withheld_and_counted() -> None:
    outbound = OutboundFilter(None, pseudonymize=False)
    outbound.set_restricted(frozenset({"4940555666"}))
    assert outbound.apply(KIND_CDR, orjson.dumps(CDR)) is None
    assert outbound.apply(KIND_SIP, orjson.dumps(SIP)) is None
    assert outbound.apply(KIND_ALERT, orjson.dumps(ALERT)) is None
    other = dict(CDR, caller="4940111222", from_uri="sip:+4940111222@example.com")
    assert outbound.apply(KIND_CDR, orjson.dumps(other)) == orjson.dumps(other)
    assert outbound.withheld == {KIND_CDR: 1, KIND_SIP: 1, KIND_ALERT: 1}


def test_pseudonymized_output_carries_no_number() -> None:
    outbound = OutboundFilter(KEY, pseudonymize=True)
    a, b = pseudonym(KEY, "4940555666"), pseudonym(KEY, "4930333444")
    cdr = orjson.loads(outbound.apply(KIND_CDR, orjson.dumps(CDR)) or b"")
    assert (cdr["caller"], cdr["callee"], cdr["cost"]) == (a, b, "0.01")
    assert cdr["from_uri"] == f"sip:{a}@example.com"
    assert cdr["request_uri"] == f"tel:{b};npdi"
    sip = orjson.loads(outbound.apply(KIND_SIP, orjson.dumps(SIP)) or b"")
    alert = orjson.loads(outbound.apply(KIND_ALERT, orjson.dumps(ALERT)) or b"")
    for text in (orjson.dumps(cdr), orjson.dumps(sip), orjson.dumps(alert)):
        assert b"4940555666" not in text and b"4930333444" not in text
    assert alert["subject"] == a and alert["details"]["n"] == 7


def test_pseudonymizing_needs_a_key() -> None:
    with pytest.raises(ValueError, match="key"):
        OutboundFilter(None, pseudonymize=True)


def test_an_unreadable_record_is_withheld_when_pseudonyms_are_promised() -> None:
    outbound = OutboundFilter(KEY, pseudonymize=True)
    assert outbound.apply(KIND_CDR, b"{broken 4940555666") is None
    assert outbound.withheld == {KIND_CDR: 1}
    plain = OutboundFilter(None, pseudonymize=False)
    plain.set_restricted(frozenset({"1"}))
    assert plain.apply(KIND_CDR, b"[]") == b"[]"


def test_a_message_naming_the_subject_in_any_header_is_withheld() -> None:
    """The rule PostgreSQL flags by (`sipcdr.privacy.naming`): any header, whole digits."""
    outbound = OutboundFilter(None, pseudonymize=False)
    outbound.set_restricted(frozenset({"4940555666"}))
    diverted = {"headers": "INVITE sip:4930333444@x SIP/2.0\r\nDiversion: <tel:4940555666>\r\n"}
    longer = {"headers": "INVITE sip:4930333444@x SIP/2.0\r\nFrom: <sip:149405556661@y>\r\n"}
    assert outbound.apply(KIND_SIP, orjson.dumps(diverted)) is None
    assert outbound.apply(KIND_SIP, orjson.dumps(longer)) == orjson.dumps(longer)


def test_signaling_after_a_restricted_cdr_is_withheld_by_its_call() -> None:
    """A message in national format names no E.164 number: once the call's CDR is known
    to be a restricted subject's, its later messages are withheld by Call-ID, until the
    restriction is lifted."""
    outbound = OutboundFilter(None, pseudonymize=False)
    assert not outbound.calls.any_restricted  # a sink sharing it reads no headers yet
    outbound.set_restricted(frozenset({"4940555666"}))
    assert outbound.calls.any_restricted
    national = {"call_id": "c1@x", "headers": "BYE sip:040555666@x SIP/2.0\r\nCall-ID: c1@x\r\n"}
    value = orjson.dumps(national)
    assert outbound.apply(KIND_SIP, value) == value  # before its CDR: not known yet
    assert outbound.apply(KIND_CDR, orjson.dumps(dict(CDR, call_id="c1@x"))) is None
    assert outbound.apply(KIND_SIP, value) is None
    other = orjson.dumps(dict(national, call_id="c2@x"))
    assert outbound.apply(KIND_SIP, other) == other
    outbound.set_restricted(frozenset({"4930999888"}))  # lifted
    assert outbound.apply(KIND_SIP, value) == value


def test_the_calls_remembered_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from sipcdr.privacy import outbound as module

    monkeypatch.setattr(module, "RESTRICTED_CALLS_KEPT", 3)
    calls = module.RestrictedCalls()
    for n in range(5):
        calls.add(f"c{n}", ("4940555666",))
    assert len(calls) == 3 and "c0" not in calls and "c4" in calls
    calls.add("c2", ("4940555666",))  # seen again: the newest now
    calls.add("c5", ("4940555666",))
    assert "c2" in calls and "c3" not in calls
    calls.keep_only(frozenset({"4940555666"}))
    calls.add("c6", ("4940555666",))
    assert "c2" in calls and "c4" not in calls  # the order survives a lifted number
