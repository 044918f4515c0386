"""pcapng packet blocks read by ``decode.capfile.PcapngBlocks``, against another
install (``--baseline PYTHON``: a build before a change) in the same run.

A mostly-media sample (RTP, which the pre-filter skips unread, so reading the blocks
is most of the cost) is repeated into an in-memory pcapng file of one Ethernet
interface; each contender reads it in 1 MiB chunks in a fresh process, alternately,
and the medians of the rounds are printed with their ratio.

    python benchmarks/pcapng_blocks.py --baseline /path/to/other/.venv/bin/python
        [--rounds 7] [--frames 1000000]
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import time
from pathlib import Path

SAMPLE = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "pcaps"
    / "heplify-rtp_rtcp_sip_ipv4_udp.pcap"
)
CHUNK = 1 << 20


def build(frames: int) -> bytes:
    import dpkt

    with SAMPLE.open("rb") as handle:
        records = [(float(ts), bytes(frame)) for ts, frame in dpkt.pcap.Reader(handle)]
    out = io.BytesIO()
    writer = dpkt.pcapng.Writer(out, linktype=1)
    for index in range(frames):
        ts, frame = records[index % len(records)]
        writer.writepkt(frame, ts=ts + index // len(records))
    return out.getvalue()


def child(path: str) -> None:
    import dpkt
    from sipcdr.decode.capfile import PcapngBlocks
    from sipcdr.decode.extract import SipExtractor

    data = Path(path).read_bytes()
    handle = io.BytesIO(data)
    reader = dpkt.pcapng.Reader(handle)
    start = handle.tell()
    extractor = SipExtractor(reader.datalink(), "bench")
    blocks = PcapngBlocks(data[8:12] == b"\x4d\x3c\x2b\x1a", reader._divisor, 0, start)
    began = time.perf_counter()
    found = 0
    for at in range(start, len(data), CHUNK):
        found += len(blocks.feed(data[at : at + CHUNK], extractor))
    elapsed = time.perf_counter() - began
    print(f"{elapsed} {found} {extractor.stats.frames_read}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="", help="another install's python (needed)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0
    if not args.baseline:
        parser.error("--baseline PYTHON is needed: the ratio is against it")
    path = Path("/tmp") / f"pcapng-blocks-bench-{args.frames}.pcapng"
    path.write_bytes(build(args.frames))
    times: dict[str, list[float]] = {"this": [], "baseline": []}
    seen: dict[str, str] = {}
    for _ in range(args.rounds):
        for name, python in (("baseline", args.baseline), ("this", sys.executable)):
            out = subprocess.run(
                [python, __file__, "--child", str(path)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            times[name].append(float(out[0]))
            seen[name] = " ".join(out[1:])
    path.unlink()
    base = statistics.median(times["baseline"])
    this = statistics.median(times["this"])
    print(f"frames {args.frames}, rounds {args.rounds}, (SIP found, frames) {seen}")
    print(f"baseline median {base * 1e3:.1f} ms ({base / args.frames * 1e9:.0f} ns/frame)")
    print(f"this     median {this * 1e3:.1f} ms ({this / args.frames * 1e9:.0f} ns/frame)")
    print(f"this / baseline: {this / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
