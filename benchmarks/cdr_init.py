"""A closed call's record made by `Cdr`'s own `__init__` (each field set by its slot's
descriptor; now) against the frozen dataclass's (`object.__setattr__` per field;
former): alone, and within parse + correlate of the calls, which makes one per call.

The traffic is `benchmarks/stages.py`'s (`benchmarks/fraud.py`'s: 7-message flows).
Each round times both forms, the order alternating between rounds; figures are the
median of the rounds' processor time per CDR, the ratios those of the two medians.
The two forms must give the same CDRs.

    python benchmarks/cdr_init.py [--flows 3000] [--rounds 9]
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fraud import Traffic, _config
from sipcdr.config import load_config
from sipcdr.dialog import Correlator
from sipcdr.model import Cdr
from sipcdr.sip import parse

DATACLASS_INIT = Cdr.__init__.dataclass_init  # type: ignore[attr-defined]

OURS = Cdr.__init__


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--flows", type=int, default=3000)
    args.add_argument("--rounds", type=int, default=9)
    opts = args.parse_args(argv)
    packets = [packet for packet, _trunk in Traffic(opts.flows).items]
    forms = {"now": OURS, "former": DATACLASS_INIT}
    figures: dict[str, list[float]] = {}
    closed: dict[str, list[Cdr]] = {}
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(_config(Path(folder), False), {})
        for index in range(opts.rounds):
            order = list(forms) if index % 2 == 0 else list(reversed(forms))
            for name in order:
                setattr(Cdr, "__init__", forms[name])  # noqa: B010
                feed = Correlator(config.dialog, egress=bool(config.trunks)).feed
                out: list[Cdr] = []
                gc.collect()
                gc.disable()
                started = time.process_time()
                for packet in packets:
                    out.extend(feed(packet, parse(packet.payload)))
                middle = time.process_time()
                fields: list[dict[str, Any]] = [
                    {f.name: getattr(c, f.name) for f in dataclasses.fields(Cdr)} for c in out
                ]
                made = time.process_time()
                for values in fields:
                    Cdr(**values)
                ended = time.process_time()
                gc.enable()
                figures.setdefault(f"parse + correlate: {name}", []).append(middle - started)
                figures.setdefault(f"the record alone: {name}", []).append(ended - made)
                closed[name] = out
    setattr(Cdr, "__init__", OURS)  # noqa: B010
    if closed["now"] != closed["former"]:
        sys.exit("the two forms gave other CDRs")
    count = len(closed["now"])
    print(
        f"median of {opts.rounds} rounds, {count:,} CDRs ({len(packets):,} messages),"
        f" processor time per CDR; same-run ratios (load {os.getloadavg()[0]:.1f})"
    )
    for name, seconds in figures.items():
        print(f"  {name:30} {statistics.median(seconds) / count * 1e6:8.2f} us")
    for part in ("the record alone", "parse + correlate"):
        ratio = statistics.median(figures[f"{part}: now"]) / statistics.median(
            figures[f"{part}: former"]
        )
        print(f"{part} costs {ratio:.0%} of its former form")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
