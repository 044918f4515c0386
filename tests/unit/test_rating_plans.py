"""Rate plans: the longest effective prefix prices the call; unrated calls say why;
a refused deck leaves the plan it had."""

from __future__ import annotations

import json
from calendar import timegm
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sipcdr.model import money_text
from sipcdr.rates import load_plan_files
from sipcdr.rating import (
    INVALID_NUMBER,
    NO_PLAN,
    NO_PREFIX,
    NOT_EFFECTIVE,
    UNRATED_REASONS,
    Deck,
    PrefixIndex,
    Rate,
    RatePlans,
    Rating,
    Unrated,
    check_deck,
    load_rate_plans,
    unreadable,
)
from sipcdr.rating.plans import _COSTS_KEPT
from sipcdr.rating.pricing import cost

HEADER = (
    "prefix,destination,rate,connect_fee,min_seconds,increment_seconds,"
    "effective_from,effective_to,currency,change\n"
)
WHOLESALE = (
    HEADER
    + "49,Germany,0.0100,0,60,60,2025-01-01,,EUR,\n"
    + "4930,Germany Berlin,0.0120,0.0150,30,6,2025-01-01,,EUR,\n"
    + "4930,Germany Berlin,0.0150,0.0150,30,6,2026-01-01,,EUR,increase\n"  # at midnight
    + "49151,Germany Mobile,0.0500,0,1,1,2025-01-01,2026-01-01,EUR,closed\n"  # closed
    + "44,United Kingdom,0.0125,0,1,1,2025-01-01,,EUR,\n"
    + "447,United Kingdom Mobile,0.0300,0,60,60,2026-03-01,,EUR,new\n"  # not yet open
    + "1,USA,0.0050,0,6,6,2025-01-01,2025-07-01,EUR,\n"  # a gap, then back
    + "1,USA,0.0060,0,6,6,2025-09-01,,EUR,\n"
).encode()
VENDOR = (HEADER + "49,Germany,0.0080,0,1,1,2025-01-01,,USD,\n").encode()
NEW_YEAR = float(timegm((2026, 1, 1, 0, 0, 0)))
SPRING = float(timegm((2026, 4, 1, 12, 0, 0)))
SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "cdr.v1.schema.json"


def plans(decimals: int = 4) -> RatePlans:
    load = load_rate_plans({"wholesale": WHOLESALE, "vendor": VENDOR}, "wholesale", decimals, 0)
    assert load.refused == ()
    return load.plans


def rated(result: Rating | Unrated) -> Rating:
    assert isinstance(result, Rating), result
    return result


def test_an_answered_call_is_priced_by_its_longest_prefix() -> None:
    result = rated(plans().rate("wholesale", "4930901820", SPRING, 34.0, answered=True))
    assert (result.rate.prefix, result.rate.destination) == ("4930", "Germany Berlin")
    assert result.billed_seconds == 36  # 30/6
    # 0.0150 + 0.0150 * 36 / 60 = 0.0240
    assert result.cost == Decimal("0.0240")
    assert result.rate.currency == "EUR"
    assert result.plan == "wholesale"


def test_a_shorter_prefix_prices_what_no_longer_one_matches() -> None:
    result = rated(plans().rate("wholesale", "4940123456", SPRING, 61.0, answered=True))
    assert result.rate.prefix == "49"
    assert (result.billed_seconds, result.cost) == (120, Decimal("0.0200"))


def test_an_unanswered_call_is_matched_and_recorded_at_zero() -> None:
    result = rated(plans().rate("wholesale", "4930901820", SPRING, 0.0, answered=False))
    assert result.rate.prefix == "4930"
    assert result.billed_seconds == 0
    assert format(result.cost, "f") == "0.0000"  # no connect fee without an answer


def test_an_answered_call_of_no_time_pays_the_connect_fee() -> None:
    result = rated(plans().rate("wholesale", "4930901820", SPRING, 0.0, answered=True))
    assert (result.billed_seconds, result.cost) == (0, Decimal("0.0150"))


def test_the_price_changes_at_midnight() -> None:
    before = rated(plans().rate("wholesale", "4930901820", NEW_YEAR - 0.001, 60, True))
    after = rated(plans().rate("wholesale", "4930901820", NEW_YEAR, 60, True))
    assert before.rate.rate == Decimal("0.0120")
    assert after.rate.rate == Decimal("0.0150")
    assert (before.cost, after.cost) == (Decimal("0.0270"), Decimal("0.0300"))


def test_a_prefix_closed_by_effective_to_gives_way_to_a_shorter_one() -> None:
    mobile = "4915112345678"
    before = rated(plans().rate("wholesale", mobile, NEW_YEAR - 1, 10, True))
    after = rated(plans().rate("wholesale", mobile, NEW_YEAR, 10, True))
    assert before.rate.destination == "Germany Mobile"
    assert after.rate.destination == "Germany"


