"""Every dialog rule: how one call's messages move it from INVITE to a closed CDR.

Read top to bottom it follows RFC 3261: the outcome table for final responses
(section 21), then the states an INVITE dialog passes through (sections 12, 13, 15),
then what each message does in each state. `correlator` only finds the dialog a
message belongs to, keeps the timers and builds the CDR; it decides nothing.
"""

from __future__ import annotations

import sys
import zlib
from enum import IntEnum
from typing import Final

from sipcdr.sip import SipMessage

# -- outcome of a call, the CDR `disposition` -----------------------------------------
ANSWERED = "answered"
BUSY = "busy"
NO_ANSWER = "no_answer"
CANCELLED = "cancelled"
REJECTED = "rejected"
UNAUTHORIZED = "unauthorized"
REDIRECTED = "redirected"
FAILED = "failed"
TIMEOUT = "timeout"

# Final responses with a disposition of their own; every other 4xx-6xx is FAILED.
#   code  disposition    RFC 3261 section (and why)
DISPOSITION_BY_CODE: dict[int, str] = {
    486: BUSY,  # 21.4.24 Busy Here
    600: BUSY,  # 21.6.1 Busy Everywhere
    408: NO_ANSWER,  # 21.4.9 Request Timeout: nobody answered within the proxy's timer
    480: NO_ANSWER,  # 21.4.18 Temporarily Unavailable: callee not reachable now
    487: CANCELLED,  # 21.4.26 Request Terminated, the INVITE's answer to CANCEL (9.1)
    403: REJECTED,  # 21.4.4 Forbidden
    603: REJECTED,  # 21.6.2 Decline
    401: UNAUTHORIZED,  # 21.4.2 Unauthorized, final only when the UAC gives up (22.2)
    407: UNAUTHORIZED,  # 21.4.8 Proxy Authentication Required, likewise (22.3)
}
# Final responses a UAC answers by retrying the same call with a higher CSeq: the
# credentials of 22.2/22.3, and RFC 4028 section 6's 422 Session Interval Too Small
# (retried with a larger Session-Expires). Not failed calls unless no retry comes.
RETRY_CODES = frozenset((401, 407, 422))


def disposition_of(code: int) -> str:
    """The disposition a final response to the initial INVITE gives the call."""
    if 200 <= code < 300:
        return ANSWERED  # 13.2.2.4: a 2xx establishes the dialog
    if 300 <= code < 400:
        return REDIRECTED  # 21.3: the UAC is told to try elsewhere
    return DISPOSITION_BY_CODE.get(code, FAILED)  # 21.4-21.6


# -- why the CDR was closed, the CDR `end_reason` ---------------------------------------
END_BYE = "bye"
END_CANCEL = "cancel"
END_FINAL_RESPONSE = "final_response"
END_TIMEOUT_NO_FINAL = "timeout_no_final"
END_TIMEOUT_NO_BYE = "timeout_no_bye"
END_SHUTDOWN = "shutdown"

HANGUP_CALLER = "caller"
HANGUP_CALLEE = "callee"

# Methods that exist only inside an INVITE dialog (RFC 3261 13/15, RFC 3262 PRACK,
# RFC 3311 UPDATE): seen for an unknown call, they mean the capture began mid-call.
# INFO, REFER and NOTIFY also travel outside calls, so there they count as non-call.
CALL_METHODS = frozenset(("INVITE", "ACK", "BYE", "CANCEL", "PRACK", "UPDATE"))


class Phase(IntEnum):
    """Where a call stands. EARLY until a final response; CHALLENGED while a UAC may
    retry a 401/407 with credentials (RFC 3261 22.2); ANSWERED after a 2xx."""

    EARLY = 0
    CHALLENGED = 1
    ANSWERED = 2
    CLOSED = 3


