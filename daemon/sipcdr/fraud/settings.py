"""What the detectors are, and the settings they run with: one frozen record per
detector, each default a named constant with the reason for its value.

Every detector ships switched on. The defaults are chosen so that a normal carrier
mix stays quiet (`tests/test_fraud_week.py` runs a simulated week of it) while each
attack pattern alerts within its window. An operator changes a detector globally, per
trunk (`TrunkSettings` replaces a detector's whole record for that trunk) and exempts
legitimate exceptions with allow-lists of numbers, number prefixes and sources.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from typing import Final

from sipcdr.fraud.numbering import (
    NumberingPlan,
    PrefixTable,
    shipped_high_risk_prefixes,
    shipped_numbering_plan,
)

# Detector ids: the names in alerts, in a CDR's fraud_flags, in metric labels and in
# the configuration.
CPS_BURST: Final = "cps_burst"
CONCURRENT_CALLS: Final = "concurrent_calls"
HIGH_RISK_DESTINATION: Final = "high_risk_destination"
WANGIRI: Final = "wangiri"
SCANNER: Final = "scanner"
AUTH_FAILURES: Final = "auth_failures"
SEQUENTIAL_DIALING: Final = "sequential_dialing"
SPEND_VELOCITY: Final = "spend_velocity"
INTERNATIONAL_SURGE: Final = "international_surge"
INVALID_DESTINATION: Final = "invalid_destination"
DETECTORS: Final = (
    CPS_BURST,
    CONCURRENT_CALLS,
    HIGH_RISK_DESTINATION,
    WANGIRI,
    SCANNER,
    AUTH_FAILURES,
    SEQUENTIAL_DIALING,
    SPEND_VELOCITY,
    INTERNATIONAL_SURGE,
    INVALID_DESTINATION,
)

# What an alert's subject is.
SUBJECT_SOURCE_IP: Final = "source_ip"
SUBJECT_TRUNK: Final = "trunk"
SUBJECT_CALLER: Final = "caller"
SUBJECT_PREFIX: Final = "prefix"

SEVERITY_WARNING: Final = "warning"
SEVERITY_CRITICAL: Final = "critical"


def _check_levels(warning: int, critical: int) -> None:
    if warning < 1:
        raise ValueError(f"warning must be at least 1, not {warning}")
    if critical < warning:
        raise ValueError(f"critical ({critical}) must not be below warning ({warning})")


def _ceil(value: float) -> int:
    whole = int(value)
    return whole if whole == value else whole + 1


@dataclass(frozen=True, slots=True)
class Threshold:
    """A count over a sliding window: `warning` raises an alert, `critical` raises it
    to critical severity."""

    warning: int
    critical: int
    window_s: int

    def __post_init__(self) -> None:
        _check_levels(self.warning, self.critical)
        if self.window_s < 1:
            raise ValueError(f"window_s must be at least 1 second, not {self.window_s}")


@dataclass(frozen=True, slots=True)
class Limit:
    """A level with no window (calls in progress, a run of numbers)."""

    warning: int
    critical: int

    def __post_init__(self) -> None:
        _check_levels(self.warning, self.critical)


@dataclass(frozen=True, slots=True)
class MoneyThreshold:
    """Money over a sliding window, in the rate deck's currency."""

    warning: Decimal
    critical: Decimal
    window_s: int

    def __post_init__(self) -> None:
        if not self.warning.is_finite() or self.warning <= 0:
            raise ValueError(f"warning must be a positive amount, not {self.warning}")
        if not self.critical.is_finite() or self.critical < self.warning:
            raise ValueError(f"critical ({self.critical}) must not be below warning")
        if self.window_s < 1:
            raise ValueError(f"window_s must be at least 1 second, not {self.window_s}")


@dataclass(frozen=True, slots=True)
class Baseline:
    """Judging a trunk by its own normal: what it did in the same hour of the day (UTC)
    on previous days, as an exponentially weighted average over days. An alert needs
    both `factor` times that baseline and at least `floor`; the first day of a trunk
    (or of a restart without a saved baseline) only learns."""

    factor: float
    critical_factor: float
    floor: int
    alpha: float  # the newest day's weight in the average

    def __post_init__(self) -> None:
        if not self.factor > 1:
            raise ValueError(f"factor must be above 1, not {self.factor}")
        if not self.critical_factor >= self.factor:
            raise ValueError(f"critical_factor ({self.critical_factor}) must not be below factor")
        if self.floor < 1:
            raise ValueError(f"floor must be at least 1, not {self.floor}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be above 0 and at most 1, not {self.alpha}")

    def limits(self, expected: float) -> tuple[int, int]:
        """(warning, critical) levels for a subject whose baseline is `expected`. The
        floor rises to critical as a baseline would, so a quiet trunk's first burst is a
        warning rather than critical at once."""
        warning = max(self.floor, _ceil(expected * self.factor))
        critical_floor = _ceil(self.floor * self.critical_factor / self.factor)
        return warning, max(warning, critical_floor, _ceil(expected * self.critical_factor))


