"""The correlator against call flows: every row of the outcome table, retransmissions,
forking, auth challenges, re-INVITEs, both-leg capture, timeouts and restarts."""

from __future__ import annotations

import gc
import ipaddress
import os
import subprocess
import sys
import tracemalloc
import uuid
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from sipcalls import CALLEE_ADDR, CALLER_ADDR, PROXY_ADDR, Call, feed
from sipcdr.dialog import Correlator, DialogLimits
from sipcdr.dialog import state as dialog_state
from sipcdr.dialog.correlator import CDR_ID_NAMESPACE, cdr_id
from sipcdr.dialog.kpi import DURATION_BUCKETS_S, PDD_BUCKETS_S
from sipcdr.enrich import EnrichStage
from sipcdr.model import Cdr, Trunk, rfc3339

T0 = 1_700_000_000.0


def only(cdrs: list[Cdr]) -> Cdr:
    assert len(cdrs) == 1, cdrs
    return cdrs[0]


def answered_call(correlator: Correlator, call: Call, hold: float = 60.0) -> list[Cdr]:
    out: list[Cdr] = []
    out += feed(correlator, T0, call.request("INVITE"))
    out += feed(correlator, T0 + 0.02, call.response(100, "Trying", to_tag=None))
    out += feed(correlator, T0 + 0.5, call.response(180, "Ringing"))
    out += feed(correlator, T0 + 3.0, call.response(200, "OK"))
    out += feed(
        correlator, T0 + 3.05, call.request("ACK", branch="z9hG4bK-ack", to_tag="callee-tag")
    )
    out += feed(
        correlator,
        T0 + 3.0 + hold,
        call.request(
            "BYE",
            cseq=2,
            branch="z9hG4bK-bye",
            to_tag="callee-tag",
            extra=['Reason: Q.850;cause=16;text="Normal call clearing"'],
        ),
    )
    return out


def test_answered_call_gives_one_complete_cdr() -> None:
    correlator = Correlator()
    raw = only(answered_call(correlator, Call()))
    # The user parts as signalled, and where the call left; the enrich stage reads both.
    assert (raw.caller, raw.callee, raw.trunk) == ("+4940111222", "+4930333444", None)
    assert raw.egress_ip == CALLEE_ADDR[0]
    cdr = enriched(raw, ())
    assert cdr.egress_ip is None
    assert cdr.disposition == "answered"
    assert cdr.end_reason == "bye"
    assert cdr.hangup_by == "caller"
    assert cdr.sip_code == 200
    assert cdr.sip_reason == "OK"
    assert cdr.q850_cause == 16
    assert cdr.start_time == T0
    assert cdr.ring_time == T0 + 0.5
    assert cdr.answer_time == T0 + 3.0
    assert cdr.billsec == 60.0
    assert cdr.duration == 63.0
    assert cdr.pdd_ms == 500
    assert cdr.caller == "4940111222"
    assert cdr.callee == "4930333444"
    assert cdr.from_uri == "sip:+4940111222@example.com"
    assert cdr.request_uri == "sip:+4930333444@example.net"
    assert (cdr.src_ip, cdr.src_port, cdr.dst_ip, cdr.dst_port) == (*CALLER_ADDR, *CALLEE_ADDR)
    assert cdr.user_agent == "TestUA/1.0"
    assert cdr.capture_node == "test"
    assert correlator.open_dialogs == 0
    record = cdr.to_record()
    assert record["start_time"] == rfc3339(T0) == "2023-11-14T22:13:20.000000Z"
    assert record["schema_version"] == 1
    assert record["billsec"] == 60.0


def test_bye_from_callee_sets_hangup_by_callee() -> None:
    correlator = Correlator()
    call = Call()
    feed(correlator, T0, call.request("INVITE"))
    feed(correlator, T0 + 1, call.response(200, "OK"))
    bye = call.request("BYE", cseq=7, branch="z9hG4bK-cb", to_tag="caller-tag", from_callee=True)
    # From/To swapped: the callee's own tag is in From.
    bye = bye.replace(
        b"<sip:+4930333444@example.net>", b"<sip:+4930333444@example.net>;tag=callee-tag", 1
    )
    cdr = only(feed(correlator, T0 + 11, bye, src=CALLEE_ADDR, dst=CALLER_ADDR))
    assert cdr.hangup_by == "callee"
    assert cdr.billsec == 10.0


# Every row of the outcome table, plus the 2xx / 3xx / other rules around it.
OUTCOMES = [
    *((code, disposition) for code, disposition in dialog_state.DISPOSITION_BY_CODE.items()),
    (200, "answered"),
    (302, "redirected"),
    (301, "redirected"),
    (404, "failed"),
    (422, "failed"),
    (488, "failed"),
    (500, "failed"),
    (503, "failed"),
    (604, "failed"),
]


@pytest.mark.parametrize(("code", "disposition"), OUTCOMES)
def test_final_response_outcome(code: int, disposition: str) -> None:
    correlator = Correlator()
    call = Call()
    feed(correlator, T0, call.request("INVITE"))
    cdrs = feed(correlator, T0 + 2, call.response(code))
    if code in dialog_state.RETRY_CODES:
        # A challenge is not a failed call until the UAC gives up (no retry in 120 s).
        assert cdrs == []
        assert list(correlator.expire(T0 + 2 + 60)) == []
        cdrs = list(correlator.expire(T0 + 2 + 120))
    elif code == 200:
        assert cdrs == []
        cdrs = feed(correlator, T0 + 5, call.request("BYE", 2, "z9hG4bK-b", to_tag="callee-tag"))
    cdr = only(cdrs)
    assert cdr.disposition == disposition
    assert cdr.sip_code == code
    if code >= 300:
        assert cdr.end_time == T0 + 2
        assert cdr.hangup_by is None
        expected_reason = "final_response"
        assert cdr.end_reason == expected_reason
        assert cdr.billsec == 0.0
        assert cdr.pdd_ms == 2000


