"""`sipcdr run` as a real process on loopback: listeners, agent keys, allow-list,
metrics endpoints, SIGTERM drain and a call that spans a restart."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonproc import Daemon, daemon_environ, start_daemon, wait_for
from pcapdata import require_shared_data
from peers import Sipp, free_udp_port
from sipcalls import Call, answered_call_messages
from sipcdr import hepencode
from sipcdr.dialogstore import read_checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    running = start_daemon(tmp_path, SIPCDR_CAPTURE__HEP_KEYS__2001="s3cret")
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait(timeout=10)


def hep_frame(payload: bytes, key: str | None = "s3cret", capture_id: int = 2001) -> bytes:
    return hepencode.encode(
        src_ip="192.0.2.10",
        dst_ip="203.0.113.20",
        src_port=5060,
        dst_port=5060,
        timestamp=time.time(),
        payload=payload,
        capture_id=capture_id,
        auth_key=key,
    )


def saved_call_ids(state_dir: Path) -> list[str]:
    """The open calls of the newest dialog checkpoint."""
    newest = max(state_dir.glob("dialogs.*.json"), key=lambda p: int(p.name.split(".")[1]))
    saved, _unwritten = read_checkpoint(newest.read_bytes())
    column = saved["fields"].index("call_id")  # type: ignore[attr-defined]
    return [row[column] for row in saved["dialogs"]]  # type: ignore[attr-defined]


def test_calls_over_sip_udp_hep_udp_and_hep_tcp(daemon: Daemon) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for data in answered_call_messages(Call("plain@x")):
            udp.sendto(data, daemon.endpoint("sip_udp"))
        for data in answered_call_messages(Call("hep-udp@x")):
            udp.sendto(hep_frame(data), daemon.endpoint("hep_udp"))
        # Wrong key, missing key, unknown agent: dropped before parsing, per capture id.
        udp.sendto(
            hep_frame(Call("bad@x").request("INVITE"), key="wrong"), daemon.endpoint("hep_udp")
        )
        udp.sendto(hep_frame(Call("bad@x").request("INVITE"), key=None), daemon.endpoint("hep_udp"))
        udp.sendto(
            hep_frame(Call("bad@x").request("INVITE"), capture_id=9), daemon.endpoint("hep_udp")
        )
        udp.sendto(b"\x00garbage", daemon.endpoint("hep_udp"))
        udp.sendto(b"NOT SIP AT ALL\r\n\r\n", daemon.endpoint("sip_udp"))
    with socket.create_connection(daemon.endpoint("hep_tcp"), timeout=5) as tcp:
        tcp.sendall(b"".join(hep_frame(data) for data in answered_call_messages(Call("hep-tcp@x"))))

    wait_for(lambda: len(daemon.cdrs()) == 3)
    by_call = {str(record["call_id"]): record for record in daemon.cdrs()}
    assert set(by_call) == {"plain@x", "hep-udp@x", "hep-tcp@x"}
    assert all(record["disposition"] == "answered" for record in by_call.values())
    assert by_call["hep-udp@x"]["src_ip"] == "192.0.2.10"  # HEP gives the original endpoints
    assert by_call["hep-udp@x"]["capture_node"] == "2001"
    assert by_call["plain@x"]["src_ip"] == "127.0.0.1"  # plain SIP: the datagram's own
    wait_for(lambda: daemon.metric("sipcdr_hep_rejected_total", capture_id="2001") == 2)
    assert daemon.metric("sipcdr_hep_rejected_total", capture_id="unknown") == 1
    assert daemon.metric("sipcdr_packets_dropped_total", source="hep_udp", reason="bad_key") == 3
    assert daemon.metric("sipcdr_packets_dropped_total", source="hep_udp", reason="bad_hep") == 1
    assert daemon.metric("sipcdr_sip_parse_errors_total", reason="bad_request_line") == 1
    assert daemon.metric("sipcdr_cdrs_total", disposition="answered") == 3
    assert daemon.metric("sipcdr_packets_received_total", source="hep_tcp") == 6
    # The KPIs of calls from no configured trunk, counted from the CDRs.
    assert daemon.metric("sipcdr_call_attempts_total", trunk="unknown") == 3
    assert daemon.metric("sipcdr_calls_answered_total", trunk="unknown") == 3
    assert daemon.metric("sipcdr_calls_network_effective_total", trunk="unknown") == 3
    assert daemon.metric("sipcdr_call_duration_seconds_count", trunk="unknown") == 3
    for path, expected in (("/healthz", b"ok\n"), ("/readyz", b"ready\n")):
        url = f"http://127.0.0.1:{daemon.metrics_port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.read() == expected
    assert daemon.stop() == 0


def test_sources_outside_the_allow_list_are_counted_and_dropped(tmp_path: Path) -> None:
    running = start_daemon(tmp_path, SIPCDR_CAPTURE__ALLOW="192.0.2.0/24")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for data in answered_call_messages(Call()):
                udp.sendto(data, running.endpoint("sip_udp"))
        wait_for(
            lambda: (
                running.metric(
                    "sipcdr_packets_dropped_total", source="sip_udp", reason="not_allowed"
                )
                == 6
            )
        )
        assert running.metric("sipcdr_sip_messages_total", method="INVITE", kind="request") == 0
    finally:
        assert running.stop() == 0
    assert running.cdrs() == []


def test_a_call_spanning_a_restart_gets_one_correct_cdr(tmp_path: Path) -> None:
    call = Call("span@x")
    messages = answered_call_messages(call)
    first = start_daemon(tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for n, data in enumerate(messages[:4]):  # INVITE, 180, 200, ACK
            if n == 2:
                answered_at = time.time()
            udp.sendto(data, first.endpoint("sip_udp"))
        answer_sent = time.time()
        wait_for(lambda: first.metric("sipcdr_open_dialogs") == 1)
        assert first.stop() == 0
        assert saved_call_ids(tmp_path / "var") == ["span@x"]

        second = start_daemon(tmp_path)
        try:
            bye_at = time.time()
            udp.sendto(messages[4], second.endpoint("sip_udp"))  # the BYE
            bye_sent = time.time()
            wait_for(lambda: len(second.cdrs()) == 1)
        finally:
            assert second.stop() == 0
    records = second.cdrs()
    assert len(records) == 1
    record = records[0]
    assert record["disposition"] == "answered"
    assert record["end_reason"] == "bye"
    # The 200 was sent before the first daemon stopped and the BYE after the second
    # started: billsec spans the restart, as the two arrival times say.
    billsec = float(str(record["billsec"]))
    assert bye_at - answer_sent - 0.25 <= billsec <= bye_sent - answered_at + 0.25
    assert saved_call_ids(tmp_path / "var") == []


@pytest.mark.parametrize("busy_key", ["SIPCDR_CAPTURE__SIP_UDP", "SIPCDR_METRICS__LISTEN"])
def test_a_failed_start_keeps_the_saved_calls(tmp_path: Path, busy_key: str) -> None:
    first = start_daemon(tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for data in answered_call_messages(Call("kept@x"))[:3]:
            udp.sendto(data, first.endpoint("sip_udp"))
        wait_for(lambda: first.metric("sipcdr_open_dialogs") == 1)
    assert first.stop() == 0
    kind = socket.SOCK_STREAM if "METRICS" in busy_key else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as taken:
        taken.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            taken.listen()
        environ = daemon_environ(**{busy_key: f"127.0.0.1:{taken.getsockname()[1]}"})
        failed = subprocess.run(
            [sys.executable, "-m", "sipcdr.cli", "run"],
            cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert failed.returncode == 1
    assert "start_failed" in failed.stderr
    assert saved_call_ids(tmp_path / "var") == ["kept@x"]


def test_replay_feeds_a_running_daemon_plain_and_in_hep(daemon: Daemon) -> None:
    """`sipcdr replay` is the load generator: each loop rewrites Call-IDs, so one capture
    becomes several distinct sets of calls."""
    capture = require_shared_data() / "pcaps" / "zeek-sip-wireshark.pcap"
    host, port = daemon.endpoint("hep_udp")
    replayed = subprocess.run(
        [
            sys.executable, "-m", "sipcdr.cli", "replay", str(capture),
            "--to", f"{host}:{port}", "--hep", "--rate", "max", "--loop", "2",
            "--capture-id", "2001", "--auth-key", "s3cret",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.startswith("sent 162 messages")
    wait_for(lambda: len(daemon.cdrs()) == 8)
    records = daemon.cdrs()
    assert Counter(str(r["disposition"]) for r in records) == {
        "rejected": 4,
        "no_answer": 2,
        "cancelled": 2,
    }
    assert len({r["call_id"] for r in records}) == 8
    assert {r["src_ip"] for r in records} == {"192.168.1.2"}  # the capture's, carried in HEP
    assert daemon.stop() == 0


def test_ipv6_listeners(tmp_path: Path) -> None:
    running = start_daemon(
        tmp_path, SIPCDR_CAPTURE__SIP_UDP="[::1]:0", SIPCDR_CAPTURE__HEP_TCP="[::1]:0"
    )
    try:
        host, port = running.endpoint("sip_udp")
        assert host == "::1"
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp:
            for data in answered_call_messages(Call("v6@x")):
                udp.sendto(data, (host, port))
        host, port = running.endpoint("hep_tcp")
        with socket.create_connection((host, port), timeout=5) as tcp:
            tcp.sendall(
                b"".join(
                    hep_frame(data, key=None) for data in answered_call_messages(Call("v6t@x"))
                )
            )
        wait_for(lambda: len(running.cdrs()) == 2)
    finally:
        assert running.stop() == 0
    by_call = {r["call_id"]: r for r in running.cdrs()}
    assert by_call["v6@x"]["src_ip"] == "::1"
    assert by_call["v6t@x"]["disposition"] == "answered"


def test_live_capture_on_loopback_makes_cdrs(tmp_path: Path, sipp: Sipp) -> None:
    """`[capture] interfaces`: SIPp's own uac/uas talking on lo, seen by AF_PACKET."""
    uas_port = free_udp_port()
    running = start_daemon(
        tmp_path,
        SIPCDR_CAPTURE__INTERFACES="lo",
        SIPCDR_CAPTURE__BPF_FILTER=f"udp port {uas_port}",
    )
    try:
        uas = sipp.run_uas("uas", port=uas_port, calls=3, timeout=30)
        uac = sipp.run_uac("uac", uas.address, calls=3, rate=10, hold_ms=200, timeout=20)
        assert uac.ok, uac.describe()
        wait_for(lambda: len(running.cdrs()) == 3, timeout=20)
        # Metrics are exported once a second, CDRs delivered as soon as they close.
        wait_for(lambda: running.metric("sipcdr_packets_received_total", source="live") > 0)
        assert running.metric("sipcdr_packets_received_total", source="live") == 18
    finally:
        assert running.stop() == 0
    records = running.cdrs()
    assert {r["disposition"] for r in records} == {"answered"}
    assert all(r["capture_node"] == "live:lo" for r in records)
    assert all(abs(float(str(r["billsec"])) - 0.2) < 0.1 for r in records)


