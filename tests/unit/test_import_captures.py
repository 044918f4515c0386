"""The CDRs `sipcdr import` makes from each public capture, and why.

Each capture runs alone through the same path as `sipcdr import` (capture file ->
pipeline -> correlator -> sink). Calls still open when a file ends are closed by the
dialog rules: an answered call without BYE ends as answered/timeout_no_bye at its last
message, a call that never got a final response as timeout_no_final.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import dpkt
import encaps
import pytest
from pcapdata import require_shared_data
from sipcalls import Call, CdrCollector, answered_call_messages
from sipcdr.capture.pcapfile import node_of
from sipcdr.config import Config
from sipcdr.importer import import_files
from sipcdr.model import Cdr

Outcome = tuple[str, str]  # (disposition, end_reason)

EXPECTED: dict[str, tuple[dict[Outcome, int], str]] = {
    "heplify-erspan_sip_ipv4_udp.pcapng": (
        {("answered", "bye"): 3},
        "three calls (two after a 407 challenge and retry, which stays one call); the 488s "
        "answer re-INVITEs and leave the calls up; SUBSCRIBE/NOTIFY/REFER are not calls",
    ),
    "heplify-rtp_rtcp_sip_ipv4_udp.pcap": (
        {("answered", "timeout_no_bye"): 1, ("no_answer", "timeout_no_final"): 1},
        "one answered call whose BYE is past the end of the capture, and one INVITE that "
        "rang (180) and got no final response before the capture ends",
    ),
    "heplify-sip_ipv4_tcp.pcap": (
        {("answered", "bye"): 1},
        "one complete call over TCP; the 200 to the BYE comes after the CDR (late)",
    ),
    "heplify-sip_ipv4_tcp_fragmented.pcap": (
        {
            ("answered", "bye"): 12,
            ("answered", "timeout_no_bye"): 20,
            ("cancelled", "cancel"): 1,
            ("rejected", "final_response"): 1,
            ("no_answer", "timeout_no_final"): 2,
            ("timeout", "timeout_no_final"): 1,
        },
        "37 INVITE dialogs over TCP on port 6060, many cut by the capture's start (their "
        "messages are orphans, the 486 among them) or its end (timeouts); one CANCEL/487, "
        "one 403",
    ),
    "heplify-sip_ipv4_tcp_retrans.pcap": ({}, "REGISTER only: no call"),
    "heplify-sip_ipv6_udp.pcap": (
        {("timeout", "timeout_no_final"): 1},
        "the capture clock is bogus and puts years between packets, so the INVITE's ring "
        "timer runs out before its 100/200 arrive; those and the ACK/BYE are then orphans "
        "or late: timers run on capture time, as they must for an import",
    ),
    "heplify-sip_sctp.pcap": ({("rejected", "final_response"): 1}, "INVITE over SCTP, 403"),
    "heplify-sip_tcp_websocket.pcap": (
        {("answered", "bye"): 2},
        "two calls through WebSocket and UDP legs of proxies sharing each Call-ID; the "
        "first is challenged (407) and retried",
    ),
    "hepwireshark-hep.pcap": (
        {},
        "the HEP INVITE declares Content-Length 287 over a 276-byte body (its line ends "
        "were converted to bare LF): rejected as body_truncated, so its 100/407 are orphans",
    ),
    "hepwireshark-hep3_compressed.pcapng": ({}, "REGISTER only"),
    "ndpi-FAX-Call-t38-CA-TDM-SIP-FB-1.pcap": (
        {("answered", "bye"): 2},
        "both legs of a fax gateway (two Call-IDs), each with T.38 re-INVITEs and a 488",
    ),
    "ndpi-sip_hello.pcapng": ({}, "REGISTER only"),
    "sngrep-ipip.pcap": ({("answered", "bye"): 1}, "INVITE/183/200/BYE, half in IP-in-IP"),
    "sngrep-ipv6frag.pcap": (
        {("answered", "bye"): 1},
        "one call through a proxy with both legs captured: one CDR, not two",
    ),
    "zeek-sip-wireshark.pcap": (
        {
            ("rejected", "final_response"): 2,
            ("no_answer", "final_response"): 1,
            ("cancelled", "cancel"): 1,
        },
        "two 403s after 407 challenges, a 480 after 183, and an INVITE the caller "
        "CANCELled that the UAS then answered with 408: cancelled at the CANCEL",
    ),
}


def _import(path: Path) -> tuple[list[Cdr], dict[str, object]]:
    sink = CdrCollector()
    summary = import_files(Config(), [path], sinks=[sink], progress=False)
    return sink.cdrs, summary


def test_every_capture_has_written_expectations() -> None:
    files = {p.name for p in (require_shared_data() / "pcaps").glob("*.pcap*")}
    assert files == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_capture_cdrs(name: str) -> None:
    expected, why = EXPECTED[name]
    cdrs, summary = _import(require_shared_data() / "pcaps" / name)
    outcomes = Counter((cdr.disposition, cdr.end_reason) for cdr in cdrs)
    assert dict(outcomes) == expected, why
    assert len({cdr.cdr_id for cdr in cdrs}) == len(cdrs), "duplicate CDR ids"
    assert summary["cdrs_written"] == len(cdrs)


class _BrokenSink:
    """A sink with a bug: every write raises."""

    name = "broken"

    def write(self, cdr: Cdr) -> None:
        raise RuntimeError("a sink bug")

    def flush(self) -> None:
        return None


def test_cdrs_a_sink_fault_lost_are_reported_not_counted_as_written() -> None:
    capture = require_shared_data() / "pcaps" / "heplify-rtp_rtcp_sip_ipv4_udp.pcap"
    summary = import_files(Config(), [capture], sinks=[_BrokenSink()], progress=False)
    assert summary["cdrs_written"] == 0
    assert summary["cdr_write_failures"] == {"broken": 2}
    assert summary["internal_errors"] == {}


def test_g711_sample_call_details() -> None:
    cdrs, _ = _import(require_shared_data() / "pcaps" / "heplify-rtp_rtcp_sip_ipv4_udp.pcap")
    answered = next(cdr for cdr in cdrs if cdr.disposition == "answered")
    assert answered.call_id == "12013223@200.57.7.195"
    assert answered.sip_code == 200
    assert answered.ring_time is not None and answered.answer_time is not None
    assert answered.start_time < answered.ring_time < answered.answer_time
    unanswered = next(cdr for cdr in cdrs if cdr.disposition == "no_answer")
    assert unanswered.call_id == "12015624@200.57.7.195"
    assert unanswered.sip_code is None
    assert unanswered.answer_time is None


def test_reimport_gives_the_same_cdr_ids() -> None:
    path = require_shared_data() / "pcaps" / "heplify-sip_ipv4_tcp_fragmented.pcap"
    first, _ = _import(path)
    again, _ = _import(path)
    assert [c.cdr_id for c in first] == [c.cdr_id for c in again]


def test_import_command_writes_jsonl_and_summary(open_tmp_path: Path) -> None:
    # On its defaults the import starts the embedded PostgreSQL under ./var.
    capture = require_shared_data() / "pcaps" / "zeek-sip-wireshark.pcap"
    summary_path = open_tmp_path / "summary.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sipcdr.cli",
            "import",
            str(capture),
            "--summary-json",
            str(summary_path),
        ],
        cwd=open_tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert '"event": "embedded_postgres_ready"' in done.stderr
    lines = (open_tmp_path / "var" / "cdrs.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert sorted(r["disposition"] for r in records) == [
        "cancelled",
        "no_answer",
        "rejected",
        "rejected",
    ]
    summary = json.loads(summary_path.read_text())
    assert summary["cdrs_written"] == 4
    assert summary["sip_messages"] == 81
    assert summary["requests_by_method"]["INVITE"] == 11  # tshark -Y sip.Method=="INVITE"


def test_files_run_in_capture_time_order_whatever_their_names() -> None:
    shared = require_shared_data() / "pcaps"
    older = shared / "zeek-sip-wireshark.pcap"  # 2005
    newer = shared / "sngrep-ipip.pcap"  # 2021
    sink = CdrCollector()
    import_files(Config(), [newer, older], sinks=[sink], progress=False)
    assert len(sink.cdrs) == 5
    # The 2005 file ran first although it was named second: its CDRs come out first.
    # In name order a jump to 2021 and back would time out calls that span files.
    assert sink.cdrs[0].start_time < 1_200_000_000 < sink.cdrs[-1].start_time
    assert Counter(cdr.disposition for cdr in sink.cdrs) == {
        "rejected": 2,
        "no_answer": 1,
        "cancelled": 1,
        "answered": 1,
    }


def test_two_sensors_recording_the_same_calls_give_each_call_once() -> None:
    capture = require_shared_data() / "pcaps" / "heplify-sip_ipv4_tcp_fragmented.pcap"
    once, _ = _import(capture)
    sink = CdrCollector()
    import_files(Config(), [capture, capture], sinks=[sink], progress=False)
    assert sorted(c.cdr_id for c in sink.cdrs) == sorted(c.cdr_id for c in once)


@pytest.mark.parametrize("kind", encaps.ENCAPSULATIONS)
def test_a_call_inside_each_encapsulation(kind: str, tmp_path: Path) -> None:
    """A call and its media as a collector receives them through each encapsulation:
    one CDR with the addresses inside, and the frames counted under the encapsulation
    in the import summary."""
    caller, callee = ("10.77.0.1", 5062), ("10.77.0.2", 5060)
    frames = []
    for index, message in enumerate(answered_call_messages(Call())):
        src, dst = (
            (caller, callee)
            if message.startswith((b"INVITE", b"ACK", b"BYE"))
            else (
                callee,
                caller,
            )
        )
        packet = encaps.ipv4(encaps.udp(message, src[1], dst[1]), src[0], dst[0])
        frames.append((1_700_000_000.0 + index, encaps.tunnelled(kind, packet)))
    rtp = encaps.ipv4(encaps.udp(b"\x80\x00" + bytes(170), 40000, 40002), caller[0], callee[0])
    frames += [(1_700_000_002.5 + i / 50, encaps.tunnelled(kind, rtp)) for i in range(20)]
    frames.sort()
    path = tmp_path / f"{kind}.pcap"
    with path.open("wb") as handle:
        writer = dpkt.pcap.Writer(handle)
        for ts, frame in frames:
            writer.writepkt(frame, ts=ts)
    cdrs, summary = _import(path)
    (cdr,) = cdrs
    assert (cdr.disposition, cdr.end_reason) == ("answered", "bye")
    assert (cdr.src_ip, cdr.src_port, cdr.dst_ip, cdr.dst_port) == (*caller, *callee)
    capture = summary["capture"]
    assert isinstance(capture, dict)
    assert capture[f"decap_{kind}"] == len(frames) == 26
    assert capture["sip_messages"] == 6
    assert capture["non_sip_payloads"] == 20
    others = {f"decap_{other}" for other in encaps.ENCAPSULATIONS} - {f"decap_{kind}"}
    assert {key: capture[key] for key in others} == dict.fromkeys(others, 0)


def test_a_file_name_that_is_not_utf8_loses_no_cdr(tmp_path: Path) -> None:
    """The file system keeps such a name's bytes as surrogates, which no CDR, signaling
    record or row can hold: every CDR of the file was lost (counted) before."""
    name = b"caf\xe9.pcap".decode("utf-8", "surrogateescape")
    capture = tmp_path / name
    capture.write_bytes((require_shared_data() / "pcaps" / "zeek-sip-wireshark.pcap").read_bytes())
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SIPCDR_")}
    environ.update(SIPCDR_SINKS__POSTGRES__DSN="", SIPCDR_STATE__SPARE_BYTES="0")
    done = subprocess.run(
        [sys.executable, "-m", "sipcdr.cli", "import", name],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "cdr_write_failed" not in done.stderr
    records = [
        json.loads(line) for line in (tmp_path / "var" / "cdrs.jsonl").read_text().splitlines()
    ]
    assert len(records) == 4
    assert {record["capture_node"] for record in records} == {"caf\ufffd.pcap"}
    assert node_of(capture) == "caf\ufffd.pcap"
    assert node_of(tmp_path / "plain.pcap") == "plain.pcap"
