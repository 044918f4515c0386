"""`sipcdr import` against `tshark -q -z sip,stat` on the same large captures, one run.

Each kind of capture a SIP link yields is built from a public sample by repeating its
frames into a file of the sample's format (pcap, or pcapng for the ERSPAN one), each
copy later by the sample's span plus 64 s (so its calls are closed before the next
copy opens them again): SIP only, SIP mirrored through ERSPAN, and mostly media (RTP
and RTCP with some TCP; T.38 fax). Both programs read the
whole file, in interleaved rounds; figures are frames per second of wall time, process
start included, and the median of the rounds; on a shared machine the processor time
(user + system) of each program is the steadier measure, and its ratio is printed too.
The sipcdr package is compiled to bytecode first, as an installed one is, so that a
PYTHONDONTWRITEBYTECODE environment does not make every run compile its source.
`sipcdr import` writes CDRs to a JSONL file only (no database). It runs as installed
(compiled when a compiler was there at install time) and, with --interpreted, with
SIPCDR_PURE_PYTHON=1 as well. `--baseline PYTHON` also times the `sipcdr import` of
another install (the interpreter of its environment: a build before a change) in the
same rounds, and prints each contender's processor time against it.

`--floor` says where a kind's time goes: it prints each sample's frame mix (SIP
frames, frames the pre-filter skips unread, frames decoded in full without SIP, mean
size) and also times `sipcdr import` of the same capture with its SIP frames left out,
in the same rounds: what is left is the start and the media; the difference, divided
by the SIP messages, is what each message costs (reading, parsing, correlating, its
share of the CDRs), set against the per-message cost that 10x tshark would allow.

    python benchmarks/import_captures.py [--rounds 3] [--scale 1.0] [--interpreted]
        [--only SIP] [--baseline /path/to/other/.venv/bin/python] [--floor]
"""

from __future__ import annotations

import argparse
import compileall
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dpkt
from sipcdr import hotpath
from sipcdr.decode.extract import SipExtractor

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "pcaps"
# (kind, public sample, frames in the built capture at scale 1)
KINDS = (
    ("SIP only", "zeek-sip-wireshark.pcap", 200_000),
    ("ERSPAN-tunnelled SIP", "heplify-erspan_sip_ipv4_udp.pcapng", 200_000),
    ("mostly media: RTP", "heplify-rtp_rtcp_sip_ipv4_udp.pcap", 2_000_000),
    ("mostly media: T.38 fax", "ndpi-FAX-Call-t38-CA-TDM-SIP-FB-1.pcap", 1_000_000),
)
CALL_GAP_S = 64.0  # twice the transaction timeout: the copies' calls never meet
TARGET_VS_TSHARK = 10.0  # what the compiled hot path was asked for, per kind


PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
# Run by the baseline's interpreter: its package compiled to bytecode, as ours is.
_COMPILE_INSTALLED = (
    "import compileall, pathlib, sipcdr; "
    "compileall.compile_dir(pathlib.Path(sipcdr.__file__).parent, quiet=1)"
)


def read_frames(path: Path) -> tuple[int, list[tuple[float, bytes]]]:
    with path.open("rb") as handle:
        magic = handle.read(4)
        handle.seek(0)
        reader: Any = (
            dpkt.pcapng.Reader(handle) if magic == PCAPNG_MAGIC else dpkt.pcap.Reader(handle)
        )
        return int(reader.datalink()), [(float(ts), bytes(frame)) for ts, frame in reader]


