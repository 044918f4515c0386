"""`sipcdr run` delivers from a process of its own: one is there with the default
settings, killing it loses no CDR (it is started again and resumes from its cursors),
and its counts reach the capture process's metrics endpoint."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from daemonproc import Daemon, start_daemon, wait_for
from pgserver import PrivatePg, run_sync
from test_delivery_end_to_end import closed_cdrs, pg_cdr_ids, send_calls

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def delivery_pids(daemon: Daemon) -> list[int]:
    """The delivery processes the daemon started, in order (its log lines)."""
    lines = daemon.log.read_text().splitlines()
    return [int(json.loads(line)["pid"]) for line in lines if '"delivery_process_started"' in line]


def niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[16])


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


def test_the_delivery_process_killed_mid_stream_loses_no_cdr(
    tmp_path: Path, private_pg: PrivatePg, daemons: list[Daemon]
) -> None:
    server = private_pg()
    dsn = run_sync(server.start)
    daemon = start_daemon(tmp_path, SIPCDR_SINKS__POSTGRES__DSN=dsn)
    daemons.append(daemon)
    wait_for(lambda: len(delivery_pids(daemon)) == 1)
    first = delivery_pids(daemon)[0]
    assert first != daemon.process.pid
    assert parent_of(first) == daemon.process.pid
    # Delivery yields the processor to capture (`[spool] delivery_nice`, 5 by default);
    # the kernel caps a nice value at 19, which a test run niced itself may reach.
    assert niceness(first) == min(niceness(daemon.process.pid) + 5, 19)

    # Counted by the delivery process, exported by the capture process.
    records = {"sink": "postgres", "stream": "records"}
    send_calls(daemon, [f"a{n}" for n in range(50)], pace_per_s=4000)
    wait_for(lambda: daemon.metric("sipcdr_sink_records_total", **records) == 50, timeout=30)
    assert daemon.metric("sipcdr_sink_up", **records) == 1
    assert daemon.metric("sipcdr_postgres_rows_total", table="cdrs", outcome="inserted") == 50

    names = [f"b{n}" for n in range(600)]
    sender = threading.Thread(target=send_calls, args=(daemon, names, 3000))
    sender.start()
    time.sleep(0.4)
    os.kill(first, signal.SIGKILL)
    sender.join()
    wait_for(lambda: len(delivery_pids(daemon)) == 2, timeout=30)
    second = delivery_pids(daemon)[1]
    assert second != first and parent_of(second) == daemon.process.pid
    wait_for(lambda: daemon.metric("sipcdr_delivery_process_restarts_total") == 1)
    assert '"delivery_process_died"' in daemon.log.read_text()

    wait_for(lambda: len(pg_cdr_ids(dsn)) >= 650, timeout=60)
    ids = pg_cdr_ids(dsn)
    assert len(ids) == len(set(ids)) == 650  # every CDR, each once
    jsonl = {str(record["cdr_id"]) for record in daemon.cdrs()}
    wait_for(lambda: {str(r["cdr_id"]) for r in daemon.cdrs()} == set(ids), timeout=30)
    assert jsonl <= set(ids)
    wait_for(lambda: daemon.metric("sipcdr_sink_lag_records", **records) == 0)

    assert daemon.stop() == 0
    assert not Path(f"/proc/{second}").exists()  # ended with the daemon


def test_stop_delivers_what_the_capture_side_wrote_last(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """SIGTERM to both processes (as Ctrl-C or a group kill sends it): the delivery
    process waits for the capture side's last CDR and delivers it before both end."""
    daemon = start_daemon(tmp_path)
    daemons.append(daemon)
    wait_for(lambda: len(delivery_pids(daemon)) == 1)
    child = delivery_pids(daemon)[0]
    send_calls(daemon, [f"s{n}" for n in range(300)], pace_per_s=20000)
    wait_for(lambda: closed_cdrs(daemon) == 300)
    os.kill(child, signal.SIGTERM)  # ignored: the capture process decides
    os.kill(child, signal.SIGHUP)  # a reload sent to the group, or a terminal's hang-up
    time.sleep(0.5)
    assert delivery_pids(daemon) == [child]
    assert daemon.stop() == 0
    assert not Path(f"/proc/{child}").exists()
    ids = [str(record["cdr_id"]) for record in daemon.cdrs()]
    assert len(set(ids)) == 300