def test_cancel_then_487_is_cancelled_at_the_cancel() -> None:
    correlator = Correlator()
    call = Call()
    feed(correlator, T0, call.request("INVITE"))
    feed(correlator, T0 + 1, call.response(180, "Ringing"))
    feed(correlator, T0 + 9, call.request("CANCEL", branch="z9hG4bK-inv-1"))
    feed(correlator, T0 + 9.01, call.response(200, "OK", method="CANCEL"))
    cdr = only(feed(correlator, T0 + 9.02, call.response(487, "Request Terminated")))
    assert cdr.disposition == "cancelled"
    assert cdr.end_reason == "cancel"
    assert cdr.hangup_by == "caller"
    assert cdr.end_time == T0 + 9
    assert cdr.sip_code == 487
    assert cdr.ring_time == T0 + 1
    # The ACK for the 487 comes after the CDR: late, not a new call.
    assert feed(correlator, T0 + 9.03, call.request("ACK", to_tag="callee-tag")) == []
    assert correlator.stats.late == 1
    assert correlator.open_dialogs == 0


def test_auth_challenge_and_retry_is_one_call() -> None:
    correlator = Correlator()
    call = Call()
    feed(correlator, T0, call.request("INVITE", cseq=1, branch="z9hG4bK-a1"))
    assert (
        feed(correlator, T0 + 0.05, call.response(407, "Proxy Auth", 1, branch="z9hG4bK-a1")) == []
    )
    feed(correlator, T0 + 0.06, call.request("ACK", 1, "z9hG4bK-a1", to_tag="callee-tag"))
    feed(
        correlator,
        T0 + 0.2,
        call.request(
            "INVITE", cseq=2, branch="z9hG4bK-a2", extra=["Proxy-Authorization: Digest x"]
        ),
    )
    feed(correlator, T0 + 1.2, call.response(180, "Ringing", 2, branch="z9hG4bK-a2"))
    feed(correlator, T0 + 4.2, call.response(200, "OK", 2, branch="z9hG4bK-a2"))
    assert list(correlator.expire(T0 + 40)) == []  # the retry cancelled the challenge timer
    cdr = only(
        feed(correlator, T0 + 34.2, call.request("BYE", 3, "z9hG4bK-a3", to_tag="callee-tag"))
    )
    assert cdr.disposition == "answered"
    assert cdr.start_time == T0  # the first INVITE, challenged or not
    assert cdr.pdd_ms == 1000  # measured on the attempt that rang
    assert cdr.billsec == 30.0
    assert correlator.stats.cdrs == {"answered": 1}


def test_forking_ends_as_the_answered_branch() -> None:
    correlator = Correlator()
    call = Call()
    proxy_vias = ["198.51.100.1:5060;branch=z9hG4bK-fork"]
    feed(correlator, T0, call.request("INVITE"))
    feed(
        correlator, T0 + 1, call.response(180, "Ringing", to_tag="fork-a"), CALLEE_ADDR, CALLER_ADDR
    )
    feed(
        correlator,
        T0 + 1.1,
        call.response(180, "Ringing", to_tag="fork-b"),
        CALLEE_ADDR,
        CALLER_ADDR,
    )
    # Fork B declines towards the proxy (the proxy's branch on top): not the caller's answer.
    busy = call.response(486, "Busy Here", to_tag="fork-b", branch="z9hG4bK-fork-b", vias=())
    assert feed(correlator, T0 + 2, busy, ("203.0.113.21", 5060), PROXY_ADDR) == []
    assert (
        feed(correlator, T0 + 5, call.response(200, "OK", to_tag="fork-a", vias=proxy_vias)) == []
    )
    cdr = only(feed(correlator, T0 + 15, call.request("BYE", 2, "z9hG4bK-b", to_tag="fork-a")))
    assert cdr.disposition == "answered"
    assert cdr.ring_time == T0 + 1
    assert cdr.answer_time == T0 + 5
    assert cdr.billsec == 10.0


def test_in_dialog_requests_do_not_restart_the_call() -> None:
    correlator = Correlator()
    call = Call()
    feed(correlator, T0, call.request("INVITE"))
    feed(correlator, T0 + 2, call.response(200, "OK"))
    for offset, method, cseq in ((10, "INVITE", 2), (20, "UPDATE", 3), (30, "INFO", 4)):
        feed(
            correlator,
            T0 + offset,
            call.request(method, cseq, f"z9hG4bK-{cseq}", to_tag="callee-tag"),
        )
    # A failed re-INVITE (RFC 3261 14.1) leaves the call up.
    feed(
        correlator, T0 + 10.1, call.response(488, "Not Acceptable Here", cseq=2, branch="z9hG4bK-2")
    )
    feed(
        correlator, T0 + 20.1, call.response(200, "OK", cseq=3, method="UPDATE", branch="z9hG4bK-3")
    )
    assert correlator.open_dialogs == 1
    cdr = only(feed(correlator, T0 + 62, call.request("BYE", 5, "z9hG4bK-5", to_tag="callee-tag")))
    assert cdr.disposition == "answered"
    assert cdr.answer_time == T0 + 2
    assert cdr.billsec == 60.0
    assert cdr.sip_code == 200


