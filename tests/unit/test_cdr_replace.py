"""`replace_cdr`, the CDR stages' copy: the same record `dataclasses.replace` makes;
and `rfc3339`, the times of every record written."""

from __future__ import annotations

import dataclasses
import time
from decimal import Decimal

import pytest
from sipcdr import model
from sipcdr.model import Cdr, replace_cdr, rfc3339


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


@pytest.mark.parametrize(
    "timestamp",
    [
        0.0,
        1_790_000_000.0,
        1_790_000_000.123456,
        1_790_000_000.9999996,  # rounds up into the next second
        1_790_035_199.9999999,  # ... and into the next day
        1_767_225_599.5,  # the last second of 2025
        951_782_400.25,  # 2000-02-29
        -1.5,  # before the epoch
        4_102_444_800.000001,
    ],
)
def test_rfc3339_is_strftime_of_the_rounded_second(timestamp: float) -> None:
    micros = round(timestamp * 1_000_000)
    second, fraction = divmod(micros, 1_000_000)
    expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)) + f".{fraction:06d}Z"
    # Twice, and after another second's: what is remembered must not leak.
    assert rfc3339(timestamp) == expected
    rfc3339(timestamp + 86_400 * 3)
    assert rfc3339(timestamp) == expected


def test_rfc3339_remembers_a_bounded_number_of_seconds() -> None:
    start = 1_790_000_000
    for offset in range(3 * model._SECONDS_KEPT):
        assert rfc3339(start + offset + 0.5).endswith(".500000Z")
    assert len(model._seconds) <= model._SECONDS_KEPT
    assert rfc3339(start + 0.5) == time.strftime("%Y-%m-%dT%H:%M:%S.500000Z", time.gmtime(start))
