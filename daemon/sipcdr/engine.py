"""The engine: the one chain every mode runs, built whole by `build_engine`.

    parse → message stages (signaling tap, fraud) → correlate
          → CDR stages (enrich → rate, in one copy of the CDR; fraud) → spool writers

`sipcdr run` (the daemon, with its dialog journal), `sipcdr import` and a correlator
fed from `sipcdr.sip` topic records (`correlate_events`) all build it here, from a
`Config` and the writers of the opened outputs, so the same traffic gives the same
CDRs whichever way it came in. Everything a stage needs is handed to its constructor;
nothing is wired into the chain afterwards. The engine also owns the once-a-second
tick: the correlator's timers and the stages that keep time-bound state (fraud).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sipcdr.antifraud import DaemonFraud, fraud_stage
from sipcdr.clock import SYSTEM_CLOCK, Clock
from sipcdr.config import Config
from sipcdr.dialog import Correlator
from sipcdr.enrich import EnrichRateStage, EnrichStage
from sipcdr.enrich.trunks import TrunkLookup
from sipcdr.fraud.stage import AlertWriter, FraudStage
from sipcdr.model import Cdr, Packet, SipEvent
from sipcdr.pipeline import CdrSink, Intake, Pipeline
from sipcdr.rates import RateDecks, rate_decks
from sipcdr.sinks.outputs import Outputs
from sipcdr.sip import SipMessage
from sipcdr.sipevent import replay
from sipcdr.stages import CdrStage, MessageStage, TimedStage

__all__ = ["Destinations", "Engine", "JournalHooks", "build_engine", "correlate_events"]

# Capture-time interval between timer runs where time is the traffic's own (an import,
# a replay of topic records).
EXPIRE_EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class Destinations:
    """Where the chain writes: CDRs, the signaling copy of each message, fraud alerts.
    The daemon and an import take them from their opened `Outputs`; a test or a caller
    with its own sinks names them."""

    cdrs: Sequence[CdrSink]
    signaling: Callable[[Packet, SipMessage], None] | None = None
    alerts: AlertWriter | None = None

    @classmethod
    def of(cls, outputs: Outputs) -> Destinations:
        """The writers of opened outputs (their spools exist only once opened)."""
        return cls(outputs.cdr_sinks(), outputs.signaling, outputs.alert_writer)


@dataclass(frozen=True, slots=True)
class JournalHooks:
    """The daemon's dialog store in the chain (`DialogStore.message` and `.decided`)."""

    message: Callable[[Packet], None]
    decided: Callable[[Sequence[Cdr], float | None], None]


class Engine:
    """The built chain. `pipeline` is what the capture adapters hand packets to."""

    __slots__ = ("correlator", "enrich", "fraud", "pipeline", "rates", "timed")

    def __init__(
        self,
        correlator: Correlator,
        destinations: Destinations,
        enrich: EnrichStage,
        rates: RateDecks,
        fraud: FraudStage | None,
        timed: Sequence[TimedStage],
        journal: JournalHooks | None,
        intake: Intake | None,
    ) -> None:
        self.correlator = correlator
        self.enrich = enrich
        self.rates = rates
        self.fraud = fraud
        self.timed = tuple(timed)
        # The fraud stage's compiled step for each message, called without a frame of
        # interpreted code in between.
        message_stages: tuple[MessageStage, ...] = () if fraud is None else (fraud.tap,)
        # Rate before fraud, which reads the cost; enrich before both (the trunk), in
        # one copy of the CDR with the rating.
        cdr_stages: tuple[CdrStage, ...] = (EnrichRateStage(enrich, rates.stage),)
        if fraud is not None:
            cdr_stages = (*cdr_stages, fraud)
        self.pipeline = Pipeline(
            correlator,
            destinations.cdrs,
            cdr_stages,
            message_stages,
            signaling=destinations.signaling,
            journal=None if journal is None else journal.message,
            decided=None if journal is None else journal.decided,
            intake=intake,
        )

    def process(self, packet: Packet) -> None:
        self.pipeline.process(packet)

    def take(self, packet: Packet, msg: SipMessage) -> None:
        self.pipeline.take(packet, msg)

    def expired(self, now: float) -> Sequence[Cdr]:
        """The calls the timers close at `now`, journaled, for the caller to emit (an
        import does so in slices)."""
        return self.pipeline.expired(now)

    def tick_stages(self, now: float) -> None:
        """The stages that keep time-bound state, at `now`."""
        for stage in self.timed:
            stage.tick(now)

    def tick(self, now: float) -> None:
        """Once a second: what the timers close goes through the CDR stages to the
        sinks first (a stage's fault afterwards cannot hold a CDR back), then the timed
        stages."""
        closed = self.expired(now)
        if closed:
            self.pipeline.emit(closed)
        self.tick_stages(now)

    def emit(self, cdrs: Sequence[Cdr]) -> None:
        self.pipeline.emit(cdrs)

    def drain(self) -> Sequence[Cdr]:
        """End of input: every open call closed by the dialog rules, for the caller to
        emit."""
        return self.correlator.drain()

    def flush(self) -> None:
        self.pipeline.flush()


