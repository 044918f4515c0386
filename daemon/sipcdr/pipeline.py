"""From captured packets to CDRs in the sinks: parse, correlate, count.

One synchronous `process` per packet, called straight from the capture adapters'
callbacks. Parsing is the costly step and runs on one core either way, so a queue
between receiving and parsing would add a copy and a wake-up without adding
capacity; the bounded buffer in front of it is the socket's SO_RCVBUF, whose
overflows the kernel counts. What the pipeline counts is in `PipelineStats`, plain
ints bumped in place that the telemetry exporter reads when it is scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import structlog

from sipcdr.dialog import Correlator
from sipcdr.model import Cdr, Packet
from sipcdr.sip import SipMessage, SipParseError, parse
from sipcdr.stages import CdrStage, MessageStage, PartsFailed

_ERROR_LOG_LIMIT = 10  # the first few internal errors are logged in full; all are counted
_log = structlog.get_logger("sipcdr.pipeline")


class PipelineStats:
    """What the pipeline counts; only ever added to."""

    __slots__ = (
        "calls_refused",
        "cdr_write_failures",
        "cdrs_emitted",
        "internal_errors",
        "messages",
        "parse_errors",
    )

    def __init__(self) -> None:
        self.parse_errors: dict[str, int] = {}  # by parser reason
        self.messages: dict[tuple[str, str], int] = {}  # by (method, "request"|"response")
        # New calls refused while intake is paused, by the pause's reason.
        self.calls_refused: dict[str, int] = {}
        # Messages a bug cost, by stage: correlator (the message did not reach its
        # call), signaling (its signaling record was not written).
        self.internal_errors: dict[str, int] = {}
        self.cdr_write_failures: dict[str, int] = {}  # by sink: a CDR the sink raised on
        self.cdrs_emitted = 0


class CdrSink(Protocol):
    name: str

    def write(self, cdr: Cdr) -> None: ...

    def flush(self) -> None: ...


class Intake:
    """Whether new calls are refused, and why: set by the daemon's intake gate while the
    CDR spool is full or its disk refuses writes under the "block" policy, read by the
    pipeline for each new call. Refused calls are counted here, by reason."""

    __slots__ = ("paused", "reason", "refused")

    def __init__(self) -> None:
        self.paused = False
        self.reason = "spool_full"
        self.refused: dict[str, int] = {}


class Pipeline:
    """The chain as `sipcdr.engine` builds it, every part handed over here: nothing is
    wired in afterwards."""

    __slots__ = (
        "_cdr_steps",
        "_errors_logged",
        "_feed",
        "_messages",
        "_on_message",
        "_parse_errors",
        "_writes",
        "correlator",
        "decided",
        "intake",
        "journal",
        "message_stages",
        "signaling",
        "sinks",
        "stages",
        "stats",
    )

    def __init__(
        self,
        correlator: Correlator,
        sinks: Sequence[CdrSink],
        stages: Sequence[CdrStage] = (),
        message_stages: Sequence[MessageStage] = (),
        *,
        signaling: Callable[[Packet, SipMessage], None] | None = None,
        journal: Callable[[Packet], None] | None = None,
        decided: Callable[[Sequence[Cdr], float | None], None] | None = None,
        intake: Intake | None = None,
    ) -> None:
        self.correlator = correlator
        self._feed = correlator.feed
        self.sinks = tuple(sinks)
        # Each closed call passes these in order (enrich, rate, then fraud, which reads
        # the cost) before any sink sees it.
        self.stages = tuple(stages)
        # Each CDR passes every stage and sink: their steps bound once, with the names
        # their faults are counted under.
        self._cdr_steps = tuple((stage.name, stage.on_cdr) for stage in self.stages)
        self._writes = tuple((sink.name, sink.write) for sink in self.sinks)
        # Each parsed message passes these before the correlator (fraud).
        self.message_stages = tuple(message_stages)
        # Their step, bound once: the usual one stage is called straight, with no loop,
        # no bound method made per message; None when there is none.
        self._on_message = self._message_step()
        # Each parsed message, for the sinks that keep signaling; None when none does.
        self.signaling = signaling
        # Each message that changed a call, for the dialog journal (the daemon's; an
        # import has none): written before any CDR it closes reaches the sinks.
        self.journal = journal
        # Closes that replaying the journaled messages would not repeat the same way,
        # for the dialog journal, before their CDRs reach the sinks: a timer run (with
        # its time) or an eviction (None), which comes before its message's record.
        self.decided = decided
        # While paused, intake is refused, counted by reason, rather than closing calls
        # whose CDRs would have nowhere to go.
        self.intake = Intake() if intake is None else intake
        self.stats = PipelineStats()
        self.stats.calls_refused = self.intake.refused
        # The hot path's counters, one attribute lookup away.
        self._parse_errors = self.stats.parse_errors
        self._messages = self.stats.messages
        self._errors_logged = 0

    @property
    def cdrs_written(self) -> int:
        return self.stats.cdrs_emitted

    def process(self, packet: Packet) -> None:
        """Parse and correlate one captured SIP message; emit the CDRs it closes."""
        try:
            msg = parse(packet.payload)
        except SipParseError as exc:
            errors = self._parse_errors
            errors[exc.reason] = errors.get(exc.reason, 0) + 1
            return
        self.take(packet, msg)

    def take(self, packet: Packet, msg: SipMessage) -> None:
        """One message already parsed (a capture's, or one replayed from the
        `sipcdr.sip` topic): the rest of the chain."""
        # Every message passes here: the parts are read from the instance once each,
        # the correlator's step bound once at construction.
        if self.intake.paused and self._refused(msg):
            return
        key = (msg.method, "request") if msg.is_request else (msg.cseq_method, "response")
        messages = self._messages
        messages[key] = messages.get(key, 0) + 1
        signaling = self.signaling
        if signaling is not None:
            try:
                signaling(packet, msg)
            except Exception as exc:  # the signaling copy must never cost the call
                _bump(self.stats.internal_errors, "signaling")
                self._log_error("signaling_record_failed", exc, msg.call_id)
        on_message = self._on_message
        if on_message is not None:
            try:
                on_message(packet, msg)
            except Exception as exc:  # several stages catch their own in `_message_step`
                self._message_stage_failed(self.message_stages[0].name, exc, msg)
        try:
            closed = self._feed(packet, msg)
        except Exception as exc:
            # A correlator bug costs this message, counted, never the capture loop.
            _bump(self.stats.internal_errors, "correlator")
            self._log_error("correlator_failed", exc, msg.call_id)
            return
        journal = self.journal
        if journal is not None and self.correlator.changed:
            if closed and closed[0].call_id != msg.call_id and self.decided is not None:
                self.decided(closed, None)  # a call evicted to make room for this one
            journal(packet)
        if closed:
            self.emit(closed)

    def _refused(self, msg: SipMessage) -> bool:
        """While intake is paused: whether `msg` is refused, counted by reason. Only new
        calls are: the BYE of a call already being billed must still end it, or its CDR
        would close short, by a timeout, much later."""
        if msg.method == "INVITE" and not self.correlator.is_open(msg.call_id):
            intake = self.intake
            _bump(intake.refused, intake.reason)
            return True
        return False

    def _message_step(self) -> Callable[[Packet, SipMessage], None] | None:
        stages = self.message_stages
        if not stages:
            return None
        if len(stages) == 1:
            return stages[0].on_message
        steps = tuple((stage.name, stage.on_message) for stage in stages)

        def each(packet: Packet, msg: SipMessage) -> None:
            for name, step in steps:
                try:
                    step(packet, msg)
                except Exception as exc:  # one stage's bug must not cost the next
                    self._message_stage_failed(name, exc, msg)

        return each

    def _message_stage_failed(self, name: str, exc: Exception, msg: SipMessage) -> None:
        # A stage's bug must never cost the call: counted, and the message goes on.
        _bump(self.stats.internal_errors, name)
        self._log_error("message_stage_failed", exc, msg.call_id)

    def _log_error(self, event: str, exc: Exception, call_id: str) -> None:
        if self._errors_logged < _ERROR_LOG_LIMIT:
            self._errors_logged += 1
            _log.error(event, error=repr(exc), call_id=call_id[:128])

    def expire(self, now: float) -> None:
        closed = self.expired(now)
        if closed:
            self.emit(closed)

    def expired(self, now: float) -> Sequence[Cdr]:
        """The calls the timers close at `now`, journaled, for the caller to emit (an
        import emits them in slices)."""
        closed = self.correlator.expire(now)
        if self.decided is not None and self.correlator.changed:
            self.decided(closed, now)
        return closed

    def drain(self) -> None:
        """End of input (an import): close every call by the dialog rules."""
        self.emit(self.correlator.drain())

    def emit(self, cdrs: Sequence[Cdr]) -> None:
        stats = self.stats
        for cdr in cdrs:
            for name, on_cdr in self._cdr_steps:
                try:
                    cdr = on_cdr(cdr)
                except PartsFailed as failed:  # the parts that failed cost their fields
                    cdr = failed.cdr
                    for part, exc in failed.failures:
                        _bump(stats.internal_errors, part)
                        self._log_error("cdr_stage_failed", exc, cdr.call_id)
                except Exception as exc:  # a stage's bug costs its fields, never the CDR
                    _bump(stats.internal_errors, name)
                    self._log_error("cdr_stage_failed", exc, cdr.call_id)
            written = True
            for name, write in self._writes:
                try:
                    write(cdr)
                except Exception as exc:  # one sink's bug must not cost the others
                    written = False
                    _bump(stats.cdr_write_failures, name)
                    self._log_error("cdr_write_failed", exc, cdr.call_id)
            # Written: every sink took it (a CDR one sink lost is counted there).
            stats.cdrs_emitted += written

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()


def _bump(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1
