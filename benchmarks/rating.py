"""Rating: deck load time, prefix look-ups per second, and the rate stage's cost per
CDR against the pipeline's cost per call, all measured in one run.

The deck is a generated A-Z deck shaped like a carrier's: real country codes, area
and mobile ranges down to 9 digits, 100,000 prefixes, a tenth of them with a price
change (an open-ended row superseded by a later one), some closed by effective_to.
Look-ups are full numbers under those prefixes (and a few unknown ones) at times
spread across the price change. The look-up index is timed against a trie of
per-digit dicts, the alternative it was chosen over. The pipeline baseline is
`Pipeline.process` of a 7-message call flow (benchmarks/dialogs.py) without CDR
stages, and again with the rate stage; the stage alone is timed on sample CDRs
priced on both sides (customer and vendor trunk): its cost per CDR against the
pipeline's, measured in the same run.

    python benchmarks/rating.py [--prefixes 100000] [--lookups 200000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dialogs import _flow
from samples import cdrs
from sipcdr.dialog import Correlator
from sipcdr.model import Cdr, Packet, Trunk
from sipcdr.pipeline import Pipeline
from sipcdr.rating import RateStage, load_rate_plans
from sipcdr.rating.deck import Rate
from sipcdr.rating.index import PrefixIndex

# Country codes of ITU-T E.164 (a broad sample; the deck's shape, not a directory).
COUNTRY_CODES = """
1 7 20 27 30 31 32 33 34 36 39 40 41 43 44 45 46 47 48 49 51 52 53 54 55 56 57 58 60
61 62 63 64 65 66 81 82 84 86 90 91 92 93 94 95 98 211 212 213 216 218 220 221 222
223 224 225 226 227 228 229 230 231 232 233 234 235 236 237 238 239 240 241 242 243
244 245 246 248 249 250 251 252 253 254 255 256 257 258 260 261 262 263 264 265 266
267 268 269 290 291 297 298 299 350 351 352 353 354 355 356 357 358 359 370 371 372
373 374 375 376 377 378 380 381 382 383 385 386 387 389 420 421 423 500 501 502 503
504 505 506 507 508 509 590 591 592 593 594 595 596 597 598 599 670 672 673 674 675
676 677 678 679 680 681 682 683 685 686 687 688 689 690 691 692 850 852 853 855 856
880 886 960 961 962 963 964 965 966 967 968 970 971 972 973 974 975 976 977 992 993
994 995 996 998
""".split()
START = "2025-01-01"
CHANGE = "2026-01-01"  # the price change at midnight UTC
CHANGE_EPOCH = 1_767_225_600.0
HEADER = (
    "prefix,destination,rate,connect_fee,min_seconds,increment_seconds,"
    "effective_from,effective_to,currency,change\n"
)
INCREMENTS = ["60,60", "30,6", "1,1", "60,1"]


def deck_csv(prefixes: int, seed: int = 11) -> tuple[bytes, list[str]]:
    """A deck of `prefixes` distinct prefixes (rows: more, for price changes)."""
    rng = random.Random(seed)
    chosen: set[str] = set(COUNTRY_CODES)
    while len(chosen) < prefixes:
        cc = rng.choice(COUNTRY_CODES)
        chosen.add(cc + "".join(rng.choices("0123456789", k=rng.randint(1, 9 - len(cc)))))
    rows = [HEADER]
    for prefix in sorted(chosen):
        name = f"Destination {prefix[:3]} {len(prefix)}"
        price = rng.randrange(5, 5000)
        old = f"{prefix},{name},{price / 10000:.4f}"
        fee = "0" if rng.random() < 0.9 else "0.0100"
        steps = rng.choice(INCREMENTS)
        roll = rng.random()
        if roll < 0.10:  # price change: the old row ends where the new one begins
            rows.append(f"{old},{fee},{steps},{START},,USD,\n")
            new = price + rng.randrange(-4, 50)
            change = "increase" if new > price else "decrease"
            rows.append(
                f"{prefix},{name},{max(new, 1) / 10000:.4f},{fee},{steps},{CHANGE},,USD,{change}\n"
            )
        elif roll < 0.11 and len(prefix) > 3:  # closed at the change
            rows.append(f"{old},{fee},{steps},{START},{CHANGE},USD,\n")
        else:
            rows.append(f"{old},{fee},{steps},{START},,USD,\n")
    return "".join(rows).encode(), sorted(chosen)


def lookups(prefixes: list[str], count: int, seed: int = 12) -> list[tuple[str, float]]:
    """Full numbers under the deck's prefixes (1 in 20 unknown), times around the change."""
    rng = random.Random(seed)
    work = []
    for _ in range(count):
        if rng.random() < 0.05:
            number = "999" + "".join(rng.choices("0123456789", k=9))
        else:
            prefix = rng.choice(prefixes)
            number = prefix + "".join(rng.choices("0123456789", k=max(0, 12 - len(prefix))))
        work.append((number, CHANGE_EPOCH + rng.uniform(-86_400 * 30, 86_400 * 30)))
    return work


class Trie:
    """The alternative: one dict per digit, periods at the node where a prefix ends."""

    def __init__(self, index: PrefixIndex) -> None:
        self.root: dict[str, object] = {}
        for prefix, periods in index._table.items():
            node = self.root
            for digit in prefix:
                node = node.setdefault(digit, {})  # type: ignore[assignment]
            node[""] = periods

    def lookup(self, digits: str, moment: float) -> Rate | None:
        node: dict[str, object] | None = self.root
        matched = []
        for digit in digits:
            node = node.get(digit)  # type: ignore[assignment, union-attr]
            if node is None:
                break
            periods = node.get("")
            if periods is not None:
                matched.append(periods)
        for periods in reversed(matched):
            for start, end, row in periods:  # type: ignore[attr-defined]
                if start <= moment < end:
                    return row  # type: ignore[no-any-return]
        return None