@dataclass(frozen=True, slots=True)
class AllowList:
    """Legitimate exceptions: a call is exempt when its caller or callee is one of
    `numbers` or starts with one of `prefixes` (E.164 digits), or when its source
    address is one of `sources` (addresses or CIDR networks)."""

    numbers: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        init=False, repr=False, compare=False
    )
    # Verdicts per source address: parsing an address costs more than the whole check.
    _verdicts: dict[str, bool] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        for number in (*self.numbers, *self.prefixes):
            if not number.isdigit() or not number.isascii():
                raise ValueError(f"{number!r} is not E.164 digits (no '+', no spaces)")
        networks = []
        for source in self.sources:
            try:
                networks.append(ipaddress.ip_network(source, strict=False))
            except ValueError:
                raise ValueError(f"{source!r} is not an IP address or network") from None
        object.__setattr__(self, "_networks", tuple(networks))

    def __bool__(self) -> bool:
        return bool(self.numbers or self.prefixes or self.sources)

    def __or__(self, other: AllowList) -> AllowList:
        return AllowList(
            self.numbers | other.numbers,
            tuple(dict.fromkeys((*self.prefixes, *other.prefixes))),
            tuple(dict.fromkeys((*self.sources, *other.sources))),
        )

    def allows_number(self, number: str | None) -> bool:
        if number is None:
            return False
        return number in self.numbers or (bool(self.prefixes) and number.startswith(self.prefixes))

    def allows_source(self, address: str) -> bool:
        if not self._networks:
            return False
        verdict = self._verdicts.get(address)
        if verdict is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                verdict = False
            else:
                verdict = any(ip in network for network in self._networks)
            if len(self._verdicts) >= _VERDICT_CACHE_LIMIT:
                self._verdicts.clear()  # source addresses are the sender's to choose
            self._verdicts[address] = verdict
        return verdict


NO_EXCEPTIONS: Final = AllowList()
_VERDICT_CACHE_LIMIT = 65536  # distinct source addresses whose verdict is remembered

# -- cps_burst ----------------------------------------------------------------------
# 50 new calls a second, averaged over 10 s, is above the busy hour of a trunk carrying
# two million calls a day (~45/s); SIPp floods and IRSF dialers run at hundreds. The
# 10 s window smooths a dialer's bursts of a second or two and still alerts within
# seconds of a flood starting.
DEFAULT_CPS_PER_SOURCE: Final = Threshold(warning=500, critical=2000, window_s=10)
DEFAULT_CPS_PER_TRUNK: Final = Threshold(warning=500, critical=2000, window_s=10)


@dataclass(frozen=True, slots=True)
class CpsBurstSettings:
    """New INVITEs per source address and per trunk, as they arrive."""

    enabled: bool = True
    per_source: Threshold = DEFAULT_CPS_PER_SOURCE
    per_trunk: Threshold = DEFAULT_CPS_PER_TRUNK
    allow: AllowList = NO_EXCEPTIONS


# -- concurrent_calls ---------------------------------------------------------------
# A person holds one or two calls and a PBX's shared number a few dozen; 50 answered
# calls at once from one number is an account pumping calls.
DEFAULT_CONCURRENT_PER_CALLER: Final = Limit(warning=50, critical=200)
# A trunk against its own busiest level at this hour on previous days: three times
# that, and at least 100 calls, is beyond any daily or weekly swing.
DEFAULT_CONCURRENT_PER_TRUNK: Final = Baseline(
    factor=3.0, critical_factor=6.0, floor=100, alpha=0.3
)


@dataclass(frozen=True, slots=True)
class ConcurrentCallsSettings:
    """Answered calls in progress per caller and per trunk."""

    enabled: bool = True
    per_caller: Limit = DEFAULT_CONCURRENT_PER_CALLER
    per_trunk: Baseline = DEFAULT_CONCURRENT_PER_TRUNK
    allow: AllowList = NO_EXCEPTIONS


