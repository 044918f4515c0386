"""The enrich stage per CDR, its E.164 rewrite of `caller` and `callee` by the compiled
`sipcdr.fraud.numbering.e164` (now) against `sipcdr.sip.numbers.to_e164` (former).

The traffic and configuration are `benchmarks/stages.py`'s (`benchmarks/fraud.py`'s:
50 trunks with a country code, 7-message flows); the CDRs are what a bare correlator
closes of it. Each round times the stage over every CDR once in each form, the order
alternating between rounds; figures are the median of the rounds' processor time per
CDR, and the ratio is of the two medians. The two forms must give the same CDRs.

    python benchmarks/enrich_numbers.py [--flows 3000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fraud import Traffic, _config, _Discard
from sipcdr.config import load_config
from sipcdr.dialog import Correlator
from sipcdr.engine import Destinations, build_engine
from sipcdr.enrich import stage as enrich_module
from sipcdr.fraud.numbering import e164
from sipcdr.model import Cdr
from sipcdr.sip import parse
from sipcdr.sip.numbers import to_e164

NOW = "enrich: fraud.numbering.e164"
FORMER = "enrich: to_e164 (former)"


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--flows", type=int, default=3000)
    args.add_argument("--rounds", type=int, default=9)
    opts = args.parse_args(argv)
    packets = [packet for packet, _trunk in Traffic(opts.flows).items]
    figures: dict[str, list[float]] = {NOW: [], FORMER: []}
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(_config(Path(folder), False), {})
        engine = build_engine(config, Destinations(cdrs=(_Discard(),)))
        enrich = engine.enrich
        feed = Correlator(config.dialog, egress=bool(config.trunks)).feed
        closed: list[Cdr] = []
        for packet in packets:
            closed.extend(feed(packet, parse(packet.payload)))
        outputs: dict[str, list[Cdr]] = {}
        for index in range(opts.rounds):
            order = (NOW, FORMER) if index % 2 == 0 else (FORMER, NOW)
            for name in order:
                enrich_module.e164 = e164 if name == NOW else to_e164  # type: ignore[attr-defined]
                gc.collect()
                gc.disable()
                started = time.process_time()
                out = list(map(enrich.on_cdr, closed))
                figures[name].append(time.process_time() - started)
                gc.enable()
                outputs[name] = out
        enrich_module.e164 = e164  # type: ignore[attr-defined]
    if outputs[NOW] != outputs[FORMER]:
        sys.exit("the two forms gave other CDRs")
    count = len(closed)
    print(
        f"median of {opts.rounds} rounds, {count:,} CDRs, processor time per CDR;"
        f" same-run ratio (load {os.getloadavg()[0]:.1f})"
    )
    for name, seconds in figures.items():
        print(f"  {name:32} {statistics.median(seconds) / count * 1e6:8.2f} us")
    ratio = statistics.median(figures[NOW]) / statistics.median(figures[FORMER])
    print(f"the enrich stage costs {ratio:.0%} of its former form")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
