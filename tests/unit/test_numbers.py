"""The number rules: user parts and tel: URIs into E.164 digits, or marked not a number."""

from __future__ import annotations

import pytest
from sipcdr.sip.numbers import (
    EMPTY,
    LEADING_ZERO,
    NATIONAL_WITHOUT_COUNTRY,
    NOT_DIGITS,
    TOO_LONG,
    TOO_SHORT,
    Number,
    NumberingPlan,
    default_international_prefixes,
    first_number,
    normalize,
    number_from_uri,
    to_e164,
)

GERMANY = NumberingPlan(country_code="49", national_prefix="0")
UK = NumberingPlan(country_code="44", national_prefix="0")
NANP = NumberingPlan(country_code="1", national_prefix="1")


@pytest.mark.parametrize(
    ("user", "plan", "digits"),
    [
        ("+4930901820", GERMANY, "4930901820"),
        ("+49 (30) 901-820", GERMANY, "4930901820"),  # visual separators
        ("+49.30.901820", NumberingPlan(), "4930901820"),
        ("%2B4930901820", NumberingPlan(), "4930901820"),  # escaped "+"
        ("004930901820", GERMANY, "4930901820"),  # ITU-T international prefix
        ("004930901820", NumberingPlan(), "4930901820"),
        ("01144207946000", NANP, "44207946000"),  # North American international prefix
        ("01144207946000", NumberingPlan(), "44207946000"),  # no country: both prefixes
        ("030901820", GERMANY, "4930901820"),  # national through country code
        ("12125550123", NANP, "12125550123"),  # NANP national prefix 1
        ("4930901820", GERMANY, "4930901820"),  # E.164 without "+", as interconnects send
        ("4930901820;npdi;rn=+4930999", GERMANY, "4930901820"),  # other params dropped
    ],
)
def test_numbers_in_their_usual_spellings(user: str, plan: NumberingPlan, digits: str) -> None:
    assert normalize(user, plan) == Number(digits, True)


def test_011_is_a_uk_area_code_not_an_international_prefix() -> None:
    # Leeds, 0113 496 0000: under country code 44 only 00 is international.
    assert normalize("01134960000", UK) == Number("441134960000", True)
    assert normalize("00441134960000", UK) == Number("441134960000", True)
    assert default_international_prefixes("44") == ("00",)
    assert default_international_prefixes("1") == ("011",)
    assert default_international_prefixes(None) == ("011", "00")


def test_explicit_international_prefixes_replace_the_defaults() -> None:
    australia = NumberingPlan(
        country_code="61", national_prefix="0", international_prefixes=("0011",)
    )
    assert normalize("0011442079460000", australia) == Number("442079460000", True)
    # "00" is not international there: it reads as a national number.
    assert normalize("0298765432", australia) == Number("61298765432", True)


@pytest.mark.parametrize(
    ("user", "digits"),
    [
        ("#31#+4930901820", "4930901820"),  # caller-id suppression code
        ("#31#030901820", "4930901820"),
        ("1010004930901820", "4930901820"),  # carrier selection before 00
        ("#31#1010+4930901820", "4930901820"),  # two technical prefixes
        ("%2331%23030901820", "4930901820"),  # escaped "#"
    ],
)
def test_technical_prefixes_of_the_trunk_are_stripped(user: str, digits: str) -> None:
    plan = NumberingPlan(country_code="49", national_prefix="0", strip_prefixes=("1010", "#31#"))
    assert normalize(user, plan) == Number(digits, True)


def test_technical_prefixes_are_not_stripped_where_not_configured() -> None:
    assert normalize("#31#+4930901820", GERMANY) == Number("#31#+4930901820", False, NOT_DIGITS)


def test_phone_context_gives_the_country_or_area_of_a_local_number() -> None:
    plain = NumberingPlan()
    # 3GPP style: a national number in the context of a country.
    assert normalize("030901820;phone-context=+49", GERMANY) == Number("4930901820", True)
    assert normalize("030901820;phone-context=+49", NumberingPlan(national_prefix="0")) == Number(
        "4930901820", True
    )
    # RFC 3966 style: a local number within an area.
    assert normalize("5550123;phone-context=+1-212", plain) == Number("12125550123", True)
    assert normalize("5550123;PHONE-CONTEXT=+1-212", plain) == Number("12125550123", True)
    # A domain-name context names no country: the trunk's plan applies.
    assert normalize("030901820;phone-context=example.com", GERMANY) == Number("4930901820", True)
    # A global number ignores its context.
    assert normalize("+4930901820;phone-context=+1", plain) == Number("4930901820", True)


