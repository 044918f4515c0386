"""The JSONL file across a SIGKILL of the delivery process: records the spool delivers
again (their cursor was not saved when the process died) are not written twice."""

from __future__ import annotations

import os
import signal
import threading
import time
from functools import partial
from pathlib import Path

import pytest
from daemonproc import Daemon, start_daemon, wait_for
from test_delivery_end_to_end import send_calls
from test_delivery_process import delivery_pids

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

RECORDS = {"sink": "jsonl", "stream": "records"}


def cdr_ids(daemon: Daemon) -> list[str]:
    return [str(record["cdr_id"]) for record in daemon.cdrs()]


def started(daemon: Daemon, count: int) -> bool:
    return len(delivery_pids(daemon)) == count


def delivered(daemon: Daemon, count: int) -> None:
    wait_for(lambda: len(cdr_ids(daemon)) >= count, timeout=60)
    wait_for(lambda: daemon.metric("sipcdr_sink_lag_records", **RECORDS) == 0, timeout=30)


def test_records_delivered_again_after_a_kill_are_in_the_file_once(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """The cursor is put back where it was 200 records earlier while the process is
    dead, as a kill between the file's fsync and the cursor save leaves it for one
    batch (or a power loss, for more): those 200 come again, and are left out."""
    daemon = start_daemon(tmp_path)
    daemons.append(daemon)
    wait_for(lambda: len(delivery_pids(daemon)) == 1)
    send_calls(daemon, [f"a{n}" for n in range(100)])
    delivered(daemon, 100)
    cursor = tmp_path / "var" / "spool" / "records" / "cursors" / "jsonl.cursor"
    earlier = cursor.read_bytes()
    send_calls(daemon, [f"b{n}" for n in range(200)])
    delivered(daemon, 300)

    os.kill(delivery_pids(daemon)[0], signal.SIGKILL)
    with cursor.open("r+b") as handle:  # in place, as the spool writes it
        handle.write(earlier)
    wait_for(lambda: len(delivery_pids(daemon)) == 2, timeout=30)
    send_calls(daemon, [f"c{n}" for n in range(50)])
    delivered(daemon, 350)
    time.sleep(1.0)  # anything written twice would be there by now
    ids = cdr_ids(daemon)
    assert len(ids) == len(set(ids)) == 350
    assert '"jsonl_repeats_skipped"' in daemon.log.read_text()
    assert daemon.stop() == 0


def test_a_kill_mid_stream_leaves_every_cdr_in_the_file_once(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Killed wherever it is while CDRs keep coming (in a write, between the fsync and
    the cursor save, or waiting): each CDR is in the file, once."""
    daemon = start_daemon(tmp_path)
    daemons.append(daemon)
    wait_for(lambda: len(delivery_pids(daemon)) == 1)
    names = [f"k{n}" for n in range(1500)]
    sender = threading.Thread(target=send_calls, args=(daemon, names, 6000))
    sender.start()
    for kill in range(3):
        time.sleep(0.5)
        wait_for(partial(started, daemon, kill + 1), timeout=30)
        os.kill(delivery_pids(daemon)[kill], signal.SIGKILL)
    sender.join()
    wait_for(lambda: len(delivery_pids(daemon)) == 4, timeout=60)
    delivered(daemon, 1500)
    ids = cdr_ids(daemon)
    assert len(ids) == len(set(ids)) == 1500
    assert daemon.stop() == 0
