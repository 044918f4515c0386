"""The shipped number tables (with their source), the numbering rules, and the
settings record: defaults on, bad values refused, per-trunk resolution, baselines
that survive a restart."""

from __future__ import annotations

import dataclasses
import json
import random
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as run_with
from hypothesis import strategies as st
from sipcdr.config import ConfigError, load_config
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


# -- the [fraud] section of the configuration ----------------------------------------------

TRUNKS = """
[[trunks]]
name = "carrier-a"
sources = ["192.0.2.0/24"]
country_code = "49"
national_prefix = "0"

[[trunks]]
name = "callcentre"
sources = ["198.51.100.0/24"]
"""


def load_fraud(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> FraudSettings:
    path = tmp_path / "sipcdr.toml"
    path.write_text(TRUNKS + text, encoding="utf-8")
    return load_config(path, environ or {}).fraud.settings


def fraud_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_fraud(tmp_path, text)
    message = str(caught.value)
    assert "\n" not in message  # one line, naming the key
    return message


def test_no_fraud_section_gives_the_shipped_defaults_with_the_trunks_numbering(
    tmp_path: Path,
) -> None:
    settings = load_fraud(tmp_path, "")
    defaults = FraudSettings()
    for detector in DETECTORS:
        assert getattr(settings, detector) == getattr(defaults, detector)
    assert settings.trunks["carrier-a"] == TrunkSettings(country_code="49", national_prefix="0")
    assert settings.trunks["callcentre"] == TrunkSettings()
    assert load_config(None, {}).fraud.settings == defaults


def test_the_documented_keys_set_thresholds_exceptions_and_trunk_overrides(
    tmp_path: Path,
) -> None:
    settings = load_fraud(
        tmp_path,
        """
[fraud]
cooldown_s = 600
max_subjects = 5000
example_calls = 0

[fraud.allow]
numbers = ["+4930111"]
prefixes = ["4980"]
sources = ["10.0.0.0/8"]

[fraud.scanner]
user_agents = ["evil-tool"]
per_source = { warning = 2 }

[fraud.wangiri]
max_ring_s = 4.5

[fraud.spend_velocity]
per_trunk = { warning = "99.95", critical = 500 }

[fraud.international_surge]
baseline = { factor = 4, alpha = 0.5 }

[fraud.trunks.carrier-a]
allow = { sources = ["192.0.2.7"] }

[fraud.trunks.carrier-a.cps_burst]
per_trunk = { warning = 3000, critical = 10000 }

[fraud.trunks.callcentre.concurrent_calls]
enabled = false
""",
    )
    assert (settings.cooldown_s, settings.max_subjects, settings.example_calls) == (600, 5000, 0)
    assert settings.allow.numbers == {"4930111"}
    assert settings.allow.allows_number("498012345")
    assert settings.allow.allows_source("10.9.8.7")
    assert settings.scanner.user_agents == ("evil-tool",)
    # A key not given keeps its default, inside a threshold too.
    assert settings.scanner.per_source == Threshold(2, 100, 300)
    assert settings.wangiri.max_ring_s == 4.5
    assert settings.spend_velocity.per_trunk == MoneyThreshold(Decimal("99.95"), Decimal(500), 3600)
    assert settings.international_surge.baseline == Baseline(4.0, 10.0, 30, 0.5)
    carrier = settings.for_trunk("carrier-a")
    assert carrier.cps_burst.per_trunk == Threshold(3000, 10000, 10)
    assert carrier.cps_burst.per_source == settings.cps_burst.per_source
    assert carrier.allow.allows_source("192.0.2.7")
    assert carrier.allow.allows_number("4930111")  # the global exceptions still apply
    assert not settings.for_trunk("callcentre").concurrent_calls.enabled
    assert settings.for_trunk("carrier-a").concurrent_calls.enabled


def test_a_trunk_table_keeps_the_global_values_it_does_not_give(tmp_path: Path) -> None:
    settings = load_fraud(
        tmp_path,
        """
[fraud.scanner]
per_source = { warning = 3, critical = 30 }
probing = { warning = 50 }

[fraud.trunks.carrier-a.scanner]
probing = { window_s = 120 }
""",
    )
    scanner = settings.for_trunk("carrier-a").scanner
    assert scanner.per_source == Threshold(3, 30, 300)
    assert scanner.probing == Threshold(50, 1000, 120)


def test_the_high_risk_list_and_the_length_table_are_replaced_by_files(tmp_path: Path) -> None:
    (tmp_path / "irsf.csv").write_text("# our own list, 2026-12\nprefix,kind\n+88299,satellite\n")
    (tmp_path / "lengths.csv").write_text("country_code,regions,lengths\n49,DE,10 11\n")
    settings = load_fraud(
        tmp_path,
        """
[fraud.high_risk_destination]
prefixes_file = "irsf.csv"

[fraud.invalid_destination]
lengths_file = "lengths.csv"
""",
    )
    prefixes = settings.high_risk_destination.prefixes
    assert len(prefixes) == 1
    assert prefixes.match("88299123456") == "88299"
    assert "our own list" in prefixes.source
    assert settings.invalid_destination.plan.verdict("493012345678") is None
    assert settings.invalid_destination.plan.verdict("33123456789") is not None
    redacted = load_config(tmp_path / "sipcdr.toml", {}).fraud.redacted()
    assert str(tmp_path / "irsf.csv") in str(redacted["files"])


def test_thresholds_are_set_from_the_environment(tmp_path: Path) -> None:
    settings = load_fraud(
        tmp_path,
        "",
        {
            "SIPCDR_FRAUD__SCANNER__PER_SOURCE__WARNING": "5",
            "SIPCDR_FRAUD__AUTH_FAILURES__ENABLED": "false",
            "SIPCDR_FRAUD__ALLOW__SOURCES": "192.0.2.1,2001:db8::/32",
        },
    )
    assert settings.scanner.per_source.warning == 5
    assert not settings.auth_failures.enabled
    assert settings.allow.allows_source("2001:db8::7")


def test_the_redacted_form_counts_exceptions_rather_than_showing_them(tmp_path: Path) -> None:
    path = tmp_path / "sipcdr.toml"
    path.write_text(TRUNKS + '[fraud.allow]\nnumbers = ["4930111"]\nsources = ["192.0.2.9"]\n')
    text = json.dumps(load_config(path, {}).redacted())
    assert "4930111" not in text
    assert "192.0.2.9" not in text
    assert '"numbers": 1' in text


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[fraud]\nmax_calls = 10\n", "fraud.max_calls"),
        ("[fraud.scanner]\nper_source = { warning = 5, critical = 2 }\n", "critical (2)"),
        ("[fraud.wangiri]\nmax_ring = 3\n", "did you mean 'max_ring_s'"),
        ("[fraud.trunks.nobody]\nallow = {}\n", "fraud.trunks.nobody"),
        ("[fraud.cps_burst]\nper_trunk = { warning = 1.5 }\n", "an integer"),
        ("[fraud.spend_velocity]\nper_trunk = { warning = 1.5 }\n", "exact positive amount"),
        ("[fraud.allow]\nnumbers = ['030 1234']\n", "fraud.allow.numbers[0]"),
        ("[fraud.allow]\nsources = ['not-an-address']\n", "fraud.allow.sources[0]"),
        ("[fraud.international_surge]\nbaseline = { alpha = 2.0 }\n", "alpha"),
        ("[fraud.scanner]\nuser_agents = ['']\n", "fraud.scanner.user_agents[0]"),
        ("[fraud.high_risk_destination]\nprefixes_file = 'missing.csv'\n", "cannot be read"),
        ("[fraud]\ncooldown_s = 0\n", "fraud.cooldown_s"),
        ("[fraud.trunks.carrier-a.sequential_dialing]\nmax_gap_s = 0\n", "max_gap_s"),
    ],
)
def test_bad_fraud_settings_stop_the_start_with_one_line_naming_the_key(
    tmp_path: Path, text: str, fragment: str
) -> None:
    assert fragment in fraud_error(tmp_path, text)


def test_a_bad_replacement_table_names_its_line(tmp_path: Path) -> None:
    (tmp_path / "irsf.csv").write_text("prefix\n+88x\n")
    message = fraud_error(tmp_path, "[fraud.high_risk_destination]\nprefixes_file = 'irsf.csv'\n")
    assert "fraud.high_risk_destination.prefixes_file" in message
    assert "line 2" in message
