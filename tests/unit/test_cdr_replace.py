"""`replace_cdr`, the CDR stages' copy: the same record `dataclasses.replace` makes."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest
from sipcdr.model import Cdr, replace_cdr


def _cdr() -> Cdr:
    values = {field.name: f"v-{field.name}" for field in dataclasses.fields(Cdr)}
    return Cdr(**values)  # type: ignore[arg-type]


def test_every_field_is_copied_and_only_the_named_ones_change() -> None:
    cdr = _cdr()
    changes = {"caller": "4940123456", "egress_ip": None, "cost": Decimal("0.0123")}
    copied = replace_cdr(cdr, **changes)
    assert copied == dataclasses.replace(cdr, **changes)  # type: ignore[arg-type]
    assert copied is not cdr and cdr == _cdr()
    for field in dataclasses.fields(Cdr):
        expected = changes.get(field.name, f"v-{field.name}")
        assert getattr(copied, field.name) == expected


def test_the_copy_is_frozen_and_hashes_like_its_equal() -> None:
    copied = replace_cdr(_cdr(), caller="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        copied.caller = "y"  # type: ignore[misc]
    assert hash(copied) == hash(dataclasses.replace(_cdr(), caller="x"))


def test_an_unknown_field_is_refused() -> None:
    with pytest.raises(TypeError):
        replace_cdr(_cdr(), calller="x")
