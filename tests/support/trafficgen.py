"""A seeded, fake-clock carrier for the fraud tests: 50 trunks, a daily curve, Poisson
arrivals, ASR around 50 %, log-normal durations, a few percent international calls,
retries, registrations, call centres dialling in bursts; and the attack patterns each
detector exists for.

Calls become the messages the fraud monitor reads (INVITE, challenges, the final
response) and a CDR when they end, in time order. Messages are built as `SipMessage`
records directly rather than parsed from bytes (a week is millions of messages);
`test_fraud_traffic.py` checks that a built message equals the parse of the same text.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import cast

from sipcdr.dialog.correlator import cdr_id
from sipcdr.fraud import FraudMonitor, FraudSettings, TrunkSettings
from sipcdr.fraud.numbering import shipped_numbering_plan
from sipcdr.model import Cdr, FraudAlert, Packet
from sipcdr.sip import SipMessage

MONDAY = datetime(2026, 11, 2, tzinfo=UTC).timestamp()  # a week starts here
DAY = 86400.0
CORE_IP = "198.51.100.1"  # the carrier's SBC: every call from a trunk goes to it
# Skips __init__, as the parser does (a compiled SipMessage refuses object.__new__).
_new_message = SipMessage.__new__


# -- messages and CDRs ------------------------------------------------------------------


def request(
    method: str,
    call_id: str,
    *,
    caller: str,
    callee: str,
    cseq: int = 1,
    from_tag: str = "ft",
    to_tag: str | None = None,
    user_agent: str | None = "PBX/1.0",
    pai: str | None = None,
    domain: str = "carrier.example",
) -> SipMessage:
    """A request as the parser would hand it on (`callee` as dialled: `+4930...`,
    `030...`, or a user name)."""
    msg: SipMessage = _new_message(SipMessage)
    msg.is_request = True
    msg.method = method
    msg.request_uri = f"sip:{callee}@{domain}" if method != "REGISTER" else f"sip:{domain}"
    msg.status_code = 0
    msg.reason_phrase = ""
    _common(msg, call_id, cseq, method, caller, callee, from_tag, to_tag, domain)
    msg.user_agent = user_agent
    msg.raw_pai = f" <sip:{pai}@{domain}>" if pai else None  # unstripped, as parsed
    msg._pai_read = False
    return msg


def response(
    status: int,
    call_id: str,
    *,
    caller: str,
    callee: str,
    cseq: int = 1,
    method: str = "INVITE",
    from_tag: str = "ft",
    to_tag: str | None = "tt",
    domain: str = "carrier.example",
) -> SipMessage:
    msg: SipMessage = _new_message(SipMessage)
    msg.is_request = False
    msg.method = ""
    msg.request_uri = ""
    msg.status_code = status
    msg.reason_phrase = "Reason"
    _common(msg, call_id, cseq, method, caller, callee, from_tag, to_tag, domain)
    msg.user_agent = "Server/1.0"
    msg.raw_pai = None
    msg._pai_read = False
    return msg


def _common(
    msg: SipMessage,
    call_id: str,
    cseq: int,
    method: str,
    caller: str,
    callee: str,
    from_tag: str,
    to_tag: str | None,
    domain: str,
) -> None:
    msg.call_id = call_id
    msg.cseq = cseq
    msg.cseq_method = method
    msg.from_uri = f"sip:{caller}@{domain}"
    msg.from_tag = from_tag
    msg.raw_from = f"<{msg.from_uri}>;tag={from_tag}"
    msg.to_uri = f"sip:{callee}@{domain}"
    msg.to_tag = to_tag
    msg.raw_to = f"<{msg.to_uri}>" + (f";tag={to_tag}" if to_tag else "")
    msg.via_branch = f"z9hG4bK-{call_id}-{cseq}"
    msg.content_type = None
    msg.content_length = 0
    msg.body = b""
    msg.body_start = -1
    msg.raw_reason = None
    msg._lines = []
    msg._defects = []
    msg._index = None


def packet(now: float, src: str, dst: str = CORE_IP) -> Packet:
    return Packet(now, src, 5060, dst, 5060, "udp", b"", "test")


@dataclass
class Call:
    """One call as the generator decided it; times are absolute."""

    call_id: str
    start: float
    source: str
    trunk: str | None
    caller: str  # E.164, as the CDR will have it
    callee: str  # E.164, as the CDR will have it
    dialled: str  # the Request-URI user as sent
    end: float
    disposition: str  # answered, busy, no_answer, cancelled, failed
    answer: float | None = None
    status: int = 200  # final response
    challenged: bool = False  # a 407 first, then the retry with credentials
    user_agent: str = "PBX/1.0"
    cost: Decimal | None = None
    caller_user: str | None = None  # the From user as sent, when not `caller`

    def cdr(self) -> Cdr:
        return Cdr(
            cdr_id=cdr_id(self.call_id, "ft", self.start),
            call_id=self.call_id,
            caller=self.caller,
            callee=self.callee,
            from_uri=f"sip:{self.caller_user or self.caller}@carrier.example",
            to_uri=f"sip:{self.dialled}@carrier.example",
            request_uri=f"sip:{self.dialled}@carrier.example",
            src_ip=self.source,
            src_port=5060,
            dst_ip=CORE_IP,
            dst_port=5060,
            trunk=self.trunk,
            start_time=self.start,
            ring_time=min(self.start + 1.5, self.end),
            answer_time=self.answer,
            end_time=self.end,
            pdd_ms=1500,
            disposition=self.disposition,
            sip_code=self.status,
            sip_reason=None,
            q850_cause=None,
            hangup_by="caller" if self.disposition in ("answered", "cancelled") else None,
            end_reason="bye" if self.answer is not None else "final_response",
            user_agent=self.user_agent,
            capture_node="test",
            rated=self.cost is not None,
            cost=self.cost,
            currency="EUR" if self.cost is not None else None,
        )


# Kinds of events on the timeline.
INVITE, CHALLENGE, ANSWER, FINAL, END, MESSAGE = range(6)


class Timeline:
    """Events in time order; feeds them to a monitor and keeps what it returns."""

    def __init__(self) -> None:
        self._events: list[tuple[float, int, int, object]] = []
        self._order = itertools.count()
        self.alerts: list[FraudAlert] = []
        self.flagged: dict[str, tuple[str, ...]] = {}  # call_id -> fraud_flags
        self.calls = 0
        self.messages = 0
        self.last = 0.0  # time of the last event run
        self.answered = 0
        self.abroad = 0  # calls dialled with the international prefix

    def add_call(self, call: Call) -> None:
        add = self._events.append
        add((call.start, next(self._order), INVITE, call))
        if call.challenged:
            add((call.start + 0.05, next(self._order), CHALLENGE, call))
        if call.answer is not None:
            add((call.answer, next(self._order), ANSWER, call))
        elif call.disposition in ("busy", "failed", "no_answer"):
            add((call.end, next(self._order), FINAL, call))
        add((call.end, next(self._order), END, call))

    def add_message(self, now: float, msg: SipMessage, src: str, dst: str = CORE_IP) -> None:
        self._events.append((now, next(self._order), MESSAGE, (msg, src, dst)))

    def copy(self) -> Timeline:
        """The same events, not yet run (messages are shared: nothing changes them)."""
        other = Timeline()
        other._events = list(self._events)
        other._order = itertools.count(next(self._order))
        return other

    def run(
        self,
        monitor: FraudMonitor,
        trunk_of: Callable[[str], str | None],
        tick_s: float = 1.0,
    ) -> None:
        """Everything added so far, in time order, with `expire` every `tick_s`."""
        events = sorted(self._events)
        self._events = []
        if events:
            self.last = events[-1][0]
        on_message = monitor.on_message
        alerts = self.alerts
        next_tick = events[0][0] if events else 0.0
        for now, _, kind, item in events:
            while now >= next_tick:
                alerts.extend(monitor.expire(next_tick))
                next_tick += tick_s
            if kind == MESSAGE:
                msg, src, dst = cast(tuple[SipMessage, str, str], item)
                self.messages += 1
                alerts.extend(on_message(msg, packet(now, src, dst), now, trunk_of(src)))
                continue
            call = cast(Call, item)
            caller = call.caller_user or call.caller
            src = call.source
            if kind == INVITE:
                self.calls += 1
                self.messages += 1
                self.abroad += call.dialled.startswith("00")
                msg = request(
                    "INVITE",
                    call.call_id,
                    caller=caller,
                    callee=call.dialled,
                    user_agent=call.user_agent,
                )
                alerts.extend(on_message(msg, packet(now, src), now, call.trunk))
            elif kind == CHALLENGE:
                self.messages += 2
                msg = response(407, call.call_id, caller=caller, callee=call.dialled, to_tag="auth")
                alerts.extend(on_message(msg, packet(now, CORE_IP, src), now, None))
                msg = request(
                    "INVITE",
                    call.call_id,
                    caller=caller,
                    callee=call.dialled,
                    cseq=2,
                    user_agent=call.user_agent,
                )
                alerts.extend(on_message(msg, packet(now, src), now, call.trunk))
            elif kind in (ANSWER, FINAL):
                self.messages += 1
                self.answered += kind == ANSWER
                msg = response(
                    200 if kind == ANSWER else call.status,
                    call.call_id,
                    caller=caller,
                    callee=call.dialled,
                    cseq=2 if call.challenged else 1,
                )
                alerts.extend(on_message(msg, packet(now, CORE_IP, src), now, None))
            else:
                flags, found = monitor.on_cdr(call.cdr(), call.cost)
                alerts.extend(found)
                if flags:
                    self.flagged[call.call_id] = flags
        alerts.extend(monitor.expire(next_tick))


# -- the carrier --------------------------------------------------------------------------

# Share of a trunk's daily calls in each hour of a weekday (UTC), before normalising.
_OFFICE = (1, 1, 1, 1, 1, 2, 5, 15, 50, 90, 100, 100, 70, 80, 95, 95, 85, 60, 30, 15, 8, 5, 3, 2)
_HOME = (8, 4, 2, 2, 2, 3, 8, 20, 35, 45, 50, 55, 60, 55, 55, 60, 70, 85, 100, 100, 90, 65, 40, 20)
_CENTRE = (0, 0, 0, 0, 0, 0, 0, 0, 0, 80, 100, 100, 90, 100, 100, 100, 100, 90, 80, 60, 0, 0, 0, 0)
_WHOLESALE = tuple(30 + 0.7 * h for h in _OFFICE)
_WEEKEND = {"office": 0.12, "home": 1.1, "centre": 0.0, "wholesale": 0.5}
_CURVES = {"office": _OFFICE, "home": _HOME, "centre": _CENTRE, "wholesale": _WHOLESALE}

# Where international calls go (country code, weight, per-minute price in EUR).
_ABROAD = (
    ("44", 20, "0.05"),
    ("33", 15, "0.05"),
    ("1", 12, "0.02"),
    ("48", 8, "0.06"),
    ("90", 8, "0.12"),
    ("39", 8, "0.05"),
    ("34", 6, "0.05"),
    ("91", 5, "0.08"),
    ("7", 4, "0.15"),
    ("234", 2, "0.25"),
    ("86", 4, "0.06"),
    ("31", 8, "0.05"),
)
_NATIONAL_RATE = Decimal("0.01")
_PREMIUM_RATE = Decimal("1.50")


@dataclass(frozen=True)
class Trunk:
    name: str
    kind: str  # office, home, centre, wholesale
    country_code: str
    sources: tuple[str, ...]
    calls_per_day: float  # on a weekday
    international: float  # share of calls abroad
    callers: tuple[str, ...]
    challenged: bool  # calls authenticate with a 407 round trip


@dataclass
class Carrier:
    """A regional carrier: 50 trunks with sizes falling off like a Zipf law."""

    seed: int
    calls_per_day: float
    trunks: list[Trunk] = field(default_factory=list)
    devices: list[tuple[str, str]] = field(default_factory=list)  # (address, user)
    victims: set[str] = field(default_factory=set)  # trunks an attack has used

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        weights = [1 / (rank + 1) ** 0.8 for rank in range(50)]
        total = sum(weights)
        kinds = ["wholesale"] * 3 + ["centre"] * 5 + ["home"] * 10 + ["office"] * 32
        rng.shuffle(kinds)
        countries = ["49"] * 40 + ["44"] * 4 + ["33"] * 3 + ["31"] * 3
        for n in range(50):
            kind = kinds[n]
            cc = countries[n]
            size = self.calls_per_day * weights[n] / total
            if kind == "centre":
                # Outbound campaigns show a handful of numbers for many agents.
                callers = tuple(_national(rng, cc) for _ in range(6))
            elif kind == "office":
                base = _national(rng, cc)[:-3]
                callers = tuple(f"{base}{i:03d}" for i in range(0, 200, 3))
            else:
                callers = tuple(_national(rng, cc) for _ in range(3000))
            self.trunks.append(
                Trunk(
                    name=f"trunk-{n:02d}",
                    kind=kind,
                    country_code=cc,
                    sources=tuple(f"10.{n}.0.{i + 1}" for i in range(2)),
                    calls_per_day=size,
                    international={"wholesale": 0.15, "centre": 0.01}.get(kind, 0.03),
                    callers=callers,
                    challenged=kind == "home",
                )
            )
        for i in range(400):  # registered phones, each behind its own address
            self.devices.append((f"172.16.{i // 250}.{i % 250 + 1}", f"{1000 + i}"))

    def settings(self) -> FraudSettings:
        """The shipped defaults; each trunk with the numbering of its `[[trunks]]` entry."""
        return FraudSettings(
            trunks={
                t.name: TrunkSettings(country_code=t.country_code, national_prefix="0")
                for t in self.trunks
            }
        )

    def trunk_of(self) -> Callable[[str], str | None]:
        table = {source: t.name for t in self.trunks for source in t.sources}
        return table.get

    def week(self, timeline: Timeline, days: int = 7) -> None:
        rng = random.Random(self.seed + 1)
        ids = itertools.count()
        for trunk in self.trunks:
            for call in _arrivals(rng, trunk, MONDAY, days, ids):
                timeline.add_call(call)
        self._registrations(rng, timeline, days)

    def _registrations(self, rng: random.Random, timeline: Timeline, days: int) -> None:
        """Phones re-register every hour (challenge, retry with credentials); an office
        of 60 phones behind one address re-registers all at once after a power cut each
        morning; three phones behind one address keep a password that was changed and
        fail every minute."""
        end = MONDAY + days * DAY
        for n, (address, user) in enumerate(self.devices):
            t = MONDAY + rng.uniform(0, 3600)
            while t < end:
                _register(timeline, t, f"reg-{n}-{int(t)}", user, address, fails=False)
                t += 3600 + rng.uniform(-30, 30)
        for day in range(days):
            t = MONDAY + day * DAY + 7 * 3600
            for phone in range(60):
                user = f"30{phone:02d}"
                _register(
                    timeline, t + rng.uniform(0, 50), f"boot-{day}-{phone}", user, "172.30.0.1"
                )
        for n in range(3):
            t = MONDAY + rng.uniform(0, 60)
            while t < end:
                _register(
                    timeline, t, f"stale-{n}-{int(t)}", f"{2000 + n}", "172.31.0.9", fails=True
                )
                t += 60 + rng.uniform(-5, 5)


def _register(
    timeline: Timeline, t: float, call_id: str, user: str, address: str, *, fails: bool = False
) -> None:
    """REGISTER, 401, REGISTER with credentials, then 200 or (a wrong password) 401."""
    timeline.add_message(t, request("REGISTER", call_id, caller=user, callee=user), address)
    timeline.add_message(
        t + 0.02,
        response(401, call_id, method="REGISTER", caller=user, callee=user),
        CORE_IP,
        address,
    )
    timeline.add_message(
        t + 0.1, request("REGISTER", call_id, cseq=2, caller=user, callee=user), address
    )
    status = 401 if fails else 200
    timeline.add_message(
        t + 0.12,
        response(status, call_id, cseq=2, method="REGISTER", caller=user, callee=user),
        CORE_IP,
        address,
    )


def _national(rng: random.Random, cc: str) -> str:
    """A number of the country with a national number of a length it can have."""
    length = _NATIONAL_LENGTH.get(cc)
    if length is None:
        lengths = sorted(shipped_numbering_plan().lengths[cc])
        length = _NATIONAL_LENGTH[cc] = 10 if 10 in lengths else lengths[-1]
    return cc + str(rng.randrange(2 * 10 ** (length - 1), 10**length))


_NATIONAL_LENGTH: dict[str, int] = {}


def _abroad(rng: random.Random, home: str) -> tuple[str, Decimal]:
    while True:
        cc, _, price = rng.choices(_ABROAD, weights=_ABROAD_WEIGHTS)[0]
        if cc != home:
            break
    return _national(rng, cc), Decimal(price)


_ABROAD_WEIGHTS = [w for _, w, _ in _ABROAD]


def _week_curve(kind: str) -> list[float]:
    """The kind's relative rate (at most 1) for each hour of the week from MONDAY."""
    shape = _CURVES[kind]
    top = max(shape)
    return [
        shape[hour % 24] / top * (_WEEKEND[kind] if hour >= 5 * 24 else 1.0)
        for hour in range(7 * 24)
    ]