def test_both_leg_capture_is_one_cdr_with_first_leg_endpoints() -> None:
    """A stateful proxy's HEP mirror shows each message received and sent."""
    correlator = Correlator()
    call = Call()
    legs = [
        (0.000, call.request("INVITE"), CALLER_ADDR, PROXY_ADDR),
        (0.001, call.request("INVITE", branch="z9hG4bK-leg2", vias=[]), PROXY_ADDR, CALLEE_ADDR),
        (1.000, call.response(180, "Ringing", branch="z9hG4bK-leg2"), CALLEE_ADDR, PROXY_ADDR),
        (1.001, call.response(180, "Ringing"), PROXY_ADDR, CALLER_ADDR),
        (3.000, call.response(200, "OK", branch="z9hG4bK-leg2"), CALLEE_ADDR, PROXY_ADDR),
        (3.001, call.response(200, "OK"), PROXY_ADDR, CALLER_ADDR),
        (
            33.00,
            call.request("BYE", 2, "z9hG4bK-bye1", to_tag="callee-tag"),
            CALLER_ADDR,
            PROXY_ADDR,
        ),
        (
            33.001,
            call.request("BYE", 2, "z9hG4bK-bye2", to_tag="callee-tag"),
            PROXY_ADDR,
            CALLEE_ADDR,
        ),
        (33.01, call.response(200, "OK", 2, "BYE", "z9hG4bK-bye2"), CALLEE_ADDR, PROXY_ADDR),
        (33.011, call.response(200, "OK", 2, "BYE", "z9hG4bK-bye1"), PROXY_ADDR, CALLER_ADDR),
    ]
    cdrs: list[Cdr] = []
    for offset, data, src, dst in legs:
        cdrs += feed(correlator, T0 + offset, data, src, dst)
    cdr = only(cdrs)
    assert (cdr.src_ip, cdr.dst_ip) == (CALLER_ADDR[0], PROXY_ADDR[0])
    assert cdr.ring_time == T0 + 1.0
    assert cdr.answer_time == T0 + 3.0
    assert cdr.end_time == T0 + 33.0
    assert correlator.stats.retransmissions == 0
    assert correlator.stats.late == 3  # the BYE's second copy and both 200s


CUSTOMER = Trunk("customer", None, None, "retail")
VENDOR_A = Trunk("vendor-a", None, None, None, cost_plan="vendor-a")
VENDOR_B = Trunk("vendor-b", None, None, None, cost_plan="vendor-b")
FAILOVER_ADDR = ("203.0.113.99", 5060)


