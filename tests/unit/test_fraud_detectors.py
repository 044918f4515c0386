"""Each detector with the shipped defaults: its attack pattern raises an alert, and a
normal mix of the same volume raises none. Then allow-lists, per-trunk settings,
flags on CDRs and the detectors' finer rules."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import replace
from decimal import Decimal

from sipcdr.fraud import FraudMonitor, FraudSettings, TrunkSettings
from sipcdr.fraud.monitor import REASON_NO_RATING
from sipcdr.fraud.settings import (
    AUTH_FAILURES,
    CONCURRENT_CALLS,
    CPS_BURST,
    HIGH_RISK_DESTINATION,
    INTERNATIONAL_SURGE,
    INVALID_DESTINATION,
    SCANNER,
    SEQUENTIAL_DIALING,
    SPEND_VELOCITY,
    WANGIRI,
    AllowList,
    CpsBurstSettings,
    ScannerSettings,
    Threshold,
)
from sipcdr.model import FraudAlert
from sipcdr.sip import SipMessage
from trafficgen import CORE_IP, MONDAY, Call, Timeline, make_call, request, response

T0 = MONDAY + 10 * 3600.0  # a Monday, 10:00 UTC
Sent = tuple[float, SipMessage, str, str]  # when, what, from, to
TRUNKS = {f"pbx-{n}": f"10.0.{n}.1" for n in range(50)}
_TRUNK_OF = {source: name for name, source in TRUNKS.items()}


def settings(**changes: object) -> FraudSettings:
    """The shipped defaults, with 50 German trunks."""
    base = FraudSettings(
        trunks={name: TrunkSettings(country_code="49", national_prefix="0") for name in TRUNKS}
    )
    return replace(base, **changes)  # type: ignore[arg-type]


class Run:
    """Calls and messages through a monitor, in time order."""

    def __init__(
        self,
        calls: Iterable[Call] = (),
        messages: Iterable[Sent] = (),
        fraud: FraudSettings | None = None,
        *,
        rating: bool = True,
        timeline: Timeline | None = None,
    ) -> None:
        self.timeline = timeline or Timeline()
        for call in calls:
            self.timeline.add_call(call)
        for now, msg, src, dst in messages:
            self.timeline.add_message(now, msg, src, dst)
        fraud = fraud or settings()
        self.monitor = FraudMonitor(fraud, rating=rating)
        self.timeline.run(self.monitor, _TRUNK_OF.get)
        # Long after the last event: open incidents close and send what they gained.
        self.timeline.alerts.extend(self.monitor.expire(self.timeline.last + fraud.cooldown_s + 1))
        self.alerts: list[FraudAlert] = self.timeline.alerts
        self.flagged = self.timeline.flagged

    def raised(self, detector: str) -> list[FraudAlert]:
        return [a for a in self.alerts if a.detector == detector and a.revision == 0]


def _rng() -> random.Random:
    return random.Random(1)


def _number(rng: random.Random, cc: str = "49") -> str:
    """A mobile-like number: 10 national digits starting with 7, on no high-risk list."""
    return cc + str(rng.randrange(7 * 10**9, 8 * 10**9))


def _trunk(n: int) -> tuple[str, str]:
    name = f"pbx-{n % 50}"
    return name, TRUNKS[name]


# -- cps_burst ------------------------------------------------------------------------------


def test_cps_burst_a_flood_from_one_address_alerts_within_seconds() -> None:
    rng = _rng()
    calls = [
        make_call(
            f"f{i}",
            T0 + i / 200,
            source="203.0.113.9",
            trunk=None,
            caller="100",
            callee=_number(rng),
            disposition="failed",
        )
        for i in range(4000)
    ]
    run = Run(calls)
    [alert] = [a for a in run.raised(CPS_BURST) if a.subject_kind == "source_ip"]
    assert alert.subject == "203.0.113.9"
    assert alert.raised_at - T0 < 10  # within the window
    assert alert.threshold == 500
    escalated = [a for a in run.alerts if a.detector == CPS_BURST and a.severity == "critical"]
    assert escalated and escalated[0].alert_id == alert.alert_id  # one incident, updated
    # From outside every trunk to thousands of numbers, it is also probing.
    assert run.flagged["f3999"] == (SCANNER, CPS_BURST)
    assert "f0" not in run.flagged  # counted before any threshold was crossed


def test_cps_burst_the_same_rate_spread_over_the_trunks_is_quiet() -> None:
    rng = _rng()
    calls = []
    for i in range(4000):
        name, source = _trunk(i)
        calls.append(
            make_call(
                f"n{i}",
                T0 + i / 200,
                source=source,
                trunk=name,
                caller=_number(rng),
                callee=_number(rng),
                dialled=None,
            )
        )
    assert Run(calls).alerts == []


# -- concurrent_calls -------------------------------------------------------------------------


def test_concurrent_calls_one_number_holding_80_calls_alerts() -> None:
    rng = _rng()
    calls = [
        make_call(
            f"h{i}",
            T0 + i * 2,
            source=TRUNKS["pbx-3"],
            trunk="pbx-3",
            caller="4930111222",
            callee=_number(rng, "44"),
            talk=600,
        )
        for i in range(80)
    ]
    run = Run(calls)
    [alert] = run.raised(CONCURRENT_CALLS)
    assert (alert.subject_kind, alert.subject, alert.observed) == ("caller", "4930111222", 50)
    assert alert.raised_at == T0 + 49 * 2 + 3  # the 50th answer
    assert run.monitor.concurrent_calls.per_caller.levels == {}  # every call ended


def test_concurrent_calls_80_callers_with_a_call_each_are_quiet() -> None:
    rng = _rng()
    calls = [
        make_call(
            f"h{i}",
            T0 + i * 2,
            source=TRUNKS["pbx-3"],
            trunk="pbx-3",
            caller=_number(rng),
            callee=_number(rng, "44"),
            talk=600,
        )
        for i in range(80)
    ]
    assert Run(calls).alerts == []


def _hourly_calls(
    trunk: str,
    start: float,
    hours: int,
    per_hour: int,
    rng: random.Random,
    tag: str,
    *,
    abroad: bool = False,
    talk: float = 120.0,
) -> list[Call]:
    calls = []
    for hour in range(hours):
        for k in range(per_hour):
            t = start + hour * 3600 + (k + rng.random()) * 3600 / per_hour
            callee = _number(rng, "44" if abroad else "49")
            calls.append(
                make_call(
                    f"{tag}{hour}-{k}",
                    t,
                    source=TRUNKS[trunk],
                    trunk=trunk,
                    caller=_number(rng),
                    callee=callee,
                    dialled=None if abroad else "0" + callee[2:],
                    talk=talk,
                )
            )
    return calls


def test_concurrent_calls_a_trunk_is_judged_against_its_own_busiest_level() -> None:
    rng = _rng()
    # A day of ~40 answered calls in progress (20 a minute, 2 min each), then a surge
    # to ~400 (200 calls a minute) in the same hours of the next day.
    normal = _hourly_calls("pbx-7", MONDAY, 24, 1200, rng, "d")
    surge = [
        make_call(
            f"s{i}",
            MONDAY + 86400 + 10 * 3600 + i * 0.3,
            source=TRUNKS["pbx-7"],
            trunk="pbx-7",
            caller=_number(rng),
            callee=_number(rng, "44"),
        )
        for i in range(1000)
    ]
    run = Run([*normal, *surge])
    [alert] = run.raised(CONCURRENT_CALLS)
    assert (alert.subject_kind, alert.subject) == ("trunk", "pbx-7")
    assert 100 <= alert.threshold <= 3 * 60  # three times its peak, never below 100
    assert float(str(alert.details["baseline"])) >= 30


def test_concurrent_calls_a_big_trunk_at_its_usual_level_is_quiet() -> None:
    rng = _rng()
    # Two days of the same ~400 calls in progress: big, and normal for this trunk.
    calls = [
        make_call(
            f"b{i}",
            MONDAY + 86400 * day + 10 * 3600 + i * 0.3,
            source=TRUNKS["pbx-8"],
            trunk="pbx-8",
            caller=_number(rng),
            callee=_number(rng, "44"),
        )
        for day in range(2)
        for i in range(1000)
    ]
    calls += _hourly_calls("pbx-8", MONDAY, 48, 10, rng, "bg")
    assert not Run(calls).raised(CONCURRENT_CALLS)


# -- high_risk_destination ---------------------------------------------------------------


def test_high_risk_destination_premium_calls_abroad_alert_on_their_invite() -> None:
    rng = _rng()
    calls = [
        make_call(
            f"p{i}",
            T0 + i * 40,
            source=TRUNKS["pbx-4"],
            trunk="pbx-4",
            caller="4930555",
            callee="37190" + str(rng.randrange(10**5, 10**6)),
            talk=300,
        )
        for i in range(30)
    ]
    run = Run(calls)
    [alert] = [a for a in run.raised(HIGH_RISK_DESTINATION) if a.subject_kind == "trunk"]
    assert alert.subject == "pbx-4"
    assert alert.raised_at == T0 + 9 * 40  # the 10th INVITE, long before any call ends
    assert alert.call_ids == ("p9",)
    last = [a for a in run.alerts if a.alert_id == alert.alert_id][-1]
    assert last.details["prefixes"] == {"37190": 21}
    assert len(last.call_ids) == 5


def test_high_risk_destination_as_many_ordinary_calls_abroad_are_quiet() -> None:
    rng = _rng()
    calls = [
        make_call(
            f"o{i}",
            T0 + i * 40,
            source=TRUNKS["pbx-4"],
            trunk="pbx-4",
            caller="4930555",
            callee=_number(rng, "371")[:11],
            talk=300,
        )
        for i in range(30)
    ]
    assert Run(calls).alerts == []


def test_high_risk_destination_many_accounts_pumping_one_range_is_one_prefix_alert() -> None:
    rng = _rng()
    calls = []
    for i in range(40):
        name, source = _trunk(i)
        calls.append(
            make_call(
                f"r{i}",
                T0 + i * 30,
                source=source,
                trunk=name,
                caller=_number(rng),
                callee="979" + str(rng.randrange(10**8, 10**9)),
            )
        )
    run = Run(calls)
    [alert] = run.raised(HIGH_RISK_DESTINATION)
    assert (alert.subject_kind, alert.subject) == ("prefix", "979")
    assert alert.details["listed_as"] == "001 international_premium_rate"


def test_high_risk_destination_home_premium_numbers_are_not_counted() -> None:
    rng = _rng()
    votes = [f"4990012{rng.randrange(10**5):05d}" for _ in range(30)]
    calls = [
        make_call(
            f"v{i}",
            T0 + i,
            source=TRUNKS["pbx-1"],
            trunk="pbx-1",
            caller=f"4930555{i:03d}",
            callee=vote,
            dialled="0" + vote[2:],
        )
        for i, vote in enumerate(votes)
    ]
    assert Run(calls).alerts == []  # a TV vote on German 0900 numbers


# -- wangiri ----------------------------------------------------------------------------------


def test_wangiri_one_ring_calls_to_many_numbers_alert() -> None:
    rng = _rng()
    calls = [
        make_call(
            f"w{i}",
            T0 + i * 1.5,
            source=TRUNKS["pbx-2"],
            trunk="pbx-2",
            caller="22507001234",
            callee=_number(rng),
            disposition="cancelled",
            end_after=2,
        )
        for i in range(300)
    ]
    run = Run(calls)
    [alert] = run.raised(WANGIRI)
    assert (alert.subject, alert.observed) == ("22507001234", 20)
    assert alert.cdr_ids and alert.call_ids == ("w19",)
    assert run.flagged["w299"] == (WANGIRI,)


def test_wangiri_a_dialer_giving_up_after_20_seconds_is_quiet() -> None:
    rng = _rng()
    calls = [
        make_call(
            f"d{i}",
            T0 + i * 1.5,
            source=TRUNKS["pbx-2"],
            trunk="pbx-2",
            caller="4930777000",
            callee=_number(rng),
            disposition="cancelled",
            end_after=rng.uniform(20, 25),
        )
        for i in range(300)
    ]
    assert Run(calls).alerts == []


# -- scanner ----------------------------------------------------------------------------------


def _registers(source: str | None, count: int, user_agent: str, start: float = T0) -> list[Sent]:
    out = []
    for i in range(count):
        user = str(100 + i)
        address = source or f"172.16.{i // 250}.{i % 250 + 1}"
        out.append(
            (
                start + i / 20,
                request("REGISTER", f"reg{i}", caller=user, callee=user, user_agent=user_agent),
                address,
                CORE_IP,
            )
        )
    return out


def test_scanner_user_agent_alerts_on_the_first_request() -> None:
    run = Run(messages=_registers("192.0.2.66", 600, "friendly-scanner"))
    [alert] = run.raised(SCANNER)
    assert (alert.subject, alert.raised_at) == ("192.0.2.66", T0)
    assert alert.details["user_agent"] == "friendly-scanner"
    assert [a.severity for a in run.alerts if a.detector == SCANNER][-1] == "critical"


def test_scanner_the_same_registrations_from_phones_are_quiet() -> None:
    assert Run(messages=_registers(None, 600, "Yealink SIP-T46U 108.86.0.20")).alerts == []


def test_scanner_one_address_probing_many_users_alerts_without_a_telltale_agent() -> None:
    messages = [
        (
            T0 + i / 10,
            request("OPTIONS", f"o{i}", caller="x", callee=str(200 + i), user_agent="Asterisk PBX"),
            "192.0.2.77",
            CORE_IP,
        )
        for i in range(400)
    ]
    run = Run(messages=messages)
    [alert] = run.raised(SCANNER)
    assert (alert.subject, alert.observed, alert.details["distinct_users"]) == (
        "192.0.2.77",
        100,
        100,
    )


def test_scanner_an_office_rebooting_60_phones_behind_one_address_is_quiet() -> None:
    run = Run(messages=_registers("172.30.0.1", 60, "Yealink SIP-T46U"))
    assert run.alerts == []


def test_scanner_keepalives_to_many_gateways_are_quiet() -> None:
    messages = [
        (
            T0 + i / 10,
            request("OPTIONS", f"k{i}", caller="ping", callee="ping", user_agent="kamailio (5.7)"),
            "198.51.100.2",
            CORE_IP,
        )
        for i in range(400)
    ]
    assert Run(messages=messages).alerts == []


# -- auth_failures ------------------------------------------------------------------------


def _auth_messages(source: str, rounds: int, *, same_call: bool, fail: bool) -> list[Sent]:
    out: list[Sent] = []
    for i in range(rounds):
        t = T0 + i * 0.05
        call_id = "crack" if same_call else f"reg{i}"
        cseq = i + 1 if same_call else 1
        out.append(
            (
                t,
                request("REGISTER", call_id, cseq=cseq, caller="100", callee="100"),
                source,
                CORE_IP,
            )
        )
        out.append(
            (
                t + 0.01,
                response(401, call_id, cseq=cseq, method="REGISTER", caller="100", callee="100"),
                CORE_IP,
                source,
            )
        )
        if not same_call:
            out.append(
                (
                    t + 0.02,
                    request("REGISTER", call_id, cseq=2, caller="100", callee="100"),
                    source,
                    CORE_IP,
                )
            )
            status = 401 if fail else 200
            out.append(
                (
                    t + 0.03,
                    response(
                        status, call_id, cseq=2, method="REGISTER", caller="100", callee="100"
                    ),
                    CORE_IP,
                    source,
                )
            )
    return out


def test_auth_failures_a_password_cracker_alerts() -> None:
    run = Run(messages=_auth_messages("198.18.0.7", 1200, same_call=True, fail=True))
    [alert] = run.raised(AUTH_FAILURES)
    assert (alert.subject, alert.observed) == ("198.18.0.7", 30)
    assert alert.raised_at - T0 < 2
    assert alert.details["methods"] == {"REGISTER": 1}


def test_auth_failures_as_many_normal_challenges_from_one_address_are_quiet() -> None:
    # 1,200 registrations through one NAT, each challenged once and then accepted.
    run = Run(messages=_auth_messages("198.18.0.8", 1200, same_call=False, fail=False))
    assert run.alerts == []


def test_auth_failures_a_wrong_password_on_each_call_counts() -> None:
    run = Run(messages=_auth_messages("198.18.0.9", 40, same_call=False, fail=True))
    [alert] = run.raised(AUTH_FAILURES)
    assert alert.observed == 30


def test_auth_failures_a_refresh_on_the_same_call_id_after_success_is_not_a_failure() -> None:
    messages: list[Sent] = []
    for i in range(100):  # re-registers every 10 s on one Call-ID: 401, retry, 200
        t, cseq = T0 + i * 10, 2 * i + 1
        messages += [
            (
                t,
                request("REGISTER", "refresh", cseq=cseq, caller="100", callee="100"),
                "198.18.0.10",
                CORE_IP,
            ),
            (
                t + 0.01,
                response(401, "refresh", cseq=cseq, method="REGISTER", caller="100", callee="100"),
                CORE_IP,
                "198.18.0.10",
            ),
            (
                t + 0.02,
                request("REGISTER", "refresh", cseq=cseq + 1, caller="100", callee="100"),
                "198.18.0.10",
                CORE_IP,
            ),
            (
                t + 0.03,
                response(
                    200, "refresh", cseq=cseq + 1, method="REGISTER", caller="100", callee="100"
                ),
                CORE_IP,
                "198.18.0.10",
            ),
        ]
    run = Run(
        messages=messages,
        fraud=settings(
            auth_failures=replace(FraudSettings().auth_failures, per_source=Threshold(1, 5, 60))
        ),
    )
    assert run.alerts == []


# -- sequential_dialing ---------------------------------------------------------------------


def _dial(numbers: list[int], caller: str = "4930123000") -> list[Call]:
    return [
        make_call(
            f"q{i}",
            T0 + i * 3,
            source=TRUNKS["pbx-5"],
            trunk="pbx-5",
            caller=caller,
            callee=str(n),
            dialled="0" + str(n)[2:],
            disposition="failed",
        )
        for i, n in enumerate(numbers)
    ]


def test_sequential_dialing_a_war_dialer_alerts() -> None:
    base = 4940555100
    run = Run(_dial([base + i for i in range(40)]))
    kinds = {(a.subject_kind, a.subject) for a in run.raised(SEQUENTIAL_DIALING)}
    assert kinds == {("caller", "4930123000"), ("trunk", "pbx-5")}
    assert min(a.raised_at for a in run.raised(SEQUENTIAL_DIALING)) == T0 + 9 * 3


def test_sequential_dialing_downwards_and_with_other_calls_between_alerts() -> None:
    rng = _rng()
    numbers: list[int] = []
    for i in range(20):
        numbers += [4940555200 - i, int(_number(rng))]
    assert Run(_dial(numbers)).raised(SEQUENTIAL_DIALING)


def test_sequential_dialing_the_same_numbers_in_random_order_are_quiet() -> None:
    numbers = [4940555100 + i for i in range(40)]
    random.Random(3).shuffle(numbers)
    assert Run(_dial(numbers)).alerts == []


def test_sequential_dialing_redials_and_numbers_minutes_apart_do_not_make_a_run() -> None:
    calls = _dial([4940555100 + i // 3 for i in range(40)])  # each number three times
    calls[-1] = make_call(
        "late",
        T0 + 3600,
        source=TRUNKS["pbx-5"],
        trunk="pbx-5",
        caller="4930123000",
        callee="4940555114",
        disposition="failed",
    )
    run = Run(calls)
    assert [a.observed for a in run.raised(SEQUENTIAL_DIALING)] == [10, 10]  # 13 distinct: no more


# -- spend_velocity -------------------------------------------------------------------------


def _priced(trunks: int) -> list[Call]:
    rng = _rng()
    calls = []
    for i in range(60):
        name, source = _trunk(i % trunks + 10)
        calls.append(
            make_call(
                f"c{i}",
                T0 + (i % 30) * 5 + (i // 30) * 1210,
                source=source,
                trunk=name,
                caller=f"99{i}",
                callee="8816" + str(rng.randrange(10**7, 10**8)),
                talk=1200,
                cost_per_min=Decimal("2.00"),
            )
        )
    return calls


def test_spend_velocity_an_hour_of_premium_calls_on_one_trunk_alerts() -> None:
    run = Run(_priced(1))
    [alert] = run.raised(SPEND_VELOCITY)
    assert alert.subject == "pbx-10"
    assert alert.observed == Decimal(1000)  # 25 calls of 40 EUR
    assert alert.threshold == Decimal(1000)
    assert alert.details["currency"] == "EUR"
    assert alert.to_record()["observed"] == "1000.000000"


def test_spend_velocity_the_same_spend_over_50_trunks_is_quiet() -> None:
    assert not Run(_priced(50)).raised(SPEND_VELOCITY)


def test_spend_velocity_is_inactive_without_a_rate_deck_and_says_why() -> None:
    run = Run(_priced(1), rating=False)
    assert not run.raised(SPEND_VELOCITY)
    assert run.monitor.stats.inactive[SPEND_VELOCITY] == REASON_NO_RATING


# -- international_surge --------------------------------------------------------------------


def test_international_surge_against_the_trunks_own_normal_alerts() -> None:
    rng = _rng()
    learnt = _hourly_calls("pbx-6", MONDAY, 34, 2, rng, "l", abroad=True)  # 2 abroad an hour
    surge = [
        make_call(
            f"s{i}",
            MONDAY + 86400 + 10 * 3600 + i * 15,
            source=TRUNKS["pbx-6"],
            trunk="pbx-6",
            caller=_number(rng),
            callee=_number(rng, "44"),
        )
        for i in range(120)
    ]
    run = Run([*learnt, *surge])
    [alert] = run.raised(INTERNATIONAL_SURGE)
    assert alert.subject == "pbx-6"
    assert alert.threshold == 30  # the floor: three times 2 is less
    assert alert.severity == "warning"
    assert alert.raised_at < MONDAY + 86400 + 10 * 3600 + 30 * 15


def test_international_surge_a_trunk_that_always_calls_abroad_this_much_is_quiet() -> None:
    rng = _rng()
    calls = _hourly_calls("pbx-6", MONDAY, 34, 240, rng, "a", abroad=True)
    assert Run(calls).alerts == []


def test_international_surge_learns_each_hour_before_judging_it() -> None:
    rng = _rng()
    calls = [
        make_call(
            f"s{i}",
            T0 + i * 15,
            source=TRUNKS["pbx-6"],
            trunk="pbx-6",
            caller=_number(rng),
            callee=_number(rng, "44"),
        )
        for i in range(120)
    ]
    assert not Run(calls).raised(INTERNATIONAL_SURGE)


# -- invalid_destination --------------------------------------------------------------------


def test_invalid_destination_calls_to_impossible_numbers_alert() -> None:
    rng = _rng()
    calls = [
        make_call(
            f"i{i}",
            T0 + i * 30,
            source=TRUNKS["pbx-9"],
            trunk="pbx-9",
            caller="4930888",
            callee="3712" + str(rng.randrange(10**7, 10**8)),
            disposition="failed",
        )
        for i in range(40)
    ]
    run = Run(calls)
    [alert] = run.raised(INVALID_DESTINATION)
    assert alert.subject == "pbx-9"
    last = [a for a in run.alerts if a.alert_id == alert.alert_id][-1]
    assert last.details == {"country_codes": {"371": 31}}  # those counted since it was raised


def test_invalid_destination_as_many_valid_numbers_abroad_are_quiet() -> None:
    rng = _rng()
    calls = [
        make_call(
            f"i{i}",
            T0 + i * 30,
            source=TRUNKS["pbx-9"],
            trunk="pbx-9",
            caller="4930888",
            callee="3712" + str(rng.randrange(10**6, 10**7)),
            disposition="failed",
        )
        for i in range(40)
    ]
    assert Run(calls).alerts == []


def test_invalid_destination_counts_unassigned_country_codes() -> None:
    calls = [
        make_call(
            f"u{i}",
            T0 + i,
            source="203.0.113.50",
            trunk=None,
            caller="100",
            callee=f"28{i:08d}",
            disposition="failed",
        )
        for i in range(10)
    ]
    [alert] = Run(calls).raised(INVALID_DESTINATION)
    assert (alert.subject_kind, alert.details) == (
        "source_ip",
        {"country_codes": {"unassigned_country_code": 1}},
    )


# -- settings -------------------------------------------------------------------------------


def test_an_allow_listed_source_is_not_judged() -> None:
    fraud = settings(scanner=ScannerSettings(allow=AllowList(sources=("192.0.2.0/24",))))
    assert Run(messages=_registers("192.0.2.66", 50, "friendly-scanner"), fraud=fraud).alerts == []


def test_an_allow_listed_number_is_not_judged() -> None:
    rng = _rng()
    calls = [
        make_call(
            f"h{i}",
            T0 + i * 2,
            source=TRUNKS["pbx-3"],
            trunk="pbx-3",
            caller="4930111222",
            callee=_number(rng, "44"),
            talk=600,
        )
        for i in range(80)
    ]
    fraud = settings(allow=AllowList(numbers=frozenset({"4930111222"})))
    assert Run(calls, fraud=fraud).alerts == []


def test_a_trunk_allow_list_and_override_apply_to_that_trunk_only() -> None:
    rng = _rng()
    calls = []
    for name in ("pbx-1", "pbx-2"):
        calls += [
            make_call(
                f"{name}-{i}",
                T0 + i / 100,
                source=TRUNKS[name],
                trunk=name,
                caller=_number(rng),
                callee=_number(rng),
                dialled=None,
            )
            for i in range(700)
        ]
    fraud = settings()
    trunks = dict(fraud.trunks)
    trunks["pbx-1"] = replace(
        trunks["pbx-1"],
        cps_burst=CpsBurstSettings(
            per_source=Threshold(5000, 9000, 10), per_trunk=Threshold(5000, 9000, 10)
        ),
    )
    run = Run(calls, fraud=replace(fraud, trunks=trunks))
    assert {a.subject for a in run.raised(CPS_BURST)} == {"pbx-2"}


def test_a_trunk_address_is_counted_apart_when_its_limit_is_below_the_trunks() -> None:
    rng = _rng()
    calls = [
        make_call(
            f"a{i}",
            T0 + i / 100,
            source=TRUNKS["pbx-1"],
            trunk="pbx-1",
            caller=_number(rng),
            callee=_number(rng),
            dialled=None,
        )
        for i in range(300)
    ]
    low = CpsBurstSettings(per_source=Threshold(100, 900, 10))
    kinds = {
        (a.subject_kind, a.subject)
        for a in Run(calls, fraud=settings(cps_burst=low)).raised(CPS_BURST)
    }
    assert kinds == {("source_ip", TRUNKS["pbx-1"])}


def test_a_detector_switched_off_stays_off() -> None:
    fraud = settings(scanner=ScannerSettings(enabled=False))
    run = Run(messages=_registers("192.0.2.66", 50, "friendly-scanner"), fraud=fraud)
    assert run.alerts == []
    assert run.monitor.stats.tracked[SCANNER] == 0
