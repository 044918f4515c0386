"""The rate stage: both sides of a call priced from the trunks' plans, the callee read
with the ingress trunk's numbering, every unrated call counted per trunk and reason,
and plans swapped whole on a reload."""

from __future__ import annotations

import asyncio
import json
from calendar import timegm
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jsonschema
import pytest
from sipcalls import CdrCollector
from sipcdr.config import RatingConfig
from sipcdr.dialog import Correlator
from sipcdr.model import UNKNOWN_TRUNK, Cdr, Trunk
from sipcdr.pipeline import Pipeline
from sipcdr.rates import RateDecks
from sipcdr.rating import (
    CURRENCY_MISMATCH,
    INVALID_NUMBER,
    NO_PLAN,
    NO_PREFIX,
    NOT_EFFECTIVE,
    RatePlans,
    RateStage,
    load_rate_plans,
)
from sipcdr.stages import CdrStage
from structlog.testing import capture_logs

HEADER = (
    "prefix,destination,rate,connect_fee,min_seconds,increment_seconds,"
    "effective_from,effective_to,currency\n"
)
RETAIL = (
    HEADER
    + "49,Germany,0.0200,0,60,60,2025-01-01,,EUR\n"
    + "4930,Germany Berlin,0.0150,0.0100,30,6,2025-01-01,,EUR\n"
    + "1,USA,0.0050,0,6,6,2027-01-01,,EUR\n"  # not yet in effect
).encode()
VENDOR_A = (HEADER + "49,Germany,0.0080,0,1,1,2025-01-01,,EUR\n").encode()
VENDOR_USD = (HEADER + "49,Germany,0.0090,0,1,1,2025-01-01,,USD\n").encode()
SPRING = float(timegm((2026, 4, 1, 12, 0, 0)))
SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "cdr.v1.schema.json"

CUSTOMER = Trunk("customer", "49", "0", "retail", strip_prefixes=("1010",))
VENDOR = Trunk("vendor-a", None, None, None, cost_plan="vendor-a")
VENDOR_IN_USD = Trunk("vendor-usd", None, None, None, cost_plan="vendor-usd")
VENDOR_WITHOUT_PLAN = Trunk("vendor-free", None, None, None)
TRUNKS = (CUSTOMER, VENDOR, VENDOR_IN_USD, VENDOR_WITHOUT_PLAN)
DECKS = {"retail": RETAIL, "vendor-a": VENDOR_A, "vendor-usd": VENDOR_USD}


def stage(default_plan: str | None = "retail") -> RateStage:
    load = load_rate_plans(DECKS, default_plan, 4, SPRING)
    assert load.refused == ()
    built = RateStage(RatePlans(default_plan=default_plan), TRUNKS)
    built.install(load)
    return built


def cdr(callee_user: str = "4930901820", billsec: float | None = 34.0, **changes: Any) -> Cdr:
    fields: dict[str, Any] = {
        "cdr_id": "9b2f6a4c-1d3e-5f70-8a9b-0c1d2e3f4a5b",
        "call_id": "call-1@192.0.2.10",
        "caller": "4940111222",
        "callee": callee_user if callee_user.isdigit() else None,
        "from_uri": "sip:+4940111222@example.com",
        "to_uri": f"sip:{callee_user}@example.net",
        "request_uri": f"sip:{callee_user}@example.net",
        "src_ip": "192.0.2.10",
        "src_port": 5060,
        "dst_ip": "198.51.100.1",
        "dst_port": 5060,
        "trunk": "customer",
        "start_time": SPRING,
        "ring_time": SPRING + 1,
        "answer_time": None if billsec is None else SPRING + 2,
        "end_time": SPRING + 2 + (billsec or 0.0),
        "pdd_ms": 1000,
        "disposition": "answered" if billsec is not None else "no_answer",
        "sip_code": 200 if billsec is not None else 480,
        "sip_reason": "OK",
        "q850_cause": None,
        "hangup_by": "caller",
        "end_reason": "bye",
        "user_agent": None,
        "capture_node": "test",
        "egress_trunk": "vendor-a",
    }
    fields.update(changes)
    return Cdr(**fields)


def test_the_stage_is_a_cdr_stage() -> None:
    rate: CdrStage = stage()
    assert rate.name == "rate"