# What a Dialog holds; snapshots are written and read by these names.
DIALOG_FIELDS: Final = (
    "answer_time",
    "call_id",
    "cancel_time",
    "capture_node",
    "dst_ip",
    "dst_port",
    "egress_ip",
    "final_code",
    "final_reason",
    "final_time",
    "first_response_time",
    "from_tag",
    "from_uri",
    "invite_branch_crc",
    "invite_cseq",
    "invite_time",
    "last_time",
    "pai_uri",
    "phase",
    "q850_cause",
    "request_uri",
    "ring_time",
    "seen",
    "src_ip",
    "src_port",
    "start_time",
    "to_uri",
    "user_agent",
)


class Dialog:
    """One call's state between its first INVITE and its CDR. Kept small: about a
    million of these may be open, so only what the CDR and the rules need is held."""

    __slots__ = DIALOG_FIELDS

    call_id: str
    from_tag: str
    phase: Phase
    start_time: float  # first INVITE seen
    invite_time: float  # INVITE of the current attempt (after an auth retry, the retry)
    invite_cseq: int
    # CRC-32 of the top Via branch of the attempt's first copy, which marks the caller's
    # leg; a checksum instead of the string saves ~50 bytes a call and survives restarts.
    invite_branch_crc: int
    last_time: float  # last message of this call, the end of a timed-out call
    ring_time: float | None
    first_response_time: float | None  # first 18x or final of the attempt: PDD
    answer_time: float | None
    cancel_time: float | None
    final_code: int | None
    final_reason: str | None
    final_time: float | None
    q850_cause: int | None
    seen: int  # bloom filter of message signatures: tells retransmissions apart
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    # Destination of the last forwarded copy of the INVITE (a stateful proxy's leg to
    # the next hop): where the call left. None while only the caller's leg is seen.
    egress_ip: str | None
    from_uri: str
    to_uri: str
    request_uri: str
    pai_uri: str | None
    user_agent: str | None
    capture_node: str


def branch_crc(branch: str | None) -> int:
    return zlib.crc32(branch.encode()) if branch else 0


# -- the transitions --------------------------------------------------------------------
# Each says what the message did to the call. "Changed" is exact (first time wins, so a
# retransmission or the other leg's copy changes nothing): the daemon journals exactly
# the messages that changed a call, and replays them after a crash.

UNCHANGED = 0
CHANGED = 1
ENDED = 2  # a final response that ends the call


def on_invite(dialog: Dialog, msg: SipMessage, now: float) -> bool:
    """An INVITE for a known Call-ID: a retransmission, the other leg's copy, a retry
    with credentials after 401/407 (RFC 3261 22.2, higher CSeq, no To tag), or a
    re-INVITE inside the dialog (14, has a To tag). Only the retry changes the call."""
    if msg.to_tag is not None or msg.cseq <= dialog.invite_cseq:
        return False
    if msg.from_tag != dialog.from_tag:
        return False  # another caller reusing the Call-ID: counted by the correlator
    if dialog.phase is Phase.ANSWERED:
        return False
    dialog.phase = Phase.EARLY
    dialog.invite_cseq = msg.cseq
    dialog.invite_branch_crc = branch_crc(msg.via_branch)
    dialog.invite_time = now
    dialog.first_response_time = None
    dialog.final_code = dialog.final_time = None
    dialog.final_reason = None
    return True


def on_forwarded_invite(dialog: Dialog, msg: SipMessage, destination: str) -> bool:
    """A copy of the current attempt's INVITE on another leg: a stateful proxy forwards
    the request with a Via of its own on top (RFC 3261 16.6 step 8), so the top branch
    differs from the caller's copy, while Call-ID, From tag and CSeq stay. Its
    destination is where the call leaves; the last leg seen wins, since a proxy that
    fails over tries the next hop after the previous one gave up. Retransmissions of
    the caller's copy carry the caller's branch and change nothing."""
    if msg.to_tag is not None or msg.from_tag != dialog.from_tag:
        return False
    if msg.cseq != dialog.invite_cseq or dialog.phase is Phase.CLOSED:
        return False
    if branch_crc(msg.via_branch) == dialog.invite_branch_crc:
        return False
    if dialog.egress_ip == destination:
        return False
    dialog.egress_ip = sys.intern(destination)
    return True


