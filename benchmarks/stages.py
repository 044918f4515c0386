"""What each CDR costs after the correlator closes it, against parse + correlate of
its call, in one run: the enrich stage, the rate stage, the CDR record and its JSON.

The traffic and the configuration are `benchmarks/fraud.py`'s (50 trunks with a
country code and a rate plan, 5 % of calls abroad, 7-message flows); the CDRs are
what a bare correlator closes from it. Each figure is the median of `--rounds`
rounds of processor time per CDR; the baseline, parse + correlate of the call's
seven messages, is timed in the same rounds, so a change in this shared machine's
speed falls on both. The copy every changing stage makes of the frozen record
(`replace_cdr`) is timed beside `dataclasses.replace`, which it replaced, on the
same record, and `rfc3339` beside a cache of the last second only, its former form.

    python benchmarks/stages.py [--flows 3000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fraud import Traffic, _config, _Discard
from sipcdr.config import Config, load_config
from sipcdr.dialog import Correlator
from sipcdr.engine import Destinations, build_engine
from sipcdr.model import Cdr, Packet, replace_cdr, rfc3339
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


def _round(config: Config, packets: list[Packet]) -> tuple[dict[str, float], int]:
    """Each step once over the traffic's CDRs, in order: its processor seconds."""
    engine = build_engine(config, Destinations(cdrs=(_Discard(),)))
    enrich, rate = engine.enrich, engine.rates.stage
    feed = Correlator(config.dialog, egress=bool(config.trunks)).feed
    closed: list[Cdr] = []
    enriched: list[Cdr] = []
    rated: list[Cdr] = []
    records: list[dict[str, object]] = []

    def correlate() -> None:
        for packet in packets:
            closed.extend(feed(packet, parse(packet.payload)))

    def times(fmt: Callable[[float], str | None]) -> None:
        for cdr in rated:
            fmt(cdr.start_time), fmt(cdr.ring_time or 0.0)
            fmt(cdr.answer_time or 0.0), fmt(cdr.end_time)

    steps: dict[str, Callable[[], object]] = {
        BASELINE: correlate,
        "enrich stage": lambda: enriched.extend(map(enrich.on_cdr, closed)),
        "rate stage": lambda: rated.extend(map(rate.on_cdr, enriched)),
        "CDR record (to_record)": lambda: records.extend(c.to_record() for c in rated),
        "its JSON (orjson)": lambda: [orjson.dumps(record) for record in records],
        NEW_COPY: lambda: [replace_cdr(c, caller="1", egress_ip=None) for c in rated],
        OLD_COPY: lambda: [dataclasses.replace(c, caller="1", egress_ip=None) for c in rated],
        NEW_TIMES: lambda: times(rfc3339),
        OLD_TIMES: lambda: times(_rfc3339_one_second),
    }
    gc.collect()
    gc.disable()
    try:
        return {name: _timed(step) for name, step in steps.items()}, len(rated)
    finally:
        gc.enable()


BASELINE = "parse + correlate (baseline)"
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
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(_config(Path(folder), False), {})
    figures: dict[str, list[float]] = {}
    count = 0
    for _ in range(opts.rounds):
        seconds, count = _round(config, packets)
        for name, value in seconds.items():
            figures.setdefault(name, []).append(value)
    base = statistics.median(figures[BASELINE])
    print(
        f"median of {opts.rounds} rounds, {count:,} CDRs ({len(packets):,} messages),"
        " processor time per CDR; the machine may be shared, the ratios are same-run"
    )
    for name, seconds_of in figures.items():
        median = statistics.median(seconds_of)
        print(f"  {name:32} {median / count * 1e6:8.2f} us   {median / base:6.1%} of baseline")
    ratio = statistics.median(figures[NEW_COPY]) / statistics.median(figures[OLD_COPY])
    print(f"replace_cdr costs {ratio:.0%} of dataclasses.replace")
    ratio = statistics.median(figures[NEW_TIMES]) / statistics.median(figures[OLD_TIMES])
    print(f"rfc3339 costs {ratio:.0%} of its one-second form")
    return 0


if __name__ == "__main__":
    sys.exit(main())
