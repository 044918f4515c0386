"""The engine's CDR work in its present form gives what its former form gave, byte for
byte: enrich and rate in one copy of the CDR against the two stages one after the
other (each with a copy of its own, every call priced afresh), and `Cdr.to_record`
against the record built through `rfc3339`, `money_text` and the `duration` and
`billsec` properties. The former forms are kept as they were in `formerstages`.

Compared on every CDR of every shared capture, imported under trunks that cover every
address with rate plans on both sides (one vendor priced in another currency, so every
branch of the rating runs), and on generated CDRs for the record's edge cases.
"""

from __future__ import annotations

import ipaddress
import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from formerstages import former_enrich, former_price, former_rate, former_record
from hypothesis import given, settings
from hypothesis import strategies as st
from pcapdata import require_shared_data
from sipcalls import Call, CdrCollector, packet
from sipcdr.capture.pcapfile import iter_packets
from sipcdr.config import Config
from sipcdr.config.schema import TrunkConfig
from sipcdr.dialog import Correlator
from sipcdr.enrich import EnrichRateStage, EnrichStage
from sipcdr.enrich.trunks import TrunkLookup
from sipcdr.hotpath import load_interpreted
from sipcdr.importer import import_files
from sipcdr.model import Cdr, cdr_copier, replace_cdr
from sipcdr.pipeline import Pipeline
from sipcdr.rating import RatePlans, RateStage, Rating, load_rate_plans
from sipcdr.sip import parse

HEADER = (
    "prefix,destination,rate,connect_fee,min_seconds,increment_seconds,"
    "effective_from,effective_to,currency\n"
)
# Wide prefixes, so the shared captures' callees (of many countries and forms) match.
RETAIL = (
    HEADER
    + "1,North America,0.0100,0,6,6,2000-01-01,,EUR\n"
    + "3,Europe 3,0.0300,0.0100,30,6,2000-01-01,,EUR\n"
    + "4,Europe 4,0.0200,0,60,60,2000-01-01,,EUR\n"
    + "49,Germany,0.0150,0.0050,1,1,2000-01-01,,EUR\n"
    + "5,South America,0.0400,0,1,1,2000-01-01,,EUR\n"
    + "6,Asia Pacific,0.0500,0,6,6,2000-01-01,,EUR\n"
    + "7,Russia,0.0600,0,6,6,2000-01-01,,EUR\n"
    + "8,Asia,0.0700,0,6,6,2000-01-01,,EUR\n"
    + "9,Asia 9,0.0800,0,6,6,2000-01-01,,EUR\n"
    + "2,Africa,0.0900,0,6,6,2000-01-01,,EUR\n"
).encode()
VENDOR_EUR = (
    HEADER + "1,All 1,0.0050,0,1,1,2000-01-01,,EUR\n4,All 4,0.0070,0,1,1,2000-01-01,,EUR\n"
).encode()
VENDOR_USD = (HEADER + "1,All 1,0.0060,0,1,1,2000-01-01,,USD\n").encode()
NOW = 1_790_000_000.0

TRUNKS = (
    TrunkConfig(
        "low",
        (ipaddress.ip_network("0.0.0.0/2"),),
        country_code="49",
        national_prefix="0",
        rate_plan="retail",
        cost_plan="vendor-eur",
    ),
    TrunkConfig(
        "mid",
        (ipaddress.ip_network("64.0.0.0/2"),),
        country_code="1",
        national_prefix="1",
        cost_plan="vendor-usd",
    ),
    TrunkConfig(
        "high",
        (ipaddress.ip_network("128.0.0.0/1"),),
        country_code="44",
        national_prefix="0",
        rate_plan="retail",
    ),
    TrunkConfig("v6", (ipaddress.ip_network("::/0"),), country_code="44", national_prefix="0"),
)


def captures() -> list[Path]:
    return sorted((require_shared_data() / "pcaps").glob("*.pcap*"))


def stages() -> tuple[EnrichStage, RateStage]:
    load = load_rate_plans(
        {"retail": RETAIL, "vendor-eur": VENDOR_EUR, "vendor-usd": VENDOR_USD}, None, 4, NOW
    )
    assert load.refused == ()
    rate = RateStage(RatePlans(), [trunk.to_trunk() for trunk in TRUNKS])
    rate.install(load)
    return EnrichStage(TRUNKS), rate