def test_both_sides_are_priced_and_the_margin_is_exact() -> None:
    rate = stage()
    before = cdr()
    after = rate.on_cdr(before)
    # Customer, 4930 row: 0.0100 + 0.0150 * 36 / 60 = 0.0190 (30/6: 34 s bills 36).
    assert (after.rated, after.rate_prefix, after.rate_name) == (True, "4930", "Germany Berlin")
    assert (after.billed_seconds, after.cost, after.currency) == (36, Decimal("0.0190"), "EUR")
    assert after.rate_per_minute == Decimal("0.0150")
    # Vendor, 1/1: 0.0080 * 34 / 60 = 0.004533... -> 0.0045.
    assert after.vendor_cost == Decimal("0.0045")
    assert after.margin == Decimal("0.0145")
    assert format(after.margin, "f") == "0.0145"
    assert after.callee_valid is True
    assert before.rated is False and before.cost is None  # records are frozen: a new one
    assert rate.stats.rated == {"customer": 1}
    assert rate.stats.vendor_rated == {"vendor-a": 1}
    assert rate.stats.unrated == {} and rate.stats.vendor_unrated == {}
    record = json.loads(json.dumps(after.to_record()))
    jsonschema.validate(record, json.loads(SCHEMA.read_text()))
    assert (record["cost"], record["vendor_cost"], record["margin"]) == (
        "0.0190",
        "0.0045",
        "0.0145",
    )
    assert record["egress_trunk"] == "vendor-a"


def test_an_unanswered_call_costs_nothing_on_either_side() -> None:
    after = stage().on_cdr(cdr(billsec=None))
    assert (after.rated, after.billed_seconds) == (True, 0)
    assert (str(after.cost), str(after.vendor_cost), str(after.margin)) == ("0.0000",) * 3


def test_the_ingress_trunks_numbering_reads_the_callee() -> None:
    """A national number behind a technical prefix: stripped, then made E.164 with
    the trunk's country code; the CDR carries the number that was rated."""
    after = stage().on_cdr(cdr("1010030901820", callee="1010030901820"))
    assert (after.callee, after.callee_valid, after.rate_prefix) == ("4930901820", True, "4930")


def test_without_a_trunk_the_default_plan_prices_and_the_callee_stays() -> None:
    rate = stage()
    after = rate.on_cdr(cdr("+4940123456", trunk=None, callee="4940123456", egress_trunk=None))
    assert (after.rated, after.rate_prefix, after.callee) == (True, "49", "4940123456")
    assert (after.vendor_cost, after.margin) == (None, None)
    assert rate.stats.rated == {UNKNOWN_TRUNK: 1}  # the KPIs' label for no trunk
    assert rate.stats.vendor_rated == {} and rate.stats.vendor_unrated == {}


@pytest.mark.parametrize(
    ("callee_user", "start_time", "default_plan", "trunk", "reason"),
    [
        ("alice", SPRING, "retail", "customer", INVALID_NUMBER),
        ("112", SPRING, "retail", "customer", INVALID_NUMBER),
        ("+33123456789", SPRING, "retail", "customer", NO_PREFIX),
        ("+12125550123", SPRING, "retail", "customer", NOT_EFFECTIVE),
        ("+4930901820", SPRING, None, None, NO_PLAN),
        ("+4930901820", SPRING, None, "elsewhere", NO_PLAN),  # not a configured trunk
    ],
)
def test_an_unrated_call_is_counted_per_trunk_and_reason(
    callee_user: str, start_time: float, default_plan: str | None, trunk: str | None, reason: str
) -> None:
    rate = stage(default_plan)
    after = rate.on_cdr(cdr(callee_user, trunk=trunk, start_time=start_time))
    assert after.rated is False
    assert (after.cost, after.rate_prefix, after.currency, after.margin) == (None,) * 4
    assert rate.stats.unrated == {(trunk or UNKNOWN_TRUNK, reason): 1}
    assert rate.stats.rated == {}
    assert after.callee_valid is (reason != INVALID_NUMBER)
    if reason == INVALID_NUMBER:
        assert after.vendor_cost is None  # the vendor side needs a number too
        assert rate.stats.vendor_unrated == {("vendor-a", INVALID_NUMBER): 1}


def test_a_vendor_in_another_currency_gives_a_cost_but_no_margin() -> None:
    rate = stage()
    after = rate.on_cdr(cdr(egress_trunk="vendor-usd"))
    assert (after.cost, after.vendor_cost, after.margin) == (
        Decimal("0.0190"),
        Decimal("0.0051"),  # 0.0090 * 34 / 60 = 0.0051
        None,
    )
    assert rate.stats.currency_mismatches == {"vendor-usd": 1}
    assert CURRENCY_MISMATCH == "currency_mismatch"


