"""What remembering a restricted subject's call costs, below its bound and at it.

`RestrictedCalls.add` runs for every CDR of a restricted subject, once for the Kafka
filter and once for the PostgreSQL sink. Below `RESTRICTED_CALLS_KEPT` calls it is an
insertion; at the bound every insertion also forgets the oldest call. A busy
restricted number (a contact centre's) keeps it at the bound for as long as the
restriction lasts, so the cost there must stay that of an insertion.

- below (baseline): a fresh `RestrictedCalls` taking calls up to just under its bound
- at the bound: one kept full, taking as many calls again, each forgetting the oldest

Figures are CPU microseconds per call (process time), the median of several rounds;
the ratio is of the same round.

    python benchmarks/restricted_calls.py [--rounds 5] [--number 60000]
"""

from __future__ import annotations

import argparse
import statistics
import time

from sipcdr.privacy.outbound import RESTRICTED_CALLS_KEPT, RestrictedCalls

NUMBERS = ("4940555666",)


def below(number: int) -> float:
    calls = RestrictedCalls()
    names = [f"b{n}@example.net" for n in range(number)]
    started = time.process_time()
    for name in names:
        calls.add(name, NUMBERS)
    return (time.process_time() - started) / number * 1e6


def at_bound(number: int) -> float:
    calls = RestrictedCalls()
    for n in range(RESTRICTED_CALLS_KEPT):
        calls.add(f"k{n}@example.net", NUMBERS)
    names = [f"a{n}@example.net" for n in range(number)]
    started = time.process_time()
    for name in names:
        calls.add(name, NUMBERS)
    assert len(calls) == RESTRICTED_CALLS_KEPT
    return (time.process_time() - started) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--number", type=int, default=60_000)
    args = parser.parse_args()
    number = min(args.number, RESTRICTED_CALLS_KEPT - 1)
    pairs = [(below(number), at_bound(number)) for _ in range(args.rounds)]
    base = statistics.median(b for b, _ in pairs)
    full = statistics.median(a for _, a in pairs)
    ratio = statistics.median(a / b for b, a in pairs)
    print(f"restricted calls, {number} calls a round, {args.rounds} rounds (CPU time, medians)")
    print(f"  below the bound (baseline): {base:.2f} us per call")
    print(f"  at the bound ({RESTRICTED_CALLS_KEPT} kept): {full:.2f} us per call ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