def _arrivals(
    rng: random.Random, trunk: Trunk, start: float, days: int, ids: Iterator[int]
) -> Iterator[Call]:
    """Poisson arrivals thinned by the daily curve; call centres launch theirs in bursts."""
    shape = _CURVES[trunk.kind]
    mean = sum(shape) / len(shape) / max(shape)
    peak_rate = trunk.calls_per_day / DAY / mean  # calls per second at the busiest hour
    burst = 12 if trunk.kind == "centre" else 1
    rate = peak_rate / burst
    curve = _week_curve(trunk.kind)
    t = start
    end = start + days * DAY
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            break
        if rng.random() > curve[int((t - MONDAY) // 3600) % len(curve)]:
            continue
        for k in range(rng.randint(burst // 2, burst * 3 // 2) if burst > 1 else 1):
            call = _call(rng, trunk, t + k * rng.uniform(0.02, 0.2), next(ids))
            yield call
            if call.disposition in ("busy", "no_answer", "failed") and rng.random() < 0.2:
                yield _retry(rng, trunk, call, next(ids))


def _call(rng: random.Random, trunk: Trunk, start: float, n: int) -> Call:
    cc = trunk.country_code
    caller = rng.choice(trunk.callers)
    if rng.random() < trunk.international:
        callee, rate = _abroad(rng, cc)
        dialled = "00" + callee
        if rng.random() < 0.002:  # a misdialled number abroad: one digit short
            callee = callee[:-1]
            dialled = dialled[:-1]
    else:
        callee = _national(rng, cc)
        dialled = "0" + callee[len(cc) :]
        rate = _NATIONAL_RATE if rng.random() < 0.6 else Decimal("0.03")
    if rng.random() < 1 / 20000:  # a legitimate call to a premium number abroad
        callee = "4490" + str(rng.randrange(10**7, 10**8))
        dialled = "00" + callee
        rate = _PREMIUM_RATE
    call = Call(
        call_id=f"c{n}@{trunk.name}",
        start=start,
        source=rng.choice(trunk.sources),
        trunk=trunk.name,
        caller=caller,
        callee=callee,
        dialled=dialled,
        end=start,
        disposition="answered",
        challenged=trunk.challenged,
        user_agent="CallCentre/7.2" if trunk.kind == "centre" else "PBX/1.0",
    )
    centre = trunk.kind == "centre"
    roll = rng.random()
    ring = rng.uniform(1.0, 3.0)
    if roll < (0.35 if centre else 0.52):
        call.answer = start + ring + rng.lognormvariate(2.0, 0.6)
        billsec = rng.lognormvariate(4.4, 1.0)
        call.end = call.answer + billsec
        call.cost = (rate * Decimal(str(round(billsec))) / 60).quantize(Decimal("0.0001"))
    elif roll < 0.62:
        call.disposition, call.status = "busy", 486
        call.end = start + ring
    elif roll < (0.85 if centre else 0.80):
        # Nobody answers: a dialer gives up after 20-25 s, the network after 30-60 s.
        call.disposition, call.status = "no_answer", 480
        call.end = start + (rng.uniform(20, 25) if centre else rng.uniform(30, 60))
        if centre:
            call.disposition, call.status = "cancelled", 487
    elif roll < 0.92:
        # The caller gives up while it rings; a few do within seconds (a wrong number).
        call.disposition, call.status = "cancelled", 487
        call.end = start + ring + rng.lognormvariate(2.3, 0.7)
    else:
        call.disposition, call.status = "failed", rng.choice((404, 503, 480))
        call.end = start + ring
    return call


def _retry(rng: random.Random, trunk: Trunk, call: Call, n: int) -> Call:
    again = _call(rng, trunk, call.end + rng.uniform(30, 600), n)
    again.caller, again.callee, again.dialled = call.caller, call.callee, call.dialled
    again.source = call.source
    return again


# -- attacks --------------------------------------------------------------------------------


_STATUS = {"answered": 200, "cancelled": 487, "failed": 404, "busy": 486, "no_answer": 480}


def make_call(
    call_id: str,
    start: float,
    *,
    source: str,
    trunk: str | None,
    caller: str,
    callee: str,
    dialled: str | None = None,
    disposition: str = "answered",
    answer_after: float = 3.0,
    talk: float = 120.0,
    end_after: float = 2.0,
    cost_per_min: Decimal | None = None,
    user_agent: str = "PBX/1.0",
) -> Call:
    """One call; `callee` in E.164, dialled with "00" unless `dialled` says otherwise.
    An answered call is answered after `answer_after` and lasts `talk`; any other ends
    `end_after` after its INVITE."""
    call = Call(
        call_id=call_id,
        start=start,
        source=source,
        trunk=trunk,
        caller=caller,
        callee=callee,
        dialled=dialled or "00" + callee,
        end=start + end_after,
        disposition=disposition,
        status=_STATUS[disposition],
        user_agent=user_agent,
    )
    if disposition == "answered":
        call.answer = start + answer_after
        call.end = call.answer + talk
        if cost_per_min is not None:
            call.cost = (cost_per_min * Decimal(str(round(talk))) / 60).quantize(Decimal("0.0001"))
    return call


@dataclass(frozen=True)
class Attack:
    """An injected attack: which detector must alert on which subject, by when, and
    every subject the attack touches (other detectors may rightly alert on those)."""

    detector: str
    subject: str
    start: float
    deadline_s: float  # the alert must be raised within this long after `start`
    end: float  # its last activity
    related: frozenset[str] = frozenset()


def inject(
    name: str, carrier: Carrier, timeline: Timeline, start: float, rng: random.Random
) -> Attack:
    """Add the attack pattern `name` (one of ATTACKS) starting at `start`."""
    return _ATTACKS[name](carrier, timeline, start, rng)


def _victim(carrier: Carrier, rng: random.Random, kind: str = "office") -> Trunk:
    """A trunk of `kind` no other attack has used, so each alert has one cause."""
    trunk = rng.choice(
        [t for t in carrier.trunks if t.kind == kind and t.name not in carrier.victims]
    )
    carrier.victims.add(trunk.name)
    return trunk


def _cps_burst(carrier: Carrier, timeline: Timeline, start: float, rng: random.Random) -> Attack:
    """A SIPp flood from one address outside every trunk: 200 INVITEs a second, 20 s."""
    source = f"203.0.113.{rng.randint(1, 250)}"
    for i in range(4000):
        callee = _national(rng, "49")
        timeline.add_call(
            make_call(
                f"attack-cps-{i}",
                start + i / 200,
                source=source,
                trunk=None,
                caller="100",
                callee=callee,
                disposition="failed",
            )
        )
    return Attack("cps_burst", source, start, 10.0, start + 20, frozenset({source, "100"}))


def _concurrent(carrier: Carrier, timeline: Timeline, start: float, rng: random.Random) -> Attack:
    """A hijacked PBX account: 80 answered calls abroad at once from one number."""
    trunk = _victim(carrier, rng)
    caller = trunk.callers[0]
    for i in range(80):
        callee, _ = _abroad(rng, trunk.country_code)
        timeline.add_call(
            make_call(
                f"attack-conc-{i}",
                start + i * 2.0,
                source=trunk.sources[0],
                trunk=trunk.name,
                caller=caller,
                callee=callee,
                talk=600,
            )
        )
    return Attack(
        "concurrent_calls", caller, start, 160.0, start + 760, frozenset({caller, trunk.name})
    )


_PREMIUM = (("37190", 6), ("979", 9), ("8816", 8), ("370900", 5))


def _high_risk(carrier: Carrier, timeline: Timeline, start: float, rng: random.Random) -> Attack:
    """IRSF through a hijacked PBX: 30 calls to premium ranges abroad in 20 minutes."""
    trunk = _victim(carrier, rng)
    for i in range(30):
        prefix, digits = rng.choice(_PREMIUM)
        callee = prefix + str(rng.randrange(10 ** (digits - 1), 10**digits))
        timeline.add_call(
            make_call(
                f"attack-hr-{i}",
                start + i * 40.0,
                source=trunk.sources[0],
                trunk=trunk.name,
                caller=trunk.callers[1],
                callee=callee,
                talk=300,
            )
        )
    related = {trunk.name, trunk.callers[1], "37190", "979", "881", "370900"}
    return Attack(
        "high_risk_destination", trunk.name, start, 3600.0, start + 1500, frozenset(related)
    )


def _wangiri(carrier: Carrier, timeline: Timeline, start: float, rng: random.Random) -> Attack:
    """One-ring calls from a number abroad to 300 subscribers, cut after 2 s."""
    trunk = _victim(carrier, rng, "wholesale")
    caller = "2250700" + str(rng.randrange(10**5, 10**6))
    for i in range(300):
        callee = _national(rng, trunk.country_code)
        timeline.add_call(
            make_call(
                f"attack-wangiri-{i}",
                start + i * 1.5,
                source=trunk.sources[0],
                trunk=trunk.name,
                caller=caller,
                callee=callee,
                dialled=callee,
                disposition="cancelled",
            )
        )
    return Attack("wangiri", caller, start, 3600.0, start + 450, frozenset({caller, trunk.name}))


def _scanner(carrier: Carrier, timeline: Timeline, start: float, rng: random.Random) -> Attack:
    """svwar enumerating extensions with REGISTER under its default User-Agent."""
    source = f"192.0.2.{rng.randint(1, 250)}"
    for i in range(600):
        user = str(100 + i)
        msg = request(
            "REGISTER", f"attack-scan-{i}", caller=user, callee=user, user_agent="friendly-scanner"
        )
        timeline.add_message(start + i / 20, msg, source)
    return Attack("scanner", source, start, 1.0, start + 30, frozenset({source}))


def _probing(carrier: Carrier, timeline: Timeline, start: float, rng: random.Random) -> Attack:
    """An enumeration hiding its User-Agent: 400 users probed with OPTIONS in 40 s."""
    source = f"192.0.2.{rng.randint(1, 250)}"
    for i in range(400):
        user = str(200 + i)
        msg = request(
            "OPTIONS", f"attack-probe-{i}", caller="x", callee=user, user_agent="Asterisk PBX"
        )
        timeline.add_message(start + i / 10, msg, source)
    return Attack("scanner", source, start, 60.0, start + 40, frozenset({source}))


def _auth(carrier: Carrier, timeline: Timeline, start: float, rng: random.Random) -> Attack:
    """svcrack: one Call-ID, a new password every 50 ms, each answered 401, for 60 s."""
    source = f"198.18.{rng.randint(0, 255)}.{rng.randint(1, 250)}"
    for i in range(1200):
        t = start + i * 0.05
        timeline.add_message(
            t, request("REGISTER", "attack-crack", cseq=i + 1, caller="100", callee="100"), source
        )
        timeline.add_message(
            t + 0.01,
            response(
                401, "attack-crack", cseq=i + 1, method="REGISTER", caller="100", callee="100"
            ),
            CORE_IP,
            source,
        )
    return Attack("auth_failures", source, start, 60.0, start + 60, frozenset({source}))


def _sequential(carrier: Carrier, timeline: Timeline, start: float, rng: random.Random) -> Attack:
    """A war dialer walking a number range, one call every 3 s."""
    trunk = _victim(carrier, rng)
    cc = trunk.country_code
    base = int(_national(rng, cc)[:-2] + "00")
    caller = trunk.callers[2]
    for i in range(40):
        callee = str(base + i)
        timeline.add_call(
            make_call(
                f"attack-seq-{i}",
                start + i * 3.0,
                source=trunk.sources[0],
                trunk=trunk.name,
                caller=caller,
                callee=callee,
                dialled="0" + callee[len(cc) :],
                disposition="failed",
            )
        )
    return Attack(
        "sequential_dialing", caller, start, 60.0, start + 120, frozenset({caller, trunk.name})
    )


def _spend(carrier: Carrier, timeline: Timeline, start: float, rng: random.Random) -> Attack:
    """Thirty channels of 20-minute calls at 2 EUR a minute to satellite numbers."""
    trunk = _victim(carrier, rng)
    for i in range(60):
        callee = "8816" + str(rng.randrange(10**7, 10**8))
        timeline.add_call(
            make_call(
                f"attack-spend-{i}",
                start + (i % 30) * 5.0 + (i // 30) * 1210,
                source=trunk.sources[1],
                trunk=trunk.name,
                caller=f"99{i}",
                callee=callee,
                talk=1200,
                cost_per_min=Decimal("2.00"),
            )
        )
    return Attack(
        "spend_velocity", trunk.name, start, 3600.0, start + 2500, frozenset({trunk.name, "881"})
    )


def _surge(carrier: Carrier, timeline: Timeline, start: float, rng: random.Random) -> Attack:
    """A PBX that rarely calls abroad places 120 international calls in 30 minutes."""
    trunk = _victim(carrier, rng)
    for i in range(120):
        callee, _ = _abroad(rng, trunk.country_code)
        timeline.add_call(
            make_call(
                f"attack-surge-{i}",
                start + i * 15.0,
                source=trunk.sources[0],
                trunk=trunk.name,
                caller=f"55{i}",
                callee=callee,
            )
        )
    return Attack(
        "international_surge", trunk.name, start, 3600.0, start + 1800, frozenset({trunk.name})
    )


def _invalid(carrier: Carrier, timeline: Timeline, start: float, rng: random.Random) -> Attack:
    """Calls pumped into numbers that cannot exist: 40 to +371 with 9-digit numbers."""
    trunk = _victim(carrier, rng)
    for i in range(40):
        callee = "3712" + str(rng.randrange(10**7, 10**8))
        timeline.add_call(
            make_call(
                f"attack-inv-{i}",
                start + i * 30.0,
                source=trunk.sources[0],
                trunk=trunk.name,
                caller=trunk.callers[3],
                callee=callee,
                disposition="failed",
            )
        )
    return Attack(
        "invalid_destination",
        trunk.name,
        start,
        3600.0,
        start + 1200,
        frozenset({trunk.name, trunk.callers[3]}),
    )


_ATTACKS: dict[str, Callable[[Carrier, Timeline, float, random.Random], Attack]] = {
    "cps_burst": _cps_burst,
    "concurrent_calls": _concurrent,
    "high_risk_destination": _high_risk,
    "wangiri": _wangiri,
    "scanner": _scanner,
    "scanner_probing": _probing,
    "auth_failures": _auth,
    "sequential_dialing": _sequential,
    "spend_velocity": _spend,
    "international_surge": _surge,
    "invalid_destination": _invalid,
}
ATTACKS = tuple(_ATTACKS)