def test_a_prefix_not_yet_effective_gives_way_to_a_shorter_one() -> None:
    mobile = "447700900123"
    assert (
        rated(plans().rate("wholesale", mobile, SPRING - 86_400 * 60, 1, True)).rate.prefix == "44"
    )
    assert rated(plans().rate("wholesale", mobile, SPRING, 1, True)).rate.prefix == "447"


def test_a_number_whose_prefixes_are_all_out_of_effect_is_not_effective() -> None:
    us = "12125550123"
    gap = float(timegm((2025, 8, 1, 0, 0, 0)))
    assert plans().rate("wholesale", us, gap, 30, True) == Unrated(NOT_EFFECTIVE)
    assert plans().rate("wholesale", us, float(timegm((2024, 1, 1, 0, 0, 0))), 30, True) == (
        Unrated(NOT_EFFECTIVE)
    )
    assert rated(plans().rate("wholesale", us, SPRING, 30, True)).rate.rate == Decimal("0.0060")


def test_unrated_calls_say_why() -> None:
    rate_plans = plans()
    assert rate_plans.rate("wholesale", "33123456789", SPRING, 30, True) == Unrated(NO_PREFIX)
    assert rate_plans.rate("retail", "4930901820", SPRING, 30, True) == Unrated(NO_PLAN)
    assert rate_plans.rate("wholesale", None, SPRING, 30, True) == Unrated(INVALID_NUMBER)
    assert rate_plans.rate("wholesale", "4" * 16, SPRING, 30, True) == Unrated(INVALID_NUMBER)
    no_default = RatePlans(rate_plans.decks, None)
    assert no_default.rate(None, "4930901820", SPRING, 30, True) == Unrated(NO_PLAN)
    assert {NO_PLAN, NO_PREFIX, NOT_EFFECTIVE, INVALID_NUMBER} == set(UNRATED_REASONS)


def test_no_plan_comes_before_the_number_is_looked_at() -> None:
    assert plans().rate("retail", None, SPRING, 30, True) == Unrated(NO_PLAN)


def test_the_default_plan_prices_calls_of_a_trunk_without_one() -> None:
    result = rated(plans().rate(None, "4930901820", SPRING, 30, True))
    assert result.plan == "wholesale"


def test_each_plan_prices_in_its_own_deck_and_currency() -> None:
    vendor = rated(plans().rate("vendor", "4930901820", SPRING, 30, True))
    assert (vendor.rate.prefix, vendor.rate.currency, vendor.cost) == (
        "49",
        "USD",
        Decimal("0.0040"),
    )


def test_decimals_apply_to_every_cost() -> None:
    result = rated(plans(decimals=2).rate("wholesale", "4930901820", SPRING, 34.0, True))
    assert format(result.cost, "f") == "0.02"  # 0.0240
    unanswered = rated(plans(decimals=2).rate("wholesale", "4930901820", SPRING, 0.0, False))
    assert format(unanswered.cost, "f") == "0.00"
    with pytest.raises(ValueError, match="decimals"):
        RatePlans(decimals=13)


def test_cdr_fields_are_the_cdr_schemas_rating_fields() -> None:
    schema = json.loads(SCHEMA.read_text())["properties"]
    result = rated(plans().rate("wholesale", "4930901820", SPRING, 34.0, True))
    fields = dict(result.cdr_fields())
    assert fields == {
        "rated": True,
        "rate_prefix": "4930",
        "rate_name": "Germany Berlin",
        "rate_per_minute": Decimal("0.0150"),
        "billed_seconds": 36,
        "cost": Decimal("0.0240"),
        "currency": "EUR",
    }
    unrated = dict(Unrated(NO_PREFIX).cdr_fields())
    assert unrated == {name: None for name in fields} | {"rated": False}
    for record in (fields, unrated):
        for name, value in record.items():
            # On the wire as the CDR writes it: money as a decimal string.
            wire = money_text(value) if isinstance(value, Decimal) else value
            jsonschema.validate(wire, schema[name])


def test_a_tiny_rate_is_written_without_an_exponent() -> None:
    deck = (HEADER + "49,Germany,0.0000001,0,1,1,2025-01-01,,EUR,\n").encode()
    rate_plans = load_rate_plans({"p": deck}, "p", 4, 0).plans
    result = rated(rate_plans.rate("p", "4930901820", SPRING, 60, True))
    assert result.cdr_fields()["rate_per_minute"] == Decimal("0.0000001")
    assert money_text(result.cdr_fields()["rate_per_minute"]) == "0.0000001"