# -- high_risk_destination ------------------------------------------------------------
# Callers reach premium and satellite numbers abroad a few times a day per trunk; an
# IRSF pump makes tens an hour.
DEFAULT_HIGH_RISK_PER_ACCOUNT: Final = Threshold(warning=10, critical=50, window_s=3600)
# Many hijacked accounts pumping one paid range at once is one campaign.
DEFAULT_HIGH_RISK_PER_PREFIX: Final = Threshold(warning=30, critical=150, window_s=3600)
# A country's own premium numbers (TV votes, hotlines) are billed by its own
# operators; revenue-share fraud pays out abroad.
DEFAULT_HIGH_RISK_INTERNATIONAL_ONLY: Final = True


@dataclass(frozen=True, slots=True)
class HighRiskDestinationSettings:
    """Calls to listed IRSF / premium prefixes, per trunk (per source address when no
    trunk matched) and per prefix, counted on the INVITE."""

    enabled: bool = True
    per_account: Threshold = DEFAULT_HIGH_RISK_PER_ACCOUNT
    per_prefix: Threshold = DEFAULT_HIGH_RISK_PER_PREFIX
    international_only: bool = DEFAULT_HIGH_RISK_INTERNATIONAL_ONLY
    prefixes: PrefixTable = field(default_factory=shipped_high_risk_prefixes)
    allow: AllowList = NO_EXCEPTIONS


# -- wangiri --------------------------------------------------------------------------
# A one-ring call is cut within about 5 s of the INVITE (1-3 s to ring, one ring);
# people and dialers waiting for an answer let it ring 15-30 s.
DEFAULT_WANGIRI_MAX_RING_S: Final = 6.0
# Distinct numbers one caller rang and cut within an hour: a person who hangs up on a
# wrong number does it a few times; a wangiri run rings hundreds.
DEFAULT_WANGIRI_PER_CALLER: Final = Threshold(warning=20, critical=100, window_s=3600)


@dataclass(frozen=True, slots=True)
class WangiriSettings:
    """One caller ringing many distinct numbers and hanging up before an answer."""

    enabled: bool = True
    per_caller: Threshold = DEFAULT_WANGIRI_PER_CALLER
    max_ring_s: float = DEFAULT_WANGIRI_MAX_RING_S
    allow: AllowList = NO_EXCEPTIONS


# -- scanner --------------------------------------------------------------------------
# User-Agent fragments of scanning and cracking tools (matched case-insensitively
# anywhere in User-Agent): the tools' own defaults (SIPVicious, sippts' pplsip, ...)
# and the lists proxy, firewall and fail2ban set-ups share (Kamailio's example
# configurations drop friendly-scanner and sipcli). sipsak is left out: it is a
# common health-check tool.
KNOWN_SCANNER_AGENTS: Final = (
    "friendly-scanner",  # SIPVicious svmap/svwar default
    "sipcli",
    "sipvicious",
    "vaxsipuseragent",
    "pplsip",  # sippts default
    "vaxipuseragent",
    "iwar",
    "sundayddr",
    "sipscan",
    "sip-scan",
    "siparmyknife",
    "sivus",
    "friendly-request",
)
# One request from a scanning tool is a scan; a hundred in five minutes is a sweep.
DEFAULT_SCANNER_PER_SOURCE: Final = Threshold(warning=1, critical=100, window_s=300)
# Distinct users one address probes with OPTIONS, REGISTER or (from outside every
# trunk) INVITE: an office behind one address re-registers tens of phones after a
# power cut; svwar enumerates hundreds of extensions a minute.
DEFAULT_SCANNER_PROBING: Final = Threshold(warning=100, critical=1000, window_s=60)


@dataclass(frozen=True, slots=True)
class ScannerSettings:
    """Scanner User-Agents, and one source probing many distinct users."""

    enabled: bool = True
    user_agents: tuple[str, ...] = KNOWN_SCANNER_AGENTS
    per_source: Threshold = DEFAULT_SCANNER_PER_SOURCE
    probing: Threshold = DEFAULT_SCANNER_PROBING
    allow: AllowList = NO_EXCEPTIONS

    def __post_init__(self) -> None:
        object.__setattr__(self, "user_agents", tuple(ua.lower() for ua in self.user_agents))
        if any(not ua for ua in self.user_agents):
            raise ValueError("an empty user agent would match every request")


# -- auth_failures ----------------------------------------------------------------------
# A device left with an old password fails once per registration interval and a
# person a few times in a row; a password cracker tries many a second.
DEFAULT_AUTH_FAILURES_PER_SOURCE: Final = Threshold(warning=30, critical=300, window_s=60)


@dataclass(frozen=True, slots=True)
class AuthFailuresSettings:
    """Failed digest authentication per requesting address, REGISTER and INVITE: a 403,
    or a second 401/407 on the same Call-ID (the first is the normal start of digest
    authentication, RFC 3261 section 22.2)."""

    enabled: bool = True
    per_source: Threshold = DEFAULT_AUTH_FAILURES_PER_SOURCE
    allow: AllowList = NO_EXCEPTIONS


