"""What the fraud detectors cost, against the pipeline they run in, in one run; and
the memory they hold under a spray of random subjects.

Cost: carrier call flows (INVITE, 100, 180, 200, ACK, BYE, 200; 5 % of calls abroad,
50 trunks with a country code and a rate plan, distinct numbers) through two engines
built by `build_engine` from one config, as `sipcdr run` builds its chain: the
baseline without the fraud stage (parse, the message counts, correlate, the enrich
and rate stages, each CDR handed to a writer, the engine's once-a-second tick), and
the same with `[fraud] enabled` (the stage on each message straight after its parse,
on each CDR after rating, in the tick). Both are fed the same packets in alternating
slices of `SLICE` packets, so a change in this shared machine's speed falls on both;
the stage's cost is the difference. Each slice's messages are also handed, parsed a
moment before as in the engine, to a bare `FraudMonitor` (`on_message`, then `on_cdr`
for the CDRs they closed): the detectors' own cost per message and per CDR. Times are
this process's CPU time (time spent waiting for a core is not counted), with the
cyclic garbage collector off during the rounds (as `timeit` does: its passes land in
whichever slice allocates past its threshold).

Three baselines, all without fraud, each measured in the same run: A, the engine above
(its writer keeps nothing); B, the capture pipeline as `sipcdr run` opens it with its
defaults, in a temporary state folder: the App's own outputs and dialog store, the
engine built with `App.start`'s arguments, so each message is also appended to the
signaling spool and the dialog journal, each CDR to the records spool, with their
fsyncs once a slice (see `_Daemon`; receiving the datagram is not in it); C, parse
and correlate alone. The same pair (without and with fraud) is fed for A and for B.
The target: the fraud stage under 10 % of the pipeline it runs in.

Memory: INVITEs from `--spray` distinct source addresses with distinct caller and
callee numbers (1,000 a second, none repeating, every one counted by several
detectors), with the shipped caps and the daemon's allocator setting
(`sipcdr.limits.return_large_blocks`; `--glibc-default` leaves it out); the process's
resident size is read as the spray grows and must level off once every cap is reached.

    python benchmarks/fraud.py [--flows 3000] [--rounds 5] [--spray 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import random
import shutil
import statistics
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from samples import BYE, INVITE, OK_200
from sipcdr.app import App
from sipcdr.config import load_config
from sipcdr.dialog import Correlator
from sipcdr.engine import Destinations, Engine, JournalHooks, build_engine
from sipcdr.fraud import FraudMonitor, FraudSettings, TrunkSettings
from sipcdr.limits import return_large_blocks
from sipcdr.model import Cdr, FraudAlert, Packet
from sipcdr.private import prepare_state_dir
from sipcdr.sip import SipMessage, parse

CALL_ID = b"8f2d3c4b5a69@198.51.100.10"
CALLEE = b"+4930901820"
CALLER = b"+4940123456"
TO_TAG = b";tag=as6b1c1a2e"
TRUNKS = 50
# Packets per slice fed to each engine in turn: a few hundred calls, small enough that
# both engines see the same machine, big enough that the switch costs nothing.
SLICE = 1400


def _flow(n: int, rng: random.Random) -> list[bytes]:
    call_id = b"%08x-%s" % (n, CALL_ID)
    if rng.random() < 0.05:
        callee = b"+44%d" % rng.randrange(7 * 10**9, 8 * 10**9)
    else:
        callee = b"+4930%d" % rng.randrange(10**7, 10**8)

    caller = b"+49%d" % rng.randrange(10**9, 10**10)

    def fix(data: bytes) -> bytes:
        return data.replace(CALL_ID, call_id).replace(CALLEE, callee).replace(CALLER, caller)

    invite, ok = fix(INVITE), fix(OK_200)
    trying = ok.replace(b"200 OK", b"100 Trying").replace(TO_TAG, b"")
    ringing = ok.replace(b"200 OK", b"180 Ringing")
    ack = fix(BYE).replace(b"BYE sip", b"ACK sip").replace(b"103 BYE", b"102 ACK")
    bye = fix(BYE)
    bye_ok = ok.replace(b"102 INVITE", b"103 BYE")
    return [invite, trying, ringing, ok, ack, bye, bye_ok]


def _settings() -> FraudSettings:
    return FraudSettings(
        trunks={
            f"trunk-{n}": TrunkSettings(country_code="49", national_prefix="0")
            for n in range(TRUNKS)
        }
    )


DECK = """prefix,destination,rate,connect_fee,min_seconds,increment_seconds,effective_from,currency
49,Germany,0.0100,0,60,60,2020-01-01,EUR
44,United Kingdom,0.0200,0,60,60,2020-01-01,EUR
"""


def _config(folder: Path, fraud: bool, state: Path | None = None) -> Path:
    """The bench's trunks (sources 10.<n>.0.0/24), one rate plan, fraud on or off;
    with `state`, the daemon's state folder (its spools and dialog journal)."""
    (folder / "deck.csv").write_text(DECK, encoding="utf-8")
    lines = ["[rating]", 'decks = { bench = "deck.csv" }', 'default_plan = "bench"']
    if state is not None:
        lines = ["[state]", f'dir = "{state}"', *lines]
    lines += ["[fraud]", f"enabled = {'true' if fraud else 'false'}"]
    for n in range(TRUNKS):
        lines += [
            "[[trunks]]",
            f'name = "trunk-{n}"',
            f'sources = ["10.{n}.0.0/24"]',
            'rate_plan = "bench"',
            'country_code = "49"',
            'national_prefix = "0"',
        ]
    path = folder / (("fraud" if fraud else "plain") + ("-daemon" if state else "") + ".toml")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class Traffic:
    """Call flows as captured packets, in time order, with the trunk of each request's
    source (what the engine's trunk lookup finds)."""

    def __init__(self, flows: int) -> None:
        rng = random.Random(3)
        self.items: list[tuple[Packet, str | None]] = []
        for n in range(flows):
            start = 1_790_000_000.0 + n * 0.2
            trunk = f"trunk-{n % TRUNKS}"
            source = f"10.{n % TRUNKS}.0.1"
            for k, data in enumerate(_flow(n, rng)):
                t = start + (0.0, 0.05, 1.0, 5.0, 5.05, 65.0, 65.05)[k]
                request = k in (0, 4, 5)
                src, dst = (source, "203.0.113.5") if request else ("203.0.113.5", source)
                packet = Packet(t, src, 5060, dst, 5060, "udp", data, "bench")
                self.items.append((packet, trunk if request else None))
        self.items.sort(key=lambda item: item[0].timestamp)


