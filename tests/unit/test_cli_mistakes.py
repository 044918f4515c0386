"""What `sipcdr import` and `sipcdr replay` answer to the mistakes people make with
files and addresses: one line naming the file, option or address, a non-zero exit, and
never a traceback. Each case runs the command line as a subprocess, as a person would.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import dpkt
import encaps
import pytest
from pcapdata import require_shared_data
from sipcalls import Call, answered_call_messages

TIMEOUT_S = 120


def sipcdr(args: Sequence[str | Path], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SIPCDR_")}
    # No database for these: the JSONL sink under ./var is enough to import into.
    environ.update(SIPCDR_SINKS__POSTGRES__DSN="", SIPCDR_STATE__SPARE_BYTES="0", **env)
    return subprocess.run(
        [sys.executable, "-m", "sipcdr.cli", *(str(arg) for arg in args)],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single line on stderr, after checking there is no traceback."""
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def sample() -> Path:
    return require_shared_data() / "pcaps" / "zeek-sip-wireshark.pcap"


def write_pcap(path: Path, frames: Sequence[tuple[float, bytes]]) -> Path:
    with path.open("wb") as handle:
        writer = dpkt.pcap.Writer(handle)
        for ts, frame in frames:
            writer.writepkt(frame, ts=ts)
    return path


def call_frames(kind: str | None = None) -> list[tuple[float, bytes]]:
    frames = []
    for index, message in enumerate(answered_call_messages(Call())):
        packet = encaps.ipv4(encaps.udp(message, 5062, 5060), "10.77.0.1", "10.77.0.2")
        frame = (
            encaps.eth(packet, encaps.ETH_IPV4) if kind is None else encaps.tunnelled(kind, packet)
        )
        frames.append((1_700_000_000.0 + index, frame))
    return frames


# -- import ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("notes.txt", b"call notes, not a capture\n", "notes.txt: not a pcap or pcapng capture"),
        ("empty.pcap", b"", "empty.pcap: empty file, no capture in it"),
        ("missing.pcap", None, "missing.pcap: no such file"),
        ("folder", "dir", "folder: a directory, not a capture file"),
        ("calls.pcap.zst", b"\x28\xb5\x2f\xfd" + bytes(40), "compressed with zstd"),
        ("broken.pcap.gz", b"\x1f\x8b\x08\x00" + bytes(6) + b"\xff" * 60, "cannot be read"),
    ],
)
def test_import_of_what_is_not_a_capture(
    tmp_path: Path, name: str, content: bytes | str | None, expected: str
) -> None:
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    done = sipcdr(["import", name], tmp_path)
    assert done.returncode == 1
    line = one_line(done)
    assert line.startswith("sipcdr: import: ")
    assert expected in line
    # Refused before anything was started or written.
    assert not (tmp_path / "var").exists()


