"""The spare's room after a crash on a full disk: the room the spare gave is for the
calls that were open, and a restart must not hand it to new calls.

Run one gives up the spare (the disk is full) and is killed with calls still open.
Run two starts on that disk: its only free space is what the spare gave. If it takes
new calls in, they fill that room, the open calls' CDRs then wait in memory with no
journal behind them, and a second crash loses them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from daemonproc import Daemon, send_sip, start_daemon, wait_for
from sipcalls import Call, answered_call_messages
from smalldisk import SmallDisk, fill
from test_delivery_end_to_end import closed_cdrs, send_calls

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def kill(daemon: Daemon) -> None:
    daemon.process.kill()
    daemon.process.wait(timeout=10)


def call_ids(jsonl: Path) -> list[str]:
    if not jsonl.exists():
        return []
    return [str(json.loads(line)["call_id"]) for line in jsonl.read_text().splitlines() if line]


def test_a_restart_keeps_the_released_spares_room_for_the_calls_still_open(
    tmp_path: Path, small_disk: SmallDisk, daemons: list[Daemon]
) -> None:
    disk = small_disk(tmp_path / "var", 8 * 1024 * 1024)
    env = {
        "SIPCDR_SPOOL__SIGNALING_MIN_FREE_BYTES": str(512 * 1024),
        "SIPCDR_SPOOL__SEGMENT_BYTES": str(64 * 1024),
    }
    first = start_daemon(tmp_path, **env)
    daemons.append(first)
    wait_for(lambda: first.metric("sipcdr_spare_bytes") == 1024 * 1024)
    ending = [Call(call_id=f"end-{n}@x", from_tag=f"e{n}") for n in range(30)]
    lasting = [Call(call_id=f"last-{n}@x", from_tag=f"l{n}") for n in range(10)]
    send_sip(first, [m for call in [*ending, *lasting] for m in answered_call_messages(call)[:4]])
    wait_for(lambda: first.metric("sipcdr_open_dialogs") == 40)
    filler = fill(disk, leave_bytes=0)
    send_sip(first, [m for call in ending for m in answered_call_messages(call)[4:]])
    wait_for(lambda: first.metric("sipcdr_spare_released_total") == 1)
    wait_for(lambda: first.metric("sipcdr_open_dialogs") == 10)
    kill(first)

    second = start_daemon(tmp_path, **env)
    daemons.append(second)
    # The disk's free space is the room the spare gave, kept for the ten calls open.
    assert second.metric("sipcdr_open_dialogs") == 10
    send_calls(second, [f"new-{n}" for n in range(1500)], pace_per_s=1500)
    send_sip(second, [m for call in lasting for m in answered_call_messages(call)[4:]])
    wait_for(lambda: second.metric("sipcdr_open_dialogs") == 0, timeout=30)
    closed_new = closed_cdrs(second) - len(lasting)
    kill(second)

    filler.unlink()
    third = start_daemon(tmp_path, **env)
    daemons.append(third)
    jsonl = tmp_path / "var" / "cdrs.jsonl"
    expected = {call.call_id for call in [*ending, *lasting]}
    # Every CDR the second run closed, and every one of the first run, reaches the file.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(set(call_ids(jsonl))) < len(expected) + closed_new:
        time.sleep(0.2)
    found = set(call_ids(jsonl))
    assert expected <= found, f"lost: {sorted(expected - found)}"
    assert len(found) == len(expected) + closed_new, f"{len(found)} of {len(expected) + closed_new}"
    assert third.stop() == 0


def test_the_daemon_starts_on_a_full_disk_with_its_embedded_database(
    open_tmp_path: Path, small_disk: SmallDisk, daemons: list[Daemon]
) -> None:
    """The defaults put the embedded PostgreSQL on the state disk: a restart on a full
    disk must still capture (the database waits, its records in the spool), not stop
    with `start_failed` while the spare's room sits unused."""
    tmp_path = open_tmp_path  # the embedded server's user passes through to the state
    disk = small_disk(tmp_path / "var", 96 * 1024 * 1024)
    env = {
        "SIPCDR_SINKS__POSTGRES__DSN": "embedded",
        "SIPCDR_SPOOL__SIGNALING_MIN_FREE_BYTES": str(512 * 1024),
    }
    first = start_daemon(tmp_path, **env)
    daemons.append(first)
    send_sip(first, answered_call_messages(Call(call_id="before@x", from_tag="b")))
    wait_for(lambda: len(call_ids(tmp_path / "var" / "cdrs.jsonl")) == 1)
    assert first.stop() == 0
    filler = fill(disk, leave_bytes=0)

    second = start_daemon(tmp_path, **env)  # fails the test if it does not start
    daemons.append(second)
    filler.unlink()
    wait_for(lambda: second.metric("sipcdr_intake_paused") == 0, timeout=60)
    send_sip(second, answered_call_messages(Call(call_id="after@x", from_tag="a")))
    wait_for(lambda: len(call_ids(tmp_path / "var" / "cdrs.jsonl")) == 2, timeout=30)
    assert second.stop() == 0


def test_cdrs_only_in_memory_are_shown_before_a_crash_can_take_them(
    tmp_path: Path, small_disk: SmallDisk, daemons: list[Daemon]
) -> None:
    """No spare (or its room used up) and a disk full even for the journal: a CDR the
    disk refuses then has no copy anywhere but memory, and no later start can count
    it. The gauge says so while it is true, which is what an alert (and Prometheus's
    last sample of a process that died) has."""
    disk = small_disk(tmp_path / "var", 8 * 1024 * 1024)
    env = {
        "SIPCDR_STATE__SPARE_BYTES": "0",
        "SIPCDR_SPOOL__SIGNALING_MIN_FREE_BYTES": str(512 * 1024),
    }
    daemon = start_daemon(tmp_path, **env)
    daemons.append(daemon)
    calls = [Call(call_id=f"risk-{n}@x", from_tag=f"r{n}") for n in range(40)]
    send_sip(daemon, [m for call in calls for m in answered_call_messages(call)[:4]])
    wait_for(lambda: daemon.metric("sipcdr_open_dialogs") == 40)
    assert daemon.metric("sipcdr_cdrs_at_risk") == 0
    filler = fill(disk, leave_bytes=0)
    send_sip(daemon, [m for call in calls for m in answered_call_messages(call)[4:]])
    wait_for(lambda: daemon.metric("sipcdr_open_dialogs") == 0)
    # The journal took the first closes in what was left of its last page, then failed.
    assert daemon.metric("sipcdr_dialog_state_errors_total", what="journal_write_error") > 0
    held = daemon.metric("sipcdr_spool_reserve_records", stream="records")
    assert daemon.metric("sipcdr_cdrs_at_risk") == held > 0
    filler.unlink()  # the disk takes them again: written, nothing at risk
    wait_for(lambda: daemon.metric("sipcdr_cdrs_at_risk") == 0, timeout=30)
    wait_for(lambda: len(call_ids(tmp_path / "var" / "cdrs.jsonl")) == 40, timeout=30)
    assert daemon.stop() == 0