def per_second(work: list[tuple[str, float]], lookup: Callable[[str, float], object]) -> float:
    started = time.perf_counter()
    for digits, moment in work:
        lookup(digits, moment)
    return len(work) / (time.perf_counter() - started)


def stage_seconds_per_cdr(stage: RateStage, calls: list[Cdr]) -> float:
    """The rate stage itself: callee number, both sides priced, the CDR copied."""
    on_cdr = stage.on_cdr
    started = time.perf_counter()
    for cdr in calls:
        on_cdr(cdr)
    return (time.perf_counter() - started) / len(calls)


def pipeline_seconds_per_cdr(flows: list[list[bytes]], stages: tuple[RateStage, ...]) -> float:
    """The pipeline's path per closed call: parse and correlate its 7 messages, then
    the CDR stages (none, or the rate stage) before the sinks (none here)."""
    pipeline = Pipeline(Correlator(), (), stages=stages)
    process = pipeline.process
    started = time.perf_counter()
    for n, flow in enumerate(flows):
        timestamp = CHANGE_EPOCH + n
        for data in flow:
            process(Packet(timestamp, "198.51.100.10", 5060, "203.0.113.5", 5060, "udp", data, "b"))
    assert pipeline.cdrs_written == len(flows)
    return (time.perf_counter() - started) / len(flows)


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--prefixes", type=int, default=100_000)
    args.add_argument("--lookups", type=int, default=200_000)
    args.add_argument("--cdrs", type=int, default=20_000)
    args.add_argument("--flows", type=int, default=3000, help="call flows per baseline round")
    args.add_argument("--rounds", type=int, default=5)
    opts = args.parse_args(argv)

    data, prefixes = deck_csv(opts.prefixes)
    now = CHANGE_EPOCH
    loads = []
    plans = None
    for _ in range(opts.rounds):
        started = time.perf_counter()
        load = load_rate_plans({"wholesale": data}, "wholesale", 4, now)
        loads.append(time.perf_counter() - started)
        assert not load.refused, load.reports["wholesale"].errors[:3]
        plans = load.plans
    assert plans is not None
    deck = plans.decks["wholesale"]
    print(
        f"deck: {deck.index.size:,} prefixes, {deck.rows:,} rows, {len(data) / 1e6:.1f} MB; "
        f"median of {opts.rounds} rounds"
    )
    print(f"  load (check + index)       {statistics.median(loads):>10.3f} s")

    work = lookups(prefixes, opts.lookups)
    trie = Trie(deck.index)
    for digits, moment in work[:2000]:
        assert trie.lookup(digits, moment) == deck.index.lookup(digits, moment)
    index_rates = []
    trie_rates = []
    for _ in range(opts.rounds):
        index_rates.append(per_second(work, deck.index.lookup))
        trie_rates.append(per_second(work, trie.lookup))
    index_rate = statistics.median(index_rates)
    trie_rate = statistics.median(trie_rates)
    print(f"  look-ups, prefix dict      {index_rate:>10,.0f} /s")
    print(f"  look-ups, per-digit trie   {trie_rate:>10,.0f} /s")
    print(f"  the prefix dict answers {index_rate / trie_rate:.2f}x the trie's look-ups")

    # A customer trunk with national numbering, a vendor trunk with a cost plan: both
    # sides of every sample CDR priced, as in a proxied call.
    trunks = [
        Trunk("carrier-a", "49", "0", "wholesale"),
        Trunk("vendor-b", None, None, None, cost_plan="wholesale"),
    ]
    rate_stage = RateStage(plans, trunks)
    calls = [dataclasses.replace(c, egress_trunk="vendor-b") for c in cdrs(opts.cdrs)]
    flows = [_flow(n) for n in range(opts.flows)]
    stage = []
    pipeline = []
    pipeline_rated = []
    for _ in range(opts.rounds):
        stage.append(stage_seconds_per_cdr(rate_stage, calls))
        pipeline.append(pipeline_seconds_per_cdr(flows, ()))
        pipeline_rated.append(pipeline_seconds_per_cdr(flows, (rate_stage,)))
    stage_s = statistics.median(stage)
    pipeline_s = statistics.median(pipeline)
    rated_s = statistics.median(pipeline_rated)
    sample = RateStage(plans, trunks)
    for cdr in calls:
        sample.on_cdr(cdr)
    rated = sum(sample.stats.rated.values())
    unrated = sum(sample.stats.unrated.values())
    print(f"rate stage per CDR ({rated / (rated + unrated):.0%} of the sample CDRs rated)")
    print(f"  rate stage (both sides)    {stage_s * 1e6:>10.1f} us per CDR")
    print(f"  pipeline, no CDR stage     {pipeline_s * 1e6:>10.1f} us per CDR (7 messages)")
    print(f"  pipeline with rate stage   {rated_s * 1e6:>10.1f} us per CDR")
    print(
        f"  the rate stage costs {stage_s / pipeline_s:.1%} of the pipeline's cost per CDR "
        f"(measured in the pipeline: {(rated_s - pipeline_s) / pipeline_s:+.1%})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
