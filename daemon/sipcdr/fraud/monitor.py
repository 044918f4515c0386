"""The fraud monitor: every detector behind two calls, one per message as it arrives
and one per closed call, plus a once-a-second `expire`.

Pure: parsed messages, CDRs and times in; alerts and CDR flags out; no I/O, clock,
logging or metrics (`stats` holds plain totals for the adapter to export).

Per message, only eager `SipMessage` fields are read, except on a new INVITE, where
the caller (P-Asserted-Identity or From) and callee user parts are parsed once, as the
dialog layer does for its CDR. What happens per message:

- a new INVITE (no To tag, a Call-ID not seen yet): the call is remembered until its
  CDR; cps_burst, scanner, high_risk_destination, invalid_destination,
  sequential_dialing and international_surge count it at once;
- REGISTER, OPTIONS and other out-of-dialog requests: scanner;
- 401, 403 or 407 to REGISTER or INVITE: auth_failures (a 2xx ends the challenge);
- a 2xx to INVITE: concurrent_calls, for a call seen from its INVITE.

Per CDR: concurrent_calls ends the call; wangiri and spend_velocity count it; the CDR
gets the ids of every detector that counted it while over its threshold (also those
that did at its INVITE or a response). Call `on_message` for a message before
`on_cdr` for the CDRs that message closed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Final

import orjson

from sipcdr.fraud.call_patterns import (
    ConcurrentCalls,
    InternationalSurge,
    SequentialDialing,
    SpendVelocity,
    Wangiri,
)
from sipcdr.fraud.detectors import (
    AuthFailures,
    CpsBurst,
    Detector,
    HighRiskDestination,
    InvalidDestination,
    Scanner,
)
from sipcdr.fraud.incidents import FraudStats, Incidents
from sipcdr.fraud.numbering import e164, is_international
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
    SUBJECT_SOURCE_IP,
    SUBJECT_TRUNK,
    WANGIRI,
    AllowList,
    AuthFailuresSettings,
    ConcurrentCallsSettings,
    CpsBurstSettings,
    FraudSettings,
    HighRiskDestinationSettings,
    InternationalSurgeSettings,
    InvalidDestinationSettings,
    ScannerSettings,
    SequentialDialingSettings,
    SpendVelocitySettings,
    WangiriSettings,
)
from sipcdr.fraud.windows import evict_oldest
from sipcdr.model import Cdr, FraudAlert, Packet
from sipcdr.sip import SipMessage
from sipcdr.sip.address import user_part
from sipcdr.sip.numbers import INTERNATIONAL_PREFIX

_NO_ALERTS: Final[Sequence[FraudAlert]] = ()
_NO_FLAGS: Final[tuple[str, ...]] = ()
# Requests outside a dialog that a scanner sends besides INVITE; their User-Agent is
# checked (INVITE, REGISTER and OPTIONS also count towards probing).
_OUT_OF_DIALOG: Final = frozenset(
    {"REGISTER", "OPTIONS", "SUBSCRIBE", "MESSAGE", "PUBLISH", "NOTIFY", "REFER", "INFO"}
)
_PROBES: Final = frozenset({"REGISTER", "OPTIONS"})
_AUTH_METHODS: Final = frozenset({"REGISTER", "INVITE"})
SNAPSHOT_VERSION: Final = 1
# How often idle subjects are dropped and baseline hours closed: counters already
# ignore what has left their window, so this only returns memory.
SWEEP_INTERVAL_S: Final = 10.0
REASON_NO_RATING: Final = "no rate deck is loaded: calls have no cost"
REASON_NO_COUNTRY: Final = "no trunk has a country code: international calls cannot be told"


class _Call:
    """A call from its INVITE to its CDR: what concurrency and flags need."""

    __slots__ = ("answered", "caller", "flags", "start", "trunk")

    def __init__(self, start: float, trunk: str | None, caller: str | None) -> None:
        self.start = start
        self.trunk = trunk
        self.caller = caller
        self.answered = False  # counted in concurrent_calls
        self.flags: list[str] | None = None


class _View:
    """The settings of one trunk, resolved: each detector's record with its
    exceptions, or None when the detector is off for the trunk. An empty allow-list
    is None, so the common case costs one comparison."""

    __slots__ = (
        "auth_failures",
        "concurrent_calls",
        "country_code",
        "cps_burst",
        "high_risk_destination",
        "high_risk_national",
        "international_surge",
        "invalid_destination",
        "national_prefix",
        "scanner",
        "sequential_dialing",
        "spend_velocity",
        "wangiri",
    )

    country_code: str | None
    national_prefix: str | None
    cps_burst: tuple[CpsBurstSettings, AllowList | None] | None
    concurrent_calls: tuple[ConcurrentCallsSettings, AllowList | None] | None
    high_risk_destination: tuple[HighRiskDestinationSettings, AllowList | None] | None
    # Calls at home count too (not `international_only`): read for every call, and a
    # field of the record is a lookup by name (the records are not compiled).
    high_risk_national: bool
    wangiri: tuple[WangiriSettings, AllowList | None] | None
    scanner: tuple[ScannerSettings, AllowList | None] | None
    auth_failures: tuple[AuthFailuresSettings, AllowList | None] | None
    sequential_dialing: tuple[SequentialDialingSettings, AllowList | None] | None
    spend_velocity: tuple[SpendVelocitySettings, AllowList | None] | None
    international_surge: tuple[InternationalSurgeSettings, AllowList | None] | None
    invalid_destination: tuple[InvalidDestinationSettings, AllowList | None] | None

    def __init__(
        self, settings: FraudSettings, country_code: str | None, national_prefix: str | None
    ) -> None:
        self.country_code = country_code or None
        self.national_prefix = national_prefix or None
        for name in (
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
        ):
            record = getattr(settings, name)
            if not settings.enabled or not record.enabled:
                setattr(self, name, None)
                continue
            allow = settings.allow | record.allow
            setattr(self, name, (record, allow if allow else None))
        high_risk = self.high_risk_destination
        self.high_risk_national = high_risk is not None and not high_risk[0].international_only


def _exempt(allow: AllowList, source: str | None, caller: str | None, callee: str | None) -> bool:
    return (
        (source is not None and allow.allows_source(source))
        or allow.allows_number(caller)
        or allow.allows_number(callee)
    )


class FraudMonitor:
    """Runs every detector over messages and closed calls; see the module docstring."""

    def __init__(
        self,
        settings: FraudSettings | None = None,
        *,
        rating: bool = False,
        trunk_of: Callable[[str], str | None] | None = None,
    ) -> None:
        """`rating`: a rate deck is loaded (spend_velocity is inactive without one).
        `trunk_of`: the trunk name of an address, used for the requester of a failed
        authentication (a response's own trunk is the responder's)."""
        self.settings = settings = settings or FraudSettings()
        self._trunk_of = trunk_of
        self._stats = FraudStats()
        self._next_sweep = 0.0
        self.incidents = Incidents(
            self._stats,
            cooldown_s=settings.cooldown_s,
            update_interval_s=settings.update_interval_s,
            max_new_per_minute=settings.max_new_alerts_per_minute,
            example_calls=settings.example_calls,
        )
        cap = settings.max_subjects
        self.cps_burst = CpsBurst(self.incidents, cap)
        self.concurrent_calls = ConcurrentCalls(self.incidents, cap)
        self.high_risk_destination = HighRiskDestination(self.incidents, cap)
        self.wangiri = Wangiri(self.incidents, cap)
        self.scanner = Scanner(self.incidents, cap)
        self.auth_failures = AuthFailures(self.incidents, cap)
        self.sequential_dialing = SequentialDialing(self.incidents, cap)
        self.spend_velocity = SpendVelocity(self.incidents, cap)
        self.international_surge = InternationalSurge(self.incidents, cap)
        self.invalid_destination = InvalidDestination(self.incidents, cap)
        self.detectors: tuple[Detector, ...] = (
            self.cps_burst,
            self.concurrent_calls,
            self.high_risk_destination,
            self.wangiri,
            self.scanner,
            self.auth_failures,
            self.sequential_dialing,
            self.spend_velocity,
            self.international_surge,
            self.invalid_destination,
        )
        self._rating = rating
        if not rating:
            self._stats.inactive[SPEND_VELOCITY] = REASON_NO_RATING
        if not any(t.country_code for t in settings.trunks.values()):
            self._stats.inactive[INTERNATIONAL_SURGE] = REASON_NO_COUNTRY
        self._default = _View(settings, None, None)
        self._views: dict[str | None, _View] = {
            name: _View(settings.for_trunk(name), trunk.country_code, trunk.national_prefix)
            for name, trunk in settings.trunks.items()
        }
        self._calls: dict[str, _Call] = {}  # by Call-ID, in order of INVITE
        self._max_calls = settings.max_tracked_calls
        self._challenged = self.auth_failures.challenged
        # Where a message's or CDR's alerts are collected: one list, emptied into a
        # new one only when something was found (nearly never), not one list per call.
        self._out: list[FraudAlert] = []

    # -- messages -----------------------------------------------------------------------

    def on_message(
        self, msg: SipMessage, packet: Packet, now: float, trunk: str | None
    ) -> Sequence[FraudAlert]:
        """One parsed message as it arrives; `trunk` is the name its source matched."""
        if msg.is_request:
            # Nothing is judged inside a dialog (ACK, BYE, re-INVITE: most requests),
            # so their method is not even read.
            if msg.to_tag is not None:
                return _NO_ALERTS
            method = msg.method
            if method == "INVITE":
                if msg.call_id not in self._calls:
                    return self._new_call(msg, packet, now, trunk)
                return _NO_ALERTS
            if method in _OUT_OF_DIALOG:
                return self._request(msg, packet, now, trunk, method)
            return _NO_ALERTS
        status = msg.status_code
        if status < 200:  # 100, 180, 183: the most common responses
            return _NO_ALERTS
        if status == 401 or status == 407 or status == 403:  # noqa: PLR1714 - fastest form
            if msg.cseq_method in _AUTH_METHODS:
                return self._auth_failure(msg, packet, now, trunk, status)
        elif status < 300:
            method = msg.cseq_method
            if method == "INVITE":
                if self._challenged:
                    self._challenged.pop(msg.call_id, None)  # the credentials were right
                call = self._calls.get(msg.call_id)
                if call is not None and not call.answered:
                    return self._answered(call, msg.call_id, now)
            elif method == "REGISTER" and self._challenged:
                self._challenged.pop(msg.call_id, None)
        return _NO_ALERTS

    def _new_call(
        self, msg: SipMessage, packet: Packet, now: float, trunk: str | None
    ) -> Sequence[FraudAlert]:
        view = self._views.get(trunk, self._default)
        country_code = view.country_code
        national_prefix = view.national_prefix
        user = user_part(msg.request_uri) or user_part(msg.to_uri)
        callee = e164(user, country_code, national_prefix)
        caller_uri = msg.p_asserted_identity or msg.from_uri
        caller = e164(user_part(caller_uri), country_code, national_prefix)
        call_id = msg.call_id
        call = _Call(now, trunk, caller)
        calls = self._calls
        calls[call_id] = call
        if len(calls) > self._max_calls:
            self._forget_oldest_calls()

        source = packet.src_ip
        out = self._out
        scanner = view.scanner
        if scanner is not None:
            s, allow = scanner
            if allow is None or not _exempt(allow, source, caller, callee):
                user_agent = msg.user_agent
                if user_agent is not None and self.scanner.is_scanner(s, user_agent):
                    if self.scanner.on_agent(out, s, source, user_agent, call_id, now):
                        _flag(call, SCANNER)
                if (
                    trunk is None
                    and user
                    and self.scanner.on_probe(out, s, source, user, call_id, now)
                ):
                    _flag(call, SCANNER)
        cps = view.cps_burst
        if cps is not None:
            s_cps, allow = cps
            if (allow is None or not _exempt(allow, source, caller, callee)) and (
                self.cps_burst.on_invite(out, s_cps, source, trunk, call_id, now)
            ):
                _flag(call, CPS_BURST)
        if callee is not None:
            dialled_abroad = user is not None and (
                user[:1] == "+" or user.startswith(INTERNATIONAL_PREFIX)
            )
            international = is_international(callee, country_code, dialled_abroad)
            if trunk is not None:
                account_kind, account = SUBJECT_TRUNK, trunk
            else:
                account_kind, account = SUBJECT_SOURCE_IP, source
            high_risk = view.high_risk_destination
            if high_risk is not None and (international or view.high_risk_national):
                s_hr, allow = high_risk
                if (allow is None or not _exempt(allow, source, caller, callee)) and (
                    self.high_risk_destination.on_invite(
                        out, s_hr, account_kind, account, callee, call_id, now
                    )
                ):
                    _flag(call, HIGH_RISK_DESTINATION)
            invalid = view.invalid_destination
            if invalid is not None and international:
                s_inv, allow = invalid
                if (allow is None or not _exempt(allow, source, caller, callee)) and (
                    self.invalid_destination.on_invite(
                        out, s_inv, account_kind, account, callee, call_id, now
                    )
                ):
                    _flag(call, INVALID_DESTINATION)
            sequential = view.sequential_dialing
            if sequential is not None and callee.isdigit():
                s_seq, allow = sequential
                if (allow is None or not _exempt(allow, source, caller, callee)) and (
                    self.sequential_dialing.on_invite(
                        out, s_seq, caller, trunk, callee, call_id, now
                    )
                ):
                    _flag(call, SEQUENTIAL_DIALING)
            surge = view.international_surge
            if surge is not None and international and trunk is not None and country_code:
                s_surge, allow = surge
                if (allow is None or not _exempt(allow, source, caller, callee)) and (
                    self.international_surge.on_international(out, s_surge, trunk, call_id, now)
                ):
                    _flag(call, INTERNATIONAL_SURGE)
        return _taken(out)

    def _request(
        self, msg: SipMessage, packet: Packet, now: float, trunk: str | None, method: str
    ) -> Sequence[FraudAlert]:
        view = self._views.get(trunk, self._default)
        scanner = view.scanner
        if scanner is None:
            return _NO_ALERTS
        s, allow = scanner
        source = packet.src_ip
        if allow is not None and allow.allows_source(source):
            return _NO_ALERTS
        out = self._out
        user_agent = msg.user_agent
        if user_agent is not None and self.scanner.is_scanner(s, user_agent):
            self.scanner.on_agent(out, s, source, user_agent, msg.call_id, now)
        if method in _PROBES:
            # A REGISTER names its user in To (the Request-URI is the registrar).
            user = user_part(msg.to_uri if method == "REGISTER" else msg.request_uri)
            if user:
                self.scanner.on_probe(out, s, source, user, msg.call_id, now)
        return _taken(out)

    def _auth_failure(
        self, msg: SipMessage, packet: Packet, now: float, trunk: str | None, status: int
    ) -> Sequence[FraudAlert]:
        # The requester is where the response goes; `trunk` names the responder's side.
        requester = packet.dst_ip
        trunk = self._trunk_of(requester) if self._trunk_of is not None else None
        auth = self._views.get(trunk, self._default).auth_failures
        if auth is None:
            return _NO_ALERTS
        s, allow = auth
        if allow is not None and allow.allows_source(requester):
            return _NO_ALERTS
        out = self._out
        call_id = msg.call_id
        if self.auth_failures.on_response(
            out, s, requester, status, call_id, msg.cseq, msg.cseq_method, now
        ):
            call = self._calls.get(call_id)
            if call is not None:
                _flag(call, AUTH_FAILURES)
        return _taken(out)

    def _answered(self, call: _Call, call_id: str, now: float) -> Sequence[FraudAlert]:
        view = self._views.get(call.trunk, self._default)
        concurrent = view.concurrent_calls
        if concurrent is None:
            return _NO_ALERTS
        s, allow = concurrent
        if allow is not None and allow.allows_number(call.caller):
            return _NO_ALERTS
        call.answered = True
        out = self._out
        if self.concurrent_calls.answered(out, s, call.trunk, call.caller, call_id, now):
            _flag(call, CONCURRENT_CALLS)
        return _taken(out)

    # -- closed calls -------------------------------------------------------------------

    def on_cdr(
        self, cdr: Cdr, cost: Decimal | None
    ) -> tuple[tuple[str, ...], Sequence[FraudAlert]]:
        """A closed call with its rated cost (None when unrated). Returns the detector
        ids for its `fraud_flags`, and any alerts."""
        call = self._calls.pop(cdr.call_id, None)
        flags: list[str] | None = None
        if call is not None:
            if call.answered:
                self.concurrent_calls.ended(call.trunk, call.caller)
            flags = call.flags
        trunk = cdr.trunk
        view = self._views.get(trunk, self._default)
        now = cdr.end_time
        out = self._out
        wangiri = view.wangiri
        if (
            wangiri is not None
            and cdr.answer_time is None
            and cdr.disposition == "cancelled"
            and now - cdr.start_time <= wangiri[0].max_ring_s
        ):
            s_w, allow = wangiri
            if (allow is None or not _exempt(allow, cdr.src_ip, cdr.caller, cdr.callee)) and (
                self.wangiri.on_cdr(out, s_w, cdr, now)
            ):
                flags = [WANGIRI] if flags is None else [*flags, WANGIRI]
        spend = view.spend_velocity
        if spend is not None and cost is not None and self._rating and trunk is not None:
            s_sp, allow = spend
            if (allow is None or not _exempt(allow, cdr.src_ip, cdr.caller, cdr.callee)) and (
                self.spend_velocity.on_cost(out, s_sp, trunk, cost, cdr, now)
            ):
                flags = [SPEND_VELOCITY] if flags is None else [*flags, SPEND_VELOCITY]
        return (tuple(dict.fromkeys(flags)) if flags else _NO_FLAGS), _taken(out)

    # -- time ---------------------------------------------------------------------------

    def expire(self, now: float) -> Sequence[FraudAlert]:
        """Once a second or so: send incident updates that are due and close quiet
        incidents; every `SWEEP_INTERVAL_S`, also forget what has left every window and
        close the hours of the baselines."""
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL_S
            for detector in self.detectors:
                detector.expire(now)
            horizon = now - self.settings.call_ttl_s
            calls = self._calls
            stale: list[str] = []
            for call_id, call in calls.items():  # in order of INVITE: stops at the first
                if call.start >= horizon:
                    break
                stale.append(call_id)
            for call_id in stale:
                call = calls.pop(call_id)
                if call.answered:
                    self.concurrent_calls.ended(call.trunk, call.caller)
        out = self._out
        self.incidents.tick(now, out)
        return _taken(out)

    @property
    def stats(self) -> FraudStats:
        """Running totals, with the subjects held and evicted per detector as of now."""
        stats = self._stats
        for detector in self.detectors:
            stats.tracked[detector.id] = detector.tracked()
            stats.evicted[detector.id] = detector.evicted()
        return stats

    @property
    def tracked_calls(self) -> int:
        return len(self._calls)

    def _forget_oldest_calls(self) -> None:
        for _call_id, call in evict_oldest(self._calls, self._max_calls):
            if call.answered:
                self.concurrent_calls.ended(call.trunk, call.caller)
            self._stats.calls_evicted += 1

    # -- restart safety -----------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The learnt baselines (each trunk's normal per hour of the day), so a restart
        does not begin another day of learning."""
        return orjson.dumps(
            {
                "version": SNAPSHOT_VERSION,
                INTERNATIONAL_SURGE: {
                    str(alpha): b.snapshot()
                    for alpha, b in self.international_surge.baselines.items()
                },
                CONCURRENT_CALLS: {
                    str(alpha): b.snapshot() for alpha, b in self.concurrent_calls.peaks.items()
                },
            }
        )

    def restore(self, data: bytes, now: float) -> int:
        """Load baselines written by `snapshot`; returns how many trunk baselines."""
        document = orjson.loads(data)
        if not isinstance(document, dict) or document.get("version") != SNAPSHOT_VERSION:
            raise ValueError("unsupported fraud baseline snapshot")
        restored = 0
        for name, make in (
            (INTERNATIONAL_SURGE, self.international_surge.baseline),
            (CONCURRENT_CALLS, self.concurrent_calls.peak),
        ):
            for alpha, subjects in dict(document.get(name) or {}).items():
                make(float(alpha)).restore(subjects, now)
                restored += len(subjects)
        return restored


def _flag(call: _Call, detector: str) -> None:
    if call.flags is None:
        call.flags = [detector]
    elif detector not in call.flags:
        call.flags.append(detector)


def _taken(out: list[FraudAlert]) -> Sequence[FraudAlert]:
    """What `out` collected, leaving it empty for the next message."""
    if not out:
        return _NO_ALERTS
    alerts = out[:]
    out.clear()
    return alerts