def test_a_refused_deck_leaves_the_plan_its_previous_deck() -> None:
    first = plans()
    broken = WHOLESALE + b"4931,Germany,abc,0,1,1,2025-01-01,,EUR,\n"
    reload = load_rate_plans({"wholesale": broken, "vendor": VENDOR}, "wholesale", 4, 0, first)
    assert (reload.loaded, reload.refused) == (("vendor",), ("wholesale",))
    assert reload.reports["wholesale"].errors[0].line == 10
    assert reload.plans.decks["wholesale"] is first.decks["wholesale"]
    assert reload.plans.decks["vendor"] is not first.decks["vendor"]
    assert (
        rated(reload.plans.rate("wholesale", "4930901820", SPRING, 30, True)).rate.prefix == "4930"
    )


def test_a_refused_deck_at_start_leaves_its_plan_unpriced() -> None:
    load = load_rate_plans({"wholesale": b"prefix\n"}, "wholesale", 4, 0)
    assert load.refused == ("wholesale",)
    assert "wholesale" not in load.plans.decks
    assert load.plans.rate(None, "4930901820", SPRING, 30, True) == Unrated(NO_PLAN)


def test_a_reload_builds_a_new_object_and_leaves_the_old_one_untouched() -> None:
    first = plans()
    changed = WHOLESALE.replace(b"49,Germany,0.0100", b"49,Germany,0.0200")
    second = load_rate_plans({"wholesale": changed}, "wholesale", 4, 0, first).plans
    assert second is not first
    assert "vendor" not in second.decks  # a plan no longer configured is dropped
    old = rated(first.rate("wholesale", "4940123456", SPRING, 60, True))
    new = rated(second.rate("wholesale", "4940123456", SPRING, 60, True))
    assert (old.cost, new.cost) == (Decimal("0.0100"), Decimal("0.0200"))
    assert isinstance(first.decks, MappingProxyType)
    with pytest.raises(TypeError):
        first.decks["x"] = first.decks["wholesale"]  # type: ignore[index]


def test_a_remembered_price_follows_the_row_in_effect_and_the_deck_reloaded() -> None:
    """Prices are remembered per deck row and billed time: the same billed time costs
    what the row in effect says on each side of midnight, and after a reload what the
    new deck says, while the plans it replaced keep their own prices."""
    first = plans()
    for _twice in range(2):  # the second round is answered from what was remembered
        before = rated(first.rate("wholesale", "4930901820", NEW_YEAR - 0.001, 60, True))
        after = rated(first.rate("wholesale", "4930901820", NEW_YEAR, 60, True))
        assert (before.cost, after.cost) == (Decimal("0.0270"), Decimal("0.0300"))
    dearer = WHOLESALE.replace(b"0.0150,0.0150,30,6,2026", b"0.0300,0.0150,30,6,2026")
    second = load_rate_plans({"wholesale": dearer, "vendor": VENDOR}, "wholesale", 4, 0, first)
    assert second.loaded == ("wholesale", "vendor")
    for _twice in range(2):
        before = rated(second.plans.rate("wholesale", "4930901820", NEW_YEAR - 0.001, 60, True))
        after = rated(second.plans.rate("wholesale", "4930901820", NEW_YEAR, 60, True))
        assert (before.cost, after.cost) == (Decimal("0.0270"), Decimal("0.0450"))
    assert rated(first.rate("wholesale", "4930901820", NEW_YEAR, 60, True)).cost == Decimal(
        "0.0300"
    )


def test_a_remembered_price_keeps_its_rows_currency() -> None:
    """Two decks with the same prices in two currencies: each call keeps its row's."""
    vendor_eur = VENDOR.replace(b",USD,", b",EUR,")
    load = load_rate_plans({"usd": VENDOR, "eur": vendor_eur}, None, 4, 0)
    for _twice in range(2):
        usd = rated(load.plans.rate("usd", "4930901820", SPRING, 30, True))
        eur = rated(load.plans.rate("eur", "4930901820", SPRING, 30, True))
        assert (usd.cost, usd.rate.currency) == (Decimal("0.0040"), "USD")
        assert (eur.cost, eur.rate.currency) == (Decimal("0.0040"), "EUR")


def test_remembered_prices_are_bounded_and_right_past_the_bound() -> None:
    """Each second of a 1/1 row is a price of its own: more of them than the bound
    keeps the memory at the bound, and every price is still the one computed afresh."""
    remembered = plans()
    row = rated(remembered.rate("wholesale", "442071234567", SPRING, 1.0, True)).rate
    assert (row.min_seconds, row.increment_seconds) == (1, 1)
    for second in range(_COSTS_KEPT + 100):
        result = rated(remembered.rate("wholesale", "442071234567", SPRING, second, True))
        assert len(remembered._costs) <= _COSTS_KEPT
        if second % 997 == 0 or second > _COSTS_KEPT - 5:
            assert result.cost == cost(row.rate, row.connect_fee, second, 4)
    assert 0 < len(remembered._costs) < _COSTS_KEPT  # cleared once, then filled again