def test_import_of_a_good_and_a_bad_file_names_the_bad_one(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a capture")
    done = sipcdr(["import", sample(), "notes.txt"], tmp_path)
    assert done.returncode == 1
    assert one_line(done).startswith("sipcdr: import: notes.txt: not a pcap or pcapng capture")
    assert done.stdout.startswith("81 SIP messages, 4 CDRs")
    assert len((tmp_path / "var" / "cdrs.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("compression", ["gzip", "bzip2", "xz"])
def test_compressed_captures_are_read_directly(tmp_path: Path, compression: str) -> None:
    compressors: dict[str, Callable[[bytes], bytes]] = {
        "gzip": gzip.compress,
        "bzip2": bz2.compress,
        "xz": lzma.compress,
    }
    compress = compressors[compression]
    path = tmp_path / f"calls.pcap.{compression}"
    path.write_bytes(compress(sample().read_bytes()))
    done = sipcdr(["import", path.name], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("81 SIP messages, 4 CDRs")


def test_a_capture_cut_mid_record_says_where(tmp_path: Path) -> None:
    whole = write_pcap(tmp_path / "whole.pcap", call_frames())
    data = whole.read_bytes()
    last = 16 + len(call_frames()[-1][1])
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[: len(data) - last + 20])  # inside the last record's frame
    done = sipcdr(["import", cut.name], tmp_path)
    assert done.returncode == 0, done.stderr
    line = one_line(done)
    assert line == (
        f"sipcdr: import: warning: cut.pcap: truncated: the file ends inside a record at "
        f"byte {len(data) - last}; what came before it was read"
    )
    assert done.stdout.startswith("5 SIP messages")


def test_a_capture_without_sip_says_what_it_held(tmp_path: Path) -> None:
    arp = encaps.eth(bytes(28), 0x0806)
    media = encaps.eth(
        encaps.ipv4(encaps.udp(b"\x80\x00" + bytes(170), 40000, 40002), "10.0.0.1", "10.0.0.2"),
        encaps.ETH_IPV4,
    )
    # GRE version 1 (PPTP): a tunnel not read here.
    pptp = encaps.eth(
        encaps.ipv4(b"\x30\x81\x88\x0b" + bytes(60), "10.0.0.1", "10.0.0.2", proto=47),
        encaps.ETH_IPV4,
    )
    frames = [(1.0, arp), (2.0, arp), (3.0, media), (4.0, pptp)]
    path = write_pcap(tmp_path / "nosip.pcap", frames)
    done = sipcdr(["import", path.name], tmp_path)
    assert done.returncode == 1
    assert one_line(done) == (
        "sipcdr: import: warning: nosip.pcap: no SIP found in 4 frames: 2 non-IP frames, "
        "1 frames in a tunnel or encapsulation not read here, "
        "1 UDP/SCTP payloads that are not SIP"
    )


def test_the_summary_counts_frames_per_encapsulation(tmp_path: Path) -> None:
    path = write_pcap(tmp_path / "gtp.pcap", call_frames("gtpu"))
    done = sipcdr(["import", path.name, "--summary-json", "summary.json"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("; frames decapsulated: gtpu 6")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["encapsulations"] == {
        "pppoe": 0,
        "mpls": 0,
        "gtpu": 6,
        "vxlan": 0,
        "geneve": 0,
        "tzsp": 0,
        "tunnelled": 0,
    }


def test_summary_json_into_a_missing_folder_is_refused_first(tmp_path: Path) -> None:
    done = sipcdr(["import", sample(), "--summary-json", "nowhere/summary.json"], tmp_path)
    assert done.returncode == 2
    assert one_line(done) == (
        "sipcdr: import: --summary-json nowhere/summary.json: nowhere is not an existing folder"
    )
    assert not (tmp_path / "var").exists()


def test_ctrl_c_during_an_import_is_one_line(tmp_path: Path) -> None:
    # The import reads from a FIFO: once the writer's open returns, the import is
    # running (past start-up), and it waits there for the rest of the capture.
    fifo = tmp_path / "capture.pcap"
    os.mkfifo(fifo)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SIPCDR_")}
    environ.update(SIPCDR_SINKS__POSTGRES__DSN="", SIPCDR_STATE__SPARE_BYTES="0")
    process = subprocess.Popen(
        [sys.executable, "-m", "sipcdr.cli", "import", fifo.name],
        cwd=tmp_path,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    data = sample().read_bytes()
    with fifo.open("wb") as writer:
        writer.write(data[:2000])
        writer.flush()
        process.send_signal(signal.SIGINT)
        writer.write(data[2000:])
    out, err = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 130
    assert "Traceback" not in out + err
    # Log lines of the outputs closing may come first; the command's own is the last.
    assert err.splitlines()[-1] == (
        "sipcdr: import: interrupted; run it again to import every file whole "
        "(records are deduplicated by id)"
    )


# -- replay ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("notes.txt", b"not a capture", "notes.txt: not a pcap or pcapng capture"),
        ("empty.pcap", b"", "empty.pcap: empty file, no capture in it"),
        ("missing.pcap", None, "missing.pcap: no such file"),
        ("folder", "dir", "folder: a directory, not a capture file"),
    ],
)
def test_replay_of_what_is_not_a_capture(
    tmp_path: Path, name: str, content: bytes | str | None, expected: str
) -> None:
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    done = sipcdr(["replay", name, "--to", "127.0.0.1:5060"], tmp_path)
    assert done.returncode == 1
    line = one_line(done)
    assert line.startswith("sipcdr: replay: ")
    assert expected in line


def test_replay_of_a_capture_without_sip(tmp_path: Path) -> None:
    write_pcap(tmp_path / "arp.pcap", [(1.0, encaps.eth(bytes(28), 0x0806))])
    done = sipcdr(["replay", "arp.pcap", "--to", "127.0.0.1:5060"], tmp_path)
    assert done.returncode == 1
    assert one_line(done) == "sipcdr: replay: arp.pcap: no SIP found to send"


def test_replay_to_a_host_that_does_not_resolve(tmp_path: Path) -> None:
    done = sipcdr(["replay", sample(), "--to", "no-such-host.invalid:5060"], tmp_path)
    assert done.returncode == 1
    assert one_line(done).startswith(
        "sipcdr: replay: --to no-such-host.invalid:5060: cannot resolve 'no-such-host.invalid'"
    )


def test_replay_says_what_the_clock_guard_does_to_original_times(tmp_path: Path) -> None:
    done = sipcdr(
        ["replay", sample(), "--to", "127.0.0.1:9", "--hep", "--original-times", "--rate", "max"],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    note = done.stderr.splitlines()[0]
    assert note.startswith("sipcdr: replay: note: --original-times: the capture's times are ")
    assert "more than 30 s off its clock by the receive time" in note
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ([], "sipcdr: replay: --workers needs --rate (N or max)"),
        (["--rate", "max", "--workers", "0"], "wants 1 to 64 processes: '0'"),
        (["--rate", "max", "--workers", "two"], "wants 1 to 64 processes: 'two'"),
    ],
)
def test_workers_without_a_rate_or_out_of_range(
    tmp_path: Path, options: list[str], expected: str
) -> None:
    done = sipcdr(["replay", sample(), "--to", "127.0.0.1:9", "--workers", "2", *options], tmp_path)
    assert done.returncode == 2
    assert expected in done.stderr
    assert "Traceback" not in done.stderr


def test_original_times_without_hep_is_refused(tmp_path: Path) -> None:
    done = sipcdr(["replay", sample(), "--to", "127.0.0.1:9", "--original-times"], tmp_path)
    assert done.returncode == 2
    assert one_line(done) == "sipcdr: replay: --original-times stamps HEP frames: add --hep"


def test_ctrl_c_during_a_replay_is_one_line(tmp_path: Path) -> None:
    # Two messages an hour apart, the gap kept: the replay waits, and is interrupted.
    frames = call_frames()[:2]
    frames[1] = (frames[0][0] + 3600, frames[1][1])
    write_pcap(tmp_path / "slow.pcap", frames)
    command = ["replay", "slow.pcap", "--to", "127.0.0.1:9", "--max-gap", "3600"]
    process = subprocess.Popen(
        [sys.executable, "-m", "sipcdr.cli", *command],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    started = process.stderr.readline()
    assert started.startswith("replaying 2 messages from slow.pcap to 127.0.0.1:9")
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 130
    assert "Traceback" not in out + err
    assert err.splitlines() == ["sipcdr: replay: interrupted"]
