"""The capture process's CPU per message from the listener on, split by step, and the
glue between them (listener, pipeline) against its former code, in one run.

Traffic: `loadgen.py`'s 6-message calls (INVITE with SDP, 180, 200, ACK, BYE, 200) as
`e2e.py` sends them, every Call-ID new, handed to the SIP/UDP listener's
`datagram_received` as uvloop would (no socket: what receiving costs is in
`receive.py`), `--turn` datagrams per event loop turn (uvloop reads up to 32 a wake-up;
the dialog journal writes once a turn).

Part 1, the split (mypyc-compiled parser, correlator and fraud tap are invisible to a
sampling profiler, whose "self" time of the pipeline's frames holds them):

- parse alone; parse, the fraud tap and correlate, called straight in a loop;
- the pipeline with every hook a no-op (signaling, journal, two CDR stages, three
  sinks), through the listener: what is left over the loop above is the glue;
- the daemon's capture chain as `sipcdr run` builds it (App with delivery apart: the
  CDR and signaling spools, the dialog journal, fraud, enrich and rate) through the
  listener.

Part 2: the glue and the daemon's chain again, each built with the former listener
and pipeline steps (`former_capture.py`), with the current ones, and (when the hot
path is compiled) with the current ones but `pipeline.py` run from its source; fed in
turn slice by slice; medians over rounds of CPU time per message, and ratios.

    python benchmarks/capture_path.py [--rounds 7] [--calls 4000] [--turn 24]
    python benchmarks/capture_path.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sipcdr.pipeline
import uvloop
from former_capture import FormerHintedSipUdpProtocol, FormerPipeline, former_pipeline
from receive import MARK, call_flow
from sipcdr import hotpath
from sipcdr.app import App
from sipcdr.capture.hints import HintedSipUdpProtocol, ListenerHint
from sipcdr.capture.listeners import AllowList, ListenerStats
from sipcdr.config import DEFAULT_ALLOW, load_config
from sipcdr.dialog import Correlator
from sipcdr.engine import Destinations, JournalHooks, build_engine
from sipcdr.fraud.stage import FraudStage
from sipcdr.model import Cdr, Packet
from sipcdr.pipeline import Pipeline
from sipcdr.private import prepare_state_dir
from sipcdr.sip import SipMessage, parse

LOCAL = ("127.0.0.1", 5060)
SENDER = ("127.0.0.1", 40000)  # e2e.py's sender is on the same host
DSN = "postgresql://sipcdr@127.0.0.1:1/sipcdr"  # never connected to: delivery runs apart

Protocol = Callable[..., Any]
# The current code with pipeline.py run from its source, beside the compiled build.
INTERPRETED = "current, pipeline.py interpreted"


class Traffic:
    """Each round's datagrams: whole calls, Call-IDs never seen before."""

    def __init__(self, calls: int) -> None:
        self.calls = calls
        self._next = 0
        self._flow = [payload for payload, _caller in call_flow()]

    def take(self) -> list[bytes]:
        first, self._next = self._next, self._next + self.calls
        return [
            payload.replace(MARK, b"%08x" % call)
            for call in range(first, first + self.calls)
            for payload in self._flow
        ]


class _NoSink:
    name = "none"

    def write(self, cdr: Cdr) -> None:
        return None

    def flush(self) -> None:
        return None


class _NoStage:
    name = "none"

    def on_cdr(self, cdr: Cdr) -> Cdr:
        return cdr


def _nothing(*_args: object) -> None:
    return None


class Chain:
    """A pipeline behind a SIP/UDP listener, fed datagrams a turn at a time."""

    def __init__(
        self, pipeline: Pipeline | FormerPipeline, protocol: Protocol, after: Callable[[], None]
    ) -> None:
        self.pipeline = pipeline
        self.hint = ListenerHint("SIP/UDP", "127.0.0.1:5060", "HEP packets", "capture.hep_udp")
        self.stats = ListenerStats()
        self.protocol = protocol(pipeline, AllowList(DEFAULT_ALLOW), LOCAL, self.hint, self.stats)
        self._after = after  # the once-a-slice work: spools synced, journal flushed

    async def feed(self, datagrams: Sequence[bytes], turn: int) -> float:
        """CPU seconds for `datagrams`, `turn` per event loop turn."""
        receive = self.protocol.datagram_received
        started = time.process_time()
        for first in range(0, len(datagrams), turn):
            for data in datagrams[first : first + turn]:
                receive(data, SENDER)
            await asyncio.sleep(0)
        self._after()
        return time.process_time() - started


Rebuild = Callable[[Pipeline], "Pipeline | FormerPipeline"]


def _same(pipeline: Pipeline) -> Pipeline:
    return pipeline


