"""`sipcdr run` on a real 8 MiB disk that fills up under load while PostgreSQL is down:
no closed CDR is lost while the reserve holds them, every refused call is counted,
signaling gives way first, and once space is back and the database up, everything
arrives without a restart.

The state directory (spool, cursors, JSONL file) is a tmpfs of its own; a filler file
takes the free space and deleting it gives it back.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from daemonproc import Daemon, start_daemon, wait_for
from pgserver import PrivatePg, run_sync
from sipcalls import Call, answered_call_messages
from smalldisk import SmallDisk, fill
from test_delivery_end_to_end import closed_cdrs, jsonl_ids, pg_cdr_ids, send_calls

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(timeout=10)


def send(daemon: Daemon, messages: Sequence[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for data in messages:
            udp.sendto(data, daemon.endpoint("sip_udp"))


def received(daemon: Daemon) -> float:
    return daemon.metric("sipcdr_packets_received_total", source="sip_udp")


def refused(daemon: Daemon, reason: str) -> float:
    return daemon.metric("sipcdr_packets_dropped_total", source="intake", reason=reason)


def test_a_full_disk_loses_no_closed_cdr_and_recovers_without_a_restart(
    tmp_path: Path, small_disk: SmallDisk, private_pg: PrivatePg, daemons: list[Daemon]
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
        SIPCDR_STATE__SPARE_BYTES="0",  # the reserve's own path (the spare's: below)
    )
    daemons.append(daemon)
    sent = 0
    send_calls(daemon, ["warmup"])
    sent += 6
    wait_for(lambda: len(jsonl_ids(daemon)) == 1)

    # Calls in progress when the disk fills; they end while intake is paused.
    open_calls = [Call(call_id=f"open-{n}@e2e", from_tag=f"t-open-{n}") for n in range(20)]
    send(daemon, [m for call in open_calls for m in answered_call_messages(call)[:4]])
    sent += 20 * 4
    filler = fill(disk, leave_bytes=1536 * 1024)  # 0.5 MiB above the signaling floor

    offered = 1 + len(open_calls)
    names = [f"load-{n}" for n in range(2000)]
    send_calls(daemon, names, pace_per_s=3000)
    offered += len(names)
    sent += len(names) * 6
    wait_for(lambda: refused(daemon, "write_error") > 0)  # the tick paused intake
    assert daemon.metric("sipcdr_spool_reserve_records", stream="records") > 0
    send(daemon, [m for call in open_calls for m in answered_call_messages(call)[4:]])
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
    assert set(ids) == set(jsonl_ids(daemon))
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
