"""Pure correlation: parsed messages in, CDRs out. Time is the capture time passed in.

The correlator finds the dialog a message belongs to (by Call-ID, so both legs of a
stateful proxy are one call and each B2BUA leg is its own), applies the rules of
`state`, keeps the timers, and builds the CDR. No I/O, no clock, no logging: counts
go to `stats`, which the adapter exports in batches.

The CDR it builds is what the signaling says: `caller` and `callee` are the user
parts as sent, `trunk` and `egress_trunk` are unset and `egress_ip` holds where the
call left. The enrich stage (`sipcdr.enrich`) looks the trunks up and writes the
numbers in E.164 next.
"""

from __future__ import annotations

import hashlib
import operator
import sys
import uuid
import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson

from sipcdr.dialog import state
from sipcdr.dialog.restore import (
    _REQUIRED_FIELDS,
    _dialog_of,
    _invite_time,
    _is_time,
    _tombstone,
)
from sipcdr.dialog.state import Dialog, Phase
from sipcdr.model import Cdr, Packet, rfc3339
from sipcdr.sip import SipMessage
from sipcdr.sip.address import user_part
from sipcdr.sip.parser import KNOWN_METHODS

# Namespace of CDR ids, fixed forever: ids must stay stable across versions so that a
# re-import or a re-delivery of the same call gives the same cdr_id.
CDR_ID_NAMESPACE = uuid.UUID("5b0e7d3a-61a4-4c39-9f0c-2f3c8f6e1d27")
_NAMESPACE_BYTES = CDR_ID_NAMESPACE.bytes
SNAPSHOT_VERSION = 2
_SLOTS = frozenset(state.DIALOG_FIELDS)
# The bloom filter of seen messages is not kept: it only tells retransmissions apart.
_SNAPSHOT_FIELDS = tuple(name for name in state.DIALOG_FIELDS if name != "seen")
_snapshot_row = operator.attrgetter(*_SNAPSHOT_FIELDS)
# Set from a snapshot row as they are; phase is converted and seen starts empty.
_RESTORED_FIELDS = tuple(name for name in _SNAPSHOT_FIELDS if name != "phase")

_NO_CDRS: Sequence[Cdr] = ()


@dataclass(frozen=True, slots=True)
class DialogLimits:
    """The `[dialog]` settings, with the reasons for their defaults."""

    ring_timeout_s: float = 180.0  # 3 min: longer than any carrier's no-answer timer
    max_duration_s: float = 14400.0  # 4 h: a call past this has lost its BYE
    max_open_dialogs: int = 1_000_000  # about 1 GB at the measured size per dialog
    # 64*T1 = Timer B (RFC 3261 17.1.1.2): how long a closed call's stray copies
    # (retransmissions, the other leg, ACKs) are recognised as late.
    transaction_timeout_s: float = 32.0
    # How long a 401/407 waits for the retry with credentials before the attempt is
    # closed as unauthorized. Softphones ask a person: the public wireshark sample
    # retries after 32.5 s and 51 s. A later retry still becomes a call of its own.
    auth_retry_wait_s: float = 120.0
    # How often answered calls are checked against max_duration_s; a 4 h limit does
    # not need finer resolution, and the sweep walks every open dialog.
    answered_sweep_s: float = 60.0


class CorrelatorStats:
    """Counters the adapter turns into metrics. Plain ints: the hot path only adds."""

    __slots__ = (
        "cdrs",
        "conflicting_from_tag",
        "dialogs_restored",
        "evicted",
        "late",
        "messages",
        "non_call_requests",
        "non_call_responses",
        "orphans",
        "retransmissions",
        "unusable",
    )

    def __init__(self) -> None:
        self.messages = 0
        self.retransmissions = 0  # same message (branch, CSeq, method/status) seen again
        self.late = 0  # for a call already closed
        self.orphans = 0  # in-dialog message for a call never seen (capture began mid-call)
        self.unusable = 0  # no Call-ID or From tag: cannot be correlated
        self.evicted = 0  # closed early because max_open_dialogs was reached
        self.dialogs_restored = 0
        self.conflicting_from_tag = 0  # a second caller on an open Call-ID: merged, counted
        self.cdrs: dict[str, int] = {}  # by disposition
        self.non_call_requests: dict[str, int] = {}  # by method
        self.non_call_responses: dict[tuple[str, str], int] = {}  # by (method, "2xx")


