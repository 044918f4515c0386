"""From captured packets to CDRs in the sinks: parse, correlate, count.

One synchronous `process` per packet, called straight from the capture adapters'
callbacks. Parsing is the costly step and runs on one core either way, so a queue
between receiving and parsing would add a copy and a wake-up without adding
capacity; the bounded buffer in front of it is the socket's SO_RCVBUF, whose
overflows the kernel counts and `capture` exports. Counters are plain ints here and
reach Prometheus in batches through `flush_metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import structlog

from sipcdr.dialog import Correlator
from sipcdr.model import Cdr, Packet
from sipcdr.sip import SipMessage, SipParseError, parse
from sipcdr.stages import CdrStage, MessageStage
from sipcdr.telemetry.metrics import Metrics, method_label

Key = TypeVar("Key")
_ERROR_LOG_LIMIT = 10  # the first few internal errors are logged in full; all are counted
_log = structlog.get_logger("sipcdr.pipeline")


class CdrSink(Protocol):
    name: str

    def write(self, cdr: Cdr) -> None: ...

    def flush(self) -> None: ...


class Pipeline:
    __slots__ = (
        "_errors_logged",
        "_flushed",
        "cdr_stages",
        "cdrs_written",
        "correlator",
        "decided",
        "drops",
        "hep_clock_skew",
        "journal",
        "message_stages",
        "messages",
        "metrics",
        "parse_errors",
        "pause_reason",
        "paused",
        "received",
        "signaling",
        "sinks",
    )

    def __init__(
        self, correlator: Correlator, sinks: Sequence[CdrSink], metrics: Metrics | None = None
    ) -> None:
        self.correlator = correlator
        self.sinks = tuple(sinks)
        self.metrics = metrics or Metrics()
        self.received: dict[str, int] = {}  # by source kind
        self.drops: dict[tuple[str, str], int] = {}  # by (source kind, reason)
        self.parse_errors: dict[str, int] = {}  # by parser reason
        self.messages: dict[tuple[str, str], int] = {}  # by (method, "request"|"response")
        self.cdrs_written = 0
        self.hep_clock_skew = 0  # HEP times replaced by the receive time
        # Each parsed message, for the sinks that keep signaling; None when none does.
        self.signaling: Callable[[Packet, SipMessage], None] | None = None
        # Each message that changed a call, for the dialog journal (the daemon's; an
        # import has none): written before any CDR it closes reaches the sinks.
        self.journal: Callable[[Packet], None] | None = None
        # Stages of the engine's chain (`sipcdr.stages`): each parsed message before the
        # correlator, each closed CDR in turn before the sinks.
        self.message_stages: tuple[MessageStage, ...] = ()
        self.cdr_stages: tuple[CdrStage, ...] = ()
        # Closes that replaying the journaled messages would not repeat the same way,
        # for the dialog journal, before their CDRs reach the sinks: a timer run (with
        # its time) or an eviction (None), which comes before its message's record.
        self.decided: Callable[[Sequence[Cdr], float | None], None] | None = None
        # Set while the CDR spool is full, or its disk refuses writes, under the "block"
        # policy: intake is refused, counted with `pause_reason`, rather than closing
        # calls whose CDRs would have nowhere to go.
        self.paused = False
        self.pause_reason = "spool_full"
        self._flushed: dict[str, int] = {}  # correlator counters already exported
        self._errors_logged = 0

    def count_received(self, source: str, n: int = 1) -> None:
        self.received[source] = self.received.get(source, 0) + n

    def drop(self, source: str, reason: str) -> None:
        """Count input refused before parsing; every drop has a reason."""
        key = (source, reason)
        self.drops[key] = self.drops.get(key, 0) + 1

    def process(self, packet: Packet) -> None:
        """Parse and correlate one captured SIP message; emit the CDRs it closes."""
        try:
            msg = parse(packet.payload)
        except SipParseError as exc:
            errors = self.parse_errors
            errors[exc.reason] = errors.get(exc.reason, 0) + 1
            return
        if self.paused and (msg.method == "INVITE" and not self.correlator.is_open(msg.call_id)):
            # Only new calls are refused: the BYE of a call already being billed must
            # still end it, or its CDR would close short, by a timeout, much later.
            self.drop("intake", self.pause_reason)
            return
        key = (msg.method, "request") if msg.is_request else (msg.cseq_method, "response")
        messages = self.messages
        messages[key] = messages.get(key, 0) + 1
        if self.signaling is not None:
            try:
                self.signaling(packet, msg)
            except Exception as exc:  # the signaling copy must never cost the call
                self.drop("signaling", "internal_error")
                self._log_error("signaling_record_failed", exc, msg.call_id)
        for stage in self.message_stages:
            try:
                stage.on_message(packet, msg)
            except Exception as exc:  # a stage's bug must never cost the call
                self.drop(stage.name, "internal_error")
                self._log_error("stage_failed", exc, msg.call_id)
        try:
            closed = self.correlator.feed(packet, msg)
        except Exception as exc:
            # A correlator bug costs this message, counted, never the capture loop.
            self.drop("correlator", "internal_error")
            self._log_error("correlator_failed", exc, msg.call_id)
            return
        journal = self.journal
        if journal is not None and self.correlator.changed:
            if closed and closed[0].call_id != msg.call_id and self.decided is not None:
                self.decided(closed, None)  # a call evicted to make room for this one
            journal(packet)
        if closed:
            self.emit(closed)

    def _log_error(self, event: str, exc: Exception, call_id: str) -> None:
        if self._errors_logged < _ERROR_LOG_LIMIT:
            self._errors_logged += 1
            _log.error(event, error=repr(exc), call_id=call_id[:128])

    def expire(self, now: float) -> None:
        closed = self.correlator.expire(now)
        if self.decided is not None and self.correlator.changed:
            self.decided(closed, now)
        if closed:
            self.emit(closed)

    def drain(self) -> None:
        """End of input (an import): close every call by the dialog rules."""
        self.emit(self.correlator.drain())

    def emit(self, cdrs: Sequence[Cdr]) -> None:
        for cdr in cdrs:
            for stage in self.cdr_stages:
                try:
                    cdr = stage.on_cdr(cdr)  # each stage adds to it
                except Exception as exc:  # the CDR goes on as it was
                    self.drop(stage.name, "internal_error")
                    self._log_error("stage_failed", exc, cdr.call_id)
            for sink in self.sinks:
                try:
                    sink.write(cdr)
                except Exception as exc:  # one sink's bug must not cost the others
                    self.drop("cdr", "write_error")
                    self._log_error("cdr_write_failed", exc, cdr.call_id)
        self.cdrs_written += len(cdrs)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def flush_metrics(self) -> None:
        """Move the counts gathered since the last call into Prometheus."""
        m = self.metrics
        for source, n in _take(self.received).items():
            m.packets_received.labels(source).inc(n)
        for (source, reason), n in _take(self.drops).items():
            m.packets_dropped.labels(source, reason).inc(n)
        for reason, n in _take(self.parse_errors).items():
            m.parse_errors.labels(reason).inc(n)
        for (method, kind), n in _take(self.messages).items():
            m.sip_messages.labels(method_label(method), kind).inc(n)
        if self.hep_clock_skew:
            m.hep_clock_skew.inc(self.hep_clock_skew)
            self.hep_clock_skew = 0
        stats = self.correlator.stats
        events = {
            "retransmission": stats.retransmissions,
            "late": stats.late,
            "orphan": stats.orphans,
            "unusable": stats.unusable,
            "evicted": stats.evicted,
            "restored": stats.dialogs_restored,
            "conflicting_from_tag": stats.conflicting_from_tag,
        }
        events.update({f"cdr:{k}": v for k, v in stats.cdrs.items()})
        for name, total in events.items():
            delta = total - self._flushed.get(name, 0)
            if delta:
                self._flushed[name] = total
                if name.startswith("cdr:"):
                    m.cdrs.labels(name[4:]).inc(delta)
                else:
                    m.dialog_events.labels(name).inc(delta)
        m.open_dialogs.set(self.correlator.open_dialogs)
        for trunk, kpi in self.correlator.kpis.items():
            label = trunk or ""
            for gauge, value in (
                (m.asr, kpi.asr),
                (m.ner, kpi.ner),
                (m.acd, kpi.acd),
                (m.pdd, None if kpi.pdd is None else kpi.pdd / 1000),
            ):
                if value is not None:
                    gauge.labels(label).set(value)


def _take(counts: dict[Key, int]) -> dict[Key, int]:
    taken = dict(counts)
    counts.clear()
    return taken