def test_an_egress_trunk_without_a_cost_plan_has_no_vendor_cost() -> None:
    rate = stage()
    after = rate.on_cdr(cdr(egress_trunk="vendor-free"))
    assert (after.rated, after.vendor_cost, after.margin) == (True, None, None)
    assert rate.stats.vendor_unrated == {("vendor-free", NO_PLAN): 1}


def test_a_reload_swaps_the_plans_whole_and_keeps_a_refused_decks_predecessor() -> None:
    rate = stage()
    assert rate.stats.deck_loads == {"retail": 1, "vendor-a": 1, "vendor-usd": 1}
    assert rate.stats.deck_rows == {"retail": 3, "vendor-a": 1, "vendor-usd": 1}
    cheaper = (HEADER + "49,Germany,0.0060,0,1,1,2025-01-01,,EUR\n").encode()
    broken = (HEADER + "49,Germany,-1,0,60,60,2025-01-01,,EUR\n").encode()
    load = load_rate_plans(
        {"retail": broken, "vendor-a": cheaper, "vendor-usd": VENDOR_USD},
        "retail",
        4,
        SPRING,
        previous=rate.plans,
    )
    rate.install(load)
    assert rate.stats.deck_refusals == {"retail": 1}
    assert rate.stats.deck_loads == {"retail": 1, "vendor-a": 2, "vendor-usd": 2}
    after = rate.on_cdr(cdr())
    assert after.cost == Decimal("0.0190")  # the refused retail deck's predecessor
    assert after.vendor_cost == Decimal("0.0034")  # 0.0060 * 34 / 60


def write_decks(directory: Path, retail: bytes) -> RatingConfig:
    (directory / "retail.csv").write_bytes(retail)
    (directory / "vendor-a.csv").write_bytes(VENDOR_A)
    return RatingConfig(
        decks=MappingProxyType(
            {"retail": directory / "retail.csv", "vendor-a": directory / "vendor-a.csv"}
        ),
        default_plan="retail",
        decimals=4,
    )


def test_sighup_reload_refuses_a_broken_deck_keeps_the_previous_and_logs_both(
    tmp_path: Path,
) -> None:
    rating = write_decks(tmp_path, RETAIL)
    decks = RateDecks(rating, TRUNKS, clock=lambda: SPRING)
    with capture_logs() as start_logs:
        decks.load()
    assert [(e["event"], e["plan"]) for e in start_logs] == [
        ("rate_deck_loaded", "retail"),
        ("rate_deck_loaded", "vendor-a"),
    ]
    (tmp_path / "retail.csv").write_bytes(RETAIL + b"44,UK,0.01,0,60,0,2025-01-01,,EUR\n")

    async def hangup() -> None:
        decks.on_sighup()
        await asyncio.gather(*decks._reloads)

    with capture_logs() as reload_logs:
        asyncio.run(hangup())
    refused = next(e for e in reload_logs if e["event"] == "rate_deck_refused")
    assert refused["plan"] == "retail" and refused["log_level"] == "error"
    assert refused["kept"] == "previous deck"
    assert refused["problems"] == [
        f"{tmp_path / 'retail.csv'}:5: error: increment_seconds is 0: no call could be billed "
        "[zero_increment]"
    ]
    assert decks.stage.stats.deck_refusals == {"retail": 1}
    assert decks.stage.stats.deck_loads == {"retail": 1, "vendor-a": 2}
    assert decks.stage.on_cdr(cdr()).cost == Decimal("0.0190")  # the previous deck prices


class _Failing:
    name = "broken"

    def on_cdr(self, cdr: Cdr) -> Cdr:
        raise RuntimeError("a bug")


def test_the_pipeline_runs_its_stages_in_order_before_the_sinks() -> None:
    collector = CdrCollector()
    rate = stage()
    pipeline = Pipeline(Correlator(), [collector], stages=(_Failing(), rate))
    pipeline.emit([cdr()])
    (written,) = collector.cdrs
    assert written.cost == Decimal("0.0190")  # a failing stage costs its own fields only
    assert pipeline.stats.internal_errors == {"broken": 1}
    assert pipeline.cdrs_written == 1
