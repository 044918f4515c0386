"""Pseudonyms are keyed and stable, and numbers are matched only whole. (Which fields
hold personal data is tested with the catalogue, tests/unit/test_personal_data.py.)"""

from __future__ import annotations

import re

import pytest
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