def build_correlator(config: Config) -> Correlator:
    """The correlator of `config`: the daemon builds it ahead of the engine, for the
    dialog store to recover calls into before the outputs open."""
    return Correlator(config.dialog, egress=bool(config.trunks))


def build_engine(
    config: Config,
    destinations: Destinations,
    *,
    correlator: Correlator | None = None,
    journal: JournalHooks | None = None,
    intake: Intake | None = None,
    daemon_fraud: bool = False,
    clock: Clock = SYSTEM_CLOCK,
) -> Engine:
    """The chain of `config` writing to `destinations`.

    The daemon passes its correlator (the dialog store recovers calls into it before
    the outputs open), its journal hooks and its intake gate's state, and keeps its
    fraud baselines across restarts (`daemon_fraud`); an import and a topic replay
    start from nothing, on the traffic's own time. `clock` dates the rate decks and
    paces the baselines' saves.
    """
    if correlator is None:
        correlator = build_correlator(config)
    # One lookup, remembering each address's trunk, for the enrich and fraud stages.
    trunks = TrunkLookup.of(config.trunks)
    enrich = EnrichStage(trunks)
    rates = rate_decks(config, clock.time)
    timed: list[TimedStage] = []
    stage: FraudStage | None
    if daemon_fraud:
        kept = DaemonFraud.build(config, destinations.alerts, clock, trunks)
        stage = None if kept is None else kept.stage
        if kept is not None:
            timed.append(kept)  # the stage's tick, then the baselines' save when due
    else:
        stage = fraud_stage(config, destinations.alerts, trunks)
        if stage is not None:
            timed.append(stage)
    return Engine(correlator, destinations, enrich, rates, stage, timed, journal, intake)


def daemon_fraud_of(engine: Engine) -> DaemonFraud | None:
    """The daemon's fraud stage with its baselines, when the engine runs one."""
    for stage in engine.timed:
        if isinstance(stage, DaemonFraud):
            return stage
    return None


def correlate_events(
    config: Config, events: Iterable[SipEvent], destinations: Destinations
) -> Engine:
    """Feed `sipcdr.sip` records through the whole chain, on their own capture time as
    an import does, and close what is still open at the end; the engine is returned for
    its counts."""
    engine = build_engine(config, destinations)
    next_expiry = 0.0
    for event in events:
        packet, msg = replay(event)
        if packet.timestamp >= next_expiry:
            engine.tick(packet.timestamp)
            next_expiry = packet.timestamp + EXPIRE_EVERY_S
        engine.take(packet, msg)
    engine.emit(engine.drain())
    engine.flush()
    return engine