def test_hep_from_a_skewed_agent_clock_still_gives_the_right_cdr(daemon: Daemon) -> None:
    """An agent 300 s behind: its times would close the call on the next tick."""

    def skewed(payload: bytes) -> bytes:
        return hepencode.encode(
            src_ip="192.0.2.10", dst_ip="203.0.113.20", src_port=5060, dst_port=5060,
            timestamp=time.time() - 300, payload=payload, capture_id=2001, auth_key="s3cret",
        )  # fmt: skip

    messages = answered_call_messages(Call("skew@x"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for data in messages[:4]:
            udp.sendto(skewed(data), daemon.endpoint("hep_udp"))
        time.sleep(2.5)  # two ticks of the daemon's timers
        for data in messages[4:]:
            udp.sendto(skewed(data), daemon.endpoint("hep_udp"))
    wait_for(lambda: len(daemon.cdrs()) == 1)
    record = daemon.cdrs()[0]
    assert (record["disposition"], record["end_reason"]) == ("answered", "bye")
    assert 2.0 <= float(str(record["billsec"])) <= 5.0
    wait_for(lambda: daemon.metric("sipcdr_hep_timestamp_replaced_total", input="listener") == 6)
    assert daemon.stop() == 0


def _raw_http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_an_oversized_metrics_request_is_refused_without_a_traceback(daemon: Daemon) -> None:
    long_line = b"GET /" + b"a" * 70 * 1024 + b" HTTP/1.1\r\n\r\n"
    long_header = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"b" * 70 * 1024 + b"\r\n\r\n"
    many_headers = b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * 500 + b"\r\n"
    for request, status in (
        (long_line, b"414"),
        (long_header, b"431"),
        (many_headers, b"431"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"200"),
        (b"GET /healthz\r\n", b"200"),  # no version, no headers: answered at once
    ):
        assert _raw_http(daemon.metrics_port, request).split(b" ", 2)[1] == status, request[:40]
    assert "sipcdr_packets_received_total" in daemon.metrics()
    assert daemon.stop() == 0
    log = daemon.log.read_text()
    assert "Traceback" not in log
    assert "metrics_request_failed" not in log


def test_metrics_connections_open_at_sigterm_end_without_a_traceback(daemon: Daemon) -> None:
    """Clients halfway through their requests when the daemon stops: each handler is
    closed by the server's stop, not left for the loop's shutdown to cancel."""
    halves = [b"GET /metrics HTTP/1.1\r\nHost: x\r\n", b"GET /met", b"\r\n", b""]
    sockets = []
    try:
        for half in halves:
            sock = socket.create_connection(("127.0.0.1", daemon.metrics_port), timeout=5)
            sockets.append(sock)
            sock.sendall(half)
        # Every connection is the daemon's before the stop (the reader's deadline is 5 s).
        assert "sipcdr_packets_received_total" in daemon.metrics()
        started = time.monotonic()
        assert daemon.stop() == 0
        stopped_in = time.monotonic() - started
        answers = [sock.recv(1024) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    log = daemon.log.read_text()
    assert "Traceback" not in log
    assert "Exception in callback" not in log
    assert stopped_in < 4.0  # not held until the clients' deadline
    # Closed without an answer: a leading empty line is no request yet (RFC 9112).
    assert answers == [b""] * len(halves)