def breakable_stages() -> tuple[Any, Any, Any]:
    """As `stages`, run from their source, whose methods a test can replace (a compiled
    stage's cannot): the enrich stage, the rate stage, and the class joining them."""
    modules = load_interpreted()
    rating, enrich_module = modules["sipcdr.rating"], modules["sipcdr.enrich.stage"]
    load = rating.load_rate_plans(
        {"retail": RETAIL, "vendor-eur": VENDOR_EUR, "vendor-usd": VENDOR_USD}, None, 4, NOW
    )
    rate = modules["sipcdr.rating.stage"].RateStage(
        rating.RatePlans(), [trunk.to_trunk() for trunk in TRUNKS]
    )
    rate.install(load)
    return enrich_module.EnrichStage(TRUNKS), rate, enrich_module.EnrichRateStage


def wire(cdr: Cdr) -> tuple[bytes, str | None]:
    return orjson.dumps(cdr.to_record()), cdr.egress_ip


# -- every capture -----------------------------------------------------------------------


def correlated(path: Path) -> list[Cdr]:
    """The CDRs the correlator closes from the capture, fed as an import feeds it, with
    no CDR stage: what the stages are then given."""
    sink = CdrCollector()
    pipeline = Pipeline(Correlator(egress=True), [sink])
    next_expiry = 0.0
    for captured in iter_packets(path):
        if captured.timestamp >= next_expiry:
            pipeline.expire(captured.timestamp)
            next_expiry = captured.timestamp + 1.0
        pipeline.process(captured)
    pipeline.drain()
    return sink.cdrs


ADDRESSES = ("10.1.2.3", "70.1.2.3", "192.0.2.10", "2001:db8::1", "not-an-address")
CALLEES = ("+4930333444", "030333444", "+12125550100", "12125550100", "0044201234567",
           "+33123456789", "alice", "+999", "4930", "")  # fmt: skip


def generated() -> list[Cdr]:
    """Calls from and to every trunk (and none), to every kind of callee, answered for
    many lengths (each billing increment's edges) or not."""
    rng = random.Random(7)
    correlator = Correlator(egress=True)
    cdrs: list[Cdr] = []
    for n in range(600):
        call = Call(call_id=f"gen-{n}@example", callee=rng.choice(CALLEES) or "x")
        src = (rng.choice(ADDRESSES[:4]), 5060)
        dst = (rng.choice(ADDRESSES[:4]), 5060)
        t = NOW + n * 7.0
        talk = rng.choice((0.0, 0.001, 0.5, 1.0, 5.999, 6.0, 30.0, 59.999, 60.0, 61.0, 3600.0))
        if rng.random() < 0.25:
            flow = [
                (t, call.request("INVITE"), src, dst),
                (t + 1, call.response(486, "Busy"), dst, src),
            ]
        else:
            flow = [
                (t, call.request("INVITE"), src, dst),
                (t + 1, call.response(200, "OK"), dst, src),
                (t + 1.1, call.request("ACK", branch="z9hG4bK-ack", to_tag="callee-tag"), src, dst),
                (
                    t + 1 + talk,
                    call.request("BYE", 2, "z9hG4bK-bye", to_tag="callee-tag"),
                    src,
                    dst,
                ),
                (t + 1.2 + talk, call.response(200, "OK", 2, "BYE", "z9hG4bK-bye"), dst, src),
            ]
        for when, data, a, b in flow:
            cdrs += correlator.feed(packet(when, data, a, b), parse(data))
    cdrs += correlator.drain()
    return cdrs


def test_enrich_and_rate_in_one_copy_give_the_former_cdrs_on_every_capture() -> None:
    enrich, rate = stages()
    former_enrich_stage, former_rate_stage = stages()
    both = EnrichRateStage(enrich, rate)
    counts: dict[str, int] = {}
    total = rated = margins = vendor_only = 0
    corpora = [(path.name, correlated(path)) for path in captures()]
    for name, cdrs in [*corpora, ("generated", generated())]:
        for cdr in cdrs:
            now = both.on_cdr(cdr)
            before = former_rate(former_rate_stage, former_enrich(former_enrich_stage, cdr), counts)
            assert wire(now) == wire(before), name
            assert now == before, name
            total += 1
            rated += now.rated
            margins += now.margin is not None
            vendor_only += now.vendor_cost is not None and now.margin is None
    # The corpus exercised what it is meant to: priced calls, margins, and vendor prices
    # without a margin (another currency, or no customer price).
    assert total > 100 and rated > 20 and margins > 0 and vendor_only > 0
    kpis = {name: vars_of(kpi) for name, kpi in enrich.stats.kpis.items()}
    assert kpis == {name: vars_of(kpi) for name, kpi in former_enrich_stage.stats.kpis.items()}
    assert sum(rate.stats.rated.values()) + sum(rate.stats.unrated.values()) == total


