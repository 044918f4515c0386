"""While the delivery process is gone or frozen nothing is delivered: the capture
process's metrics and /readyz must say so rather than repeat its last counts, and its
counters must not run backwards when a new one starts from zero."""

from __future__ import annotations

import os
import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from daemonproc import Daemon, start_daemon, wait_for
from test_delivery_end_to_end import send_calls
from test_delivery_process import delivery_pids

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

RECORDS = {"sink": "jsonl", "stream": "records"}


def readyz(daemon: Daemon) -> int:
    url = f"http://127.0.0.1:{daemon.metrics_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_frozen_delivery_process_shows_its_sinks_down(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = start_daemon(tmp_path, SIPCDR_SPOOL__MAX_BYTES=str(1024 * 1024))
    daemons.append(daemon)
    wait_for(lambda: len(delivery_pids(daemon)) == 1)
    child = delivery_pids(daemon)[0]
    assert readyz(daemon) == 200
    os.kill(child, signal.SIGSTOP)
    try:
        send_calls(daemon, [f"f{n}" for n in range(3000)], pace_per_s=3000)
        wait_for(lambda: daemon.metric("sipcdr_spool_full", stream="records") == 1)
        assert daemon.metric("sipcdr_calls_refused_total", reason="spool_full") > 0
        wait_for(lambda: daemon.metric("sipcdr_sink_up", **RECORDS) == 0, timeout=15)
        assert readyz(daemon) == 503  # calls are refused: not ready
    finally:
        os.kill(child, signal.SIGCONT)
    wait_for(lambda: daemon.metric("sipcdr_sink_up", **RECORDS) == 1, timeout=15)
    wait_for(lambda: readyz(daemon) == 200, timeout=15)
    assert daemon.stop() == 0
    ids = [str(record["cdr_id"]) for record in daemon.cdrs()]
    assert len(ids) == len(set(ids)) > 0


def test_counters_survive_a_restart_of_the_delivery_process(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = start_daemon(tmp_path)
    daemons.append(daemon)
    wait_for(lambda: len(delivery_pids(daemon)) == 1)
    send_calls(daemon, [f"c{n}" for n in range(40)], pace_per_s=4000)
    wait_for(lambda: daemon.metric("sipcdr_sink_records_total", **RECORDS) >= 40, timeout=30)
    before = daemon.metric("sipcdr_sink_records_total", **RECORDS)
    os.kill(delivery_pids(daemon)[0], signal.SIGKILL)
    # Gone: nothing is delivered until the next one runs (a back-off of a second).
    wait_for(lambda: daemon.metric("sipcdr_sink_up", **RECORDS) == 0, timeout=5)
    wait_for(lambda: len(delivery_pids(daemon)) == 2, timeout=30)
    wait_for(lambda: daemon.metric("sipcdr_delivery_process_restarts_total") == 1)
    send_calls(daemon, [f"d{n}" for n in range(10)], pace_per_s=4000)
    wait_for(
        lambda: daemon.metric("sipcdr_sink_records_total", **RECORDS) >= before + 10, timeout=30
    )
    assert daemon.metric("sipcdr_sink_up", **RECORDS) == 1
    assert daemon.stop() == 0
    ids = [str(record["cdr_id"]) for record in daemon.cdrs()]
    assert len(ids) == len(set(ids)) == 50
