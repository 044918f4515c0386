"""The fraud monitor behind the real parser and correlator, and the test traffic's
shortcut (messages built as records) checked against the parser."""

from __future__ import annotations

import pytest
import trafficgen
from sipcalls import CALLEE_ADDR, CALLER_ADDR, Call, packet
from sipcdr.dialog import Correlator
from sipcdr.fraud import FraudMonitor, FraudSettings
from sipcdr.fraud.settings import (
    AUTH_FAILURES,
    CONCURRENT_CALLS,
    HIGH_RISK_DESTINATION,
    ConcurrentCallsSettings,
    HighRiskDestinationSettings,
    Limit,
    Threshold,
)
from sipcdr.model import Cdr
from sipcdr.sip import SipMessage, parse

T0 = 1_700_000_000.0
_EAGER = (
    "is_request",
    "method",
    "request_uri",
    "status_code",
    "call_id",
    "cseq",
    "cseq_method",
    "from_uri",
    "from_tag",
    "to_uri",
    "to_tag",
    "user_agent",
    "raw_from",
    "raw_to",
    "raw_pai",
    "p_asserted_identity",
    "from_user",
    "to_user",
)


def _text(start_line: str, msg: SipMessage, user_agent_header: str) -> bytes:
    lines = [
        start_line,
        f"Via: SIP/2.0/UDP 192.0.2.10:5060;branch={msg.via_branch}",
        f"From: {msg.raw_from}",
        f"To: {msg.raw_to}",
        f"Call-ID: {msg.call_id}",
        f"CSeq: {msg.cseq} {msg.cseq_method}",
        *([f"P-Asserted-Identity:{msg.raw_pai}"] if msg.raw_pai else []),
        f"{user_agent_header}: {msg.user_agent}",
        "Content-Length: 0",
        "",
        "",
    ]
    return "\r\n".join(lines).encode()


@pytest.mark.parametrize(
    "built",
    [
        trafficgen.request(
            "INVITE", "a@b", caller="+4940111", callee="004930222", pai="4940999", cseq=2
        ),
        trafficgen.request("REGISTER", "r@b", caller="1001", callee="1001"),
        trafficgen.request(
            "OPTIONS", "o@b", caller="x", callee="205", user_agent="friendly-scanner"
        ),
    ],
    ids=["invite", "register", "options"],
)
def test_a_built_request_equals_the_parse_of_its_text(built: SipMessage) -> None:
    parsed = parse(_text(f"{built.method} {built.request_uri} SIP/2.0", built, "User-Agent"))
    for name in _EAGER:
        assert getattr(built, name) == getattr(parsed, name), name


def test_a_built_response_equals_the_parse_of_its_text() -> None:
    built = trafficgen.response(401, "r@b", caller="1001", callee="1001", method="REGISTER")
    parsed = parse(_text("SIP/2.0 401 Reason", built, "Server"))
    for name in _EAGER:
        assert getattr(built, name) == getattr(parsed, name), name


def _run(
    monitor: FraudMonitor,
    correlator: Correlator,
    now: float,
    data: bytes,
    src: tuple[str, int],
    dst: tuple[str, int],
    trunk: str | None,
) -> tuple[list[Cdr], int]:
    """What the engine will do per packet: parse, fraud, correlate, fraud per CDR."""
    msg = parse(data)
    pkt = packet(now, data, src, dst)
    alerts = len(monitor.on_message(msg, pkt, now, trunk))
    closed: list[Cdr] = []
    for cdr in correlator.feed(pkt, msg):
        flags, found = monitor.on_cdr(cdr, None)
        alerts += len(found)
        closed.append(cdr if not flags else _with_flags(cdr, flags))
    return closed, alerts


def _with_flags(cdr: Cdr, flags: tuple[str, ...]) -> Cdr:
    from dataclasses import replace

    return replace(cdr, fraud_flags=flags)


def test_calls_counted_while_over_a_threshold_carry_the_detector_in_their_cdr() -> None:
    # Two concurrent answered calls from one number against a limit of 2: the second
    # crosses it, so its CDR is flagged and the first one's is not.
    settings = FraudSettings(
        concurrent_calls=ConcurrentCallsSettings(per_caller=Limit(warning=2, critical=5))
    )
    monitor = FraudMonitor(settings)
    correlator = Correlator()
    calls = [Call(call_id=f"c{i}@192.0.2.10", callee=f"+4930333{i:03d}") for i in range(2)]
    cdrs: list[Cdr] = []
    alerts = 0
    for i, call in enumerate(calls):
        for offset, data, src, dst in (
            (0.0, call.request("INVITE"), CALLER_ADDR, CALLEE_ADDR),
            (2.0, call.response(200, "OK"), CALLEE_ADDR, CALLER_ADDR),
        ):
            closed, found = _run(monitor, correlator, T0 + i + offset, data, src, dst, None)
            cdrs += closed
            alerts += found
    for i, call in enumerate(calls):
        bye = call.request("BYE", 2, "z9hG4bK-bye", to_tag="callee-tag")
        closed, found = _run(monitor, correlator, T0 + 60 + i, bye, CALLER_ADDR, CALLEE_ADDR, None)
        cdrs += closed
        alerts += found
    assert alerts == 1
    flags = {cdr.call_id: cdr.fraud_flags for cdr in cdrs}
    assert flags == {"c0@192.0.2.10": (), "c1@192.0.2.10": (CONCURRENT_CALLS,)}
    assert monitor.concurrent_calls.per_caller.levels == {}  # both calls ended


def test_an_alert_exists_while_the_attack_runs_before_any_cdr_closes() -> None:
    # High-risk calls alert on their INVITE: the calls are still ringing.
    settings = FraudSettings(
        high_risk_destination=HighRiskDestinationSettings(
            per_account=Threshold(warning=3, critical=10, window_s=3600)
        )
    )
    monitor = FraudMonitor(settings)
    correlator = Correlator()
    alerts = 0
    for i in range(3):
        call = Call(call_id=f"irsf{i}@192.0.2.10", callee=f"+37190{i:06d}")
        closed, found = _run(
            monitor, correlator, T0 + i, call.request("INVITE"), CALLER_ADDR, CALLEE_ADDR, "pbx"
        )
        assert closed == []
        alerts += found
    assert alerts == 1
    assert correlator.open_dialogs == 3


def test_a_password_cracker_is_seen_through_the_real_parser() -> None:
    monitor = FraudMonitor()
    crack = Call(call_id="crack@192.0.2.66", caller="100", callee="100")
    alerts = 0
    for cseq in range(1, 40):
        register = crack.request("REGISTER", cseq=cseq)
        challenge = crack.response(401, "Unauthorized", cseq=cseq, method="REGISTER")
        alerts += len(
            monitor.on_message(
                parse(register),
                packet(T0 + cseq / 10, register, CALLER_ADDR, CALLEE_ADDR),
                T0 + cseq / 10,
                None,
            )
        )
        alerts += len(
            monitor.on_message(
                parse(challenge),
                packet(T0 + cseq / 10, challenge, CALLEE_ADDR, CALLER_ADDR),
                T0 + cseq / 10,
                None,
            )
        )
    assert alerts == 1
    assert monitor.stats.alerts == {(AUTH_FAILURES, "warning"): 1}
    assert HIGH_RISK_DESTINATION not in {d for d, _ in monitor.stats.alerts}
