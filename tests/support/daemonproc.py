"""A `sipcdr run` process for tests: started on free loopback ports, read through its
log line, its metrics endpoint and its JSONL file."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 30.0


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    workdir: Path
    log: Path
    listeners: dict[str, list[str]]
    metrics_port: int

    def endpoint(self, kind: str) -> tuple[str, int]:
        host, _, port = self.listeners[kind][0].rpartition(":")
        return host, int(port)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        series = f"{name}{{{wanted}}}" if labels else name
        for line in self.metrics().splitlines():
            key, _, value = line.rpartition(" ")
            if key == series or (labels and _same_series(key, name, labels)):
                return float(value)
        return 0.0

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def records(self) -> list[dict[str, object]]:
        """Every line of the JSONL file: CDRs, and fraud alerts when it is the only sink.
        Read as a tailing consumer would: a last line without its newline is still being
        written by the delivery process, and is left for the next read."""
        path = self.workdir / "var" / "cdrs.jsonl"
        if not path.exists():
            return []
        complete, _, _ = path.read_bytes().rpartition(b"\n")
        return [json.loads(line) for line in complete.splitlines() if line]

    def cdrs(self) -> list[dict[str, object]]:
        return [record for record in self.records() if "alert_id" not in record]

    def alerts(self) -> list[dict[str, object]]:
        return [record for record in self.records() if "alert_id" in record]


def _same_series(key: str, name: str, labels: dict[str, str]) -> bool:
    if not key.startswith(name + "{"):
        return False
    found = dict(part.split("=", 1) for part in key[len(name) + 1 : -1].split(","))
    return all(found.get(k) == f'"{v}"' for k, v in labels.items())


def daemon_environ(**env: str) -> dict[str, str]:
    """This process's environment without its SIPCDR_ settings, every listener on a
    free loopback port, no PostgreSQL sink, a 1 MiB spare file (the default 64 MiB in
    every test's state folder would add up), then `env` on top."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SIPCDR_")}
    environ.update(
        SIPCDR_CAPTURE__SIP_UDP="127.0.0.1:0",
        SIPCDR_CAPTURE__HEP_UDP="127.0.0.1:0",
        SIPCDR_CAPTURE__HEP_TCP="127.0.0.1:0",
        SIPCDR_METRICS__LISTEN="127.0.0.1:0",
        SIPCDR_SINKS__POSTGRES__DSN="",
        SIPCDR_STATE__SPARE_BYTES=str(1024 * 1024),
    )
    environ.update(env)
    return environ


def start_daemon(workdir: Path, **env: str) -> Daemon:
    environ = daemon_environ(**env)
    log = workdir / f"daemon-{time.monotonic_ns()}.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "sipcdr.cli", "run"],
            cwd=workdir,
            env=environ,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if '"event": "started"' in line:
                event = json.loads(line)
                return Daemon(process, workdir, log, event["listeners"], event["metrics_port"])
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"daemon did not start:\n{log.read_text()}")


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail("condition not met in time")


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons a test starts (append each): killed in teardown if still running."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(timeout=10)


def send_sip(daemon: Daemon, messages: Sequence[bytes]) -> None:
    """Plain SIP datagrams to the daemon's SIP/UDP listener, in order."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for data in messages:
            udp.sendto(data, daemon.endpoint("sip_udp"))