@dataclass(frozen=True)
class Defined:
    """A configured trunk of one address, as the enrich stage reads `[[trunks]]`."""

    trunk: Trunk
    address: str

    @property
    def sources(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return (ipaddress.ip_network(self.address),)

    def to_trunk(self) -> Trunk:
        return self.trunk


TRUNKS = (
    Defined(CUSTOMER, CALLER_ADDR[0]),
    Defined(VENDOR_A, CALLEE_ADDR[0]),
    Defined(VENDOR_B, FAILOVER_ADDR[0]),
)


def enriched(cdr: Cdr, trunks: tuple[Defined, ...] = TRUNKS) -> Cdr:
    """The CDR as the chain's enrich stage, right after the correlator, writes it."""
    return EnrichStage(trunks).on_cdr(cdr)


def test_egress_trunk_is_matched_from_the_forwarded_leg() -> None:
    """Ingress from the caller's first INVITE, egress from where the proxy sent it;
    a late retransmission of the caller's copy does not move the egress."""
    correlator = Correlator(egress=True)
    call = Call()
    changed = []
    for offset, data, src, dst in [
        (0.000, call.request("INVITE"), CALLER_ADDR, PROXY_ADDR),
        (0.001, call.request("INVITE", branch="z9hG4bK-leg2"), PROXY_ADDR, CALLEE_ADDR),
        (0.002, call.request("INVITE", branch="z9hG4bK-leg2"), PROXY_ADDR, CALLEE_ADDR),
        (0.500, call.request("INVITE"), CALLER_ADDR, PROXY_ADDR),  # retransmission
        (3.000, call.response(200, "OK", branch="z9hG4bK-leg2"), CALLEE_ADDR, PROXY_ADDR),
    ]:
        feed(correlator, T0 + offset, data, src, dst)
        changed.append(correlator.changed)
    # The forwarded copy is journaled once (a restart must rebuild the egress).
    assert changed == [True, True, False, False, True]
    bye = call.request("BYE", 2, "z9hG4bK-bye1", to_tag="callee-tag")
    cdr = enriched(only(feed(correlator, T0 + 63, bye, CALLER_ADDR, PROXY_ADDR)))
    assert (cdr.trunk, cdr.egress_trunk) == ("customer", "vendor-a")
    assert (cdr.src_ip, cdr.dst_ip) == (CALLER_ADDR[0], PROXY_ADDR[0])  # first leg's


def test_egress_trunk_follows_a_failover_to_the_last_leg() -> None:
    correlator = Correlator(egress=True)
    call = Call()
    for offset, data, src, dst in [
        (0.0, call.request("INVITE"), CALLER_ADDR, PROXY_ADDR),
        (0.1, call.request("INVITE", branch="z9hG4bK-to-a"), PROXY_ADDR, CALLEE_ADDR),
        (0.2, call.response(503, "Unavailable", branch="z9hG4bK-to-a"), CALLEE_ADDR, PROXY_ADDR),
        (0.3, call.request("INVITE", branch="z9hG4bK-to-b"), PROXY_ADDR, FAILOVER_ADDR),
        (2.0, call.response(200, "OK", branch="z9hG4bK-to-b"), FAILOVER_ADDR, PROXY_ADDR),
        (2.1, call.response(200, "OK"), PROXY_ADDR, CALLER_ADDR),
    ]:
        assert feed(correlator, T0 + offset, data, src, dst) == []
    bye = call.request("BYE", 2, "z9hG4bK-bye1", to_tag="callee-tag")
    cdr = enriched(only(feed(correlator, T0 + 30, bye, CALLER_ADDR, PROXY_ADDR)))
    assert (cdr.disposition, cdr.egress_trunk) == ("answered", "vendor-b")


def test_egress_of_a_single_leg_is_its_destination_and_survives_a_restart() -> None:
    """Without a forwarded copy the call left where its INVITE went; an egress seen
    before a checkpoint is still known after a restore."""
    single = Correlator(egress=True)
    assert enriched(only(answered_call(single, Call()))).egress_trunk == "vendor-a"
    before = Correlator(egress=True)
    call = Call()
    feed(before, T0, call.request("INVITE"), CALLER_ADDR, PROXY_ADDR)
    feed(before, T0 + 0.1, call.request("INVITE", branch="z9hG4bK-b"), PROXY_ADDR, FAILOVER_ADDR)
    after = Correlator(egress=True)
    assert after.restore(before.snapshot()) == 1
    feed(after, T0 + 1, call.response(200, "OK"), PROXY_ADDR, CALLER_ADDR)
    bye = call.request("BYE", 2, "z9hG4bK-bye1", to_tag="callee-tag")
    assert enriched(only(feed(after, T0 + 9, bye, CALLER_ADDR, PROXY_ADDR))).egress_trunk == (
        "vendor-b"
    )


def test_without_trunks_no_egress_is_kept_or_journaled() -> None:
    correlator = Correlator()
    call = Call()
    feed(correlator, T0, call.request("INVITE"), CALLER_ADDR, PROXY_ADDR)
    feed(correlator, T0 + 0.1, call.request("INVITE", branch="z9hG4bK-b"), PROXY_ADDR, CALLEE_ADDR)
    assert correlator.changed is False
    snapshot = orjson.loads(correlator.snapshot())
    assert snapshot["dialogs"][0][snapshot["fields"].index("egress_ip")] is None
    feed(correlator, T0 + 1, call.response(486, "Busy Here"), PROXY_ADDR, CALLER_ADDR)
    assert correlator.open_dialogs == 0


def test_retransmissions_are_counted_and_change_nothing() -> None:
    correlator = Correlator()
    call = Call()
    invite = call.request("INVITE")
    feed(correlator, T0, invite)
    feed(correlator, T0 + 0.5, invite)  # Timer A (RFC 3261 17.1.1.2)
    feed(correlator, T0 + 1.5, invite)
    ringing = call.response(180, "Ringing")
    feed(correlator, T0 + 2, ringing)
    feed(correlator, T0 + 2.1, ringing)
    busy = call.response(486, "Busy Here")
    cdr = only(feed(correlator, T0 + 4, busy))
    assert correlator.stats.retransmissions == 3
    assert cdr.start_time == T0
    assert cdr.ring_time == T0 + 2
    assert cdr.pdd_ms == 2000
    assert cdr.disposition == "busy"
    assert feed(correlator, T0 + 4.5, busy) == []
    assert correlator.stats.late == 1


def test_ring_timeout_is_no_answer_and_silence_is_timeout() -> None:
    correlator = Correlator(DialogLimits(ring_timeout_s=60))
    ringing, silent = Call("ring@x"), Call("silent@x")
    feed(correlator, T0, ringing.request("INVITE"))
    feed(correlator, T0 + 1, ringing.response(180, "Ringing"))
    feed(correlator, T0 + 2, silent.request("INVITE"))
    assert list(correlator.expire(T0 + 59)) == []
    first = only(list(correlator.expire(T0 + 60.5)))
    assert (first.call_id, first.disposition, first.end_reason) == (
        "ring@x",
        "no_answer",
        "timeout_no_final",
    )
    assert first.end_time == T0 + 1  # the last message seen, never the timer
    second = only(list(correlator.expire(T0 + 62)))
    assert (second.call_id, second.disposition, second.sip_code) == ("silent@x", "timeout", None)
    assert correlator.open_dialogs == 0


def test_answered_call_without_bye_times_out() -> None:
    correlator = Correlator(DialogLimits(max_duration_s=3600, answered_sweep_s=1))
    call = Call()
    feed(correlator, T0, call.request("INVITE"))
    feed(correlator, T0 + 2, call.response(200, "OK"))
    feed(correlator, T0 + 1800, call.request("UPDATE", 2, "z9hG4bK-u", to_tag="callee-tag"))
    assert list(correlator.expire(T0 + 3000)) == []
    # The UPDATE at +1800 was a sign of life: the limit counts from there.
    assert list(correlator.expire(T0 + 3603)) == []
    cdr = only(list(correlator.expire(T0 + 5401)))
    assert cdr.disposition == "answered"
    assert cdr.end_reason == "timeout_no_bye"
    assert cdr.hangup_by is None
    assert cdr.end_time == T0 + 1800  # billed to the last sign of life, never the limit
    assert cdr.billsec == 1798.0


def test_messages_for_a_closed_call_are_late_not_new_calls() -> None:
    correlator = Correlator()
    call = Call()
    answered_call(correlator, call)
    assert feed(correlator, T0 + 70, call.request("INVITE")) == []
    assert correlator.stats.late == 1
    assert correlator.open_dialogs == 0
    # After a transaction lifetime the Call-ID is forgotten.
    correlator.expire(T0 + 200)
    assert feed(correlator, T0 + 201, call.response(200, "OK", 2, "BYE", "z9hG4bK-bye")) == []
    assert correlator.stats.orphans == 1


def test_non_call_methods_are_counted_not_held() -> None:
    correlator = Correlator()
    register = Call("reg@x")
    feed(correlator, T0, register.request("REGISTER"))
    feed(correlator, T0, register.response(401, "Unauthorized", method="REGISTER"))
    feed(correlator, T0, register.request("REGISTER", cseq=2))
    feed(correlator, T0, register.response(200, "OK", 2, method="REGISTER"))
    options = Call("opt@x")
    feed(correlator, T0, options.request("OPTIONS"))
    feed(correlator, T0, options.response(200, "OK", method="OPTIONS"))
    for method in ("SUBSCRIBE", "MESSAGE", "PUBLISH"):
        feed(correlator, T0, Call(f"{method}@x").request(method))
    assert correlator.open_dialogs == 0
    assert correlator.stats.non_call_requests == {
        "REGISTER": 2,
        "OPTIONS": 1,
        "SUBSCRIBE": 1,
        "MESSAGE": 1,
        "PUBLISH": 1,
    }
    assert correlator.stats.non_call_responses == {
        ("REGISTER", "4xx"): 1,
        ("REGISTER", "2xx"): 1,
        ("OPTIONS", "2xx"): 1,
    }


def test_in_dialog_message_for_unknown_call_is_an_orphan() -> None:
    correlator = Correlator()
    assert feed(correlator, T0, Call().request("BYE", 2, to_tag="x")) == []
    assert correlator.stats.orphans == 1
    assert correlator.open_dialogs == 0


def test_max_open_dialogs_closes_the_oldest() -> None:
    correlator = Correlator(DialogLimits(max_open_dialogs=2))
    for n in range(3):
        cdrs = feed(correlator, T0 + n, Call(f"c{n}@x").request("INVITE"))
    evicted = only(cdrs)
    assert evicted.call_id == "c0@x"
    assert evicted.end_reason == "timeout_no_final"
    assert correlator.stats.evicted == 1
    assert correlator.open_dialogs == 2


def test_restart_keeps_a_call_that_spans_it() -> None:
    before = Correlator()
    call = Call()
    feed(before, T0, call.request("INVITE"))
    feed(before, T0 + 1, call.response(180, "Ringing"))
    feed(before, T0 + 2, call.response(200, "OK"))
    ringing = Call("ringing@x")
    feed(before, T0 + 3, ringing.request("INVITE"))
    snapshot = before.snapshot()

    after = Correlator()
    assert after.restore(snapshot) == 2
    cdr = only(feed(after, T0 + 62, call.request("BYE", 2, "z9hG4bK-b", to_tag="callee-tag")))
    assert cdr.disposition == "answered"
    assert (cdr.start_time, cdr.ring_time, cdr.answer_time) == (T0, T0 + 1, T0 + 2)
    assert cdr.billsec == 60.0
    assert cdr.cdr_id == cdr_id(call.call_id, call.from_tag, T0)
    # The early call still has its ring timer after the restart.
    timed_out = only(list(after.expire(T0 + 3 + 180)))
    assert timed_out.call_id == "ringing@x"


def test_restore_refuses_an_unknown_snapshot_version() -> None:
    with pytest.raises(ValueError, match="version"):
        Correlator().restore(b'{"version": 99, "dialogs": []}')


def test_cdr_id_is_deterministic_uuid5() -> None:
    first = only(answered_call(Correlator(), Call()))
    again = only(answered_call(Correlator(), Call()))
    other = only(answered_call(Correlator(), Call(from_tag="another")))
    assert first.cdr_id == again.cdr_id
    assert first.cdr_id != other.cdr_id
    parsed = uuid.UUID(first.cdr_id)
    assert parsed.version == 5
    assert parsed == uuid.uuid5(CDR_ID_NAMESPACE, f"{first.call_id}\ncaller-tag\n{rfc3339(T0)}")


def test_caller_prefers_p_asserted_identity_and_trunk_numbering() -> None:
    trunk = Trunk("carrier-a", country_code="49", national_prefix="0", rate_plan="wholesale")
    correlator = Correlator()
    call = Call(caller="anonymous", callee="0301234567", pai="+4940999888")
    raw = only(answered_call(correlator, call))
    assert (raw.caller, raw.callee, raw.trunk) == ("+4940999888", "0301234567", None)
    cdr = enriched(raw, (Defined(trunk, CALLER_ADDR[0]),))
    assert cdr.caller == "4940999888"
    assert cdr.callee == "49301234567"
    assert cdr.trunk == "carrier-a"


def test_kpis_from_closed_calls() -> None:
    correlator = Correlator()
    closed = answered_call(correlator, Call("a@x"), hold=60)
    closed += answered_call(correlator, Call("b@x"), hold=120)
    busy = Call("c@x")
    feed(correlator, T0, busy.request("INVITE"))
    closed += feed(correlator, T0 + 1, busy.response(486, "Busy Here"))
    broken = Call("d@x")
    feed(correlator, T0, broken.request("INVITE"))
    closed += feed(correlator, T0 + 0.25, broken.response(503, "Service Unavailable"))
    stage = EnrichStage(())
    for cdr in closed:
        stage.on_cdr(cdr)
    kpi = stage.stats.kpis[None]
    assert (kpi.attempts, kpi.answered) == (4, 2)
    assert kpi.network_effective == 3  # the 503 is the network's failure; busy the user's
    assert kpi.failed == 1
    assert (kpi.duration.count, kpi.duration.total) == (2, 180.0)
    # One observation per bucket: 60 s in (30, 60], 120 s in (60, 120].
    assert kpi.duration.counts[DURATION_BUCKETS_S.index(60.0)] == 1
    assert kpi.duration.counts[DURATION_BUCKETS_S.index(120.0)] == 1
    assert kpi.pdd.count == 4
    assert kpi.pdd.total == pytest.approx(0.5 + 0.5 + 1.0 + 0.25)
    assert kpi.pdd.counts[PDD_BUCKETS_S.index(0.25)] == 1  # the 503, at exactly 0.25 s
    assert kpi.pdd.counts[PDD_BUCKETS_S.index(0.5)] == 2
    assert kpi.pdd.counts[PDD_BUCKETS_S.index(1.0)] == 1


def test_drain_closes_everything_by_the_dialog_rules() -> None:
    correlator = Correlator()
    up, ringing, challenged = Call("up@x"), Call("ring@x"), Call("auth@x")
    feed(correlator, T0, up.request("INVITE"))
    feed(correlator, T0 + 1, up.response(200, "OK"))
    feed(correlator, T0, ringing.request("INVITE"))
    feed(correlator, T0 + 2, ringing.response(180, "Ringing"))
    feed(correlator, T0, challenged.request("INVITE"))
    feed(correlator, T0 + 0.1, challenged.response(401, "Unauthorized"))
    by_call = {cdr.call_id: cdr for cdr in correlator.drain()}
    assert by_call["up@x"].end_reason == "timeout_no_bye"
    assert by_call["ring@x"].disposition == "no_answer"
    assert by_call["auth@x"].disposition == "unauthorized"
    assert correlator.open_dialogs == 0


def test_cancel_answered_by_another_final_is_still_cancelled() -> None:
    """Some UASs answer a CANCELled INVITE with 408 or 480 instead of 487."""
    correlator = Correlator()
    call = Call()
    feed(correlator, T0, call.request("INVITE"))
    feed(correlator, T0 + 1, call.response(100, "Trying", to_tag=None))
    feed(correlator, T0 + 20, call.request("CANCEL"))
    cdr = only(feed(correlator, T0 + 36, call.response(408, "Request Timeout")))
    assert (cdr.disposition, cdr.end_reason, cdr.hangup_by) == ("cancelled", "cancel", "caller")
    assert cdr.end_time == T0 + 20
    assert cdr.sip_code == 408


def test_notify_and_refer_outside_a_call_are_not_orphans() -> None:
    correlator = Correlator()
    feed(correlator, T0, Call("sub@x").request("NOTIFY", to_tag="t"))
    feed(correlator, T0, Call("ref@x").request("REFER"))
    assert correlator.stats.orphans == 0
    assert correlator.stats.non_call_requests == {"NOTIFY": 1, "REFER": 1}


def test_a_call_closed_by_a_timer_still_recognises_its_late_copies() -> None:
    correlator = Correlator(DialogLimits(ring_timeout_s=60))
    call = Call()
    feed(correlator, T0, call.request("INVITE"))
    assert len(list(correlator.expire(T0 + 61))) == 1
    correlator.expire(T0 + 80)  # the call ended at T0, but was closed at T0 + 61
    assert feed(correlator, T0 + 85, call.request("INVITE")) == []
    assert correlator.stats.late == 1
    assert correlator.open_dialogs == 0


def test_a_new_attempt_after_a_redirect_is_a_new_call_not_late() -> None:
    """After a 3xx (or a 422, or a 401 retried after the wait) the UAC may send a new
    INVITE on the same Call-ID with a higher CSeq: its own call, its own CDR."""
    correlator = Correlator()
    call = Call()
    feed(correlator, T0, call.request("INVITE", 1, "z9hG4bK-r1"))
    first = only(feed(correlator, T0 + 1, call.response(302, "Moved", 1, branch="z9hG4bK-r1")))
    feed(correlator, T0 + 1.1, call.request("ACK", 1, "z9hG4bK-r1", to_tag="callee-tag"))
    feed(correlator, T0 + 2, call.request("INVITE", 2, "z9hG4bK-r2"))
    feed(correlator, T0 + 3, call.response(200, "OK", 2, branch="z9hG4bK-r2"))
    second = only(
        feed(correlator, T0 + 63, call.request("BYE", 3, "z9hG4bK-r3", to_tag="callee-tag"))
    )
    assert first.disposition == "redirected"
    assert (second.disposition, second.billsec, second.start_time) == ("answered", 60.0, T0 + 2)
    assert first.cdr_id != second.cdr_id
    assert correlator.stats.late == 1  # only the ACK of the 302


def test_second_challenge_is_timed_from_itself() -> None:
    correlator = Correlator()
    call = Call()
    feed(correlator, T0, call.request("INVITE", 1, "z9hG4bK-c1"))
    feed(correlator, T0 + 0.1, call.response(407, "Proxy Auth", 1, branch="z9hG4bK-c1"))
    feed(correlator, T0 + 30, call.request("INVITE", 2, "z9hG4bK-c2"))
    feed(correlator, T0 + 30.1, call.response(401, "Unauthorized", 2, branch="z9hG4bK-c2"))
    assert list(correlator.expire(T0 + 121)) == []  # the first challenge's timer is stale
    feed(correlator, T0 + 140, call.request("INVITE", 3, "z9hG4bK-c3"))
    feed(correlator, T0 + 141, call.response(200, "OK", 3, branch="z9hG4bK-c3"))
    cdr = only(
        feed(correlator, T0 + 151, call.request("BYE", 4, "z9hG4bK-c4", to_tag="callee-tag"))
    )
    assert cdr.disposition == "answered"


def test_cancel_whose_487_is_lost_still_ends_at_the_cancel() -> None:
    correlator = Correlator(DialogLimits(ring_timeout_s=60))
    call = Call()
    feed(correlator, T0, call.request("INVITE"))
    feed(correlator, T0 + 1, call.response(180, "Ringing"))
    feed(correlator, T0 + 5, call.request("CANCEL"))
    feed(correlator, T0 + 5.1, call.response(200, "OK", method="CANCEL"))
    cdr = only(list(correlator.expire(T0 + 61)))
    assert (cdr.disposition, cdr.end_reason, cdr.hangup_by) == ("cancelled", "cancel", "caller")
    assert cdr.end_time == T0 + 5


def test_eviction_spares_answered_calls() -> None:
    correlator = Correlator(DialogLimits(max_open_dialogs=2))
    up = Call("up@x")
    feed(correlator, T0, up.request("INVITE"))
    feed(correlator, T0 + 1, up.response(200, "OK"))
    feed(correlator, T0 + 2, Call("ring@x").request("INVITE"))
    evicted = only(feed(correlator, T0 + 3, Call("new@x").request("INVITE")))
    assert evicted.call_id == "ring@x"


def test_cancel_200_after_invite_200_is_not_a_retransmission() -> None:
    correlator = Correlator()
    call = Call()
    feed(correlator, T0, call.request("INVITE"))
    feed(correlator, T0 + 1, call.request("CANCEL"))
    feed(correlator, T0 + 1.01, call.response(200, "OK"))
    feed(correlator, T0 + 1.02, call.response(200, "OK", method="CANCEL"))
    assert correlator.stats.retransmissions == 0


def test_second_caller_on_an_open_call_id_is_counted() -> None:
    correlator = Correlator()
    feed(correlator, T0, Call(from_tag="t1").request("INVITE"))
    feed(correlator, T0 + 1, Call(from_tag="t2").request("INVITE", cseq=5))
    assert correlator.stats.conflicting_from_tag == 1


def test_unknown_methods_share_one_counter() -> None:
    correlator = Correlator()
    for n in range(50):
        feed(correlator, T0, Call(f"scan{n}@x").request(f"XMETHOD{n}"))
    assert correlator.stats.non_call_requests == {"other": 50}


def test_a_second_caller_cannot_take_over_the_attempt() -> None:
    correlator = Correlator()
    first = Call(from_tag="t1")
    feed(correlator, T0, first.request("INVITE"))
    feed(correlator, T0 + 1, Call(from_tag="t2").request("INVITE", cseq=7, branch="z9hG4bK-2"))
    cdr = only(feed(correlator, T0 + 2, first.response(486, "Busy Here")))
    assert cdr.disposition == "busy"


def test_eviction_takes_a_challenged_call_before_an_answered_one() -> None:
    correlator = Correlator(DialogLimits(max_open_dialogs=2))
    up, auth = Call("up@x"), Call("auth@x")
    feed(correlator, T0, up.request("INVITE"))
    feed(correlator, T0 + 1, up.response(200, "OK"))
    feed(correlator, T0 + 2, auth.request("INVITE"))
    feed(correlator, T0 + 2.1, auth.response(407, "Proxy Auth"))
    evicted = only(feed(correlator, T0 + 3, Call("new@x").request("INVITE")))
    assert (evicted.call_id, evicted.disposition) == ("auth@x", "unauthorized")


def test_restore_rejects_malformed_rows_and_orders_timers() -> None:
    with pytest.raises(ValueError, match="snapshot row field"):
        Correlator().restore(b'{"version": 1, "dialogs": [{"call_id": "x", "invite_time": null}]}')
    before = Correlator(DialogLimits(ring_timeout_s=60))
    late, early = Call("late@x"), Call("early@x")
    feed(before, T0, late.request("INVITE", 1, "z9hG4bK-l1"))
    feed(before, T0 + 1, early.request("INVITE"))
    feed(before, T0 + 1.1, late.response(407, "Proxy Auth", 1, branch="z9hG4bK-l1"))
    feed(before, T0 + 2, late.request("INVITE", 2, "z9hG4bK-l2"))  # rings again from +2
    after = Correlator(DialogLimits(ring_timeout_s=60))
    after.restore(before.snapshot())
    assert [c.call_id for c in after.expire(T0 + 61.5)] == ["early@x"]
    assert [c.call_id for c in after.expire(T0 + 62.5)] == ["late@x"]


def test_422_retry_is_one_call() -> None:
    """RFC 4028 section 6: 422 Session Interval Too Small, retried at once."""
    correlator = Correlator()
    call = Call()
    feed(correlator, T0, call.request("INVITE", 1, "z9hG4bK-s1"))
    assert (
        feed(correlator, T0 + 0.1, call.response(422, "Interval Too Small", 1, branch="z9hG4bK-s1"))
        == []
    )
    feed(correlator, T0 + 0.2, call.request("INVITE", 2, "z9hG4bK-s2"))
    feed(correlator, T0 + 1, call.response(200, "OK", 2, branch="z9hG4bK-s2"))
    cdr = only(feed(correlator, T0 + 11, call.request("BYE", 3, "z9hG4bK-s3", to_tag="callee-tag")))
    assert (cdr.disposition, cdr.start_time, cdr.billsec) == ("answered", T0, 10.0)
    stage = EnrichStage(())
    stage.on_cdr(cdr)
    assert (stage.stats.kpis[None].attempts, stage.stats.kpis[None].answered) == (1, 1)


def test_changed_marks_exactly_the_messages_a_restart_must_replay() -> None:
    correlator = Correlator()
    call, auth = Call(), Call("auth@x")
    flow = [
        (call.request("INVITE"), True),  # opens the call
        (call.request("INVITE"), False),  # retransmission
        (call.response(100, "Trying", to_tag=None), False),
        (call.response(180, "Ringing"), True),
        (call.response(183, "Progress"), False),  # already ringing
        (call.response(200, "OK"), True),
        (call.response(200, "OK"), False),
        (call.request("ACK", branch="z9hG4bK-ack", to_tag="callee-tag"), False),
        (call.request("INVITE", 2, "z9hG4bK-re", to_tag="callee-tag"), False),  # re-INVITE
        (call.response(200, "OK", 2, branch="z9hG4bK-re"), False),
        (call.request("CANCEL"), False),  # answered: nothing to cancel
        (call.request("BYE", 3, "z9hG4bK-bye", to_tag="callee-tag"), True),  # closes
        (call.request("BYE", 3, "z9hG4bK-bye", to_tag="callee-tag"), False),  # late
        (Call("other@x").request("OPTIONS"), False),
        (Call("orphan@x").request("BYE", 2, to_tag="t"), False),
        (auth.request("INVITE", 1, "z9hG4bK-a1"), True),
        (auth.response(407, "Proxy Auth", 1, branch="z9hG4bK-a1"), True),
        (auth.response(407, "Proxy Auth", 1, branch="z9hG4bK-a1"), False),
        (auth.request("INVITE", 2, "z9hG4bK-a2"), True),  # the retry
        (auth.request("CANCEL", 2, "z9hG4bK-a2"), True),
        (auth.request("CANCEL", 2, "z9hG4bK-a2"), False),
        (auth.response(487, "Terminated", 2, branch="z9hG4bK-a2"), True),  # ends it
    ]
    seen = []
    for n, (data, _) in enumerate(flow):
        feed(correlator, T0 + n, data)
        seen.append(correlator.changed)
    assert seen == [changed for _, changed in flow]


def test_forget_closes_a_call_without_a_cdr_and_remembers_it_as_closed() -> None:
    correlator = Correlator()
    call = Call()
    feed(correlator, T0, call.request("INVITE"))
    assert not correlator.forget(call.call_id, cdr_id(call.call_id, "other-tag", T0), T0 + 5)
    assert correlator.forget(call.call_id, cdr_id(call.call_id, call.from_tag, T0), T0 + 5)
    assert correlator.open_dialogs == 0
    assert feed(correlator, T0 + 6, call.response(200, "OK")) == []
    assert correlator.stats.late == 1
    assert list(correlator.expire(T0 + 1000)) == []


def test_snapshot_keeps_the_recently_closed_calls() -> None:
    before = Correlator()
    call = Call()
    only(answered_call(before, call))
    after = Correlator()
    assert after.restore(before.snapshot()) == 0
    assert after.now == before.now
    feed(after, T0 + 64, call.request("BYE", 2, "z9hG4bK-bye", to_tag="callee-tag"))
    assert after.stats.late == 1  # a retransmitted BYE, not an orphan


def _snapshot_with(before: Correlator, field: str, value: object) -> bytes:
    document = orjson.loads(before.snapshot())
    column = document["fields"].index(field)
    document["dialogs"][0][column] = value
    return orjson.dumps(document)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("answer_time", "x"),  # a string where a time belongs: the BYE would raise
        ("start_time", 1e300),  # a time no CDR can render
        ("ring_time", -5.0),
        ("final_code", 1000),
        ("src_port", 70000),
        ("phase", 3),  # closed: never in a snapshot
        ("user_agent", 5),
        ("invite_cseq", True),
    ],
)
def test_restore_checks_the_type_and_range_of_every_field(field: str, value: object) -> None:
    before = Correlator()
    call = Call()
    feed(before, T0, call.request("INVITE"))
    feed(before, T0 + 1, call.response(200, "OK"))
    after = Correlator()
    with pytest.raises(ValueError, match=field):
        after.restore(_snapshot_with(before, field, value))
    assert after.open_dialogs == 0  # nothing applied
    assert after.restore(before.snapshot()) == 1


