"""How fast `sipcdr replay` can offer messages, so that it is never what limits the
end-to-end benchmark (`e2e.py`): it must offer at least 100,000 messages/s here.

The capture is `loadgen.py`'s calls (6 messages each, INVITE and 200 with SDP); every
loop renames the Call-IDs. The sink is a UDP socket that nobody reads, so the kernel
queues a little and drops the rest: a send costs what it costs when the daemon keeps
up. The floor is a bare `sendto` loop of one fixed datagram of the capture's mean
size, in the same run. Figures are medians of several rounds.

    python benchmarks/replay.py [--messages 600000] [--rounds 3]
    python benchmarks/replay.py --quick   # a second or two, to keep it from rotting
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import MESSAGES_PER_CALL, write_calls
from sipcdr.capture.pcapfile import iter_packets
from sipcdr.replay import replay

CALLS = 1000
TARGET = 100_000


def sink() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.bind(("127.0.0.1", 0))
    return sock


def floor(address: tuple[str, int], size: int, count: int) -> float:
    data = b"x" * size
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sendto = sock.sendto
        started = time.perf_counter()
        for _ in range(count):
            sendto(data, address)
        return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=600_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20,000 messages, one round")
    args = parser.parse_args()
    if args.quick:
        args.messages, args.rounds = 20_000, 1
    with tempfile.TemporaryDirectory() as folder:
        capture = Path(folder) / "calls.pcap"
        per_loop = write_calls(capture, CALLS, "rp")
        packets = list(iter_packets(capture))
    loops = max(2, args.messages // per_loop)
    mean = sum(len(p.payload) for p in packets) // len(packets)
    contenders = {
        "floor: bare sendto, one datagram": None,
        "replay, plain SIP": (False, 1),
        "replay, HEPv3": (True, 1),
        "replay, plain SIP, --workers 2": (False, 2),
        "replay, HEPv3, --workers 2": (True, 2),
    }
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    with sink() as receiver:
        address = receiver.getsockname()
        for _ in range(args.rounds):
            for name, setting in contenders.items():
                if setting is None:
                    rates[name].append(floor(address, mean, loops * per_loop))
                    continue
                as_hep, workers = setting
                result = replay(
                    capture,
                    address,
                    as_hep=as_hep,
                    loops=loops,
                    original_pace=False,
                    packets=packets,
                    workers=workers,
                )
                rates[name].append(result.sent / result.seconds)
    base = statistics.median(rates["floor: bare sendto, one datagram"])
    print(
        f"{loops * per_loop:,} messages ({MESSAGES_PER_CALL}-message calls, mean "
        f"{mean} bytes), loops renaming Call-IDs, into a UDP sink nobody reads; "
        f"median of {args.rounds} rounds"
    )
    print(f"{'contender':<36}{'messages/s':>12}{'x floor':>9}")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"{name:<36}{rate:>12,.0f}{rate / base:>9.2f}")
    plain = statistics.median(rates["replay, plain SIP"])
    verdict = "met" if plain >= TARGET else "NOT met"
    print(f"replay offers {plain:,.0f} messages/s from one sender: target {TARGET:,} {verdict}")


if __name__ == "__main__":
    main()
