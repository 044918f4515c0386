"""The enrich stage's `caller` and `callee` are `to_e164`'s, whichever way it reads them."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sipcdr.config.schema import TrunkConfig
from sipcdr.enrich import EnrichStage
from sipcdr.fraud.numbering import e164
from sipcdr.model import Cdr
from sipcdr.sip.numbers import to_e164

# Digits, the prefixes and separators of numbers as dialled, and what makes a user
# part no number: parameters, escapes, letters, non-ASCII digits.
_ALPHABET = "0123456789" * 3 + "+;%=-.() ab#*\u0663\u00b2"
_PLANS = [(None, None), ("49", "0"), ("1", "1"), ("44", ""), ("", "0"), ("358", "00")]

USERS = [
    None,
    "",
    "+",
    "0",
    "00",
    "000",
    "+00",
    "0049301234567",
    "+49301234567",
    "+0049301234567",
    "030 1234567",
    "030-1234-567",
    "(030)1234567",
    "0301234567",
    "4930123456",
    "1" * 15,
    "1" * 16,
    "+" + "1" * 15,
    "+" + "1" * 16,
    "00" + "1" * 15,
    "0" + "1" * 15,
    "+49301234;npdi",
    "0301234;user=phone",
    "%2B49301234",
    "++49301234",
    "+-49301234",
    "alice",
    "*21#",
    "\u0663\u0663\u0663",
    "12\u00b2",
]


@pytest.mark.parametrize("plan", _PLANS)
@pytest.mark.parametrize("user", USERS)
def test_e164_is_to_e164(user: str | None, plan: tuple[str | None, str | None]) -> None:
    assert e164(user, *plan) == to_e164(user, *plan)


@settings(max_examples=500, deadline=None)
@given(
    user=st.one_of(st.none(), st.text(alphabet=_ALPHABET, max_size=20)),
    plan=st.sampled_from(_PLANS),
)
def test_e164_is_to_e164_for_any_user_part(
    user: str | None, plan: tuple[str | None, str | None]
) -> None:
    assert e164(user, *plan) == to_e164(user, *plan)


def test_enrich_stage_numbers_are_to_e164s() -> None:
    trunk = TrunkConfig(
        "berlin", (ipaddress.ip_network("192.0.2.0/24"),), country_code="49", national_prefix="0"
    )
    stage = EnrichStage([trunk])
    plain = _cdr("0301234567", "+4940123456")
    unusual = _cdr("030 123-4567;npdi", "%2B4940123456")
    for cdr in (plain, unusual):
        out = stage.on_cdr(cdr)
        assert out.caller == to_e164(cdr.caller, "49", "0")
        assert out.callee == to_e164(cdr.callee, "49", "0")
        assert out.trunk == "berlin"
    assert stage.on_cdr(plain).caller == "49301234567"
    assert stage.on_cdr(unusual).caller == "49301234567"


def _cdr(caller: str, callee: str) -> Cdr:
    start = 1_780_000_000.0
    return Cdr(
        cdr_id="9b2f6a4c-1d3e-5f70-8a9b-0c1d2e3f4a5b",
        call_id="call-1@192.0.2.10",
        caller=caller,
        callee=callee,
        from_uri=f"sip:{caller}@example.com",
        to_uri=f"sip:{callee}@example.net",
        request_uri=f"sip:{callee}@example.net",
        src_ip="192.0.2.10",
        src_port=5060,
        dst_ip="198.51.100.1",
        dst_port=5060,
        trunk=None,
        start_time=start,
        ring_time=start + 1,
        answer_time=start + 2,
        end_time=start + 30,
        pdd_ms=1000,
        disposition="answered",
        sip_code=200,
        sip_reason="OK",
        q850_cause=None,
        hangup_by="caller",
        end_reason="bye",
        user_agent=None,
        capture_node="test",
        egress_ip="198.51.100.1",
    )
