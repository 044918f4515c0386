"""What each CDR costs after the correlator closes it, against parse + correlate of
its call, in one run: the enrich and rate stages (as the engine runs them, in one copy
of the CDR, and each alone), the CDR record and its JSON.

The traffic and the configuration are `benchmarks/fraud.py`'s (50 trunks with a
country code and a rate plan, 5 % of calls abroad, 7-message flows); the CDRs are
what a bare correlator closes from it. Each figure is the median of `--rounds`
rounds of processor time per CDR; the baseline, parse + correlate of the call's
seven messages, is timed in the same rounds, so a change in this shared machine's
speed falls on both. The copy every changing stage makes of the frozen record
(`replace_cdr`) is timed beside `dataclasses.replace`, which it replaced, on the
same record, and `rfc3339` beside a cache of the last second only, its former form.
The engine's enrich-and-rate stage is timed beside the former chain of the two stages,
each with a copy of its own and the rate stage pricing every call afresh (the former
code, kept here), and must give the same CDRs. The record and its JSON are made as the
spool's writer makes them, each dropped once written: kept, the rounds' thousands of
fresh allocations would be timed as page faults rather than as the work.

    python benchmarks/stages.py [--flows 3000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from formerstages import former_enrich, former_rate, former_record
from fraud import Traffic, _config, _Discard
from sipcdr.config import Config, load_config
from sipcdr.dialog import Correlator
from sipcdr.engine import Destinations, build_engine
from sipcdr.enrich import EnrichRateStage
from sipcdr.model import (
    Cdr,
    Packet,
    replace_cdr,
    rfc3339,
)
from sipcdr.sip import parse

_last_second: list[object] = [None, ""]


def _rfc3339_one_second(timestamp: float) -> str:
    """The former form: only the last second's text remembered."""
    micros = round(timestamp * 1_000_000)
    second, fraction = divmod(micros, 1_000_000)
    if second != _last_second[0]:
        _last_second[0] = second
        _last_second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_last_second[1]}.{fraction:06d}Z"


def _timed(step: Callable[[], object]) -> float:
    clock = time.process_time
    started = clock()
    step()
    return clock() - started


def _round(config: Config, packets: list[Packet], swap: bool) -> tuple[dict[str, float], int]:
    """Each step once over the traffic's CDRs, in order: its processor seconds."""
    engine = build_engine(config, Destinations(cdrs=(_Discard(),)))
    enrich, rate = engine.enrich, engine.rates.stage
    both = EnrichRateStage(enrich, rate)
    feed = Correlator(config.dialog, egress=bool(config.trunks)).feed
    closed: list[Cdr] = []
    enriched: list[Cdr] = []
    rated: list[Cdr] = []
    once: list[Cdr] = []
    former: list[Cdr] = []

    def records() -> None:
        for cdr in rated:
            cdr.to_record()

    def former_records() -> None:
        for cdr in rated:
            former_record(cdr)

    def records_json() -> None:
        dumps = orjson.dumps
        for cdr in rated:
            dumps(cdr.to_record())

    def correlate() -> None:
        for packet in packets:
            closed.extend(feed(packet, parse(packet.payload)))

    def times(fmt: Callable[[float], str | None]) -> None:
        for cdr in rated:
            fmt(cdr.start_time), fmt(cdr.ring_time or 0.0)
            fmt(cdr.answer_time or 0.0), fmt(cdr.end_time)

    steps: dict[str, Callable[[], object]] = {
        BASELINE: correlate,
        NEW_BOTH: lambda: once.extend(map(both.on_cdr, closed)),
        OLD_BOTH: lambda: former.extend(
            former_rate(rate, former_enrich(enrich, c)) for c in closed
        ),
        "enrich stage alone": lambda: enriched.extend(map(enrich.on_cdr, closed)),
        "rate stage alone": lambda: rated.extend(map(rate.on_cdr, enriched)),
        NEW_RECORD: records,
        OLD_RECORD: former_records,
        "record + JSON (the writer's)": records_json,
        NEW_COPY: lambda: [replace_cdr(c, caller="1", egress_ip=None) for c in rated],
        OLD_COPY: lambda: [dataclasses.replace(c, caller="1", egress_ip=None) for c in rated],
        NEW_TIMES: lambda: times(rfc3339),
        OLD_TIMES: lambda: times(_rfc3339_one_second),
    }
    if swap:  # each pair of forms in the other order every other round
        for first, second in ((NEW_BOTH, OLD_BOTH), (NEW_RECORD, OLD_RECORD)):
            order = list(steps)
            i, j = order.index(first), order.index(second)
            order[i], order[j] = order[j], order[i]
            steps = {name: steps[name] for name in order}
    gc.collect()
    gc.disable()
    try:
        seconds = {name: _timed(step) for name, step in steps.items()}
    finally:
        gc.enable()
    if [c.to_record() for c in once] != [c.to_record() for c in former] or once != rated:
        sys.exit("the enrich-and-rate stage gave other CDRs than the former two stages")
    if [orjson.dumps(c.to_record()) for c in rated] != [
        orjson.dumps(former_record(c)) for c in rated
    ]:
        sys.exit("to_record gave other bytes than its former form")
    return seconds, len(rated)


BASELINE = "parse + correlate (baseline)"
NEW_BOTH = "enrich+rate: one copy"
OLD_BOTH = "enrich, rate: former, 2 copies"
NEW_RECORD = "CDR record (to_record)"
OLD_RECORD = "CDR record: former form"
NEW_COPY = "copy: replace_cdr"
OLD_COPY = "copy: dataclasses.replace"
NEW_TIMES = "4 times: rfc3339"
OLD_TIMES = "4 times: last second only"


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--flows", type=int, default=3000)
    args.add_argument("--rounds", type=int, default=7)
    opts = args.parse_args(argv)
    packets = [packet for packet, _trunk in Traffic(opts.flows).items]
    figures: dict[str, list[float]] = {}
    count = 0
    # The config names its rate deck by a path in this folder, read when each round's
    # engine is built: the folder lives as long as the rounds do.
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(_config(Path(folder), False), {})
        for index in range(opts.rounds):
            seconds, count = _round(config, packets, swap=index % 2 == 1)
            for name, value in seconds.items():
                figures.setdefault(name, []).append(value)
    base = statistics.median(figures[BASELINE])
    print(
        f"median of {opts.rounds} rounds, {count:,} CDRs ({len(packets):,} messages),"
        " processor time per CDR; the machine may be shared, the ratios are same-run"
        f" (load {os.getloadavg()[0]:.1f})"
    )
    for name, seconds_of in figures.items():
        median = statistics.median(seconds_of)
        print(f"  {name:32} {median / count * 1e6:8.2f} us   {median / base:6.1%} of baseline")
    ratio = statistics.median(figures[NEW_BOTH]) / statistics.median(figures[OLD_BOTH])
    print(f"enrich and rate cost {ratio:.0%} of their former form")
    ratio = statistics.median(figures[NEW_RECORD]) / statistics.median(figures[OLD_RECORD])
    print(f"to_record costs {ratio:.0%} of its former form")
    ratio = statistics.median(figures[NEW_COPY]) / statistics.median(figures[OLD_COPY])
    print(f"replace_cdr costs {ratio:.0%} of dataclasses.replace")
    ratio = statistics.median(figures[NEW_TIMES]) / statistics.median(figures[OLD_TIMES])
    print(f"rfc3339 costs {ratio:.0%} of its one-second form")
    return 0


if __name__ == "__main__":
    sys.exit(main())
