"""HEP over TCP and TLS against a real `sipcdr run`: TLS agents good and bad through
`sipcdr replay --tls`, and thousands of idle and slowloris connections while a
well-behaved agent keeps sending."""

from __future__ import annotations

import contextlib
import itertools
import json
import resource
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonproc import Daemon, daemon_environ, start_daemon, wait_for
from pcapdata import require_shared_data
from sipcalls import Call, answered_call_messages
from sipcdr import hepencode
from tlscerts import Pki, make_pki

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def hep_frame(payload: bytes) -> bytes:
    return hepencode.encode(
        src_ip="192.0.2.10", dst_ip="203.0.113.20", src_port=5060, dst_port=5060,
        timestamp=time.time(), payload=payload, capture_id=2001, auth_key="s3cret",
    )  # fmt: skip


def call_frames(call_id: str) -> bytes:
    return b"".join(hep_frame(data) for data in answered_call_messages(Call(call_id)))


def started_event(daemon: Daemon) -> dict[str, object]:
    for line in daemon.log.read_text().splitlines():
        if '"event": "started"' in line:
            event: dict[str, object] = json.loads(line)
            return event
    raise AssertionError("no started event")


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def stop(daemon: Daemon) -> None:
    if daemon.process.poll() is None:
        daemon.process.kill()
        daemon.process.wait(timeout=10)


# -- TLS ----------------------------------------------------------------------------------


@pytest.fixture
def tls_daemon(tmp_path: Path, pki: Pki) -> Iterator[Daemon]:
    running = start_daemon(
        tmp_path,
        SIPCDR_CAPTURE__HEP_TLS="127.0.0.1:0",
        SIPCDR_CAPTURE__TLS_CERT=str(pki.server_cert),
        SIPCDR_CAPTURE__TLS_KEY=str(pki.server_key),
        SIPCDR_CAPTURE__TLS_CLIENT_CA=str(pki.ca),
        SIPCDR_CAPTURE__HEP_TCP_FRAME_TIMEOUT_S="1",
        SIPCDR_CAPTURE__HEP_KEYS__2001="s3cret",
    )
    yield running
    stop(running)


