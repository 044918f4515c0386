"""What the fraud detectors cost, against the pipeline they run in, in one run; and
the memory they hold under a spray of random subjects.

Timed sections run with the cyclic garbage collector off (as `timeit` does): its
passes land in whichever section happens to allocate past its threshold, which made
rounds on this shared machine differ by more than the detectors cost.

Cost: carrier call flows (INVITE, 100, 180, 200, ACK, BYE, 200; 5 % of calls abroad,
50 trunks, distinct numbers) through parse + correlate (the pipeline's per-message
work, measured here as the baseline), then the same parsed messages through
`FraudMonitor.on_message` and the correlator's CDRs through `on_cdr`. The target is
under 10 % of the baseline. Then the same bytes through the daemon's `Pipeline` as
wired, without and with the fraud stage (its trunk lookup by source, the CDR's
`fraud_flags`, alerts to a writer), so what the stage adds to a packet's whole path
is measured too.

Memory: INVITEs from `--spray` distinct source addresses with distinct caller and
callee numbers (1,000 a second, none repeating, every one counted by several
detectors), with the shipped caps; the process's resident size is read as the spray
grows and must level off once every cap is reached.

    python benchmarks/fraud.py [--flows 3000] [--rounds 5] [--spray 1000000]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import random
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from samples import BYE, INVITE, OK_200
from sipcdr.dialog import Correlator
from sipcdr.fraud import FraudMonitor, FraudSettings, TrunkSettings
from sipcdr.fraud.stage import FraudStage
from sipcdr.model import Cdr, FraudAlert, Packet, Trunk
from sipcdr.pipeline import Pipeline
from sipcdr.sip import SipMessage, parse

CALL_ID = b"8f2d3c4b5a69@198.51.100.10"
CALLEE = b"+4930901820"
CALLER = b"+4940123456"
TO_TAG = b";tag=as6b1c1a2e"
TRUNKS = 50


@contextlib.contextmanager
def _timed() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


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


class Traffic:
    """Call flows as bytes, and as the pipeline hands them on: packet, parsed message,
    trunk; with the CDRs the correlator closes."""

    def __init__(self, flows: int) -> None:
        rng = random.Random(3)
        self.items: list[tuple[bytes, Packet, str]] = []
        for n in range(flows):
            start = 1_790_000_000.0 + n * 0.2
            trunk = f"trunk-{n % TRUNKS}"
            source = f"10.{n % TRUNKS}.0.1"
            for k, data in enumerate(_flow(n, rng)):
                t = start + (0.0, 0.05, 1.0, 5.0, 5.05, 65.0, 65.05)[k]
                request = k in (0, 4, 5)
                src, dst = (source, "203.0.113.5") if request else ("203.0.113.5", source)
                self.items.append(
                    (data, Packet(t, src, 5060, dst, 5060, "udp", data, "bench"), trunk)
                )
        self.items.sort(key=lambda item: item[1].timestamp)
        self.parsed: list[tuple[SipMessage, Packet, str | None]] = []
        self.cdrs: list[Cdr] = []

    def pipeline(self) -> float:
        """Parse and correlate every message; seconds taken. The parsed messages and
        CDRs the detectors are fed afterwards are collected in a second, untimed pass:
        holding them during the timed one would make the collector walk them, a cost
        the pipeline does not have (it keeps no message)."""
        correlator = Correlator()
        feed = correlator.feed
        with _timed():
            started = time.perf_counter()
            for data, packet, _trunk in self.items:
                feed(packet, parse(data))
            elapsed = time.perf_counter() - started
        correlator = Correlator()
        parsed: list[tuple[SipMessage, Packet, str | None]] = []
        cdrs: list[Cdr] = []
        for data, packet, trunk in self.items:
            msg = parse(data)
            cdrs += correlator.feed(packet, msg)
            parsed.append((msg, packet, trunk if packet.src_ip != "203.0.113.5" else None))
        self.parsed, self.cdrs = parsed, cdrs
        return elapsed

    def fraud(self) -> tuple[float, float]:
        """Every message through on_message and every CDR through on_cdr, each
        interleaved as the engine will (a CDR after the message that closed it is not
        needed for the cost); seconds taken for each."""
        monitor = FraudMonitor(_settings(), rating=True)
        on_message = monitor.on_message
        with _timed():
            started = time.perf_counter()
            for msg, packet, trunk in self.parsed:
                on_message(msg, packet, packet.timestamp, trunk)
            per_message = time.perf_counter() - started
        # The walk over the list is this benchmark's, not the detectors': taken out.
        started = time.perf_counter()
        for _msg, packet, _trunk in self.parsed:
            packet.timestamp  # noqa: B018 - the same attribute read as above
        per_message -= time.perf_counter() - started
        cost = Decimal("0.0123")
        on_cdr = monitor.on_cdr
        with _timed():
            started = time.perf_counter()
            for cdr in self.cdrs:
                on_cdr(cdr, cost)
            per_cdr = time.perf_counter() - started
        return per_message, per_cdr


class _Discard:
    """A CDR sink and alert writer that keeps nothing: the spool is not measured."""

    name = "discard"

    def write(self, cdr: Cdr) -> None:
        pass

    def flush(self) -> None:
        pass

    def write_alert(self, alert: FraudAlert) -> bool:
        return True


def _trunk_of(source: str) -> Trunk | None:
    # The benchmark's sources are 10.<trunk>.0.1; a dict stands in for the resolver,
    # whose result the stage caches per source anyway.
    return _TRUNKS.get(source)


_TRUNKS = {f"10.{n}.0.1": Trunk(f"trunk-{n}", "49", "0", None) for n in range(TRUNKS)}


def wired(traffic: Traffic, with_stage: bool) -> float:
    """Every packet through `Pipeline.process` (parse, stages, correlate, CDR stages,
    sink), with or without the fraud stage; seconds taken."""
    sink = _Discard()
    pipeline = Pipeline(Correlator(), [sink])
    if with_stage:
        stage = FraudStage(_settings(), sink, _trunk_of, rating=True)
        pipeline = Pipeline(Correlator(), [sink], (stage,), (stage,))
    process = pipeline.process
    packets = [packet for _data, packet, _trunk in traffic.items]
    with _timed():
        started = time.perf_counter()
        for packet in packets:
            process(packet)
        return time.perf_counter() - started


def cost(flows: int, rounds: int) -> None:
    """Each round measures the pipeline and then the detectors on its output, so the
    ratio is taken within a round (this machine's speed varies from minute to minute);
    the median round is reported."""
    traffic = Traffic(flows)
    rows: list[tuple[float, float, float, float]] = []  # (ratio, pipeline, message, CDR)
    for _ in range(rounds):
        pipeline = traffic.pipeline()
        per_message, per_cdr = traffic.fraud()
        rows.append(((per_message + per_cdr) / pipeline, pipeline, per_message, per_cdr))
    ratio, base, on_message, on_cdr = sorted(rows)[len(rows) // 2]
    count = len(traffic.items)
    cdrs = len(traffic.cdrs)
    print(f"median of {rounds} rounds, {flows:,} call flows ({count:,} messages, {cdrs:,} CDRs)")
    print(f"  parse + correlate          {base / count * 1e6:8.2f} us/msg")
    print(f"  fraud on_message           {on_message / count * 1e6:8.2f} us/msg")
    print(f"  fraud on_cdr               {on_cdr / cdrs * 1e6:8.2f} us/CDR")
    print(f"  fraud, a call's messages   {on_message / cdrs * 1e6:8.2f} us/call")
    spread = sorted(r[0] for r in rows)
    print(
        f"fraud detectors cost {ratio:.1%} of parse + correlate"
        f" (rounds from {spread[0]:.1%} to {spread[-1]:.1%})"
    )
    # As wired: the pipeline without the stage, with it, and without again, per round.
    added: list[tuple[float, float, float]] = []
    for _ in range(rounds):
        before = wired(traffic, with_stage=False)
        staged = wired(traffic, with_stage=True)
        after = wired(traffic, with_stage=False)
        plain = (before + after) / 2
        added.append(((staged - plain) / plain, plain, staged))
    share, plain, staged = sorted(added)[len(added) // 2]
    print(f"  pipeline, no stages        {plain / count * 1e6:8.2f} us/msg")
    print(f"  pipeline, fraud stage      {staged / count * 1e6:8.2f} us/msg")
    shares = sorted(a[0] for a in added)
    print(
        f"the fraud stage adds {share:.1%} to the pipeline as wired"
        f" (rounds from {shares[0]:.1%} to {shares[-1]:.1%})"
    )


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
    opts = args.parse_args(argv)
    cost(opts.flows, opts.rounds)
    spray(opts.spray)
    return 0


if __name__ == "__main__":
    sys.exit(main())
