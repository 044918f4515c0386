"""The same HEP traffic gives the same CDRs whichever way it reaches sipcdr: sent as
HEP/UDP to a running `sipcdr run`, or recorded in a capture file and run through
`sipcdr import`. Both go through the one HEP to Packet conversion (`hep.to_packet`):
the agent's endpoints and time, and as capture node its node name, else its capture
id."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import dpkt
import encaps
import pytest
from daemonproc import daemon_environ, start_daemon, wait_for
from sipcalls import Call, answered_call_messages
from sipcdr import hepencode

pytestmark = pytest.mark.integration

AGENT = ("198.51.100.7", 47000)  # the HEP agent's own address, in the capture file


def rejected(call: Call) -> list[bytes]:
    return [
        call.request("INVITE"),
        call.response(486, "Busy Here"),
        call.request("ACK", branch="z9hG4bK-inv-1", to_tag="callee-tag"),
    ]


def cancelled(call: Call) -> list[bytes]:
    return [
        call.request("INVITE"),
        call.response(180, "Ringing"),
        call.request("CANCEL", branch="z9hG4bK-inv-1"),
        call.response(200, "OK", method="CANCEL"),
        call.response(487, "Request Terminated"),
        call.request("ACK", branch="z9hG4bK-inv-1", to_tag="callee-tag"),
    ]


def hep_traffic(start: float) -> list[tuple[float, bytes]]:
    """(agent time, HEP datagram) of a few calls from two agents: one names its node,
    the other only has a capture id; IPv4 and IPv6 signaling, UDP and TCP."""
    flows = [
        (Call("live-1@192.0.2.10"), answered_call_messages, "sbc-fra-1", 17, False),
        (Call("live-2@192.0.2.10", caller="+4940111333"), rejected, None, 17, False),
        (Call("live-3@192.0.2.10", callee="+4930333555"), cancelled, "sbc-fra-1", 6, False),
        (Call("live-4@2001:db8::10"), answered_call_messages, None, 17, True),
    ]
    out = []
    at = start
    for n, (call, messages, node, protocol, v6) in enumerate(flows):
        caller, callee = ("2001:db8::10", "2001:db8::20") if v6 else ("192.0.2.10", "203.0.113.20")
        for index, payload in enumerate(messages(call)):
            at += 0.137  # a few tenths between messages: PDD and durations not zero
            request = not payload.startswith(b"SIP/")
            src, dst = (caller, callee) if request else (callee, caller)
            frame = hepencode.encode(
                src_ip=src, dst_ip=dst, src_port=5060, dst_port=5060 + n,
                timestamp=at, payload=payload, capture_id=2001 + n % 2, node_name=node,
                ip_protocol=protocol, compress=index % 2 == 1,
            )  # fmt: skip
            out.append((at, frame))
    return out


def write_capture(path: Path, traffic: list[tuple[float, bytes]], to: tuple[str, int]) -> None:
    """The datagrams as a sensor next to the daemon would have recorded them."""
    with path.open("wb") as handle:
        writer = dpkt.pcap.Writer(handle)
        for at, datagram in traffic:
            ip = encaps.ipv4(encaps.udp(datagram, AGENT[1], to[1]), AGENT[0], to[0])
            writer.writepkt(encaps.eth(ip, encaps.ETH_IPV4), ts=at)


def by_id(records: list[dict[str, object]]) -> dict[object, dict[str, object]]:
    return {record["cdr_id"]: record for record in records}


def test_the_same_hep_traffic_live_and_imported_gives_identical_cdrs(tmp_path: Path) -> None:
    # Agent times are now: the live listeners keep an agent's time within 30 s of theirs.
    traffic = hep_traffic(time.time())
    live_dir = tmp_path / "live"
    live_dir.mkdir()
    daemon = start_daemon(live_dir)
    try:
        target = daemon.endpoint("hep_udp")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _, datagram in traffic:
                sock.sendto(datagram, target)
        wait_for(lambda: len(daemon.cdrs()) == 4, timeout=30)
    finally:
        assert daemon.stop() == 0
    live = daemon.cdrs()
    assert "Traceback" not in daemon.log.read_text()

    import_dir = tmp_path / "import"
    import_dir.mkdir()
    capture = tmp_path / "agents.pcap"
    write_capture(capture, traffic, target)
    subprocess.run(
        [sys.executable, "-m", "sipcdr.cli", "import", str(capture)],
        cwd=import_dir,
        env=daemon_environ(),
        check=True,
        timeout=120,
        capture_output=True,
    )
    imported = [
        json.loads(line)
        for line in (import_dir / "var" / "cdrs.jsonl").read_text().splitlines()
        if line
    ]

    assert len(live) == len(imported) == 4
    # Nothing differs: the agent's time, endpoints and node are the CDR's on both paths,
    # and every call ends by signaling (BYE, a final response), not by a timer, whose
    # clock is the host's live and the capture's on import.
    assert by_id(live) == by_id(imported)
    nodes = sorted(str(record["capture_node"]) for record in live)
    assert nodes == ["2002", "2002", "sbc-fra-1", "sbc-fra-1"]
    outcomes = sorted((str(r["disposition"]), str(r["end_reason"])) for r in live)
    assert outcomes == [
        ("answered", "bye"),
        ("answered", "bye"),
        ("busy", "final_response"),
        ("cancelled", "cancel"),
    ]