def test_plans_keep_their_decks_when_the_mapping_they_came_from_changes() -> None:
    """Plans hold their decks, even when handed a read-only view of someone's dict:
    otherwise a deck swapped in that dict frees the rows the plans remember prices
    by, a new row can take a freed row's id, and a call is priced at the new row's
    rate with the old row's cost."""
    first = plans().decks["wholesale"]
    dearer = load_rate_plans(
        {"wholesale": WHOLESALE.replace(b",0.0125,", b",0.0250,")}, None, 4, 0
    ).plans.decks["wholesale"]
    held = {"wholesale": first}
    remembered = RatePlans(MappingProxyType(held), "wholesale", 4)
    before = rated(remembered.rate(None, "442071234567", SPRING, 60, True))
    assert before.cost == Decimal("0.0125")
    del held["wholesale"], first  # the rows are the plans' alone now, or gone
    held["wholesale"] = dearer
    after = rated(remembered.rate(None, "442071234567", SPRING, 60, True))
    assert after.cost == cost(after.rate.rate, after.rate.connect_fee, 60, 4)
    assert (after.rate.rate, after.cost) == (Decimal("0.0125"), Decimal("0.0125"))


def test_plans_from_files_refuse_a_missing_file(tmp_path: Path) -> None:
    deck_path = tmp_path / "wholesale.csv"
    deck_path.write_bytes(WHOLESALE)
    first = load_plan_files({"wholesale": deck_path}, "wholesale", 4, 0)
    assert first.loaded == ("wholesale",)
    deck_path.unlink()
    second = load_plan_files({"wholesale": deck_path}, "wholesale", 4, 0, first.plans)
    assert second.refused == ("wholesale",)
    assert second.reports["wholesale"].errors[0].reason == "unreadable"
    assert second.plans.decks["wholesale"] is first.plans.decks["wholesale"]
    assert load_rate_plans({"x": unreadable("gone")}, None, 4, 0).refused == ("x",)


def test_an_index_cannot_be_built_from_a_refused_deck() -> None:
    with pytest.raises(ValueError, match="errors"):
        Deck.from_report(check_deck(b"prefix\n", 0))


# A naive reference: every row of every prefix of the number, effective now, longest.
def _reference(rates: list[Rate], digits: str, moment: float) -> Rate | None:
    best: Rate | None = None
    for rate in rates:
        if not digits.startswith(rate.prefix):
            continue
        later = [
            other.effective_from
            for other in rates
            if other.prefix == rate.prefix and other.effective_from > rate.effective_from
        ]
        end = rate.effective_to if rate.effective_to is not None else min(later, default=1e300)
        if rate.effective_from <= moment < end and (
            best is None or len(rate.prefix) > len(best.prefix)
        ):
            best = rate
    return best


_prefixes = st.text(alphabet="1234", min_size=1, max_size=5)
_days = st.integers(min_value=0, max_value=20)
_row = st.tuples(_prefixes, _days, st.one_of(st.none(), st.integers(min_value=1, max_value=5)))


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(_row, min_size=1, max_size=25),
    digits=st.text(alphabet="1234", min_size=7, max_size=15),
    moment_day=st.floats(min_value=-1, max_value=30, allow_nan=False),
)
def test_the_index_agrees_with_a_naive_search(
    rows: list[tuple[str, int, int | None]], digits: str, moment_day: float
) -> None:
    day = 86_400.0
    seen: set[tuple[str, int]] = set()
    rates = []
    for line, (prefix, start, length) in enumerate(rows, start=2):
        if (prefix, start) in seen:
            continue  # a duplicate the deck check refuses
        seen.add((prefix, start))
        end = None if length is None else (start + length) * day
        rates.append(
            Rate(prefix, prefix, Decimal(1), Decimal(0), 1, 1, start * day, end, "EUR", None, line)
        )
    index = PrefixIndex(rates)
    moment = moment_day * day
    found = index.lookup(digits, moment)
    # Rows with explicit ends may overlap here (the check would refuse the deck); the
    # index then prefers the newest row, which the reference does too when they agree.
    expected = _reference(rates, digits, moment)
    if found is None or expected is None:
        assert found is expected
    else:
        assert found.prefix == expected.prefix
    if found is None:
        any_prefix = any(digits.startswith(rate.prefix) for rate in rates)
        assert index.miss_reason(digits) == (NOT_EFFECTIVE if any_prefix else NO_PREFIX)