@pytest.mark.parametrize(
    ("user", "plan", "reason"),
    [
        ("alice", GERMANY, NOT_DIGITS),
        ("*21#", GERMANY, NOT_DIGITS),
        ("+49-30-abc", GERMANY, NOT_DIGITS),
        ("+", GERMANY, NOT_DIGITS),
        ("\uff14\uff19\uff13\uff10\uff19\uff10\uff11\uff18\uff12\uff10", GERMANY, NOT_DIGITS),
        ("112", GERMANY, TOO_SHORT),  # emergency: not a US number starting with 1
        ("+4912", GERMANY, TOO_SHORT),
        ("+4930901820123456", GERMANY, TOO_LONG),  # 16 digits
        ("030901820", NumberingPlan(), LEADING_ZERO),  # national, country unknown
        ("030901820", NumberingPlan(national_prefix="0"), NATIONAL_WITHOUT_COUNTRY),
        ("+04930901820", GERMANY, LEADING_ZERO),
        ("00", GERMANY, NOT_DIGITS),
    ],
)
def test_what_is_not_a_number_stays_raw_and_is_flagged(
    user: str, plan: NumberingPlan, reason: str
) -> None:
    assert normalize(user, plan) == Number(user, False, reason)


def test_empty_user_part() -> None:
    assert normalize(None) == Number("", False, EMPTY)
    assert normalize("") == Number("", False, EMPTY)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sip:+4930901820@carrier.example;user=phone", Number("4930901820", True)),
        ("sips:030901820@carrier.example", Number("4930901820", True)),
        ("sip:+4930901820:secret@carrier.example", Number("4930901820", True)),
        ("tel:+49-30-901820", Number("4930901820", True)),
        ("tel:901820;phone-context=+49-30", Number("4930901820", True)),
        ("TEL:030901820", Number("4930901820", True)),
        ("sip:alice@example.com", Number("alice", False, NOT_DIGITS)),
        ("sip:carrier.example", Number("", False, EMPTY)),
        ("urn:service:sos", Number("", False, EMPTY)),
        ("", Number("", False, EMPTY)),
    ],
)
def test_numbers_from_uris(uri: str, expected: Number) -> None:
    assert number_from_uri(uri, GERMANY) == expected


def test_first_number_prefers_the_first_uri_holding_a_number() -> None:
    pai = "sip:+4940999888@carrier.example"
    anonymous = "sip:anonymous@anonymous.invalid"
    assert first_number((pai, anonymous), GERMANY) == Number("4940999888", True)
    assert first_number((anonymous, pai), GERMANY) == Number("4940999888", True)
    assert first_number((None, anonymous), GERMANY) == Number("anonymous", False, NOT_DIGITS)
    host_only = "sip:gw.example"
    assert first_number((host_only, anonymous), GERMANY) == Number("anonymous", False, NOT_DIGITS)
    assert first_number((), GERMANY) == Number("", False, EMPTY)


def test_numbering_plan_keeps_prefixes_longest_first() -> None:
    plan = NumberingPlan(
        strip_prefixes=("#31#", "1010", "#31#12"), international_prefixes=("0", "00")
    )
    assert plan.strip_prefixes == ("#31#12", "#31#", "1010")
    assert plan.international_prefixes == ("00", "0")
    assert NumberingPlan(country_code="1").international_prefixes == ("011",)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"country_code": "0"},
        {"country_code": "4917"},
        {"country_code": "4a"},
        {"national_prefix": "o"},
        {"strip_prefixes": ("",)},
        {"strip_prefixes": (" #31#",)},
        {"international_prefixes": ("+",)},
    ],
)
def test_numbering_plan_refuses_values_that_are_not_numbering(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        NumberingPlan(**kwargs)  # type: ignore[arg-type]


def test_to_e164_keeps_the_cdr_digits_it_always_gave() -> None:
    # caller/callee of the CDR: dialled national numbers stay as dialled without a
    # country code, non-numbers give None.
    assert to_e164("+49 (30) 1234") == "49301234"
    assert to_e164("0049301234") == "49301234"
    assert to_e164("0301234567", "49", "0") == "49301234567"
    assert to_e164("0301234567") == "0301234567"
    assert to_e164("alice") is None
    assert to_e164(None) is None
