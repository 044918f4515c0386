"""`sipcdr run` facing inputs as operators wire them: a listener address that cannot be
used, the wrong protocol on a listener, Ctrl-C, and mirrored VXLAN traffic from a cloud
mirror session (fed by a test sender, as AWS VPC Traffic Mirroring would send it)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import encaps
import pytest
from daemonproc import Daemon, daemon_environ, start_daemon, wait_for
from sipcalls import Call, answered_call_messages
from sipcdr import hepencode

pytestmark = pytest.mark.integration


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    running = start_daemon(tmp_path, SIPCDR_CAPTURE__VXLAN_UDP="127.0.0.1:0")
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait(timeout=10)


def run_failing(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sipcdr.cli", "run"],
        cwd=tmp_path,
        env=daemon_environ(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def start_failed(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    (line,) = [line for line in done.stderr.splitlines() if '"start_failed"' in line]
    return str(json.loads(line)["error"])


@pytest.mark.parametrize(
    ("variable", "key", "kind"),
    [
        ("SIPCDR_CAPTURE__SIP_UDP", "capture.sip_udp", socket.SOCK_DGRAM),
        ("SIPCDR_CAPTURE__HEP_UDP", "capture.hep_udp", socket.SOCK_DGRAM),
        ("SIPCDR_CAPTURE__VXLAN_UDP", "capture.vxlan_udp", socket.SOCK_DGRAM),
        ("SIPCDR_CAPTURE__HEP_TCP", "capture.hep_tcp", socket.SOCK_STREAM),
        ("SIPCDR_METRICS__LISTEN", "metrics.listen", socket.SOCK_STREAM),
    ],
)
def test_an_address_in_use_names_its_key(
    tmp_path: Path, variable: str, key: str, kind: socket.SocketKind
) -> None:
    with socket.socket(socket.AF_INET, kind) as taken:
        taken.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        error = start_failed(run_failing(tmp_path, **{variable: address}))
    assert error == f"{key} {address}: cannot listen there (address already in use)"


def test_an_address_not_on_this_host_names_its_key(tmp_path: Path) -> None:
    # 192.0.2.0/24 is reserved for documentation: no host has it.
    error = start_failed(run_failing(tmp_path, SIPCDR_CAPTURE__SIP_UDP="192.0.2.1:5060"))
    assert (
        error
        == "capture.sip_udp 192.0.2.1:5060: cannot listen there (cannot assign requested address)"
    )


def parse_errors(daemon: Daemon) -> float:
    return sum(
        float(line.rpartition(" ")[2])
        for line in daemon.metrics().splitlines()
        if line.startswith("sipcdr_sip_parse_errors_total{")
    )


def hints(daemon: Daemon) -> list[dict[str, object]]:
    lines = daemon.log.read_text().splitlines()
    return [json.loads(line) for line in lines if '"listener_protocol_mismatch"' in line]


def test_the_wrong_protocol_on_a_listener_gives_one_hint(daemon: Daemon) -> None:
    invite = answered_call_messages(Call("misdirected@x"))[0]
    frame = hepencode.encode(
        src_ip="192.0.2.10",
        dst_ip="203.0.113.20",
        src_port=5060,
        dst_port=5060,
        timestamp=time.time(),
        payload=invite,
    )
    sip_host, sip_port = daemon.endpoint("sip_udp")
    hep_host, hep_port = daemon.endpoint("hep_udp")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for _ in range(50):
            udp.sendto(frame, (sip_host, sip_port))
            udp.sendto(invite, (hep_host, hep_port))
        wait_for(lambda: len(hints(daemon)) == 2)
        # More of the same within the interval: no more lines. The tick that exports
        # their parse errors has run the hints before, so it would have logged by then.
        for _ in range(50):
            udp.sendto(frame, (sip_host, sip_port))
        wait_for(lambda: parse_errors(daemon) == 100)
    by_listener = {str(hint["listener"]): hint for hint in hints(daemon)}
    assert set(by_listener) == {f"SIP/UDP {sip_host}:{sip_port}", f"HEP/UDP {hep_host}:{hep_port}"}
    assert by_listener[f"SIP/UDP {sip_host}:{sip_port}"]["hint"] == (
        f"HEP packets are arriving on the SIP/UDP listener {sip_host}:{sip_port}; "
        "configure them on capture.hep_udp"
    )
    assert by_listener[f"HEP/UDP {hep_host}:{hep_port}"]["hint"] == (
        f"plain SIP packets are arriving on the HEP/UDP listener {hep_host}:{hep_port}; "
        "configure them on capture.sip_udp"
    )
    assert len(hints(daemon)) == 2


def test_ctrl_c_stops_the_daemon_cleanly(daemon: Daemon) -> None:
    daemon.process.send_signal(signal.SIGINT)
    assert daemon.process.wait(timeout=30) == 0
    log = daemon.log.read_text()
    assert "Traceback" not in log
    assert '"event": "stopped"' in log


def dropped(daemon: Daemon, reason: str) -> float:
    return daemon.metric("sipcdr_packets_dropped_total", source="vxlan_udp", reason=reason)


def vxlan_call(call_id: str, vni: int) -> list[bytes]:
    caller, callee = ("10.77.0.1", 5062), ("10.77.0.2", 5060)
    datagrams = []
    for message in answered_call_messages(Call(call_id)):
        outbound = message.startswith((b"INVITE", b"ACK", b"BYE"))
        src, dst = (caller, callee) if outbound else (callee, caller)
        packet = encaps.ipv4(encaps.udp(message, src[1], dst[1]), src[0], dst[0])
        datagrams.append(encaps.vxlan(encaps.eth(packet, encaps.ETH_IPV4), vni=vni))
    return datagrams


def test_mirrored_vxlan_traffic_gives_cdrs_named_by_vni(daemon: Daemon) -> None:
    target = daemon.endpoint("vxlan_udp")
    media = encaps.ipv4(
        encaps.udp(b"\x80\x00" + bytes(170), 40000, 40002), "10.77.0.1", "10.77.0.2"
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for datagram in vxlan_call("mirrored@x", vni=4711):
            udp.sendto(datagram, target)
        for _ in range(10):
            udp.sendto(encaps.vxlan(encaps.eth(media, encaps.ETH_IPV4), vni=4711), target)
        udp.sendto(b"\x00" * 16, target)  # no I flag: not VXLAN
        wait_for(lambda: len(daemon.cdrs()) == 1)
        wait_for(
            lambda: (
                daemon.metric("sipcdr_packets_dropped_total", source="vxlan_udp", reason="not_sip")
                == 10
            )
        )
    (cdr,) = daemon.cdrs()
    assert cdr["call_id"] == "mirrored@x"
    assert cdr["capture_node"] == "vxlan:4711"
    assert (cdr["src_ip"], cdr["dst_ip"]) == ("10.77.0.1", "10.77.0.2")
    assert daemon.metric("sipcdr_packets_received_total", source="vxlan_udp") == 17
    assert (
        daemon.metric("sipcdr_packets_dropped_total", source="vxlan_udp", reason="bad_vxlan") == 1
    )


def test_vxlan_from_outside_the_allow_list_is_dropped(tmp_path: Path) -> None:
    running = start_daemon(
        tmp_path, SIPCDR_CAPTURE__VXLAN_UDP="127.0.0.1:0", SIPCDR_CAPTURE__ALLOW="10.0.0.0/8"
    )
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for datagram in vxlan_call("refused@x", vni=1):
                udp.sendto(datagram, running.endpoint("vxlan_udp"))
        wait_for(
            lambda: (
                running.metric(
                    "sipcdr_packets_dropped_total", source="vxlan_udp", reason="not_allowed"
                )
                == 6
            )
        )
        assert running.stop() == 0
        assert running.cdrs() == []
    finally:
        if running.process.poll() is None:
            running.process.kill()


def readyz(daemon: Daemon) -> int:
    url = f"http://127.0.0.1:{daemon.metrics_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def started_event(daemon: Daemon) -> dict[str, object]:
    for line in daemon.log.read_text().splitlines():
        if '"event": "started"' in line:
            return dict(json.loads(line))
    pytest.fail("no started line")


def test_started_says_where_cdrs_go_with_the_password_masked(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    dsn = f"postgresql://sipcdr:pw-in-dsn@127.0.0.1:{port}/cdr"
    running = start_daemon(
        tmp_path,
        SIPCDR_SINKS__POSTGRES__DSN=dsn,
        SIPCDR_SINKS__KAFKA__BOOTSTRAP=f"127.0.0.1:{port}",
    )
    try:
        assert started_event(running)["cdrs_to"] == {
            "jsonl": str(tmp_path / "var" / "cdrs.jsonl"),
            "postgres": f"postgresql://sipcdr:***@127.0.0.1:{port}/cdr",
            "kafka": f"127.0.0.1:{port}, topic sipcdr.cdrs",
        }
        # Both sinks refused their first connection: their records wait in the spool,
        # within its limits, so the daemon is ready.
        wait_for(lambda: readyz(running) == 200, timeout=30)
        assert running.stop() == 0
        assert "pw-in-dsn" not in running.log.read_text()
    finally:
        if running.process.poll() is None:
            running.process.kill()


def test_not_ready_until_each_sink_has_had_its_first_connection(tmp_path: Path) -> None:
    # A "database" that takes the connection (the kernel's backlog) and never answers.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    running = start_daemon(
        tmp_path, SIPCDR_SINKS__POSTGRES__DSN=f"postgresql://sipcdr@127.0.0.1:{port}/cdr"
    )
    try:
        assert readyz(running) == 503
        silent.close()  # the waiting connection is reset: the first attempt is over
        wait_for(lambda: readyz(running) == 200)
        assert running.stop() == 0
    finally:
        silent.close()
        if running.process.poll() is None:
            running.process.kill()
