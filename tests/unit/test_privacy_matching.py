"""Pseudonyms are keyed and stable, numbers are matched only whole, and erasure
rewrites every number column of the personal-data catalogue (tested itself in
tests/unit/test_personal_data.py)."""

from __future__ import annotations

import inspect
import re

import pytest
from sipcdr.model import PERSONAL_COLUMNS, PHONE_NUMBER, SIP_URI
from sipcdr.privacy import subjects
from sipcdr.privacy.matching import header_pattern, normalize_number
from sipcdr.privacy.pseudonym import is_pseudonym, pseudonym


def test_pseudonyms_are_keyed_stable_and_never_numbers() -> None:
    a, b = b"k" * 32, b"j" * 32
    assert pseudonym(a, "4940555666") == pseudonym(a, "4940555666")
    assert pseudonym(a, "4940555666") != pseudonym(b, "4940555666")
    assert pseudonym(a, "4940555666") != pseudonym(a, "4940555667")
    assert is_pseudonym(pseudonym(a, "4940555666"))
    assert not pseudonym(a, "1").isdigit()


def test_numbers_match_whole() -> None:
    pattern = re.compile(header_pattern("4940555666"))
    assert pattern.search("From: <sip:+4940555666@x>")
    assert pattern.search("To: tel:4940555666")
    assert not pattern.search("From: <sip:+149405556661@x>")
    assert normalize_number("+49 (40) 555-666") == "4940555666"
    for bad in ("040555666", "12", "49a0", "+"):
        with pytest.raises(ValueError):
            normalize_number(bad)


def test_a_number_in_other_scripts_digits_is_refused() -> None:
    """Digits Python counts as digits but signaling never carries (Arabic-Indic,
    full-width, superscript) would be stored as a restriction that no header can name
    and that the SQL rule (`header_pattern`) refuses."""
    for bad in (
        "+\u0664\u0669\u0664\u0660\u0665\u0665\u0665",
        "4940555\uff16\uff16\uff16",
        "494055566\u00b2",
    ):
        with pytest.raises(ValueError, match=r"not an E\.164 number"):
            normalize_number(bad)


def test_erasure_rewrites_every_number_and_uri_column_of_the_catalogue() -> None:
    """A CDR column the catalogue (sipcdr.model) names as a number or a SIP URI must be
    replaced by erasure; a new one left out of the UPDATE would keep the number."""
    source = inspect.getsource(subjects.erase)
    wanted = {
        column
        for column, kind in PERSONAL_COLUMNS["cdrs"].items()
        if kind in (PHONE_NUMBER, SIP_URI)
    }
    assert wanted == {"caller", "callee", "from_uri", "to_uri", "request_uri"}
    assert {column for column in wanted if f"{column} = CASE WHEN" in source} == wanted
    # Alerts: the subject column is replaced too.
    assert "UPDATE fraud_alerts SET subject = $2" in source


def test_the_python_rule_is_the_regex_rule() -> None:
    """`names_any` (the sinks) and `header_pattern` (the SQL) say the same of a header
    section; tests/integration/test_naming_agrees.py checks the regex in PostgreSQL."""
    from sipcdr.privacy.naming import names_any

    number = "4940555666"
    samples = [
        "From: <sip:+4940555666@x>",
        "Diversion: <tel:4940555666>;reason=busy",
        "X-Num: 4940555666",
        "4940555666",
        "Call-ID: 14940555666@x",
        "To: <sip:49405556660@x>",
        "To: <sip:040555666@x>",
        "Diversion: <tel:+49-40-555-666>",
        "From: <sip:+49.40.555.666@x>",
        "From: <sip:+49(40)555666@x>",
        "From: <sip:+49-40-555-666-7@x>",
        "From: <sip:+1-49-40-555-666@x>",
        "From: <sip:49-40-555-666@x>",
        "",
    ]
    assert sum(names_any(text, {number}.__contains__) for text in samples) == 7
    for text in samples:
        assert names_any(text, {number}.__contains__) == bool(
            re.search(header_pattern(number), text)
        ), text
