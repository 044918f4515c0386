"""`sipcdr run` on a real 8 MiB disk that fills up under load while PostgreSQL is down:
no closed CDR is lost while the reserve holds them, every refused call is counted,
signaling gives way first, and once space is back and the database up, everything
arrives without a restart.

The state directory (spool, cursors, JSONL file) is a tmpfs of its own; a filler file
takes the free space and deleting it gives it back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from daemonproc import Daemon, send_sip, start_daemon, wait_for
from pgserver import PrivatePg, run_sync
from sipcalls import Call, answered_call_messages
from sipcdr.clock import FakeClock
from sipcdr.spare import SpareSpace
from smalldisk import SmallDisk, fill, free_bytes
from test_delivery_end_to_end import closed_cdrs, jsonl_ids, pg_cdr_ids, send_calls

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def received(daemon: Daemon) -> float:
    return daemon.metric("sipcdr_packets_received_total", source="sip_udp")


def refused(daemon: Daemon, reason: str) -> float:
    return daemon.metric("sipcdr_calls_refused_total", reason=reason)


@pytest.mark.parametrize("spare_bytes", [0, 1024 * 1024])
def test_a_full_disk_loses_no_closed_cdr_and_recovers_without_a_restart(
    tmp_path: Path,
    small_disk: SmallDisk,
    private_pg: PrivatePg,
    daemons: list[Daemon],
    spare_bytes: int,
) -> None:
    server = private_pg()
    dsn = run_sync(server.start)  # known now; down while the disk fills
    run_sync(server.stop)
    disk = small_disk(tmp_path / "var", 8 * 1024 * 1024)
    daemon = start_daemon(
        tmp_path,
        SIPCDR_SINKS__POSTGRES__DSN=dsn,
        SIPCDR_SPOOL__SEGMENT_BYTES=str(64 * 1024),
        SIPCDR_SPOOL__SIGNALING_MIN_FREE_BYTES=str(1024 * 1024),
        # 0: the reserve's own path; with a spare, its room goes first (and below)
        SIPCDR_STATE__SPARE_BYTES=str(spare_bytes),
    )
    daemons.append(daemon)
    sent = 0
    send_calls(daemon, ["warmup"])
    sent += 6
    wait_for(lambda: len(jsonl_ids(daemon)) == 1)

    # Calls in progress when the disk fills; they end while intake is paused.
    open_calls = [Call(call_id=f"open-{n}@e2e", from_tag=f"t-open-{n}") for n in range(20)]
    send_sip(daemon, [m for call in open_calls for m in answered_call_messages(call)[:4]])
    sent += 20 * 4
    filler = fill(disk, leave_bytes=1536 * 1024)  # 0.5 MiB above the signaling floor

    offered = 1 + len(open_calls)
    names = [f"load-{n}" for n in range(2000)]
    send_calls(daemon, names, pace_per_s=3000)
    offered += len(names)
    sent += len(names) * 6
    wait_for(lambda: refused(daemon, "write_error") > 0)  # the tick paused intake
    if spare_bytes:
        assert daemon.metric("sipcdr_spare_released_total") == 1  # its room went first
    else:
        assert daemon.metric("sipcdr_spool_reserve_records", stream="records") > 0
    send_sip(daemon, [m for call in open_calls for m in answered_call_messages(call)[4:]])
    sent += 20 * 2
    late = [f"late-{n}" for n in range(50)]
    send_calls(daemon, late)
    offered += len(late)
    sent += len(late) * 6
    wait_for(lambda: received(daemon) == sent)
    assert daemon.metric("sipcdr_packets_dropped_total", source="sip_udp") == 0

    # Every call offered either closed (its CDR kept) or had its INVITE refused, counted.
    closed = closed_cdrs(daemon)
    refusals = refused(daemon, "write_error") + refused(daemon, "spool_full")
    assert closed + refusals == offered
    assert refused(daemon, "write_error") >= len(late)
    assert daemon.metric("sipcdr_spool_dropped_total", stream="records") == 0
    assert daemon.metric("sipcdr_spool_dropped_total", stream="signaling", reason="disk_floor") > 0
    assert daemon.metric("sipcdr_sink_up", sink="postgres", stream="records") == 0

    if spare_bytes:
        # Some room comes back, too little for the spare and a quarter as much again:
        # new calls are taken in all the same (the spare comes back once it can).
        filler.unlink()
        filler = fill(disk, leave_bytes=spare_bytes + 128 * 1024)
        wait_for(lambda: daemon.metric("sipcdr_intake_paused") == 0, timeout=30)
    filler.unlink()
    assert run_sync(server.start) == dsn
    wait_for(lambda: len(pg_cdr_ids(dsn)) == closed, timeout=60)
    wait_for(lambda: len(set(jsonl_ids(daemon))) == closed, timeout=30)
    wait_for(lambda: daemon.metric("sipcdr_spool_reserve_records", stream="records") == 0)
    # Once the disk has taken writes for a while (not at once: it must not flap).
    wait_for(lambda: daemon.metric("sipcdr_intake_paused") == 0, timeout=20)
    assert "intake_resumed" in daemon.log.read_text()
    send_calls(daemon, [f"after-{n}" for n in range(10)])  # taken in again
    wait_for(lambda: len(pg_cdr_ids(dsn)) == closed + 10, timeout=30)
    ids = pg_cdr_ids(dsn)
    assert len(ids) == len(set(ids))
    # The sinks deliver independently: the JSONL file may be a flush behind PostgreSQL.
    wait_for(lambda: set(jsonl_ids(daemon)) == set(ids), timeout=30)
    assert {f"open-{n}@e2e" for n in range(20)} <= {
        str(record["call_id"]) for record in daemon.cdrs()
    }
    # Lost signaling is counted once, as refused: no gap, no backlog that never clears.
    assert daemon.metric("sipcdr_spool_damaged_total", stream="signaling") == 0
    wait_for(
        lambda: daemon.metric("sipcdr_sink_lag_records", sink="postgres", stream="signaling") == 0
    )
    assert daemon.metric("sipcdr_spool_dropped_total", stream="records") == 0
    assert daemon.stop() == 0


def open_calls(daemon: Daemon, calls: Sequence[Call]) -> None:
    """INVITE, 180, 200, ACK: answered, in progress."""
    send_sip(daemon, [m for call in calls for m in answered_call_messages(call)[:4]])


def hang_up(daemon: Daemon, calls: Sequence[Call]) -> None:
    send_sip(daemon, [m for call in calls for m in answered_call_messages(call)[4:]])


def log_events(daemon: Daemon) -> list[dict[str, object]]:
    return [json.loads(line) for line in daemon.log.read_text().splitlines() if line]


def by_call(daemon: Daemon) -> dict[str, list[dict[str, object]]]:
    found: dict[str, list[dict[str, object]]] = {}
    for record in daemon.cdrs():
        found.setdefault(str(record["call_id"]), []).append(record)
    return found


@pytest.mark.parametrize("stop", ["sigkill", "sigterm"])
def test_cdrs_held_while_the_spool_disk_is_full_survive_a_kill_or_a_stop(
    tmp_path: Path, small_disk: SmallDisk, daemons: list[Daemon], stop: str
) -> None:
    """Only the spool's disk is full: the CDRs wait in memory, their calls are not
    recorded as closed, so a SIGKILL (the journal) or a stop (its last checkpoint) keeps
    them, and the next start writes each once."""
    var = tmp_path / "var"
    var.mkdir(mode=0o700)
    spool_disk = small_disk(var / "spool", 2 * 1024 * 1024)
    first = start_daemon(tmp_path)
    daemons.append(first)
    calls = [Call(call_id=f"held-{n}@x", from_tag=f"h{n}") for n in range(30)]
    open_calls(first, calls)
    wait_for(lambda: first.metric("sipcdr_open_dialogs") == 30)
    filler = fill(spool_disk, leave_bytes=0)
    hang_up(first, calls)
    wait_for(lambda: first.metric("sipcdr_spool_reserve_records", stream="records") == 30)
    assert first.metric("sipcdr_dialog_journal_records_total", kind="close") == 0
    if stop == "sigkill":
        first.process.kill()
        first.process.wait(timeout=10)
    else:
        assert first.stop() == 0
        events = log_events(first)
        assert [e["cdrs"] for e in events if e["event"] == "cdrs_kept_for_next_start"] == [30]
        assert not [e for e in events if e["event"] == "spool_refused_records"]
    assert first.cdrs() == []
    filler.unlink()

    second = start_daemon(tmp_path)
    daemons.append(second)
    wait_for(lambda: len(second.cdrs()) >= 30)
    assert second.stop() == 0
    records = by_call(second)
    assert sorted(records) == sorted(call.call_id for call in calls)
    assert all(len(found) == 1 for found in records.values())
    assert {found[0]["end_reason"] for found in records.values()} == {"bye"}


def test_the_spare_file_keeps_a_disk_full_for_everything_durable(
    tmp_path: Path, small_disk: SmallDisk, daemons: list[Daemon]
) -> None:
    """One 4 MiB disk for spool, journal and checkpoints, full. The first refused write
    gives up the 1 MiB spare: the CDRs of the calls that end go to disk, their journal
    records too, new calls are refused; once space is back the spare is allocated again
    and intake resumes. A SIGKILL in the middle loses no call."""
    disk = small_disk(tmp_path / "disk", 4 * 1024 * 1024)
    env = {
        "SIPCDR_STATE__DIR": str(disk / "var"),
        "SIPCDR_SINKS__JSONL__PATH": str(tmp_path / "cdrs.jsonl"),
        "SIPCDR_SPOOL__SIGNALING_MIN_FREE_BYTES": str(512 * 1024),
    }
    first = start_daemon(tmp_path, **env)
    daemons.append(first)
    wait_for(lambda: first.metric("sipcdr_spare_bytes") == 1024 * 1024)
    ending = [Call(call_id=f"end-{n}@x", from_tag=f"e{n}") for n in range(30)]
    lasting = [Call(call_id=f"last-{n}@x", from_tag=f"l{n}") for n in range(10)]
    open_calls(first, [*ending, *lasting])
    wait_for(lambda: first.metric("sipcdr_open_dialogs") == 40)
    filler = fill(disk, leave_bytes=0)
    # The first refused write gives up the spare and pauses intake at once: a call
    # offered right behind the BYEs, before any timer run, is refused already.
    hang_up(first, ending)
    send_sip(first, [Call(call_id="refused@x").request("INVITE")])
    wait_for(lambda: first.metric("sipcdr_open_dialogs") == 10)
    wait_for(lambda: first.metric("sipcdr_spare_released_total") == 1)
    wait_for(lambda: first.metric("sipcdr_intake_paused") == 1)
    wait_for(lambda: refused(first, "write_error") == 1)
    assert first.metric("sipcdr_spool_reserve_records", stream="records") == 0
    assert first.metric("sipcdr_dialog_state_errors_total", what="journal_write_error") == 0
    first.process.kill()  # nothing was lost to the full disk: the kill loses nothing either
    first.process.wait(timeout=10)

    second = start_daemon(tmp_path, **env)
    daemons.append(second)
    recovered = [e for e in log_events(second) if e["event"] == "dialogs_recovered"]
    assert recovered[0]["open_dialogs"] == 10
    filler.unlink()
    wait_for(lambda: second.metric("sipcdr_spare_bytes") == 1024 * 1024, timeout=20)
    wait_for(lambda: second.metric("sipcdr_intake_paused") == 0, timeout=20)
    hang_up(second, lasting)
    jsonl = tmp_path / "cdrs.jsonl"

    def records() -> dict[str, list[dict[str, object]]]:
        found: dict[str, list[dict[str, object]]] = {}
        for line in jsonl.read_text().splitlines() if jsonl.exists() else []:
            record = json.loads(line)
            found.setdefault(str(record["call_id"]), []).append(record)
        return found

    wait_for(lambda: len(records()) == 40, timeout=30)
    assert second.stop() == 0
    assert all(len(found) == 1 for found in records().values())
    assert {found[0]["end_reason"] for found in records().values()} == {"bye"}


@pytest.mark.parametrize("spare", ["with_spare", "without_spare"])
def test_the_daemon_starts_on_a_full_disk(
    tmp_path: Path, small_disk: SmallDisk, daemons: list[Daemon], spare: str
) -> None:
    disk = small_disk(tmp_path / "disk", 4 * 1024 * 1024)
    env = {
        "SIPCDR_STATE__DIR": str(disk / "var"),
        "SIPCDR_SINKS__JSONL__PATH": str(tmp_path / "cdrs.jsonl"),
        "SIPCDR_STATE__CHECKPOINT_INTERVAL_S": "1",
    }
    if spare == "without_spare":
        env["SIPCDR_STATE__SPARE_BYTES"] = "0"
    first = start_daemon(tmp_path, **env)
    daemons.append(first)
    assert first.stop() == 0
    filler = fill(disk, leave_bytes=0)
    second = start_daemon(tmp_path, **env)  # raises if it does not start
    daemons.append(second)
    events = {str(e["event"]): e for e in log_events(second)}
    if spare == "with_spare":
        # The journal's header took the spare's room; new calls wait for the disk.
        assert "dialog_journal_unavailable" not in events
        assert events["intake_paused"]["reason"] == "write_error"  # before any call came
        wait_for(lambda: second.metric("sipcdr_spare_released_total") == 1)
    else:
        assert events["dialog_journal_unavailable"]["level"] == "error"
        wait_for(
            lambda: (
                second.metric("sipcdr_dialog_state_errors_total", what="journal_write_error") > 0
            )
        )
    filler.unlink()
    wait_for(lambda: second.metric("sipcdr_intake_paused") == 0, timeout=30)
    written = second.metric("sipcdr_dialog_checkpoints_total", outcome="written")
    open_calls(second, [Call(call_id="after@x")])
    wait_for(lambda: second.metric("sipcdr_open_dialogs") == 1, timeout=20)
    wait_for(
        lambda: second.metric("sipcdr_dialog_checkpoints_total", outcome="written") > written,
        timeout=30,
    )
    assert second.stop() == 0


def test_the_spare_file_is_allocated_given_up_and_allocated_again_with_room(
    tmp_path: Path, small_disk: SmallDisk
) -> None:
    clock = FakeClock()
    disk = small_disk(tmp_path / "disk", 4 * 1024 * 1024)
    spare = SpareSpace(disk / "spare", 1024 * 1024, clock)
    before = free_bytes(disk)
    assert spare.ensure()
    assert before - free_bytes(disk) >= 1024 * 1024  # blocks really taken
    assert spare.bytes_held == 1024 * 1024
    assert spare.release() and spare.released and not (disk / "spare").exists()
    assert not spare.release()  # nothing left to give
    filler = fill(disk, leave_bytes=1100 * 1024)  # less than the spare and a quarter
    clock.advance(10.0)
    assert not spare.ensure()
    filler.unlink()
    assert not spare.ensure()  # read again only after a while
    clock.advance(10.0)
    assert spare.ensure() and not spare.released
    fill(disk, leave_bytes=0)
    assert SpareSpace(disk / "spare", 1024 * 1024).ensure()  # the one on disk is kept
    off = SpareSpace(disk / "spare", 0)
    assert not off.ensure() and not (disk / "spare").exists()  # switched off: room back
