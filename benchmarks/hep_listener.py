"""The HEP/UDP listener per datagram, against its former code, in one run.

HEPv3 frames of `loadgen`-style 6-message calls (as `sipcdr replay --hep` sends
them) are handed to the listener's `datagram_received` as uvloop would (no socket:
`receive.py` times receiving), with the daemon's hint check in front. Two pipelines
behind it: one that takes the packet and does nothing (what the listener itself costs:
allow-list, counter, HEP decode, agent gate, the `Packet`), and the daemon's parse and
correlate (`Pipeline` with a `Correlator`), to show the listener's share of a message.
The former listener (`former_capture.py`: a call each for the allow-list, the
counter, `handle_hep`, the gate and `hep_to_packet`) and the current one (one frame a
datagram) take turns within every round; CPU time, medians over rounds, and the ratio
current/former.

    python benchmarks/hep_listener.py [--rounds 7] [--calls 400] [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from former_capture import FormerHintedHepUdpProtocol
from sipcalls import Call, answered_call_messages
from sipcdr import hepencode
from sipcdr.capture.hints import HintedHepUdpProtocol, ListenerHint
from sipcdr.capture.listeners import AllowList, HepGate, ListenerStats
from sipcdr.config import DEFAULT_ALLOW
from sipcdr.dialog import Correlator
from sipcdr.hotpath import hot_path
from sipcdr.model import Packet
from sipcdr.pipeline import Pipeline

SENDER = ("127.0.0.1", 40000)


class _Taken:
    """A pipeline that takes each packet and does nothing with it."""

    def process(self, packet: Packet) -> None:
        return None


def frames(calls: int, first: int) -> list[bytes]:
    now = time.time()
    return [
        hepencode.encode(
            src_ip="192.0.2.10",
            dst_ip="203.0.113.20",
            src_port=5060,
            dst_port=5060,
            timestamp=now,
            payload=message,
            capture_id=2001,
        )
        for call in range(first, first + calls)
        for message in answered_call_messages(Call(f"hep-{call}@x"))
    ]


def per_datagram(protocol: Callable[..., Any], pipeline: object, data: list[bytes]) -> float:
    """CPU seconds per datagram for `data` through a fresh listener."""
    hint = ListenerHint("HEP/UDP", "127.0.0.1:9060", "plain SIP packets", "capture.sip_udp")
    listener = protocol(pipeline, AllowList(DEFAULT_ALLOW), HepGate({}), hint, ListenerStats())
    receive = listener.datagram_received
    started = time.process_time()
    for datagram in data:
        receive(datagram, SENDER)
    return (time.process_time() - started) / len(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=400, help="calls per contender a turn")
    parser.add_argument("--repeat", type=int, default=20, help="turns per round")
    args = parser.parse_args(argv)
    contenders = {"former": FormerHintedHepUdpProtocol, "current": HintedHepUdpProtocol}
    results: dict[tuple[str, str], list[float]] = {}
    call = 0
    for _ in range(args.rounds):
        spent: dict[tuple[str, str], float] = {}
        for turn in range(args.repeat):
            order = list(contenders) if turn % 2 == 0 else list(reversed(contenders))
            for behind in ("nothing", "parse + correlate"):
                for name in order:
                    data = frames(args.calls, call)  # new Call-IDs for every pipeline
                    call += args.calls
                    pipeline: object = (
                        _Taken() if behind == "nothing" else Pipeline(Correlator(), ())
                    )
                    key = (behind, name)
                    spent[key] = spent.get(key, 0.0) + per_datagram(
                        contenders[name], pipeline, data
                    )
        for key, seconds in spent.items():
            results.setdefault(key, []).append(seconds / args.repeat)
    kind, why = hot_path()
    print(
        f"HEP/UDP listener, {args.calls:,} 6-message calls a turn, {args.repeat} turns a"
        f" round, medians of {args.rounds} rounds, CPU time; hot path {kind}"
        f"{f' ({why})' if why else ''}"
    )
    for behind in ("nothing", "parse + correlate"):
        former = results[behind, "former"]
        current = results[behind, "current"]
        ratios = [c / f for c, f in zip(current, former, strict=True)]
        print(
            f"  pipeline behind: {behind:<18} former {statistics.median(former) * 1e6:6.2f} us"
            f"  current {statistics.median(current) * 1e6:6.2f} us a datagram"
            f"  current/former {statistics.median(ratios):.3f}x"
            f" (rounds {min(ratios):.3f}-{max(ratios):.3f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
