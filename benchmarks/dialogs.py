"""Memory per open dialog and correlator throughput, measured in one run.

Memory: tracemalloc over 100,000 open calls built from a realistic carrier INVITE
(half of them answered), after the parsed messages are gone, so what remains is what
the correlator holds. Throughput: full call flows (INVITE, 100, 180, 200, ACK, BYE,
200) through parse + correlate, against parse alone on the same messages.

    python benchmarks/dialogs.py [--calls 100000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from samples import BYE, INVITE, OK_200
from sipcdr import hotpath
from sipcdr.dialog import Correlator, DialogLimits
from sipcdr.model import Packet
from sipcdr.sip import parse

CALL_ID = b"8f2d3c4b5a69@198.51.100.10"
TO_TAG = b";tag=as6b1c1a2e"


def _flow(n: int) -> list[bytes]:
    call_id = b"%08x-%s" % (n, CALL_ID)
    invite = INVITE.replace(CALL_ID, call_id)
    ok = OK_200.replace(CALL_ID, call_id)
    trying = ok.replace(b"200 OK", b"100 Trying").replace(TO_TAG, b"")
    ringing = ok.replace(b"200 OK", b"180 Ringing")
    ack = (
        BYE.replace(CALL_ID, call_id)
        .replace(b"BYE sip", b"ACK sip")
        .replace(b"103 BYE", b"102 ACK")
    )
    bye = BYE.replace(CALL_ID, call_id)
    bye_ok = ok.replace(b"102 INVITE", b"103 BYE")
    return [invite, trying, ringing, ok, ack, bye, bye_ok]


def _packet(timestamp: float, data: bytes) -> Packet:
    return Packet(timestamp, "198.51.100.10", 5060, "203.0.113.5", 5060, "udp", data, "bench")


def bytes_per_dialog(calls: int) -> float:
    flows = [_flow(n) for n in range(calls)]
    correlator = Correlator(DialogLimits(max_open_dialogs=calls + 1))
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for n, flow in enumerate(flows):
        steps = flow[:4] if n % 2 else flow[:3]  # odd calls answered, even ones ringing
        for data in steps:
            correlator.feed(_packet(1_700_000_000.0 + n * 0.001, data), parse(data))
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert correlator.open_dialogs == calls
    return held / calls


def rate(
    flows: list[list[bytes]],
    correlate: bool,
    parse: Callable[[bytes], Any] = parse,
    correlator_class: Callable[[], Any] = Correlator,
) -> float:
    correlator = correlator_class()
    started = time.perf_counter()
    messages = 0
    for n, flow in enumerate(flows):
        timestamp = 1_700_000_000.0 + n
        for data in flow:
            msg = parse(data)
            if correlate:
                correlator.feed(_packet(timestamp, data), msg)
            messages += 1
    return messages / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--calls", type=int, default=100_000)
    args.add_argument("--rounds", type=int, default=5)
    args.add_argument("--flows", type=int, default=3000, help="call flows per throughput round")
    opts = args.parse_args(argv)

    per_dialog = bytes_per_dialog(opts.calls)
    print(f"memory: {per_dialog:,.0f} bytes per open dialog at {opts.calls:,} open calls")

    flows = [_flow(n) for n in range(opts.flows)]
    # The same source interpreted: what compiling the parser and the correlator gives.
    interpreted = hotpath.load_interpreted()
    slow_parse = interpreted["sipcdr.sip.parser"].parse
    slow_correlator = interpreted["sipcdr.dialog.correlator"].Correlator
    parse_only: list[float] = []
    full: list[float] = []
    slow_parse_only: list[float] = []
    slow_full: list[float] = []
    for _ in range(opts.rounds):
        parse_only.append(rate(flows, correlate=False))
        full.append(rate(flows, correlate=True))
        slow_parse_only.append(rate(flows, False, slow_parse, slow_correlator))
        slow_full.append(rate(flows, True, slow_parse, slow_correlator))
    parse_rate = statistics.median(parse_only)
    full_rate = statistics.median(full)
    print(f"hot path: {' '.join(hotpath.hot_path()).strip()}")
    print(f"median of {opts.rounds} rounds, {opts.flows} call flows of 7 messages each")
    print(f"  parse only                 {parse_rate:>10,.0f} msg/s")
    print(f"  parse + correlate          {full_rate:>10,.0f} msg/s")
    print(f"  correlation costs {parse_rate / full_rate - 1:.0%} on top of parsing")
    slow_parse_rate = statistics.median(slow_parse_only)
    slow_full_rate = statistics.median(slow_full)
    print(f"  interpreted: parse only    {slow_parse_rate:>10,.0f} msg/s")
    print(f"  interpreted: + correlate   {slow_full_rate:>10,.0f} msg/s")
    correlate_us = 1e6 / full_rate - 1e6 / parse_rate
    slow_correlate_us = 1e6 / slow_full_rate - 1e6 / slow_parse_rate
    print(
        f"  correlation per message: {correlate_us:.2f} us, interpreted {slow_correlate_us:.2f} us"
        f" ({slow_correlate_us / correlate_us:.2f}x)"
    )
    print(f"  parse + correlate / interpreted    {full_rate / slow_full_rate:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