def on_invite_response(dialog: Dialog, msg: SipMessage, now: float) -> int:
    """A response to the call's INVITE. Provisional: ringing (RFC 3261 13.2.2.1, 100
    only says a hop got it). 2xx from any fork answers the call (13.2.2.4). A non-2xx
    final ends it only on the caller's leg (the first copy's branch): with a forking
    proxy the other forks' failures never reach the caller (16.7). Returns UNCHANGED,
    CHANGED, or ENDED when a final response ends the call."""
    code = msg.status_code
    if msg.cseq != dialog.invite_cseq:
        return UNCHANGED  # an older attempt's or a re-INVITE's response
    if code < 200:
        if code < 180 or (dialog.ring_time is not None and dialog.first_response_time is not None):
            return UNCHANGED
        if dialog.ring_time is None:
            dialog.ring_time = now
        if dialog.first_response_time is None:
            dialog.first_response_time = now
        return CHANGED
    if code < 300:
        if dialog.phase is Phase.ANSWERED:
            return UNCHANGED
        dialog.phase = Phase.ANSWERED
        dialog.answer_time = now
        dialog.final_code = code
        dialog.final_reason = msg.reason_phrase
        dialog.final_time = now
        if dialog.first_response_time is None:
            dialog.first_response_time = now
        return CHANGED
    if dialog.phase is not Phase.EARLY or branch_crc(msg.via_branch) != dialog.invite_branch_crc:
        return UNCHANGED
    dialog.final_code = code
    dialog.final_reason = msg.reason_phrase
    dialog.final_time = now
    if dialog.first_response_time is None:
        dialog.first_response_time = now
    cause = msg.reason_header
    if cause is not None:
        dialog.q850_cause = cause
    if code in RETRY_CODES:
        dialog.phase = Phase.CHALLENGED  # closed by the correlator if no retry comes
        return CHANGED
    return ENDED


def on_cancel(dialog: Dialog, msg: SipMessage, now: float) -> bool:
    """CANCEL (RFC 3261 9): the caller gives up; the 487 that follows ends the call."""
    if dialog.phase is not Phase.EARLY or dialog.cancel_time is not None:
        return False
    dialog.cancel_time = now
    cause = msg.reason_header
    if cause is not None:
        dialog.q850_cause = cause
    return True


def on_bye(dialog: Dialog, msg: SipMessage, now: float) -> str:
    """BYE (RFC 3261 15) ends the call whoever sends it; its Reason carries the cause."""
    cause = msg.reason_header
    if cause is not None:
        dialog.q850_cause = cause
    return END_BYE


def hangup_side(dialog: Dialog, msg: SipMessage) -> str:
    """The caller's requests carry the caller's tag in From (RFC 3261 12.2.1.1)."""
    return HANGUP_CALLER if msg.from_tag == dialog.from_tag else HANGUP_CALLEE


def outcome(dialog: Dialog, end_reason: str) -> str:
    """The CDR disposition once the call is over, whatever closed it."""
    if dialog.phase is Phase.ANSWERED:
        return ANSWERED
    if dialog.cancel_time is not None:
        # The caller gave up first; the final response that follows (487 per 9.1, but
        # some UASs send 408 or 480) only confirms it.
        return CANCELLED
    if dialog.final_code is not None:
        return disposition_of(dialog.final_code)
    if end_reason == END_BYE:
        return CANCELLED  # a BYE before any final answer: the call was abandoned
    # No final response at all: a ring timeout is an unanswered call (no_answer), an
    # INVITE nobody answered even provisionally is a timeout.
    return NO_ANSWER if dialog.ring_time is not None else TIMEOUT