def build(sample: Path, frames: int, target: Path) -> int:
    """`sample`'s frames repeated into a file of its format of at least `frames` frames."""
    linktype, records = read_frames(sample)
    span = records[-1][0] - records[0][0] + CALL_GAP_S
    copies = max(1, -(-frames // len(records)))
    pcapng = sample.read_bytes()[:4] == PCAPNG_MAGIC
    with target.open("wb") as handle:
        writer: Any = (
            dpkt.pcapng.Writer(handle, linktype=linktype)
            if pcapng
            else dpkt.pcap.Writer(handle, linktype=linktype)
        )
        for copy in range(copies):
            for ts, frame in records:
                writer.writepkt(frame, ts + copy * span)
    return copies * len(records)


def frame_mix(sample: Path) -> tuple[dict[str, float], list[tuple[float, bytes]], int]:
    """Shares of the sample's frames by what decoding does with them, its mean frame
    size, the sample's frames without those that hold SIP, and its SIP messages."""
    linktype, records = read_frames(sample)
    full = SipExtractor(linktype, "mix", prefilter=False)
    skipping = SipExtractor(linktype, "mix")
    sip = skipped = 0
    media: list[tuple[float, bytes]] = []
    for ts, frame in records:
        found = full.feed(ts, frame)
        if found:
            sip += 1
        else:
            media.append((ts, frame))
        skipped += skipping.skip_media(frame, 0, len(frame))
    count = len(records)
    mix = {
        "SIP": sip / count,
        "skipped": skipped / count,
        "decoded": (count - sip - skipped) / count,
        "bytes": sum(len(frame) for _ts, frame in records) / count,
    }
    return mix, media, full.stats.sip_messages


def build_records(
    records: list[tuple[float, bytes]], linktype: int, span: float, copies: int, target: Path
) -> int:
    """``records`` repeated ``copies`` times into a pcap file, each copy ``span`` later."""
    with target.open("wb") as handle:
        writer: Any = dpkt.pcap.Writer(handle, linktype=linktype)
        for copy in range(copies):
            for ts, frame in records:
                writer.writepkt(frame, ts + copy * span)
    return copies * len(records)


def timed(
    command: list[str], cwd: Path, env: dict[str, str], allowed: tuple[int, ...] = (0,)
) -> tuple[float, float]:
    """Wall and processor (user + system) seconds of one run of `command`, which must
    exit with one of `allowed`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, check=False)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in allowed:
        sys.exit(f"{command[0]} failed: {done.stderr.decode()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="capture sizes, times")
    parser.add_argument("--interpreted", action="store_true", help="also SIPCDR_PURE_PYTHON=1")
    parser.add_argument("--only", default="", help="the kinds whose name holds this text")
    parser.add_argument("--baseline", default="", help="another install's python, timed too")
    parser.add_argument("--floor", action="store_true", help="frame mix; the capture without SIP")
    opts = parser.parse_args()
    compileall.compile_dir(Path(hotpath.__file__).parent, quiet=1)
    tshark = shutil.which("tshark")
    if tshark is None:
        sys.exit("tshark is not installed")
    sipcdr = [sys.executable, "-m", "sipcdr.cli", "import"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIPCDR_")}
    env["SIPCDR_SINKS__POSTGRES__DSN"] = ""
    contenders: dict[str, tuple[list[str], dict[str, str]]] = {"sipcdr": (sipcdr, env)}
    if opts.interpreted:
        contenders["sipcdr interpreted"] = (sipcdr, {**env, hotpath.PURE_PYTHON_ENV: "1"})
    if opts.baseline:
        other = [opts.baseline, "-m", "sipcdr.cli", "import"]
        subprocess.run([opts.baseline, "-c", _COMPILE_INSTALLED], check=True, capture_output=True)
        contenders["baseline"] = (other, env)

    kind, why = hotpath.hot_path()
    print(f"sipcdr hot path: {kind}{f' ({why})' if why else ''}; medians of {opts.rounds}")
    print(f"{'capture':24} {'frames':>10} {'tshark fps':>11}", end="")
    for name in contenders:
        print(f" {name + ' fps':>24} {'x tshark':>9} {'cpu x':>6}", end="")
    print()
    with tempfile.TemporaryDirectory(prefix="sipcdr-import-bench-") as tmp:
        workdir = Path(tmp)
        for label, sample, size in KINDS:
            if opts.only.lower() not in label.lower():
                continue
            capture = workdir / ("capture" + Path(sample).suffix)
            frames = build(SAMPLES / sample, max(1, int(size * opts.scale)), capture)
            runs: dict[str, list[tuple[float, float]]] = {
                "tshark": [],
                **{name: [] for name in contenders},
            }
            without_sip = workdir / "without-sip.pcap"
            if opts.floor:
                mix, media, sip_per_copy = frame_mix(SAMPLES / sample)
                linktype, records = read_frames(SAMPLES / sample)
                copies = frames // len(records)
                span = records[-1][0] - records[0][0] + CALL_GAP_S
                media_frames = build_records(media, linktype, span, copies, without_sip)
                runs["without SIP"] = []
            for _ in range(opts.rounds):
                runs["tshark"].append(
                    timed([tshark, "-q", "-z", "sip,stat", "-r", str(capture)], workdir, env)
                )
                for name, (command, environ) in contenders.items():
                    shutil.rmtree(workdir / "var", ignore_errors=True)
                    runs[name].append(timed([*command, str(capture)], workdir, environ))
                if opts.floor:
                    shutil.rmtree(workdir / "var", ignore_errors=True)
                    # Exits 1 (no SIP found): expected here.
                    runs["without SIP"].append(
                        timed([*sipcdr, str(without_sip)], workdir, env, allowed=(0, 1))
                    )
            wall = {name: statistics.median(w for w, _c in done) for name, done in runs.items()}
            cpu = {name: statistics.median(c for _w, c in done) for name, done in runs.items()}
            base = frames / wall["tshark"]
            print(f"{label:24} {frames:>10,} {base:>11,.0f}", end="")
            for name in contenders:
                rate = frames / wall[name]
                print(
                    f" {rate:>24,.0f} {rate / base:>8.2f}x {cpu['tshark'] / cpu[name]:>5.2f}x",
                    end="",
                )
            print()
            if opts.baseline:
                print(
                    "  processor time against the baseline install: "
                    + ", ".join(
                        f"{name} {cpu[name] / cpu['baseline']:.3f}x"
                        for name in contenders
                        if name != "baseline"
                    )
                )
            if opts.floor:
                messages = sip_per_copy * copies
                per_message = (cpu["sipcdr"] - cpu["without SIP"]) / messages
                allowed = (cpu["tshark"] / TARGET_VS_TSHARK - cpu["without SIP"]) / messages
                print(
                    f"  frames: {mix['SIP']:.1%} SIP, {mix['skipped']:.1%} skipped unread,"
                    f" {mix['decoded']:.1%} decoded in full without SIP;"
                    f" {mix['bytes']:.0f} bytes on average"
                )
                floor = (
                    f"{cpu['without SIP'] / media_frames * 1e6:.2f} µs a frame, start included"
                    if media_frames
                    else "the start alone"
                )
                print(
                    f"  processor time: tshark {cpu['tshark']:.2f} s, sipcdr {cpu['sipcdr']:.2f} s,"
                    f" of which start and non-SIP frames {cpu['without SIP']:.2f} s ({floor});"
                    f" {messages:,} SIP messages at {per_message * 1e6:.1f} µs each;"
                    f" {TARGET_VS_TSHARK:.0f}x tshark would allow"
                    f" {allowed * 1e6:.1f} µs a message"
                )
                without_sip.unlink()
            capture.unlink()
    print(f"target: {TARGET_VS_TSHARK:.0f}x tshark on each kind of capture")
    return 0


if __name__ == "__main__":
    sys.exit(main())