def replay_tls(
    daemon: Daemon, *options: str | Path, kind: str = "--tls"
) -> subprocess.CompletedProcess[str]:
    capture = require_shared_data() / "pcaps" / "zeek-sip-wireshark.pcap"
    host, port = daemon.endpoint("hep_tls")
    return subprocess.run(
        [
            sys.executable, "-m", "sipcdr.cli", "replay", str(capture), "--to", f"{host}:{port}",
            "--hep", kind, "--rate", "max", "--capture-id", "2001", "--auth-key", "s3cret",
            *(str(option) for option in options),
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_hep_over_tls_delivers_and_counts_every_refused_handshake(
    tls_daemon: Daemon, pki: Pki
) -> None:
    daemon = tls_daemon
    good = replay_tls(daemon, "--ca", pki.ca, "--cert", pki.agent_cert, "--key", pki.agent_key)
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("sent 81 messages")
    # Confirmed by the daemon before replay returned: the CDRs follow at once.
    wait_for(lambda: len(daemon.cdrs()) == 4)
    assert {record["src_ip"] for record in daemon.cdrs()} == {"192.168.1.2"}

    def failures() -> dict[str, float]:
        return {
            reason: daemon.metric("sipcdr_hep_tls_handshake_failures_total", reason=reason)
            for reason in ("no_client_cert", "unknown_ca", "agent_alert", "not_tls", "timeout")
        }

    expected = dict.fromkeys(failures(), 0.0)

    def refused(reason: str, *options: str | Path, says: str, kind: str = "--tls") -> None:
        result = replay_tls(daemon, *options, kind=kind)
        assert result.returncode == 1, result.stdout
        assert says in result.stderr, result.stderr
        expected[reason] += 1
        wait_for(lambda: failures() == expected)

    refused("no_client_cert", "--ca", pki.ca, says="certificate required")
    refused(
        "unknown_ca", "--ca", pki.ca, "--cert", pki.rogue_cert, "--key", pki.rogue_key,
        says="unknown ca",
    )  # fmt: skip
    refused(
        "agent_alert", "--ca", pki.other_ca, "--cert", pki.agent_cert, "--key", pki.agent_key,
        says="certificate verify failed",
    )  # fmt: skip
    refused("not_tls", kind="--tcp", says="or a HEP/TLS port (use --tls)")
    with (
        socket.create_connection(daemon.endpoint("hep_tls"), timeout=10) as stalled,
        pytest.raises(ConnectionResetError),
    ):
        stalled.recv(1)  # reset by the daemon after the 1 s deadline
    expected["timeout"] += 1
    wait_for(lambda: failures() == expected)

    # None of that touched the listener: an agent's own TLS connection still delivers.
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.agent_cert), str(pki.agent_key))
    with (
        socket.create_connection(daemon.endpoint("hep_tls"), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as agent,
    ):
        agent.sendall(call_frames("after@x"))
        wait_for(lambda: len(daemon.cdrs()) == 5)
        wait_for(lambda: daemon.metric("sipcdr_hep_connections", source="hep_tls") == 1)
    wait_for(lambda: daemon.metric("sipcdr_hep_connections", source="hep_tls") == 0)
    assert daemon.metric("sipcdr_packets_received_total", source="hep_tls") == 81 + 6
    assert daemon.metric("sipcdr_hep_connections_closed_total", source="hep_tls") == 0
    assert "tls_key_readable" not in daemon.log.read_text()  # the key is 0600
    assert daemon.stop() == 0


def test_a_tls_key_others_can_read_is_warned_about_at_start(tmp_path: Path, pki: Pki) -> None:
    key = tmp_path / "server.key"
    key.write_bytes(pki.server_key.read_bytes())
    key.chmod(0o640)
    daemon = start_daemon(
        tmp_path,
        SIPCDR_CAPTURE__HEP_TLS="127.0.0.1:0",
        SIPCDR_CAPTURE__TLS_CERT=str(pki.server_cert),
        SIPCDR_CAPTURE__TLS_KEY=str(key),
    )
    try:
        events = [json.loads(line) for line in daemon.log.read_text().splitlines()]
        (warning,) = [event for event in events if event["event"] == "tls_key_readable"]
        assert (warning["level"], warning["tls_key"]) == ("warning", str(key))
        assert "PRIVATE KEY" not in daemon.log.read_text()
    finally:
        assert daemon.stop() == 0


# -- abuse ----------------------------------------------------------------------------------

MAX_CONNECTIONS = 2000
MAX_PER_SOURCE = 100
IDLE_TIMEOUT_S = 4.0
FRAME_TIMEOUT_S = 2.5
CALL_INTERVAL_S = 0.05


class Agent(threading.Thread):
    """A well-behaved HEP/TCP agent: one connection, a call every CALL_INTERVAL_S."""

    def __init__(self, endpoint: tuple[str, int]) -> None:
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.sent: list[str] = []
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with socket.create_connection(self.endpoint, timeout=10) as sock:
                while not self.halt.is_set():
                    call_id = f"agent-{len(self.sent)}@x"
                    sock.sendall(call_frames(call_id))
                    self.sent.append(call_id)
                    self.halt.wait(CALL_INTERVAL_S)
                socket.socket.shutdown(sock, socket.SHUT_WR)
                while sock.recv(4096):
                    pass
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def connect(endpoint: tuple[str, int], source: str) -> socket.socket | None:
    """A connection from `source`, or None when the daemon refused it so fast that
    its reset arrived before connect() returned (it is counted all the same)."""
    try:
        return socket.create_connection(endpoint, timeout=10, source_address=(source, 0))
    except ConnectionResetError:
        return None


def open_abusers(
    endpoint: tuple[str, int], source: str, count: int, slow: bool
) -> list[socket.socket]:
    opened = []
    for index in range(count):
        sock = connect(endpoint, source)
        if sock is None:
            continue
        opened.append(sock)
        if slow and index % 2:
            # A frame of 65535 bytes announced, 100 sent, the rest never (unless the
            # connection was refused and reset already).
            with contextlib.suppress(OSError):
                sock.sendall(b"HEP3\xff\xff" + b"\x00" * 100)
    return opened


def test_idle_and_slowloris_floods_do_not_stall_a_good_agent(tmp_path: Path) -> None:
    sources = [f"127.0.0.{n}" for n in range(3, 27)]  # 24 x 100 = 2400 attempts
    attempts = 120 + len(sources) * MAX_PER_SOURCE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = attempts + 500
    assert hard >= needed, f"this test opens {attempts} sockets: raise the hard file limit"
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    daemon = start_daemon(
        tmp_path,
        SIPCDR_CAPTURE__HEP_TCP_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
        SIPCDR_CAPTURE__HEP_TCP_MAX_PER_SOURCE=str(MAX_PER_SOURCE),
        SIPCDR_CAPTURE__HEP_TCP_IDLE_TIMEOUT_S=str(IDLE_TIMEOUT_S),
        SIPCDR_CAPTURE__HEP_TCP_FRAME_TIMEOUT_S=str(FRAME_TIMEOUT_S),
        SIPCDR_CAPTURE__HEP_KEYS__2001="s3cret",
    )
    abusers: list[socket.socket] = []
    agent = Agent(daemon.endpoint("hep_tcp"))
    try:
        assert started_event(daemon)["hep_connections_max"] == MAX_CONNECTIONS
        agent.start()
        wait_for(lambda: len(daemon.cdrs()) >= 20)
        rss_before = vm_rss_kib(daemon.process.pid)

        # CDR arrivals watched from here on: the agent's calls must keep landing.
        arrivals: list[float] = [time.monotonic()]
        seen = len(daemon.cdrs())

        def watch() -> None:
            nonlocal seen
            count = len(daemon.cdrs())
            if count > seen:
                seen = count
                arrivals.append(time.monotonic())

        endpoint = daemon.endpoint("hep_tcp")
        abusers += open_abusers(endpoint, "127.0.0.2", 120, slow=False)
        for source in sources:
            abusers += open_abusers(endpoint, source, MAX_PER_SOURCE, slow=True)
            watch()
        peak_open = 0.0
        rss_peak = 0

        def refused(reason: str) -> float:
            return daemon.metric(
                "sipcdr_hep_connections_refused_total", source="hep_tcp", reason=reason
            )

        def closed(reason: str) -> float:
            return daemon.metric(
                "sipcdr_hep_connections_closed_total", source="hep_tcp", reason=reason
            )

        def all_abusers_gone() -> bool:
            nonlocal peak_open, rss_peak
            watch()
            peak_open = max(peak_open, daemon.metric("sipcdr_hep_connections", source="hep_tcp"))
            rss_peak = max(rss_peak, vm_rss_kib(daemon.process.pid))
            accounted = (
                refused("max_per_source")
                + refused("max_connections")
                + closed("idle_timeout")
                + closed("frame_timeout")
            )
            return accounted == attempts

        wait_for(all_abusers_gone, timeout=30)
        for sock in abusers:
            sock.close()
        abusers.clear()
        assert daemon.metric("sipcdr_hep_connections", source="hep_tcp") == 1  # the agent
        # The caps held: one source 100 at most, everyone together 2000 at most.
        assert refused("max_per_source") >= 20
        assert refused("max_connections") >= attempts - 20 - MAX_CONNECTIONS
        assert MAX_CONNECTIONS / 2 < peak_open <= MAX_CONNECTIONS
        assert closed("frame_timeout") > 0 and closed("idle_timeout") > 0
        assert refused("not_allowed") == 0

        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # a few more calls after the flood
            watch()
            time.sleep(0.05)
        agent.halt.set()
        agent.join(timeout=20)
        assert agent.error is None, repr(agent.error)
        rss_after = vm_rss_kib(daemon.process.pid)
    finally:
        for sock in abusers:
            sock.close()
        agent.halt.set()
        stop_code = daemon.stop()
    assert stop_code == 0
    # Every call of the agent arrived, once.
    call_ids = [str(record["call_id"]) for record in daemon.cdrs()]
    assert sorted(call_ids) == sorted(agent.sent)
    assert all(record["disposition"] == "answered" for record in daemon.cdrs())
    # Delivery never stalled: with a call every 50 ms, never 1.5 s without a new CDR.
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    print(
        f"RSS before {rss_before} KiB, peak {rss_peak} KiB with {peak_open:.0f} open, "
        f"after {rss_after} KiB; longest gap between CDRs {max(gaps):.2f} s "
        f"over {len(arrivals)} arrivals"
    )
    assert max(gaps) < 1.5
    # An open connection costs a transport and a small protocol object: 2,000 of them,
    # half with a started frame buffered, took about 3 MiB here. Bounds with room for
    # other machines; once they are gone the daemon is within 8 MiB of before.
    assert rss_peak - rss_before < 16 * 1024
    assert rss_after - rss_before < 8 * 1024


def test_a_low_file_limit_lowers_the_connection_cap_and_says_so(tmp_path: Path) -> None:
    """Started under a file limit of 512, the default cap of 1024 connections would
    let agents take every descriptor the spool and the sinks need."""

    # `sipcdr run` in a process that lowers its own file limit first (hard and soft,
    # so the daemon cannot raise it back).
    under_low_limit = (
        "import resource, runpy, sys; "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512)); "
        "sys.argv = ['sipcdr', 'run']; runpy.run_module('sipcdr.cli', run_name='__main__')"
    )
    log = tmp_path / "daemon.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-c", under_low_limit],
            cwd=tmp_path, env=daemon_environ(), stdout=handle, stderr=subprocess.STDOUT,
        )  # fmt: skip
    daemon: Daemon | None = None
    connections: list[socket.socket] = []
    try:
        wait_for(lambda: '"event": "started"' in log.read_text(), timeout=30)
        events = {event["event"]: event for event in map(json.loads, log.read_text().splitlines())}
        warning = events["file_limit_low"]
        assert warning["level"] == "warning"
        assert (warning["file_limit"], warning["hep_tcp_max_connections"]) == (512, 1024)
        assert warning["capped_at"] == 512 - 256
        started = events["started"]
        assert (started["file_limit"], started["hep_connections_max"]) == (512, 256)
        daemon = Daemon(process, tmp_path, log, started["listeners"], started["metrics_port"])
        endpoint = daemon.endpoint("hep_tcp")
        for n in range(300):
            sock = connect(endpoint, f"127.0.0.{2 + n % 8}")
            if sock is not None:
                connections.append(sock)
        wait_for(
            lambda: (
                daemon is not None
                and daemon.metric(
                    "sipcdr_hep_connections_refused_total",
                    source="hep_tcp",
                    reason="max_connections",
                )
                == 300 - 256
            )
        )
        # With the connections it could hold all open, the daemon still writes CDRs.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for data in answered_call_messages(Call("still@x")):
                udp.sendto(data, daemon.endpoint("sip_udp"))
        wait_for(lambda: daemon is not None and len(daemon.cdrs()) == 1)
    finally:
        for sock in connections:
            sock.close()
        if daemon is not None:
            assert daemon.stop() == 0
        else:
            process.kill()
            process.wait(timeout=10)