class _Discard:
    """A CDR sink and alert writer that keeps nothing: the spool is not measured."""

    name = "discard"

    def __init__(self) -> None:
        self.cdrs = 0

    def write(self, cdr: Cdr) -> None:
        self.cdrs += 1

    def flush(self) -> None:
        pass

    def write_alert(self, alert: FraudAlert) -> bool:
        return True


class _Fed:
    """One engine and the capture time of its next tick, as `sipcdr import` runs it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.next_tick = 0.0
        self.seconds = 0.0

    def feed(self, packets: list[Packet]) -> None:
        engine = self.engine
        process = engine.process
        clock = time.process_time
        started = clock()
        for packet in packets:
            if packet.timestamp >= self.next_tick:
                engine.tick(packet.timestamp)
                self.next_tick = packet.timestamp + 1.0
            process(packet)
        self.seconds += clock() - started


class _Daemon(_Fed):
    """The capture process's chain as `sipcdr run` opens it with its defaults: the
    App's own correlator, outputs (role "capture": the spools of the default sinks,
    records and signaling, without the sinks, which run in the delivery process) and
    dialog store, the engine built with the same arguments as `App.start` (the spools as
    writers, the journal hooks, the intake gate, the fraud stage that keeps its
    baselines). Per capture second, as `App.tick`: the engine's tick, then the writers'
    flush. At the end of each slice (a few hundred calls, about what a busy daemon sees
    in one fsync interval), what the two fsync loops do: every spool synced (the
    buffered signaling written), the journal fsynced. Not here: receiving the datagram,
    the journal's checkpoints (written in the background), the metrics. Role "capture"
    is what the daemon takes on two cores or more (`delivery_processes = "auto"`); on
    one, the same spools are written and delivery runs in the same process."""

    def __init__(self, config: Path, loop: asyncio.AbstractEventLoop) -> None:
        self.app = App(load_config(config, {}), apart=True)
        self.loop = loop
        loop.run_until_complete(self._open())
        assert self.app.engine is not None
        super().__init__(self.app.engine)

    async def _open(self) -> None:
        app = self.app
        prepare_state_dir(app.state_dir)
        app.dialogs.recover()
        await app.outputs.open()
        app.engine = build_engine(
            app.config,
            Destinations.of(app.outputs),
            correlator=app.correlator,
            journal=JournalHooks(app.dialogs.message, app.dialogs.decided),
            intake=app.intake.intake,
            daemon_fraud=True,
            clock=app.clock,
        )
        await app.dialogs.start(app.engine.emit)

    def feed(self, packets: list[Packet]) -> None:
        engine = self.engine
        process = engine.process
        spools = list(self.app.outputs.spools.values())
        journal = self.app.dialogs
        clock = time.process_time
        started = clock()
        for packet in packets:
            if packet.timestamp >= self.next_tick:
                engine.tick(packet.timestamp)
                engine.flush()
                self.next_tick = packet.timestamp + 1.0
            process(packet)
        for spool in spools:
            spool.sync()
        journal.flush()
        self.seconds += clock() - started

    def close(self) -> None:
        app = self.app
        # What is measured must be what the daemon writes: CDRs, signaling, journal.
        written = {stream: spool.next_seq for stream, spool in app.outputs.spools.items()}
        assert len(written) == 2 and min(written.values()) > 0, written
        assert app.dialogs.stats.journal_messages > 0
        self.loop.run_until_complete(app.dialogs.stop())
        self.loop.run_until_complete(app.outputs.close(drain_timeout_s=0))
        shutil.rmtree(app.state_dir)


class _ParseCorrelate:
    """Parse and correlate alone, the narrowest baseline: the pipeline's per-message
    work without its counts, stages, tick or writer."""

    def __init__(self) -> None:
        self.correlator = Correlator()
        self.seconds = 0.0

    def feed(self, packets: list[Packet]) -> None:
        feed = self.correlator.feed
        clock = time.process_time
        started = clock()
        for packet in packets:
            feed(packet, parse(packet.payload))
        self.seconds += clock() - started


class Round:
    """One pass of the traffic through both pairs of chains (the engine, the capture
    pipeline; each without and with fraud), parse + correlate, and the bare detectors."""

    def __init__(
        self,
        traffic: Traffic,
        configs: tuple[Path, Path],
        daemon: tuple[Path, Path],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        sink = _Discard()
        destinations = Destinations(cdrs=(sink,), alerts=sink)
        self.plain = _Fed(build_engine(load_config(configs[0], {}), destinations))
        self.staged = _Fed(build_engine(load_config(configs[1], {}), destinations))
        assert self.plain.engine.fraud is None and self.staged.engine.fraud is not None
        self.daemon_plain = _Daemon(daemon[0], loop)
        self.daemon_staged = _Daemon(daemon[1], loop)
        assert self.daemon_plain.engine.fraud is None
        assert self.daemon_staged.engine.fraud is not None
        self.bare = _ParseCorrelate()
        self.monitor = FraudMonitor(_settings(), rating=True)
        self.correlator = Correlator()
        self.traffic = traffic
        self.on_message = 0.0
        self.on_cdr = 0.0
        self.cdrs = 0

    def run(self) -> None:
        items = self.traffic.items
        for index, begin in enumerate(range(0, len(items), SLICE)):
            batch = items[begin : begin + SLICE]
            packets = [packet for packet, _trunk in batch]
            chains: list[_Fed] = [self.plain, self.staged, self.daemon_plain, self.daemon_staged]
            for chain in chains if index % 2 else reversed(chains):
                chain.feed(packets)
            self.bare.feed(packets)
            self._detectors(batch)

    def _detectors(self, batch: list[tuple[Packet, str | None]]) -> None:
        parsed: list[tuple[SipMessage, Packet, str | None]] = [
            (parse(packet.payload), packet, trunk) for packet, trunk in batch
        ]
        on_message = self.monitor.on_message
        clock = time.process_time
        started = clock()
        for msg, packet, trunk in parsed:
            on_message(msg, packet, packet.timestamp, trunk)
        self.on_message += clock() - started
        cdrs: list[Cdr] = []
        feed = self.correlator.feed
        for msg, packet, _trunk in parsed:
            cdrs += feed(packet, msg)
        cost = Decimal("0.0123")
        on_cdr = self.monitor.on_cdr
        started = clock()
        for cdr in cdrs:
            on_cdr(cdr, cost)
        self.on_cdr += clock() - started
        self.cdrs += len(cdrs)

    def close(self) -> None:
        self.daemon_plain.close()
        self.daemon_staged.close()


def _ratio(label: str, values: list[float]) -> None:
    print(
        f"  {label:<44}{statistics.median(values):7.1%}"
        f"   (rounds {min(values):.1%} to {max(values):.1%})"
    )


def cost(flows: int, rounds: int) -> None:
    """Rounds of the whole traffic; the median of each figure across rounds."""
    traffic = Traffic(flows)
    count = len(traffic.items)
    done: list[Round] = []
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        configs = (_config(folder, False), _config(folder, True))
        daemon = (
            _config(folder, False, folder / "state-plain"),
            _config(folder, True, folder / "state-fraud"),
        )
        try:
            for _ in range(rounds):
                one = Round(traffic, configs, daemon, loop)
                gc.collect()
                gc.disable()
                try:
                    one.run()
                finally:
                    gc.enable()
                    one.close()
                done.append(one)
        finally:
            loop.close()
    cdrs = done[0].cdrs

    def per_msg(seconds: list[float]) -> str:
        return f"{statistics.median(seconds) / count * 1e6:8.2f} us/msg"

    detectors = [r.on_message + r.on_cdr for r in done]
    added = [r.staged.seconds - r.plain.seconds for r in done]
    added_daemon = [r.daemon_staged.seconds - r.daemon_plain.seconds for r in done]
    engine = [r.plain.seconds for r in done]
    pipeline = [r.daemon_plain.seconds for r in done]
    bare = [r.bare.seconds for r in done]
    on_message = statistics.median(r.on_message for r in done)
    on_cdr = statistics.median(r.on_cdr for r in done)
    print(
        f"median of {rounds} rounds, {flows:,} call flows ({count:,} messages, {cdrs:,} CDRs),"
        " CPU time"
    )
    print("baselines, without fraud:")
    print(f"  A. the engine                          {per_msg(engine)}")
    print("     (parse, correlate, enrich, rate, CDR to a writer that keeps nothing, tick)")
    print(f"  B. the capture pipeline as run        {per_msg(pipeline)}")
    print(
        "     (A, with the daemon's default writers: records and signaling spools,"
        " dialog journal, their fsyncs)"
    )
    print(f"  C. parse + correlate alone             {per_msg(bare)}")
    print("with the fraud stage:")
    staged = [r.staged.seconds for r in done]
    daemon_staged = [r.daemon_staged.seconds for r in done]
    print(f"  the engine                             {per_msg(staged)}")
    print(f"  the capture pipeline                   {per_msg(daemon_staged)}")
    print(f"  detectors: on_message                  {on_message / count * 1e6:8.2f} us/msg")
    print(f"  detectors: on_cdr                      {on_cdr / cdrs * 1e6:8.2f} us/CDR")
    print(f"  detectors: a call's messages           {on_message / cdrs * 1e6:8.2f} us/call")
    print("fraud detectors' own cost (on_message + on_cdr), of:")
    _ratio("A. the engine", [d / e for d, e in zip(detectors, engine, strict=True)])
    _ratio("B. the capture pipeline", [d / p for d, p in zip(detectors, pipeline, strict=True)])
    _ratio("C. parse + correlate", [d / b for d, b in zip(detectors, bare, strict=True)])
    print("the fraud stage's added cost (with it less without it), of:")
    _ratio("A. the engine", [d / e for d, e in zip(added, engine, strict=True)])
    _ratio(
        "B. the capture pipeline",
        [d / p for d, p in zip(added_daemon, pipeline, strict=True)],
    )
    _ratio(
        "B, with the cost added in the engine (A's)",
        [d / p for d, p in zip(added, pipeline, strict=True)],
    )
    _ratio(
        "C. parse + correlate (added in the engine)",
        [d / b for d, b in zip(added, bare, strict=True)],
    )
    print("the target: under 10 % of the pipeline it runs in")


def _rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * 4096


def spray(subjects: int) -> None:
    """INVITEs from `subjects` distinct addresses and numbers, none repeating."""
    template = parse(INVITE)
    monitor = FraudMonitor(_settings())
    checkpoints = sorted({max(1, subjects * n // 8) for n in (1, 2, 4, 6, 8)})
    gc.collect()
    before = _rss()
    start = 1_790_000_000.0
    print(f"spray of {subjects:,} distinct sources and numbers (INVITEs, no trunk)")
    print("  subjects    RSS growth   tracked subjects   calls followed   evicted")
    sent = 0
    for checkpoint in checkpoints:
        while sent < checkpoint:
            msg = copy.copy(template)
            number = str(10**10 + sent * 7919 % 10**10)
            msg.call_id = f"spray-{sent}"
            msg.request_uri = f"sip:+44{number}@203.0.113.5"
            msg.from_uri = f"sip:+49{number}@198.51.100.10"
            msg.raw_pai = None
            msg._pai_read = False
            source = f"{10 + sent // 65536}.{sent // 256 % 256}.{sent % 256}.1"
            now = start + sent / 1000
            monitor.on_message(
                msg, Packet(now, source, 5060, "203.0.113.5", 5060, "udp", b"", "b"), now, None
            )
            sent += 1
            if sent % 10_000 == 0:
                monitor.expire(now)
        gc.collect()
        stats = monitor.stats
        grown = (_rss() - before) / 2**20
        evicted = sum(stats.evicted.values()) + stats.calls_evicted
        tracked = sum(stats.tracked.values())
        print(
            f"  {sent:>9,}   {grown:8.1f} MiB   {tracked:>12,}"
            f"   {monitor.tracked_calls:>14,}   {evicted:>12,}"
        )


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--flows", type=int, default=3000, help="call flows per cost round")
    args.add_argument("--rounds", type=int, default=5)
    args.add_argument("--spray", type=int, default=1_000_000, help="distinct subjects sprayed")
    args.add_argument(
        "--glibc-default",
        action="store_true",
        help="leave the allocator as it is, without the daemon's return_large_blocks",
    )
    opts = args.parse_args(argv)
    # As the daemon does at start, before anything is allocated.
    taken = False if opts.glibc_default else return_large_blocks()
    print(f"large blocks returned when freed (the daemon's setting): {'yes' if taken else 'no'}")
    if opts.rounds > 0:
        cost(opts.flows, opts.rounds)
    if opts.spray > 0:
        spray(opts.spray)
    return 0


if __name__ == "__main__":
    sys.exit(main())
