"""The pricing rule on its worked examples, and exact against a rational reference."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sipcdr.model import money_text
from sipcdr.rating import Rating, load_rate_plans
from sipcdr.rating.pricing import billed_seconds, cost


@pytest.mark.parametrize(
    ("billsec", "min_seconds", "increment", "billed"),
    [
        (61.0, 60, 60, 120),  # the worked examples of schemas/rate_deck.md
        (34.0, 30, 6, 36),
        (2.008, 1, 1, 3),
        (0.0, 60, 60, 0),  # answered, hung up at once: nothing billed
        (0.0004, 1, 1, 0),  # below the CDR's millisecond: 0
        (0.001, 60, 60, 60),  # any time at all bills the first increment
        (12.0, 30, 6, 30),  # within the minimum
        (30.0, 30, 6, 30),  # exactly the minimum
        (30.001, 30, 6, 36),
        (60.0, 60, 60, 60),
        (120.0, 60, 60, 120),  # a whole number of increments: no extra one
        (120.001, 60, 60, 180),
        (3599.999, 60, 60, 3600),
        (5.5, 0, 6, 6),  # no minimum: increments from the first second
        (0.3, 0, 1, 1),
    ],
)
def test_billed_seconds(billsec: float, min_seconds: int, increment: int, billed: int) -> None:
    assert billed_seconds(billsec, min_seconds, increment) == billed


def test_cost_of_the_worked_examples() -> None:
    # 0.0100 a minute, 61 s on 60/60: 120 s billed, 0.0200.
    assert cost(Decimal("0.0100"), Decimal(0), 120, 4) == Decimal("0.0200")
    # A connect fee is added once.
    assert cost(Decimal("0.0100"), Decimal("0.0500"), 120, 4) == Decimal("0.0700")
    # 0.0120 a minute, 34 s on 30/6: 36 s billed, 0.0072.
    assert cost(Decimal("0.0120"), Decimal(0), 36, 4) == Decimal("0.0072")
    # Answered at 0 s: the connect fee alone.
    assert cost(Decimal("0.0120"), Decimal("0.0150"), 0, 4) == Decimal("0.0150")


def test_cost_rounds_once_half_up_at_the_end() -> None:
    # 0.0125 a minute for 30 s is 0.00625: half-up gives 0.0063 (banker's would 0.0062).
    result = cost(Decimal("0.0125"), Decimal(0), 30, 4)
    assert result == Decimal("0.0063")
    exact = Decimal("0.00625")
    assert exact.quantize(Decimal("0.0001"), rounding=ROUND_HALF_EVEN) == Decimal("0.0062")
    # Just under the half rounds down: 0.01249999 a minute for 30 s.
    assert cost(Decimal("0.01249999"), Decimal(0), 30, 4) == Decimal("0.0062")
    # Rounded once: 1/3 of a cent per call stays exact until the end.
    assert cost(Decimal("0.01"), Decimal("0.00005"), 20, 4) == Decimal("0.0034")  # 0.0033833..


def test_cost_has_exactly_the_configured_places() -> None:
    assert format(cost(Decimal("0.0100"), Decimal(0), 120, 4), "f") == "0.0200"
    assert format(cost(Decimal("0.0100"), Decimal(0), 120, 2), "f") == "0.02"
    assert format(cost(Decimal("1"), Decimal(0), 90, 0), "f") == "2"  # 1.5 half-up
    assert format(cost(Decimal("0.0000001"), Decimal(0), 60, 8), "f") == "0.00000010"
    assert format(cost(Decimal(0), Decimal(0), 0, 4), "f") == "0.0000"


def test_cost_is_exact_where_floats_are_not() -> None:
    # In floats 0.07 * 600 / 60 is 0.7000000000000001; at 12 places that shows.
    assert format(cost(Decimal("0.07"), Decimal(0), 600, 12), "f") == "0.700000000000"
    # 0.1 + 0.2 * 60 / 60 is 0.30000000000000004 in floats.
    assert format(cost(Decimal("0.2"), Decimal("0.1"), 60, 12), "f") == "0.300000000000"


amounts = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)


@given(
    rate=amounts,
    fee=amounts,
    billed=st.integers(min_value=0, max_value=86_400 * 7),
    decimals=st.integers(min_value=0, max_value=8),
)
def test_cost_equals_a_rational_reference(
    rate: Decimal, fee: Decimal, billed: int, decimals: int
) -> None:
    exact = Fraction(fee) + Fraction(rate) * billed / 60
    scaled = exact * 10**decimals
    units = int(scaled) + (1 if scaled - int(scaled) >= Fraction(1, 2) else 0)
    assert cost(rate, fee, billed, decimals) == Decimal(units).scaleb(-decimals)


@given(
    billsec_ms=st.integers(min_value=0, max_value=86_400_000),
    min_seconds=st.integers(min_value=0, max_value=600),
    increment=st.integers(min_value=1, max_value=600),
)
def test_billed_seconds_is_the_smallest_billable_time_covering_the_call(
    billsec_ms: int, min_seconds: int, increment: int
) -> None:
    billed = billed_seconds(billsec_ms / 1000, min_seconds, increment)
    if billsec_ms == 0:
        assert billed == 0
        return
    assert billed * 1000 >= billsec_ms
    assert billed >= min_seconds
    assert (billed - min_seconds) % increment == 0
    # One increment less would not cover the call (or would undercut the minimum).
    assert billed == min_seconds or (billed - increment) * 1000 < billsec_ms


@pytest.mark.parametrize(
    ("rate", "fee", "min_seconds", "increment", "billsec", "answered", "billed", "charged"),
    [
        ("0.0100", "0", 60, 60, 61.0, True, 120, "0.0200"),
        ("0.0120", "0", 30, 6, 34.0, True, 36, "0.0072"),
        ("0.0120", "0.0150", 30, 6, 34.0, True, 36, "0.0222"),
        ("0.0100", "0", 1, 1, 2.008, True, 3, "0.0005"),
        ("0.0120", "0", 30, 6, 12.0, True, 30, "0.0060"),
        ("0.0100", "0", 60, 60, 120.0, True, 120, "0.0200"),
        ("0.0125", "0", 1, 1, 30.0, True, 30, "0.0063"),
        ("0.0120", "0.0150", 30, 6, 0.0, True, 0, "0.0150"),
        ("0.0120", "0.0150", 30, 6, 0.0, False, 0, "0.0000"),
    ],
)
def test_the_worked_examples_of_the_deck_documentation(
    rate: str,
    fee: str,
    min_seconds: int,
    increment: int,
    billsec: float,
    answered: bool,
    billed: int,
    charged: str,
) -> None:
    """The table in schemas/rate_deck.md, row by row, through a rate plan."""
    deck = (
        "prefix,destination,rate,connect_fee,min_seconds,increment_seconds,"
        "effective_from,currency\n"
        f"49,Germany,{rate},{fee},{min_seconds},{increment},2026-01-01,EUR\n"
    ).encode()
    plans = load_rate_plans({"p": deck}, "p", 4, 0).plans
    result = plans.rate("p", "4930901820", 1_790_000_000.0, billsec, answered)
    assert isinstance(result, Rating)
    assert (result.billed_seconds, money_text(result.cdr_fields()["cost"])) == (billed, charged)