# -- sequential_dialing -----------------------------------------------------------------
# Ten consecutive numbers from one caller or trunk is a war dialer walking a range;
# by chance it does not happen with numbers of 8 digits or more.
DEFAULT_SEQUENTIAL_PER_CALLER: Final = Limit(warning=10, critical=50)
DEFAULT_SEQUENTIAL_PER_TRUNK: Final = Limit(warning=10, critical=50)
# A war dialer moves to the next number within seconds; numbers minutes apart are not
# one run.
DEFAULT_SEQUENTIAL_MAX_GAP_S: Final = 300


@dataclass(frozen=True, slots=True)
class SequentialDialingSettings:
    """Runs of consecutive callee numbers (up or down) from one caller or trunk."""

    enabled: bool = True
    per_caller: Limit = DEFAULT_SEQUENTIAL_PER_CALLER
    per_trunk: Limit = DEFAULT_SEQUENTIAL_PER_TRUNK
    max_gap_s: int = DEFAULT_SEQUENTIAL_MAX_GAP_S
    allow: AllowList = NO_EXCEPTIONS

    def __post_init__(self) -> None:
        if self.max_gap_s < 1:
            raise ValueError(f"max_gap_s must be at least 1 second, not {self.max_gap_s}")


# -- spend_velocity ---------------------------------------------------------------------
# A hijacked 30-channel PBX calling premium ranges at ~2 a minute spends 3,600 an hour
# and passes 1,000 within 17 minutes; the busiest hour of a trunk of 500,000 calls a
# day at one cent a minute is about 600.
DEFAULT_SPEND_PER_TRUNK: Final = MoneyThreshold(
    warning=Decimal(1000), critical=Decimal(5000), window_s=3600
)


@dataclass(frozen=True, slots=True)
class SpendVelocitySettings:
    """Rated cost per trunk over the last hour; needs a rate deck."""

    enabled: bool = True
    per_trunk: MoneyThreshold = DEFAULT_SPEND_PER_TRUNK
    allow: AllowList = NO_EXCEPTIONS


# -- international_surge ----------------------------------------------------------------
# An hour's international calls three times the same hour's usual, and at least 30:
# below that, chance alone (a trunk averaging 6 an hour makes 17 in some hour of a
# simulated week) comes too close, and small trunks' attacks are also caught by the
# other detectors. The newest day weighs 30 %: a weekend lowers the baseline slowly,
# a growing customer is learnt within a week.
DEFAULT_INTERNATIONAL_SURGE: Final = Baseline(factor=3.0, critical_factor=10.0, floor=30, alpha=0.3)
DEFAULT_INTERNATIONAL_SURGE_WINDOW_S: Final = 3600  # compared with hourly baselines


@dataclass(frozen=True, slots=True)
class InternationalSurgeSettings:
    """A trunk's international calls over the last hour against its own baseline for
    that hour of the day; needs the trunk's country code."""

    enabled: bool = True
    baseline: Baseline = DEFAULT_INTERNATIONAL_SURGE
    window_s: int = DEFAULT_INTERNATIONAL_SURGE_WINDOW_S
    allow: AllowList = NO_EXCEPTIONS


# -- invalid_destination ----------------------------------------------------------------
# People misdial a number abroad now and then; tens an hour to numbers that cannot
# exist is traffic pumped into unallocated ranges.
DEFAULT_INVALID_PER_ACCOUNT: Final = Threshold(warning=10, critical=50, window_s=3600)


@dataclass(frozen=True, slots=True)
class InvalidDestinationSettings:
    """International calls to numbers of impossible length for their country code, or
    to an unassigned code, per trunk (per source address when no trunk matched)."""

    enabled: bool = True
    per_account: Threshold = DEFAULT_INVALID_PER_ACCOUNT
    plan: NumberingPlan = field(default_factory=shipped_numbering_plan)
    allow: AllowList = NO_EXCEPTIONS


