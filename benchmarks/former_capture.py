"""The capture glue as it was before 2026-12-05's rework, kept as the baseline of
`capture_path.py`: the pipeline's per-message and per-CDR steps reading each part
from the instance and binding each step anew, and the SIP/UDP listener's two frames
a datagram (the hint's check, then the plain listener), with the allow-list and the
counter behind a method call each and the `Packet` built through its `__new__`; and
the HEP/UDP listener as it was until later that day (`hep_listener.py`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from sipcdr.capture.hints import ListenerHint
from sipcdr.capture.listeners import AllowList, HepGate, ListenerStats, handle_hep
from sipcdr.clock import SYSTEM_CLOCK, Clock
from sipcdr.decode.startline import sip_offset
from sipcdr.dialog import Correlator
from sipcdr.model import TRANSPORT_UDP, Cdr, Packet
from sipcdr.pipeline import CdrSink, Intake, Pipeline, PipelineStats
from sipcdr.sip import SipMessage, SipParseError, parse
from sipcdr.stages import CdrStage, MessageStage, PartsFailed

_HEP3 = b"HEP3"
_ERROR_LOG_LIMIT = 10
_log = structlog.get_logger("sipcdr.pipeline")


def _bump(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


class FormerPipeline:
    """The former pipeline, whole (the current one may be compiled: no subclass)."""

    __slots__ = (
        "_errors_logged",
        "_messages",
        "_on_message",
        "_parse_errors",
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
        self.sinks = tuple(sinks)
        self.stages = tuple(stages)
        self.message_stages = tuple(message_stages)
        self._on_message = self._message_step()
        self.signaling = signaling
        self.journal = journal
        self.decided = decided
        self.intake = Intake() if intake is None else intake
        self.stats = PipelineStats()
        self.stats.calls_refused = self.intake.refused
        self._parse_errors = self.stats.parse_errors
        self._messages = self.stats.messages
        self._errors_logged = 0

    @property
    def cdrs_written(self) -> int:
        return self.stats.cdrs_emitted

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
                except Exception as exc:
                    self._message_stage_failed(name, exc, msg)

        return each

    def _message_stage_failed(self, name: str, exc: Exception, msg: SipMessage) -> None:
        _bump(self.stats.internal_errors, name)
        self._log_error("message_stage_failed", exc, msg.call_id)

    def _log_error(self, event: str, exc: Exception, call_id: str) -> None:
        if self._errors_logged < _ERROR_LOG_LIMIT:
            self._errors_logged += 1
            _log.error(event, error=repr(exc), call_id=call_id[:128])

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def process(self, packet: Packet) -> None:
        try:
            msg = parse(packet.payload)
        except SipParseError as exc:
            errors = self._parse_errors
            errors[exc.reason] = errors.get(exc.reason, 0) + 1
            return
        self.take(packet, msg)

    def take(self, packet: Packet, msg: SipMessage) -> None:
        intake = self.intake
        if intake.paused and (msg.method == "INVITE" and not self.correlator.is_open(msg.call_id)):
            _bump(intake.refused, intake.reason)
            return
        key = (msg.method, "request") if msg.is_request else (msg.cseq_method, "response")
        messages = self._messages
        messages[key] = messages.get(key, 0) + 1
        if self.signaling is not None:
            try:
                self.signaling(packet, msg)
            except Exception as exc:
                _bump(self.stats.internal_errors, "signaling")
                self._log_error("signaling_record_failed", exc, msg.call_id)
        on_message = self._on_message
        if on_message is not None:
            try:
                on_message(packet, msg)
            except Exception as exc:
                self._message_stage_failed(self.message_stages[0].name, exc, msg)
        try:
            closed = self.correlator.feed(packet, msg)
        except Exception as exc:
            _bump(self.stats.internal_errors, "correlator")
            self._log_error("correlator_failed", exc, msg.call_id)
            return
        journal = self.journal
        if journal is not None and self.correlator.changed:
            if closed and closed[0].call_id != msg.call_id and self.decided is not None:
                self.decided(closed, None)
            journal(packet)
        if closed:
            self.emit(closed)

    def emit(self, cdrs: Sequence[Cdr]) -> None:
        stages = self.stages
        for cdr in cdrs:
            for stage in stages:
                try:
                    cdr = stage.on_cdr(cdr)
                except PartsFailed as failed:
                    cdr = failed.cdr
                    for name, exc in failed.failures:
                        _bump(self.stats.internal_errors, name)
                        self._log_error("cdr_stage_failed", exc, cdr.call_id)
                except Exception as exc:
                    _bump(self.stats.internal_errors, stage.name)
                    self._log_error("cdr_stage_failed", exc, cdr.call_id)
            written = True
            for sink in self.sinks:
                try:
                    sink.write(cdr)
                except Exception as exc:
                    written = False
                    _bump(self.stats.cdr_write_failures, sink.name)
                    self._log_error("cdr_write_failed", exc, cdr.call_id)
            self.stats.cdrs_emitted += written


def former_pipeline(current: Pipeline) -> FormerPipeline:
    """The former steps over the same parts as `current` (which is then not used)."""
    return FormerPipeline(
        current.correlator,
        current.sinks,
        current.stages,
        current.message_stages,
        signaling=current.signaling,
        journal=current.journal,
        decided=current.decided,
        intake=current.intake,
    )


class FormerSipUdpProtocol(asyncio.DatagramProtocol):
    SOURCE = "sip_udp"

    def __init__(
        self,
        pipeline: Pipeline | FormerPipeline,
        allow: AllowList,
        local: tuple[str, int],
        stats: ListenerStats,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._pipeline = pipeline
        self._allow = allow
        self._stats = stats
        self._now = clock.time
        self._local_ip, self._local_port = local
        self._node = f"sip_udp:{local[0]}:{local[1]}"

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        ip = str(addr[0])
        if not self._allow.permits(ip):
            self._stats.drop(self.SOURCE, "not_allowed")
            return
        self._stats.count_received(self.SOURCE)
        port = addr[1]
        self._pipeline.process(
            Packet(
                self._now(),
                ip,
                port if isinstance(port, int) else 0,
                self._local_ip,
                self._local_port,
                TRANSPORT_UDP,
                data,
                self._node,
            )
        )


class FormerHintedSipUdpProtocol(FormerSipUdpProtocol):
    def __init__(
        self,
        pipeline: Pipeline | FormerPipeline,
        allow: AllowList,
        local: tuple[str, int],
        hint: ListenerHint,
        stats: ListenerStats,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(pipeline, allow, local, stats, clock)
        self.hint = hint

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        first = data[0] if data else 0
        if (first == 72 and data.startswith(_HEP3)) or first in (1, 2):
            self.hint.seen += 1
        FormerSipUdpProtocol.datagram_received(self, data, addr)


class FormerHepUdpProtocol(asyncio.DatagramProtocol):
    """The HEP/UDP listener before it took one frame a datagram: the allow-list, the
    counter and `handle_hep` (the decode, the agent gate, `hep_to_packet`) a call each."""

    SOURCE = "hep_udp"

    def __init__(
        self,
        pipeline: Pipeline,
        allow: AllowList,
        gate: HepGate,
        stats: ListenerStats,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._pipeline = pipeline
        self._allow = allow
        self._gate = gate
        self._stats = stats
        self._clock = clock

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        stats = self._stats
        if not self._allow.permits(str(addr[0])):
            stats.drop(self.SOURCE, "not_allowed")
            return
        stats.count_received(self.SOURCE)
        handle_hep(self._pipeline, self._gate, stats, self.SOURCE, data, self._clock)


class FormerHintedHepUdpProtocol(FormerHepUdpProtocol):
    def __init__(
        self,
        pipeline: Pipeline,
        allow: AllowList,
        gate: HepGate,
        hint: ListenerHint,
        stats: ListenerStats,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(pipeline, allow, gate, stats, clock)
        self.hint = hint

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if not data.startswith(_HEP3) and sip_offset(data) >= 0:
            self.hint.seen += 1
        FormerHepUdpProtocol.datagram_received(self, data, addr)