def test_restore_keeps_the_order_calls_arrived_in() -> None:
    """Capture times out of order (two HEP agents): live, calls are kept in the order
    they arrived, and a restore keeps that order."""
    before = Correlator()
    for n, at in enumerate([5.0, 1.0, 3.0]):
        feed(before, T0 + at, Call(f"c{n}@x").request("INVITE"))
    after = Correlator()
    after.restore(before.snapshot())
    assert after.snapshot() == before.snapshot()


def test_a_restored_time_ahead_of_the_clock_is_brought_back() -> None:
    before = Correlator()
    call = Call()
    feed(before, T0, call.request("INVITE"))
    feed(before, T0 + 1, call.response(200, "OK"))
    feed(before, T0 + 365 * 86400, Call("ahead@x").request("OPTIONS"))  # a clock a year ahead
    feed(before, T0 + 63, call.request("BYE", 2, "z9hG4bK-bye", to_tag="callee-tag"))
    after = Correlator()
    after.restore(before.snapshot())
    after.limit_time(T0 + 100)
    assert after.now == T0 + 100
    closed = orjson.loads(after.snapshot())["closed"]
    assert closed[call.call_id][0] == T0 + 100
    after.expire(T0 + 100 + 33)  # the late window ends from there, not a year later
    assert orjson.loads(after.snapshot())["closed"] == {}