class Correlator:
    def __init__(
        self,
        limits: DialogLimits | None = None,
        egress: bool = False,
    ) -> None:
        self.limits = limits or DialogLimits()
        self.stats = CorrelatorStats()
        # Whether the egress moves with a forwarded INVITE: only trunks make it matter.
        self._egress = egress
        self._dialogs: dict[str, Dialog] = {}  # by Call-ID, in order of first INVITE
        self._early: dict[str, Dialog] = {}  # not yet answered, in order of INVITE time
        self._challenged: deque[tuple[float, Dialog]] = deque()  # by retry deadline
        # Call-ID -> (close time, From tag, last INVITE CSeq): recognises late copies, and
        # tells them from a new attempt on the same Call-ID (after a 3xx, a 422, or a
        # 401/407 retried after the wait).
        self._closed: dict[str, tuple[float, str, int]] = {}
        self._next_sweep = 0.0
        self._now = 0.0  # latest capture time seen: when a closed call was closed
        # Whether the last message fed changed a call (opened, rang, answered, was
        # cancelled, challenged, retried, ended), or the last timer run closed or forgot
        # a call: the daemon journals exactly those. Retransmissions, the other leg's
        # copies (but a forwarded INVITE that moves the egress, when trunks are set)
        # and in-dialog requests other than BYE only move the call's last-message
        # time, which the checkpoints carry.
        self.changed = False

    @property
    def open_dialogs(self) -> int:
        return len(self._dialogs)

    @property
    def now(self) -> float:
        """The latest time seen, in messages or timer runs: when a call closes."""
        return self._now

    def is_open(self, call_id: str) -> bool:
        return call_id in self._dialogs

    # -- messages -----------------------------------------------------------------------

    def feed(self, packet: Packet, msg: SipMessage) -> Sequence[Cdr]:
        """Apply one message; return the CDRs it closed (usually none). Afterwards
        `changed` says whether the message changed what a restart has to rebuild."""
        stats = self.stats
        stats.messages += 1
        self.changed = False
        now = packet.timestamp
        self._now = max(self._now, now)
        dialog = self._dialogs.get(msg.call_id)
        if dialog is None:
            return self._unknown_call(packet, msg, now)

        bits = _signature_bits(msg)
        if dialog.seen & bits == bits:
            stats.retransmissions += 1
        else:
            dialog.seen |= bits
        dialog.last_time = now

        method = msg.cseq_method
        if msg.is_request:
            if method == "INVITE":
                if msg.to_tag is None and msg.from_tag != dialog.from_tag:
                    stats.conflicting_from_tag += 1
                if state.on_invite(dialog, msg, now):
                    self.changed = True
                    # An auth retry starts ringing again: to the back of the ring timer.
                    self._early.pop(msg.call_id, None)
                    self._early[msg.call_id] = dialog
                elif self._egress and state.on_forwarded_invite(dialog, msg, packet.dst_ip):
                    # The egress trunk is matched from it: journaled so that a restart
                    # rebuilds it. Without trunks nothing is matched and nothing kept.
                    self.changed = True
            elif method == "BYE":
                self.changed = True
                side = state.hangup_side(dialog, msg)
                return (self._close(dialog, now, state.on_bye(dialog, msg, now), side),)
            elif method == "CANCEL":
                self.changed = state.on_cancel(dialog, msg, now)
        elif method == "INVITE":
            effect = state.on_invite_response(dialog, msg, now)
            if effect:
                self.changed = True
                if effect == state.ENDED:
                    return (self._close_on_final(dialog, now),)
                if dialog.phase is not Phase.EARLY:
                    self._early.pop(msg.call_id, None)
                    if dialog.phase is Phase.CHALLENGED:
                        deadline = now + self.limits.auth_retry_wait_s
                        self._challenged.append((deadline, dialog))
        return _NO_CDRS

    def _unknown_call(self, packet: Packet, msg: SipMessage, now: float) -> Sequence[Cdr]:
        stats = self.stats
        call_id = msg.call_id
        method = msg.cseq_method
        initial_invite = msg.is_request and method == "INVITE" and msg.to_tag is None
        tombstone = self._closed.get(call_id)
        if tombstone is not None:
            _closed_at, from_tag, invite_cseq = tombstone
            if not (initial_invite and msg.from_tag == from_tag and msg.cseq > invite_cseq):
                stats.late += 1
                return _NO_CDRS
            del self._closed[call_id]  # a new attempt: its own call and CDR
        if method not in state.CALL_METHODS:
            # REGISTER, OPTIONS, SUBSCRIBE, MESSAGE, PUBLISH...: counted, never held.
            # Method names are the sender's text: unknown ones share one key.
            if method not in KNOWN_METHODS:
                method = "other"
            if msg.is_request:
                counts = stats.non_call_requests
                counts[method] = counts.get(method, 0) + 1
            else:
                key = (method, f"{msg.status_code // 100}xx")
                responses = stats.non_call_responses
                responses[key] = responses.get(key, 0) + 1
            return _NO_CDRS
        if not initial_invite:
            stats.orphans += 1
            return _NO_CDRS
        if not call_id or msg.from_tag is None:
            stats.unusable += 1
            return _NO_CDRS
        evicted = _NO_CDRS
        if len(self._dialogs) >= self.limits.max_open_dialogs:
            evicted = self._evict_oldest()
        dialog = _new_dialog(packet, msg, now)
        self._dialogs[call_id] = dialog
        self._early[call_id] = dialog
        self.changed = True
        return evicted

    # -- time ---------------------------------------------------------------------------

    def expire(self, now: float) -> Sequence[Cdr]:
        """Close calls whose timers ran out by capture time `now`."""
        closed: list[Cdr] = []
        self._now = max(self._now, now)
        limits = self.limits
        ring_deadline = now - limits.ring_timeout_s
        early = self._early
        while early:
            call_id, dialog = next(iter(early.items()))
            if dialog.invite_time > ring_deadline:
                break
            del early[call_id]
            if dialog.phase is Phase.EARLY:
                closed.append(self._close_unanswered(dialog))
        challenged = self._challenged
        retry_wait = limits.auth_retry_wait_s
        while challenged and challenged[0][0] <= now:
            _deadline, dialog = challenged.popleft()
            # A call challenged again after a retry has a later entry of its own.
            if dialog.phase is Phase.CHALLENGED and (dialog.final_time or 0.0) + retry_wait <= now:
                closed.append(self._close_on_final(dialog, dialog.final_time or now))
        if now >= self._next_sweep:
            self._next_sweep = now + limits.answered_sweep_s
            # Measured from the last sign of life, so session refreshes (RFC 4028) keep a
            # long call open and only a call that went silent is closed.
            silent_since = now - limits.max_duration_s
            stale = [
                d
                for d in self._dialogs.values()
                if d.phase is Phase.ANSWERED and d.last_time <= silent_since
            ]
            closed.extend(self._close(d, d.last_time, state.END_TIMEOUT_NO_BYE) for d in stale)
        forgotten = self.prune_closed(now)
        # A timer run that closed or forgot nothing changes nothing a restart rebuilds.
        self.changed = bool(closed) or forgotten > 0
        return closed or _NO_CDRS

    def prune_closed(self, now: float) -> int:
        """Forget Call-IDs closed longer ago than the late window (or beyond the cap);
        returns how many."""
        self._now = max(self._now, now)
        closed_calls = self._closed
        late_deadline = now - self.limits.transaction_timeout_s
        cap = self.limits.max_open_dialogs
        forgotten = 0
        while closed_calls:
            call_id, (closed_at, _tag, _cseq) = next(iter(closed_calls.items()))
            if closed_at > late_deadline and len(closed_calls) <= cap:
                break
            del closed_calls[call_id]
            forgotten += 1
        return forgotten

    def drain(self) -> list[Cdr]:
        """Close every open call as if all its timers had run out: the end of an import,
        where no later message can come. Each call ends at its last message."""
        closed: list[Cdr] = []
        for dialog in list(self._dialogs.values()):
            if dialog.phase is Phase.CHALLENGED:
                closed.append(self._close_on_final(dialog, dialog.final_time or dialog.last_time))
            elif dialog.phase is Phase.ANSWERED:
                closed.append(self._close(dialog, dialog.last_time, state.END_TIMEOUT_NO_BYE))
            else:
                closed.append(self._close_unanswered(dialog))
        return closed

    def _evict_oldest(self) -> Sequence[Cdr]:
        # Calls still ringing go first, then challenged ones: an answered call is being
        # billed right now and goes last.
        dialog: Dialog | None = next(iter(self._early.values()), None)
        while dialog is None and self._challenged:
            _deadline, candidate = self._challenged.popleft()
            if candidate.phase is Phase.CHALLENGED:
                dialog = candidate
        if dialog is None:
            dialog = next(iter(self._dialogs.values()))
        self.stats.evicted += 1
        self._early.pop(dialog.call_id, None)
        if dialog.phase is Phase.ANSWERED:
            return (self._close(dialog, dialog.last_time, state.END_TIMEOUT_NO_BYE),)
        if dialog.phase is Phase.CHALLENGED:
            return (self._close_on_final(dialog, dialog.final_time or dialog.last_time),)
        return (self._close_unanswered(dialog),)

    # -- closing ------------------------------------------------------------------------

    def _close_unanswered(self, dialog: Dialog) -> Cdr:
        """No final response came: a CANCELled call still ends at its CANCEL."""
        if dialog.cancel_time is not None:
            return self._close_on_final(dialog, dialog.cancel_time)
        return self._close(dialog, dialog.last_time, state.END_TIMEOUT_NO_FINAL)

    def _close_on_final(self, dialog: Dialog, now: float) -> Cdr:
        if dialog.cancel_time is not None:
            # The caller hung up at the CANCEL; the final response only confirms it.
            return self._close(dialog, dialog.cancel_time, state.END_CANCEL, state.HANGUP_CALLER)
        return self._close(dialog, dialog.final_time or now, state.END_FINAL_RESPONSE)

    def _close(
        self, dialog: Dialog, end_time: float, end_reason: str, hangup_by: str | None = None
    ) -> Cdr:
        call_id = dialog.call_id
        disposition = state.outcome(dialog, end_reason)
        self._retire(dialog, end_time)
        caller_uri = dialog.pai_uri or dialog.from_uri
        callee_user = user_part(dialog.request_uri) or user_part(dialog.to_uri)
        pdd_ms = None
        if dialog.first_response_time is not None:
            pdd_ms = round((dialog.first_response_time - dialog.invite_time) * 1000)
        cdr = Cdr(
            cdr_id=cdr_id(call_id, dialog.from_tag, dialog.start_time),
            call_id=call_id,
            caller=user_part(caller_uri),
            callee=callee_user,
            from_uri=dialog.from_uri,
            to_uri=dialog.to_uri,
            request_uri=dialog.request_uri,
            src_ip=dialog.src_ip,
            src_port=dialog.src_port,
            dst_ip=dialog.dst_ip,
            dst_port=dialog.dst_port,
            trunk=None,
            start_time=dialog.start_time,
            ring_time=dialog.ring_time,
            answer_time=dialog.answer_time,
            end_time=max(end_time, dialog.start_time),
            pdd_ms=pdd_ms,
            disposition=disposition,
            sip_code=dialog.final_code,
            sip_reason=dialog.final_reason,
            q850_cause=dialog.q850_cause,
            hangup_by=hangup_by,
            end_reason=end_reason,
            user_agent=dialog.user_agent,
            capture_node=dialog.capture_node,
            egress_ip=dialog.egress_ip or dialog.dst_ip,
        )
        self._count(cdr)
        return cdr

    def _count(self, cdr: Cdr) -> None:
        counts = self.stats.cdrs
        counts[cdr.disposition] = counts.get(cdr.disposition, 0) + 1

    def recount(self, pending: Iterable[Cdr]) -> None:
        """Start the counts over after a recovery: what replaying the journal counted
        was counted by the process that first saw it; this one counts the calls it
        holds and the CDRs it still has to write."""
        self.stats = CorrelatorStats()
        self.stats.dialogs_restored = self.open_dialogs
        for cdr in pending:
            self._count(cdr)

    def _retire(self, dialog: Dialog, end_time: float) -> None:
        call_id = dialog.call_id
        self._dialogs.pop(call_id, None)
        self._early.pop(call_id, None)
        # Remembered from when it was closed, not from its end: a call closed by a
        # timer ended long before, and its stray copies may still be on the way.
        self._closed[call_id] = (max(end_time, self._now), dialog.from_tag, dialog.invite_cseq)
        dialog.phase = Phase.CLOSED

    # -- restart safety -----------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Every open call and the recently closed Call-IDs: what a restart needs. One
        array per call (field names once), which halves the time and the size of
        objects per call; ~2.7 us a call, measured at 100,000."""
        return orjson.dumps(
            {
                "version": SNAPSHOT_VERSION,
                "fields": _SNAPSHOT_FIELDS,
                "dialogs": list(map(_snapshot_row, self._dialogs.values())),
                "closed": self._closed,
                "now": self._now,
            }
        )

    def restore(self, data: bytes | dict[str, object]) -> int:
        """Load a snapshot written by `snapshot` (or by version 1, which had no closed
        Call-IDs), as bytes or already parsed; returns how many calls were reopened.
        Every row is checked, field by field, before any is applied: a bad snapshot
        changes nothing. Each call is built straight from its row, and the row let go
        as soon as it is, so a restore needs little more memory than the calls it
        reopens (the parsed document goes as they are built)."""
        document = orjson.loads(data) if isinstance(data, bytes) else data
        del data
        if not isinstance(document, dict):
            raise ValueError("dialog snapshot is not an object")
        version = document.get("version")
        names: list[str] | None = None
        if version == 1:
            closed: object = {}
            now: object = 0.0
        elif version == SNAPSHOT_VERSION:
            names = document.get("fields")  # type: ignore[assignment]
            if (
                not isinstance(names, list)
                or not all(isinstance(name, str) for name in names)
                or not set(names) <= _SLOTS
                or not set(names) >= _REQUIRED_FIELDS
                or len(set(names)) != len(names)
            ):
                raise ValueError("dialog snapshot fields are not those of a call")
            closed = document.get("closed") or {}
            now = document.get("now", 0.0)
        else:
            raise ValueError(f"unsupported dialog snapshot version {str(version)[:16]!r}")
        rows = document.pop("dialogs", None)
        del document
        if not isinstance(rows, list):
            raise ValueError("dialog snapshot without a list of calls")
        if not isinstance(closed, dict) or not _is_time(now):
            raise ValueError("dialog snapshot closed calls or time")
        tombstones = {call_id: _tombstone(entry) for call_id, entry in closed.items()}
        del closed
        dialogs: list[Dialog] = []
        for index, row in enumerate(rows):
            dialogs.append(_dialog_of(row, names))
            rows[index] = None  # its list goes now; the strings live on in the call
        del rows
        # In the order they arrived, as live; the ring timer's queue by INVITE time,
        # which is that order unless capture times came out of order.
        for dialog in dialogs:
            self._dialogs[dialog.call_id] = dialog
        early = [d for d in dialogs if d.phase is Phase.EARLY]
        early.sort(key=_invite_time)
        for dialog in early:
            self._early[dialog.call_id] = dialog
        challenged = sorted(
            (
                (d.final_time or d.last_time) + self.limits.auth_retry_wait_s,
                d,
            )
            for d in dialogs
            if d.phase is Phase.CHALLENGED
        )
        self._challenged.extend(challenged)
        self._closed.update(tombstones)
        self._now = max(self._now, float(now))  # type: ignore[arg-type]
        count = len(dialogs)
        self.stats.dialogs_restored += count
        return count

    def limit_time(self, latest: float) -> None:
        """Bring the latest time seen, and the close times of recently closed calls,
        back to `latest` at most: a clock that once jumped ahead must not outlive a
        restart in the state it left (every later close would be stamped ahead)."""
        self._now = min(self._now, latest)
        closed_calls = self._closed
        for call_id, (closed_at, from_tag, invite_cseq) in closed_calls.items():
            if closed_at > latest:
                closed_calls[call_id] = (latest, from_tag, invite_cseq)

    def close_decided(
        self,
        call_id: str,
        closed_cdr_id: str,
        end_time: float,
        end_reason: str,
        hangup_by: str | None,
        decided_at: float,
    ) -> Cdr | None:
        """Close an open call the way a timer or an eviction closed it before a restart
        (end time and reason as then decided, at `decided_at`): the same CDR as then.
        None when no such call is open."""
        self._now = max(self._now, decided_at)
        dialog = self._dialogs.get(call_id)
        if dialog is None or cdr_id(call_id, dialog.from_tag, dialog.start_time) != closed_cdr_id:
            return None
        return self._close(dialog, end_time, end_reason, hangup_by)

    def forget(self, call_id: str, closed_cdr_id: str, closed_at: float) -> bool:
        """Close an open call without a CDR, because its CDR was already written (before
        a restart, by a timer or an eviction that replaying its messages does not
        repeat) at `closed_at`. False when no such call is open."""
        self._now = max(self._now, closed_at)
        dialog = self._dialogs.get(call_id)
        if dialog is None or cdr_id(call_id, dialog.from_tag, dialog.start_time) != closed_cdr_id:
            return False
        self._retire(dialog, closed_at)
        return True


def cdr_id(call_id: str, from_tag: str, start_time: float) -> str:
    """UUID v5 (RFC 9562 section 5.5) of Call-ID, From tag and first INVITE time: the
    same call re-imported or re-delivered gets the same id. Built directly from the
    SHA-1, since uuid.UUID's checks cost more than the hash on this path."""
    name = f"{call_id}\n{from_tag}\n{rfc3339(start_time)}".encode()
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name, usedforsecurity=False).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _signature_bits(msg: SipMessage) -> int:
    """Two bits of the per-dialog bloom filter for this message's identity: the same
    branch, CSeq and method or status again is a retransmission (RFC 3261 17). The
    texts go in by CRC, the numbers as ints: `hash()` of a str (or of None) changes
    with every process, and the same capture must count the same retransmissions in
    every run."""
    texts = zlib.crc32(msg.cseq_method.encode(), state.branch_crc(msg.via_branch))
    status = msg.status_code
    signature = hash((texts, msg.cseq, -1 if status is None else status))
    return (1 << (signature & 255)) | (1 << ((signature >> 8) & 255))


