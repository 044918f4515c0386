"""The shipped number tables (with their source), the numbering rules, and the
settings record: defaults on, bad values refused, per-trunk resolution, baselines
that survive a restart."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given
from hypothesis import settings as run_with
from hypothesis import strategies as st
from sipcdr.fraud import DETECTORS, FraudMonitor, FraudSettings, TrunkSettings
from sipcdr.fraud.numbering import (
    TableError,
    e164,
    is_international,
    parse_numbering_plan,
    parse_prefix_table,
    shipped_high_risk_prefixes,
    shipped_numbering_plan,
)
from sipcdr.fraud.settings import (
    INTERNATIONAL_SURGE,
    AllowList,
    Baseline,
    HighRiskDestinationSettings,
    Limit,
    MoneyThreshold,
    ScannerSettings,
    Threshold,
)
from sipcdr.sip.numbers import to_e164
from trafficgen import MONDAY, Timeline, make_call


def test_the_shipped_tables_say_where_they_come_from_and_when() -> None:
    for table in (shipped_high_risk_prefixes(), shipped_numbering_plan()):
        assert "libphonenumber" in table.source
        assert "phonenumbers 9.0.43" in table.source
        assert "Generated 2026-" in table.source
    assert "ITU-T" in shipped_high_risk_prefixes().source


@pytest.mark.parametrize(
    ("number", "prefix"),
    [
        ("37190123456", "37190"),  # Latvian premium rate
        ("979123456789", "979"),  # International Premium Rate Service
        ("881612345678", "881"),  # satellite
        ("4490123456789", "4490"),  # UK premium rate
        ("19005551234", "19005"),  # NANP 900
        ("4930901820", None),
        ("37120123456", None),  # a Latvian mobile
    ],
)
def test_high_risk_prefixes(number: str, prefix: str | None) -> None:
    assert shipped_high_risk_prefixes().match(number) == prefix


@pytest.mark.parametrize(
    ("number", "verdict"),
    [
        ("4930901820", None),
        ("12125550100", None),
        ("37120123456", None),
        ("371201234567", "impossible_length"),  # Latvia has 8-digit numbers only
        ("3712012345", "impossible_length"),
        ("441234", "impossible_length"),
        ("2812345678", "unassigned_country_code"),
        ("979123456789", None),
    ],
)
def test_numbers_that_cannot_exist(number: str, verdict: str | None) -> None:
    assert shipped_numbering_plan().verdict(number) == verdict


@run_with(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.none(),
        st.text(alphabet="+0123456789;%-. ()a٣", max_size=20),
        st.from_regex(r"\+?(00)?[0-9]{1,17}", fullmatch=True),
    ),
    st.sampled_from([None, "", "49", "1"]),
    st.sampled_from([None, "", "0", "1"]),
)
def test_the_fast_number_path_gives_what_to_e164_gives(
    user: str | None, country_code: str | None, national_prefix: str | None
) -> None:
    assert e164(user, country_code, national_prefix) == to_e164(user, country_code, national_prefix)


def test_international_is_judged_against_the_home_country_when_known() -> None:
    assert is_international("4420123456", "49", dialled_international=False)
    assert not is_international("4930123456", "49", dialled_international=True)
    assert not is_international("112", "49", dialled_international=False)  # a short code
    assert is_international("4930123456", None, dialled_international=True)
    assert not is_international("4930123456", None, dialled_international=False)


def test_a_replacement_table_is_parsed_and_bad_lines_are_named() -> None:
    table = parse_prefix_table("# ours, 2026-12-01\nprefix,regions,kind\n+4930,DE,test\n882\n")
    assert dict(table.entries) == {"4930": "DE test", "882": ""}
    assert table.source == "ours, 2026-12-01"
    with pytest.raises(TableError, match="line 2"):
        parse_prefix_table("prefix\n49x\n")
    with pytest.raises(TableError, match="no prefixes"):
        parse_prefix_table("# nothing\n")
    plan = parse_numbering_plan("country_code,regions,lengths\n49,DE,10 11\n")
    assert plan.verdict("493012345678") is None
    with pytest.raises(TableError, match="line 1"):
        parse_numbering_plan("49,DE\n")


def test_every_detector_ships_switched_on() -> None:
    defaults = FraudSettings()
    assert defaults.enabled
    assert len(set(DETECTORS)) == 10
    for detector in DETECTORS:
        assert getattr(defaults, detector).enabled, detector
    fields = {f.name for f in dataclasses.fields(TrunkSettings)}
    assert set(DETECTORS) <= fields  # each can be set per trunk


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Threshold(0, 5, 10), "warning must be at least 1"),
        (lambda: Threshold(10, 5, 10), "critical"),
        (lambda: Threshold(1, 5, 0), "window_s"),
        (lambda: Limit(5, 4), "critical"),
        (lambda: Baseline(1.0, 2.0, 10, 0.3), "factor must be above 1"),
        (lambda: Baseline(3.0, 2.0, 10, 0.3), "critical_factor"),
        (lambda: Baseline(3.0, 6.0, 10, 0.0), "alpha"),
        (lambda: AllowList(sources=("not-a-network",)), "not an IP address"),
        (lambda: AllowList(numbers=frozenset({"+4930"})), "not E.164 digits"),
        (lambda: ScannerSettings(user_agents=("",)), "empty user agent"),
        (lambda: TrunkSettings(country_code="+49"), "country_code"),
        (lambda: FraudSettings(cooldown_s=0), "cooldown_s"),
    ],
)
def test_bad_values_are_refused_with_a_reason(build: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()  # type: ignore[operator]


def test_money_limits_are_exact_amounts() -> None:
    from decimal import Decimal

    with pytest.raises(ValueError, match="positive amount"):
        MoneyThreshold(Decimal(0), Decimal(1), 3600)
    assert MoneyThreshold(Decimal("99.95"), Decimal(500), 3600).warning == Decimal("99.95")


def test_a_trunk_replaces_whole_detector_records_and_adds_exceptions() -> None:
    mine = HighRiskDestinationSettings(per_account=Threshold(1, 2, 60))
    settings = FraudSettings(
        allow=AllowList(numbers=frozenset({"4930111"})),
        trunks={
            "wholesale": TrunkSettings(
                high_risk_destination=mine, allow=AllowList(sources=("10.1.0.0/16",))
            )
        },
    )
    resolved = settings.for_trunk("wholesale")
    assert resolved.high_risk_destination is mine
    assert resolved.scanner == settings.scanner
    assert resolved.allow.numbers == {"4930111"}
    assert resolved.allow.allows_source("10.1.2.3")
    assert not resolved.allow.allows_source("10.2.0.1")
    assert settings.for_trunk("unknown") is settings
    assert settings.for_trunk(None) is settings


def test_baseline_limits_have_a_floor_that_scales_to_critical() -> None:
    baseline = Baseline(factor=3.0, critical_factor=10.0, floor=20, alpha=0.3)
    assert baseline.limits(0.0) == (20, 67)
    assert baseline.limits(10.0) == (30, 100)


def test_learnt_baselines_survive_a_restart() -> None:
    rng = random.Random(2)
    settings = FraudSettings(trunks={"pbx": TrunkSettings(country_code="49")})

    def abroad(tag: str, start: float, count: int, spacing: float) -> Timeline:
        timeline = Timeline()
        for i in range(count):
            callee = "44" + str(rng.randrange(7 * 10**9, 8 * 10**9))
            timeline.add_call(
                make_call(
                    f"{tag}{i}",
                    start + i * spacing,
                    source="10.0.0.1",
                    trunk="pbx",
                    caller=f"4930{i:06d}",
                    callee=callee,
                )
            )
        return timeline

    learning = abroad("l", MONDAY, 26 * 2, 1800.0)  # two calls abroad an hour, 26 hours
    before = FraudMonitor(settings)
    learning.run(before, lambda _address: "pbx")
    snapshot = before.snapshot()

    after = FraudMonitor(settings)
    assert after.restore(snapshot, MONDAY + 86400 + 2 * 3600) == 2  # surge and concurrency
    surge = abroad("s", MONDAY + 86400 + 10 * 3600, 60, 15.0)  # 60 in 15 minutes
    surge.run(after, lambda _address: "pbx")
    assert [a.detector for a in surge.alerts if a.revision == 0] == [INTERNATIONAL_SURGE]

    fresh = FraudMonitor(settings)  # without the snapshot this hour is still being learnt
    again = abroad("s", MONDAY + 86400 + 10 * 3600, 60, 15.0)
    again.run(fresh, lambda _address: "pbx")
    assert again.alerts == []
    with pytest.raises(ValueError, match="unsupported"):
        fresh.restore(b'{"version": 99}', MONDAY)