def test_a_close_decided_before_a_restart_gives_the_same_cdr() -> None:
    """The ring timer closed the call at its last message, whose time a restart does not
    know (a retransmission moved it); the decision closes it the same way."""
    live = Correlator()
    call = Call()
    feed(live, T0, call.request("INVITE"))
    feed(live, T0 + 1, call.response(180, "Ringing"))
    snapshot = live.snapshot()
    feed(live, T0 + 20, call.response(180, "Ringing"))  # changes only the last time
    (timed_out,) = live.expire(T0 + 200)
    assert timed_out.end_time == T0 + 20
    after = Correlator()
    after.restore(snapshot)
    again = after.close_decided(
        call.call_id,
        timed_out.cdr_id,
        timed_out.end_time,
        timed_out.end_reason,
        timed_out.hangup_by,
        T0 + 200,
    )
    assert again is not None and again.to_record() == timed_out.to_record()
    assert after.open_dialogs == 0 and after.now == T0 + 200
    assert after.close_decided(call.call_id, timed_out.cdr_id, T0, "x", None, T0) is None


def test_a_restore_needs_little_more_memory_than_the_calls_built_live() -> None:
    """Each call is built straight from its row, with no object per row on the way (the
    parsed document is given, so that only what the restore itself allocates counts)."""
    limits = DialogLimits(max_open_dialogs=10_000)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        live = Correlator(limits)
        for n in range(3000):
            call = Call(f"m{n}@x", from_tag=f"t{n}")
            feed(live, T0 + n / 1000, call.request("INVITE"))
            feed(live, T0 + n / 1000, call.response(200, "OK"))
        gc.collect()
        built = tracemalloc.get_traced_memory()[0] - start
        document = orjson.loads(live.snapshot())
        del live
        gc.collect()
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        restored = Correlator(limits)
        restored.restore(document)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert restored.open_dialogs == 3000
    # Each row's list goes as its call is made: the calls take the place of the rows.
    assert peak < 0.5 * built, (peak, built)


_SIGNATURES = """
from sipcalls import Call
from sipcdr.dialog.correlator import _signature_bits
from sipcdr.sip import parse
call = Call()
messages = [
    call.request("INVITE"),
    call.response(180, "Ringing"),
    call.response(200, "OK"),
    call.request("BYE", 2, "z9hG4bK-bye1", to_tag="callee-tag"),
]
print([_signature_bits(parse(message)) for message in messages])
"""


def test_retransmission_signatures_are_the_same_in_every_process() -> None:
    """The bloom filter's bits come from the message alone, not from the process's
    hash seed: the same capture counts the same retransmissions in every run."""
    support = Path(__file__).parents[1] / "support"
    runs = {
        subprocess.run(
            [sys.executable, "-c", _SIGNATURES],
            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(support)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3", "4")
    }
    assert len(runs) == 1, runs