def vars_of(kpi: Any) -> tuple[object, ...]:
    return (kpi.attempts, kpi.answered, kpi.network_effective, kpi.failed)


def test_the_record_is_the_former_record_on_every_capture() -> None:
    found = 0
    for path in captures():
        collector = CdrCollector()
        import_files(Config(trunks=TRUNKS), [path], sinks=[collector], progress=False)
        for cdr in collector.cdrs:
            assert orjson.dumps(cdr.to_record()) == orjson.dumps(former_record(cdr)), path.name
            found += 1
    enrich, rate = stages()
    for cdr in map(EnrichRateStage(enrich, rate).on_cdr, generated()):
        assert orjson.dumps(cdr.to_record()) == orjson.dumps(former_record(cdr))
        found += 1
    assert found > 500


_times = st.floats(min_value=-1e9, max_value=4.2e9, allow_nan=False, allow_infinity=False)
_money = st.none() | st.decimals(
    min_value=Decimal("-1e6"), max_value=Decimal("1e6"), places=6, allow_nan=False
)


@settings(max_examples=300, deadline=None)
@given(
    start=_times,
    ring=st.none() | _times,
    answer=st.none() | _times,
    end=_times,
    moneys=st.tuples(_money, _money, _money, _money),
    flags=st.lists(st.sampled_from(["cps_burst", "wangiri", "scanner"]), max_size=3),
)
def test_the_record_is_the_former_record_for_any_times_and_money(
    start: float,
    ring: float | None,
    answer: float | None,
    end: float,
    moneys: tuple[Decimal | None, ...],
    flags: list[str],
) -> None:
    """Calls that end before they were answered, times before the epoch and on the
    edge of a second, money of any scale (an exponent is never written)."""
    rate_per_minute, price, vendor, call_margin = moneys
    cdr = Cdr(
        "id", "call", "1", "2", "sip:a", "sip:b", "sip:b", "192.0.2.1", 5060,
        "192.0.2.2", 5060, None, start, ring, answer, end, None, "answered", 200,
        "OK", None, None, "bye", None, "node",
        rate_per_minute=rate_per_minute, cost=price, vendor_cost=vendor,
        margin=call_margin, fraud_flags=tuple(flags),
    )  # fmt: skip
    assert orjson.dumps(cdr.to_record()) == orjson.dumps(former_record(cdr))
    assert (cdr.duration, cdr.billsec) == (
        former_record(cdr)["duration"],
        former_record(cdr)["billsec"],
    )


# -- faults, counted under the part's name ---------------------------------------------


class _Broken:
    def __init__(self, *_args: object) -> None:
        pass

    def __call__(self, *_args: object) -> object:
        raise RuntimeError("broken")


