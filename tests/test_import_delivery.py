"""`sipcdr import` delivers through the daemon's own spool and sinks: a capture larger
than the spool's limit waits for the sinks instead of dropping anything, and an
import whose sink is unreachable says so and exits 1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import dpkt
import pytest
from daemonproc import daemon_environ
from sipcalls import Call, answered_call_messages
from test_delivery_end_to_end import MESSAGES_PER_CALL, pg_cdr_ids, pg_count

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def write_capture(path: Path, calls: int) -> None:
    """`calls` whole calls as Ethernet/IPv4/UDP frames, 10 ms apart."""
    caller, callee = socket.inet_aton("192.0.2.10"), socket.inet_aton("203.0.113.20")
    with path.open("wb") as handle:
        writer = dpkt.pcap.Writer(handle)
        stamp = 1_795_000_000.0
        for n in range(calls):
            for data in answered_call_messages(Call(call_id=f"imp-{n}@x", from_tag=f"t{n}")):
                udp = dpkt.udp.UDP(sport=5060, dport=5060, data=data)
                udp.ulen = len(udp)
                ip = dpkt.ip.IP(src=caller, dst=callee, p=dpkt.ip.IP_PROTO_UDP, data=udp)
                ip.len = len(ip)
                frame = dpkt.ethernet.Ethernet(type=dpkt.ethernet.ETH_TYPE_IP, data=ip)
                writer.writepkt(bytes(frame), ts=stamp)
                stamp += 0.01
        writer.close()


def run_import(
    workdir: Path, capture: Path, *options: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "sipcdr.cli", "import", str(capture)),
            *("--summary-json", "s.json", *options),
        ],
        cwd=workdir,
        env=daemon_environ(**env),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_an_import_larger_than_the_spool_waits_for_the_sinks(tmp_path: Path, pg_dsn: str) -> None:
    calls = 1500
    capture = tmp_path / "calls.pcap"
    write_capture(capture, calls)
    done = run_import(
        tmp_path,
        capture,
        SIPCDR_SINKS__POSTGRES__DSN=pg_dsn,
        SIPCDR_SPOOL__MAX_BYTES=str(1024 * 1024),  # ~1,000 CDRs, well under the capture
        SIPCDR_SPOOL__SIGNALING_MAX_BYTES=str(1024 * 1024),
        SIPCDR_SPOOL__SEGMENT_BYTES=str(64 * 1024),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["cdrs_written"] == calls
    assert summary["undelivered"] == {}
    assert summary["spool_refused"] == {}
    lines = (tmp_path / "var" / "cdrs.jsonl").read_text().splitlines()
    assert len({json.loads(line)["cdr_id"] for line in lines}) == calls
    ids = pg_cdr_ids(pg_dsn)
    assert len(ids) == len(set(ids)) == calls
    assert pg_count(pg_dsn, "sip_messages") == calls * MESSAGES_PER_CALL
    assert not any((tmp_path / "var" / "import-spool").iterdir())  # cleaned up


def test_an_import_whose_database_is_down_fails_and_can_be_run_again(
    tmp_path: Path, pg_dsn: str
) -> None:
    capture = tmp_path / "calls.pcap"
    write_capture(capture, 5)
    down = run_import(
        tmp_path,
        capture,
        "--delivery-timeout",
        "3",
        SIPCDR_SINKS__POSTGRES__DSN="postgresql://postgres@127.0.0.1:1/none",
    )
    assert down.returncode == 1
    assert "not delivered" in down.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["undelivered"] == {"postgres/records": 5, "postgres/signaling": 30}
    again = run_import(tmp_path, capture, SIPCDR_SINKS__POSTGRES__DSN=pg_dsn)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(set(pg_cdr_ids(pg_dsn))) == 5


def test_an_import_that_outgrows_its_spool_while_the_sink_is_down_gives_up_in_time(
    tmp_path: Path,
) -> None:
    capture = tmp_path / "calls.pcap"
    write_capture(capture, 1500)
    started = time.monotonic()
    done = run_import(
        tmp_path,
        capture,
        "--delivery-timeout",
        "2",
        SIPCDR_SINKS__POSTGRES__DSN="postgresql://postgres@127.0.0.1:1/none",
        SIPCDR_SINKS__JSONL__PATH="",
        SIPCDR_SPOOL__MAX_BYTES=str(1024 * 1024),
        SIPCDR_SPOOL__SIGNALING_MAX_BYTES=str(1024 * 1024),
        SIPCDR_SPOOL__SEGMENT_BYTES=str(64 * 1024),
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 1
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["aborted"] == "neither the sinks nor the disk took anything for 2 s"
    assert 0 < summary["sip_messages"] < 1500 * MESSAGES_PER_CALL  # how far it got
    assert elapsed < 30  # one timeout, not a second one for the drain