def _new_dialog(packet: Packet, msg: SipMessage, now: float) -> Dialog:
    dialog = Dialog()
    dialog.call_id = msg.call_id
    dialog.from_tag = msg.from_tag or ""
    dialog.phase = Phase.EARLY
    dialog.start_time = dialog.invite_time = dialog.last_time = now
    dialog.invite_cseq = msg.cseq
    dialog.invite_branch_crc = state.branch_crc(msg.via_branch)
    dialog.ring_time = dialog.first_response_time = dialog.answer_time = None
    dialog.cancel_time = dialog.final_time = None
    dialog.final_code = dialog.q850_cause = None
    dialog.final_reason = None
    dialog.seen = _signature_bits(msg)
    # Addresses, user agents and capture nodes repeat across calls: one copy each.
    intern = sys.intern
    dialog.src_ip = intern(packet.src_ip)
    dialog.src_port = packet.src_port
    dialog.dst_ip = intern(packet.dst_ip)
    dialog.dst_port = packet.dst_port
    dialog.egress_ip = None
    dialog.capture_node = intern(packet.capture_node)
    dialog.from_uri = msg.from_uri
    dialog.to_uri = msg.to_uri
    dialog.request_uri = msg.request_uri
    dialog.pai_uri = msg.p_asserted_identity
    user_agent = msg.user_agent
    dialog.user_agent = intern(user_agent) if user_agent is not None else None
    return dialog


__all__ = ["CDR_ID_NAMESPACE", "Correlator", "CorrelatorStats", "DialogLimits", "cdr_id"]