@pytest.mark.parametrize("part", ["enrich", "rate", "both"])
def test_a_fault_of_one_part_costs_its_fields_only(
    part: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As when they were two stages: the other part's fields are set, and the fault is
    counted under the failing part's name."""
    enrich, rate, joined = breakable_stages()
    if part in ("enrich", "both"):
        monkeypatch.setattr(enrich, "fields", _Broken())
    if part in ("rate", "both"):
        monkeypatch.setattr(rate, "priced", _Broken())
    sink = CdrCollector()
    pipeline = Pipeline(Correlator(egress=True), [sink], [joined(enrich, rate)])
    closed = correlated(next(p for p in captures() if any(c.egress_ip for c in correlated(p))))
    cdr = next(c for c in closed if c.egress_ip is not None)
    pipeline.emit([cdr])
    (out,) = sink.cdrs
    former_enrich_stage, former_rate_stage = stages()
    enriched = former_enrich(former_enrich_stage, cdr)
    expected = {
        "enrich": former_rate(former_rate_stage, cdr, {}),
        "rate": enriched,
        "both": cdr,
    }[part]
    assert wire(out) == wire(expected)
    names = {"enrich": {"enrich": 1}, "rate": {"rate": 1}, "both": {"enrich": 1, "rate": 1}}
    assert pipeline.stats.internal_errors == names[part]
    assert pipeline.stats.cdrs_emitted == 1


# -- the pieces ---------------------------------------------------------------------------


def test_a_copier_sets_the_named_fields_in_order_and_copies_the_rest() -> None:
    (cdr, *_rest) = correlated(captures()[0]) or [pytest.skip("no call")]
    copy = cdr_copier("callee", "caller", "egress_ip")
    assert copy(cdr, "2", "1", None) == replace_cdr(cdr, caller="1", callee="2", egress_ip=None)
    with pytest.raises(ValueError, match="not Cdr fields"):
        cdr_copier("calller")
    with pytest.raises(ValueError, match="repeated"):
        cdr_copier("caller", "caller")


def test_a_remembered_price_is_the_price_computed_afresh() -> None:
    _enrich, rate = stages()
    plans = rate.plans
    for billsec in (0.0, 0.001, 1.0, 5.999, 6.0, 59.5, 60.0, 61.0, 3599.999, 86400.0):
        for callee in ("4930123", "1212555", "3312345", "999"):
            for _twice in range(2):
                now = plans.rate("retail", callee, NOW, billsec, True)
                before = former_price(plans, "retail", callee, NOW, billsec, True)
                assert now == before
                assert str(now.cost if isinstance(now, Rating) else None) == str(
                    before.cost if isinstance(before, Rating) else None
                )
    unanswered = plans.rate("retail", "4930123", NOW, 0.0, False)
    assert isinstance(unanswered, Rating) and str(unanswered.cost) == "0.0000"


def test_a_deck_reloaded_into_the_rate_stage_prices_the_next_cdr() -> None:
    """The one-copy stage prices with the plans in force when the CDR reaches it: the
    prices remembered under the plans replaced are not used."""
    enrich, rate = stages()
    both = EnrichRateStage(enrich, rate)
    cdrs = [c for c in generated() if c.answer_time is not None]
    old = [both.on_cdr(cdr) for cdr in cdrs]
    assert sum(c.rated for c in old) > 20
    dearer = RETAIL.replace(b",0.0", b",0.1")
    load = load_rate_plans(
        {"retail": dearer, "vendor-eur": VENDOR_EUR, "vendor-usd": VENDOR_USD},
        None,
        4,
        NOW,
        rate.plans,
    )
    rate.install(load)
    former_enrich_stage, former_rate_stage = stages()
    former_rate_stage.install(load)
    changed = 0
    for cdr, before in zip(cdrs, old, strict=True):
        now = both.on_cdr(cdr)
        assert wire(now) == wire(
            former_rate(former_rate_stage, former_enrich(former_enrich_stage, cdr), {})
        )
        changed += now.cost != before.cost
    assert changed > 20


@pytest.mark.parametrize("egress", [True, False])
def test_a_fault_of_the_kpi_count_costs_the_enrich_fields_only(
    egress: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault after the enrich fields were made (the KPI count) costs them too, as the
    enrich stage alone lost its whole copy; the rating is still that of the CDR as it
    came, on CDRs with and without an egress address."""
    enrich, rate, joined = breakable_stages()
    monkeypatch.setattr(enrich, "count", _Broken())
    sink = CdrCollector()
    pipeline = Pipeline(Correlator(egress=True), [sink], [joined(enrich, rate)])
    cdrs = generated()[:50]
    if not egress:  # a CDR enriched already, or from a correlator that reads no egress
        cdrs = [replace_cdr(c, egress_ip=None) for c in cdrs]
    pipeline.emit(cdrs)
    _former_enrich, former_rate_stage = stages()
    assert [wire(c) for c in sink.cdrs] == [
        wire(former_rate(former_rate_stage, c, {})) for c in cdrs
    ]
    assert pipeline.stats.internal_errors == {"enrich": len(cdrs)}
    assert pipeline.stats.cdrs_emitted == len(cdrs)
    assert enrich.stats.kpis == {}


def test_a_fault_inside_the_compiled_enrich_part_is_counted_under_its_name() -> None:
    """As above with the stages in use (compiled where the install built them): a
    trunk lookup that fails inside the enrich part costs its fields only."""
    _enrich, rate = stages()

    def failing(_source: str) -> None:
        raise RuntimeError("broken")

    enrich = EnrichStage(TrunkLookup(failing))
    sink = CdrCollector()
    pipeline = Pipeline(Correlator(egress=True), [sink], [EnrichRateStage(enrich, rate)])
    cdrs = [c for c in generated()[:50] if c.egress_ip is not None]
    assert cdrs
    pipeline.emit(cdrs)
    _former_enrich, former_rate_stage = stages()
    assert [wire(c) for c in sink.cdrs] == [
        wire(former_rate(former_rate_stage, c, {})) for c in cdrs
    ]
    assert pipeline.stats.internal_errors == {"enrich": len(cdrs)}