# -- common -----------------------------------------------------------------------------
# An attack paused for half an hour (a shift change, a script restarting) is the same
# incident: one alert, updated. A longer quiet gap starts a new one.
DEFAULT_COOLDOWN_S: Final = 1800
# A running incident's record is refreshed at most once a minute, not per call.
DEFAULT_UPDATE_INTERVAL_S: Final = 60
# Subjects tracked per counter. A day of distinct sources at a large carrier fits; a
# spray of random addresses or numbers past it evicts the idlest (about 200 bytes
# each, so ~20 MB per counter at worst).
DEFAULT_MAX_SUBJECTS: Final = 100_000
# Calls set up or in progress whose INVITE was seen: seven times the calls in progress
# at the busy hour of a carrier of 10 million calls a day (~28,000); about 60 MB.
DEFAULT_MAX_TRACKED_CALLS: Final = 200_000
# A call's record is kept until its CDR closes; past the dialog layer's longest call
# (4 h without a BYE, plus 3 min of ringing) it has closed whatever happened.
DEFAULT_CALL_TTL_S: Final = 14400 + 180
# A botnet sweeping from thousands of addresses is one event for the NOC: beyond 100
# new incidents a minute per detector the rest are counted, not sent.
DEFAULT_MAX_NEW_ALERTS_PER_MINUTE: Final = 100
# Call-IDs kept as examples per alert: enough to open the calls, small on the wire.
DEFAULT_EXAMPLE_CALLS: Final = 5


@dataclass(frozen=True, slots=True)
class TrunkSettings:
    """What differs for one trunk: its numbering (from its `[[trunks]]` entry), extra
    exceptions, and any detector's record replaced whole (None keeps the global one)."""

    country_code: str | None = None
    national_prefix: str | None = None
    allow: AllowList = NO_EXCEPTIONS
    cps_burst: CpsBurstSettings | None = None
    concurrent_calls: ConcurrentCallsSettings | None = None
    high_risk_destination: HighRiskDestinationSettings | None = None
    wangiri: WangiriSettings | None = None
    scanner: ScannerSettings | None = None
    auth_failures: AuthFailuresSettings | None = None
    sequential_dialing: SequentialDialingSettings | None = None
    spend_velocity: SpendVelocitySettings | None = None
    international_surge: InternationalSurgeSettings | None = None
    invalid_destination: InvalidDestinationSettings | None = None

    def __post_init__(self) -> None:
        if self.country_code is not None and not (
            self.country_code.isdigit() and self.country_code.isascii()
        ):
            raise ValueError(f"country_code {self.country_code!r} is not digits")


@dataclass(frozen=True, slots=True)
class FraudSettings:
    """Everything the fraud monitor runs with. The config loader builds it from
    `[fraud]`; every field has a shipped default."""

    enabled: bool = True
    cps_burst: CpsBurstSettings = CpsBurstSettings()
    concurrent_calls: ConcurrentCallsSettings = ConcurrentCallsSettings()
    high_risk_destination: HighRiskDestinationSettings = field(
        default_factory=HighRiskDestinationSettings
    )
    wangiri: WangiriSettings = WangiriSettings()
    scanner: ScannerSettings = ScannerSettings()
    auth_failures: AuthFailuresSettings = AuthFailuresSettings()
    sequential_dialing: SequentialDialingSettings = SequentialDialingSettings()
    spend_velocity: SpendVelocitySettings = SpendVelocitySettings()
    international_surge: InternationalSurgeSettings = InternationalSurgeSettings()
    invalid_destination: InvalidDestinationSettings = field(
        default_factory=InvalidDestinationSettings
    )
    allow: AllowList = NO_EXCEPTIONS  # exempt from every detector
    trunks: Mapping[str, TrunkSettings] = field(default_factory=dict)
    cooldown_s: int = DEFAULT_COOLDOWN_S
    update_interval_s: int = DEFAULT_UPDATE_INTERVAL_S
    max_subjects: int = DEFAULT_MAX_SUBJECTS
    max_tracked_calls: int = DEFAULT_MAX_TRACKED_CALLS
    call_ttl_s: int = DEFAULT_CALL_TTL_S
    max_new_alerts_per_minute: int = DEFAULT_MAX_NEW_ALERTS_PER_MINUTE
    example_calls: int = DEFAULT_EXAMPLE_CALLS

    def __post_init__(self) -> None:
        for name in (
            "cooldown_s",
            "update_interval_s",
            "max_subjects",
            "max_tracked_calls",
            "call_ttl_s",
            "max_new_alerts_per_minute",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.example_calls < 0:
            raise ValueError(f"example_calls must not be negative, not {self.example_calls}")

    def for_trunk(self, name: str | None) -> FraudSettings:
        """These settings as they apply to calls of trunk `name`."""
        trunk = self.trunks.get(name) if name is not None else None
        if trunk is None:
            return self
        changes: dict[str, object] = {
            f.name: getattr(trunk, f.name)
            for f in fields(trunk)
            if f.name in DETECTORS and getattr(trunk, f.name) is not None
        }
        changes["allow"] = self.allow | trunk.allow
        return replace(self, **changes)  # type: ignore[arg-type]
