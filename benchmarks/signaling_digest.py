"""The signaling record's message-id digest per SIP message, taken from a copy of the
namespace's hash (now) against a hash begun afresh with the namespace for each
message (former); and the whole capture-side record (`spooled`, which takes the
digest as `_digest` does) against its former form (tests/support/formerspooled.py:
the end of the headers searched for, the names encoded per message).

The traffic is `benchmarks/signaling.py`'s: an INVITE and a 200 OK with SDP and a
BYE, the body cut off (the default), so every message with SDP is digested at
capture. Each round times both forms, the order alternating between rounds; figures
are the median of the rounds' processor time per message, the ratio that of the two
medians. The two forms must give the same bytes.

    python benchmarks/signaling_digest.py [--number 30000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from formerspooled import former_spooled
from signaling import traffic
from sipcdr import sipevent
from sipcdr.sipevent import _NAMESPACE, _TIME_AND_PORTS, spooled


def _former_digest(
    timestamp: float, src_port: int, dst_port: int, src: bytes, dst: bytes, payload: bytes
) -> bytes:
    hashing = hashlib.sha1(
        b"".join(
            (_NAMESPACE, _TIME_AND_PORTS.pack(timestamp, src_port, dst_port), src, b"|", dst, b"|")
        ),
        usedforsecurity=False,
    )
    hashing.update(payload)
    return hashing.digest()[:16]


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--number", type=int, default=30000)
    args.add_argument("--rounds", type=int, default=9)
    opts = args.parse_args(argv)
    pairs = traffic(opts.number)
    fields = [
        (p.timestamp, p.src_port, p.dst_port, p.src_ip.encode(), p.dst_ip.encode(), p.payload)
        for p, _msg in pairs
    ]
    forms: dict[str, tuple[Callable[..., bytes], Callable[..., bytes]]] = {
        "now": (sipevent._digest, spooled),
        "former": (_former_digest, former_spooled),
    }
    figures: dict[str, list[float]] = {}
    values: dict[str, list[bytes]] = {}
    for index in range(opts.rounds):
        order = list(forms) if index % 2 == 0 else list(reversed(forms))
        for name in order:
            digest, spool = forms[name]
            gc.disable()
            started = time.process_time()
            digests = [digest(*item) for item in fields]
            middle = time.process_time()
            out = [spool(packet, msg, False) for packet, msg in pairs]
            ended = time.process_time()
            gc.enable()
            figures.setdefault(f"digest: {name}", []).append(middle - started)
            figures.setdefault(f"spooled: {name}", []).append(ended - middle)
            values[name] = out + digests
    if values["now"] != values["former"]:
        sys.exit("the two forms gave other bytes")
    count = len(pairs)
    print(
        f"median of {opts.rounds} rounds, {count:,} messages, processor time per message;"
        f" same-run ratios (load {os.getloadavg()[0]:.1f})"
    )
    for name, seconds in figures.items():
        print(f"  {name:20} {statistics.median(seconds) / count * 1e6:8.3f} us")
    for part in ("digest", "spooled"):
        ratio = statistics.median(figures[f"{part}: now"]) / statistics.median(
            figures[f"{part}: former"]
        )
        print(f"{part} costs {ratio:.0%} of its former form")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