def source_pipeline() -> Rebuild:
    """The current pipeline's source, loaded apart from the compiled module in use (its
    imports, the parser and correlator among them, are the compiled ones): what
    compiling `pipeline.py` changes, and nothing else."""
    path = Path(sipcdr.pipeline.__file__).with_name("pipeline.py")
    spec = importlib.util.spec_from_file_location("capture_path_pipeline_source", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def rebuild(current: Pipeline) -> Pipeline:
        pipeline: Pipeline = module.Pipeline(
            current.correlator,
            current.sinks,
            current.stages,
            current.message_stages,
            signaling=current.signaling,
            journal=current.journal,
            decided=current.decided,
            intake=current.intake,
        )
        return pipeline

    return rebuild


def glue_chain(protocol: Protocol, rebuild: Rebuild, fraud: FraudStage) -> Chain:
    pipeline = Pipeline(
        Correlator(),
        (_NoSink(), _NoSink(), _NoSink()),
        (_NoStage(), _NoStage()),
        (fraud.tap,),
        signaling=_nothing,
        journal=_nothing,
        decided=_nothing,
    )
    return Chain(rebuild(pipeline), protocol, lambda: None)


class Daemon:
    """The capture process's chain as `sipcdr run` opens it with its defaults (delivery
    apart), PostgreSQL keeping signaling, as fraud.py's daemon chain; fed through the
    listener, with the spools synced and the journal flushed at the end of a step."""

    def __init__(self, folder: Path) -> None:
        environ = {
            "SIPCDR_STATE__DIR": str(folder),
            "SIPCDR_SINKS__POSTGRES__DSN": DSN,
            "SIPCDR_SINKS__POSTGRES__STORE_SIGNALING": "true",
        }
        self.app = App(load_config(None, environ), apart=True)
        self.folder = folder

    async def open(self, protocol: Protocol, rebuild: Rebuild = _same) -> Chain:
        app = self.app
        prepare_state_dir(app.state_dir)
        app.dialogs.recover()
        await app.outputs.open()
        engine = build_engine(
            app.config,
            Destinations.of(app.outputs),
            correlator=app.correlator,
            journal=JournalHooks(app.dialogs.message, app.dialogs.decided),
            intake=app.intake.intake,
            daemon_fraud=True,
            clock=app.clock,
        )
        app.engine = engine
        # The former steps over the engine's parts; the journal's timer closes go out
        # by the same steps as the messages' closes.
        pipeline = rebuild(engine.pipeline)
        await app.dialogs.start(pipeline.emit)
        return Chain(pipeline, protocol, self._slice_end)

    def _slice_end(self) -> None:
        for spool in self.app.outputs.spools.values():
            spool.sync()
        self.app.dialogs.flush()

    def fraud(self) -> FraudStage:
        assert self.app.engine is not None and self.app.engine.fraud is not None
        return self.app.engine.fraud

    async def close(self, fed: bool = True) -> None:
        """After checking that what was fed wrote what the daemon writes."""
        app = self.app
        written = {stream: spool.next_seq for stream, spool in app.outputs.spools.items()}
        assert len(written) == 2 and (not fed or min(written.values()) > 0), written
        assert not fed or app.dialogs.stats.journal_messages > 0
        await app.dialogs.stop()
        await app.outputs.close(drain_timeout_s=0)
        shutil.rmtree(self.folder)


def _straight(datagrams: Sequence[bytes], fraud: FraudStage | None) -> float:
    """Parse (and with `fraud`, its tap and correlate) in a plain loop: CPU seconds."""
    packets = [Packet(time.time(), *SENDER, *LOCAL, "udp", data, "x") for data in datagrams]
    gc.collect()
    if fraud is None:
        started = time.process_time()
        for packet in packets:
            parse(packet.payload)
        return time.process_time() - started
    feed = Correlator().feed
    tap: Callable[[Packet, SipMessage], None] = fraud.tap.on_message
    started = time.process_time()
    for packet in packets:
        msg = parse(packet.payload)
        tap(packet, msg)
        feed(packet, msg)
    return time.process_time() - started


def _check(chain: Chain, messages: int) -> None:
    """What was timed is what was meant: every message parsed, every call a CDR."""
    counted = sum(chain.pipeline.stats.messages.values())
    cdrs = chain.pipeline.cdrs_written
    received = chain.stats.received.get("sip_udp", 0)
    if counted != messages or received != messages or cdrs != messages // 6:
        raise SystemExit(f"unexpected counts: {counted} {received} {cdrs} of {messages}")


async def run(opts: argparse.Namespace) -> None:
    traffic = Traffic(opts.slice)
    scratch = Path(tempfile.mkdtemp(prefix="capture-path-"))
    # The daemon's fraud stage, for its tap in the plain loop and the glue chains.
    probe = Daemon(scratch / "probe")
    await probe.open(HintedSipUdpProtocol)
    fraud = probe.fraud()
    split: dict[str, list[float]] = {"parse": [], "parse + tap + correlate": []}
    pairs: dict[str, dict[str, list[float]]] = {
        "glue": {},
        "daemon": {},
    }
    builds: dict[str, tuple[Protocol, Rebuild]] = {
        "former": (FormerHintedSipUdpProtocol, former_pipeline),
        "current": (HintedSipUdpProtocol, _same),
    }
    if hotpath.hot_path()[0] == hotpath.COMPILED:
        builds[INTERPRETED] = (HintedSipUdpProtocol, source_pipeline())
    slices = max(1, opts.calls // opts.slice)
    for round_ in range(opts.rounds):
        chains: dict[tuple[str, str], Chain] = {}
        daemons: list[Daemon] = []
        for name, (protocol, rebuild) in builds.items():
            chains["glue", name] = glue_chain(protocol, rebuild, fraud)
            daemon = Daemon(scratch / f"{name}-{round_}")
            daemons.append(daemon)
            chains["daemon", name] = await daemon.open(protocol, rebuild)
        seconds: dict[str | tuple[str, str], float] = dict.fromkeys([*split, *chains], 0.0)
        gc.collect()
        # Slice by slice, every contender in turn (the order reversed every other
        # slice): a burst of load from elsewhere falls on all of them alike.
        for step in range(slices):
            keys = list(seconds) if step % 2 == 0 else list(reversed(seconds))
            for key in keys:
                data = traffic.take()
                if isinstance(key, tuple):
                    seconds[key] += await chains[key].feed(data, opts.turn)
                else:
                    seconds[key] += _straight(data, fraud if key != "parse" else None)
        n = slices * opts.slice * 6
        for key, spent in seconds.items():
            if isinstance(key, tuple):
                _check(chains[key], n)
                pairs[key[0]].setdefault(key[1], []).append(spent / n)
            else:
                split[key].append(spent / n)
        for daemon in daemons:
            await daemon.close()
    await probe.close(fed=False)
    shutil.rmtree(scratch, ignore_errors=True)

    med = statistics.median
    us = 1e6
    kind, why = hotpath.hot_path()
    print(
        f"capture path, {opts.calls:,} 6-message calls a round in slices of {opts.slice},"
        f" {opts.turn} datagrams a turn,"
        f" medians of {opts.rounds} rounds, CPU time; hot path {kind}{f' ({why})' if why else ''};"
        f" load average {os.getloadavg()[0]:.1f}"
    )
    parse_us = med(split["parse"]) * us
    straight_us = med(split["parse + tap + correlate"]) * us
    glue_us = med(pairs["glue"]["current"]) * us
    daemon_us = med(pairs["daemon"]["current"]) * us
    print("part 1: where a message's CPU goes (current code)")
    print(f"  {'parse':<52}{parse_us:7.2f} us")
    print(f"  {'parse + fraud tap + correlate, a plain loop':<52}{straight_us:7.2f} us")
    print(f"  {'listener + pipeline, every hook a no-op':<52}{glue_us:7.2f} us")
    print(
        f"  {'  of which the glue (listener, pipeline steps)':<52}{glue_us - straight_us:7.2f} us"
    )
    print(f"  {'the daemon chain through the listener':<52}{daemon_us:7.2f} us")
    share = (glue_us - straight_us) / daemon_us
    print(f"  {'  of which the glue':<52}{share:7.1%}")
    print("part 2: former against current, alternated (lower is better)")
    # Each round's contenders shared its slices' machine: the ratio is taken within a
    # round, and its median over rounds quoted.
    for label, runs in pairs.items():
        former_us = med(runs["former"]) * us
        current_us = med(runs["current"]) * us
        ratios = [c / f for c, f in zip(runs["current"], runs["former"], strict=True)]
        print(
            f"  {label:<8} former {former_us:7.2f} us  current {current_us:7.2f} us"
            f"  current/former {med(ratios):5.3f}x (rounds {min(ratios):.3f}-{max(ratios):.3f}x)"
        )
        if INTERPRETED in runs:
            # What compiling pipeline.py adds to the rest of the rework.
            source_us = med(runs[INTERPRETED]) * us
            ratios = [c / i for c, i in zip(runs["current"], runs[INTERPRETED], strict=True)]
            print(
                f"  {'':<8} {INTERPRETED} {source_us:7.2f} us: compiled/interpreted"
                f" {med(ratios):5.3f}x (rounds {min(ratios):.3f}-{max(ratios):.3f}x)"
            )


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--rounds", type=int, default=7)
    args.add_argument("--calls", type=int, default=4000, help="calls per contender a round")
    args.add_argument("--slice", type=int, default=200, help="calls per contender in turn")
    args.add_argument("--turn", type=int, default=24, help="datagrams per event loop turn")
    args.add_argument("--quick", action="store_true", help="a few hundred calls, one round")
    opts = args.parse_args(argv)
    if opts.quick:
        opts.rounds, opts.calls, opts.slice = 1, 300, 100
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run(opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
