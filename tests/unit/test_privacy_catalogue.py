"""The personal-data catalogue covers every field of every record schema, pseudonyms
are keyed and stable, and numbers are matched only whole."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from sipcdr.privacy import catalogue
from sipcdr.privacy.matching import header_pattern, normalize_number
from sipcdr.privacy.pseudonym import is_pseudonym, pseudonym

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
# Names that suggest a number or an address: such a field may not be called "none".
SUSPECT = re.compile(
    r"(^|_)(ip|addr|address|caller|callee|uri|number|user|subject|from|to|contact|host)(_|$)"
)


@pytest.mark.parametrize("table", sorted(catalogue.FIELDS))
def test_every_schema_field_is_classified(table: str) -> None:
    schema = json.loads((SCHEMAS / catalogue.SCHEMA_OF_TABLE[table]).read_text())
    fields = set(schema["properties"])
    assert fields == set(catalogue.FIELDS[table]), (
        "classify the new fields in sipcdr/privacy/catalogue.py: "
        f"{sorted(fields ^ set(catalogue.FIELDS[table]))}"
    )
    for name, kind in catalogue.FIELDS[table].items():
        if SUSPECT.search(name) and name not in ("user_agent", "subject_kind"):
            assert kind != catalogue.NONE, f"{table}.{name} looks personal"


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
