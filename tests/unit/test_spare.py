"""The spare file on a real small disk: never trusted by its name alone, allocated again
when it can be, and never a reason to refuse calls once the disk takes CDRs again; the
daemon itself (in this process, its clocks under the test's hand) on a disk that fills.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sipcalls import Call, answered_call_messages, packet
from sipcdr.app import App
from sipcdr.clock import FakeClock
from sipcdr.config import load_config
from sipcdr.sinks.base import STREAM_SIGNALING
from sipcdr.spare import SpareSpace
from smalldisk import SmallDisk, fill, free_bytes
from structlog.testing import capture_logs

MIB = 1024 * 1024


@pytest.fixture
def clock() -> FakeClock:
    """The spare's, the spools' and the intake gate's clock, moved by the test."""
    return FakeClock()


def test_a_spare_deleted_or_cut_short_behind_the_daemon_is_made_again(
    tmp_path: Path, small_disk: SmallDisk, clock: FakeClock
) -> None:
    disk = small_disk(tmp_path / "disk", 4 * MIB)
    path = disk / "spare"
    spare = SpareSpace(path, MIB, clock=clock)
    assert spare.ensure()
    path.unlink()  # an operator's cleanup
    assert not spare.release()  # no room to give: nothing is claimed
    assert spare.releases == 0 and not spare.released
    clock.advance(10.0)
    assert spare.ensure() and path.stat().st_size == MIB
    os.truncate(path, 0)
    clock.advance(10.0)
    assert spare.ensure()
    assert path.stat().st_size == MIB and path.stat().st_blocks * 512 >= MIB
    (disk / "other-name").hardlink_to(path)  # unlinking the spare would free nothing
    clock.advance(10.0)
    with capture_logs() as logs:
        assert spare.ensure()
    assert path.stat().st_nlink == 1 and spare.bytes_held == MIB
    assert [e["event"] for e in logs] == ["spare_space_lost"]


def test_a_spare_of_another_size_is_resized_in_place_or_still_given_up_on_a_full_disk(
    tmp_path: Path, small_disk: SmallDisk, clock: FakeClock
) -> None:
    disk = small_disk(tmp_path / "disk", 8 * MIB)
    path = disk / "spare"
    assert SpareSpace(path, 2 * MIB, clock=clock).ensure()
    fill(disk, leave_bytes=0)
    smaller = SpareSpace(path, MIB, clock=clock)  # the setting was lowered; the disk is full
    assert smaller.ensure()
    assert path.stat().st_size == MIB and free_bytes(disk) >= MIB
    larger = SpareSpace(path, 3 * MIB, clock=clock)  # raised: no room to grow it...
    assert not larger.ensure()
    assert larger.release()  # ...but the room the old one holds is given up when needed
    assert not path.exists() and free_bytes(disk) >= 2 * MIB


def test_after_a_release_its_room_is_kept_until_that_much_is_free_and_it_comes_back_sooner(
    tmp_path: Path, small_disk: SmallDisk, clock: FakeClock
) -> None:
    disk = small_disk(tmp_path / "disk", 4 * MIB)
    spare = SpareSpace(disk / "spare", MIB, clock=clock)
    assert spare.ensure()
    filler = fill(disk, leave_bytes=0)
    assert spare.release() and spare.withheld
    filler.unlink()
    filler = fill(disk, leave_bytes=MIB - 100 * 1024)  # the room it gave, partly used
    clock.advance(10.0)
    assert not spare.ensure() and spare.withheld
    filler.unlink()
    filler = fill(disk, leave_bytes=MIB + 100 * 1024)  # its room, not a quarter more
    clock.advance(10.0)
    assert not spare.ensure() and spare.released
    assert not spare.withheld  # the calls already open have their room again
    filler.unlink()
    fill(disk, leave_bytes=MIB + MIB // 2)  # not twice its size, but room enough
    clock.advance(10.0)
    assert spare.ensure() and not spare.released


def test_a_release_is_kept_across_a_restart_until_the_room_is_back(
    tmp_path: Path, small_disk: SmallDisk, clock: FakeClock
) -> None:
    disk = small_disk(tmp_path / "disk", 4 * MIB)
    spare = SpareSpace(disk / "spare", MIB, clock=clock)
    assert spare.ensure()
    filler = fill(disk, leave_bytes=0)
    assert spare.release() and spare.withheld
    marker = disk / "spare.released"
    assert marker.stat().st_size == 0 and marker.stat().st_mode & 0o777 == 0o600
    fill(disk, leave_bytes=MIB - 100 * 1024)  # the CDRs of the calls open, partly
    # A crash or a stop: the next process finds the room the release gave still kept.
    restarted = SpareSpace(disk / "spare", MIB, clock=clock)
    with capture_logs() as logs:
        assert not restarted.ensure()
    assert restarted.withheld and restarted.released
    assert [e["event"] for e in logs] == ["spare_space_released_before_start"]
    filler.unlink()
    fill(disk, leave_bytes=MIB + 100 * 1024)  # as much as it gave is free again
    clock.advance(10.0)
    assert not restarted.ensure() and not restarted.withheld
    assert not marker.exists()
    again = SpareSpace(disk / "spare", MIB, clock=clock)  # the release is over for good
    again.ensure()
    assert not again.withheld and not again.released


def test_a_release_whose_room_was_used_up_is_not_kept_by_the_next_start(
    tmp_path: Path, small_disk: SmallDisk, clock: FakeClock
) -> None:
    disk = small_disk(tmp_path / "disk", 4 * MIB)
    spare = SpareSpace(disk / "spare", MIB, clock=clock)
    assert spare.ensure()
    fill(disk, leave_bytes=0)
    assert spare.release()
    spare.room_back()  # a CDR had to wait in memory: nothing left to keep
    assert not (disk / "spare.released").exists()
    restarted = SpareSpace(disk / "spare", MIB, clock=clock)
    assert not restarted.ensure() and not restarted.withheld


def test_a_spare_that_cannot_be_made_again_holds_nothing_back_once_there_is_room(
    tmp_path: Path, small_disk: SmallDisk, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = small_disk(tmp_path / "disk", 4 * MIB)
    spare = SpareSpace(disk / "spare", MIB, clock=clock)
    assert spare.ensure()
    filler = fill(disk, leave_bytes=0)
    assert spare.release()
    filler.unlink()

    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    clock.advance(10.0)
    with capture_logs() as logs:
        assert not spare.ensure()
    assert not spare.withheld  # the disk has room: the release is over without it
    events = [e["event"] for e in logs]
    assert events == ["spare_space_release_over", "spare_space_not_allocated"]
    clock.advance(10.0)
    with capture_logs() as logs:
        assert not spare.ensure()  # tried again, said once
    assert logs == []


@pytest.fixture
def daemon(tmp_path: Path, small_disk: SmallDisk, clock: FakeClock) -> Iterator[tuple[App, Path]]:
    """A daemon whose state is a 4 MiB disk with a 256 KiB spare and PostgreSQL down (so
    the spool keeps what it has), its JSONL file on another disk; its tick is the test's
    to call."""
    disk = small_disk(tmp_path / "disk", 4 * MIB)
    yield _daemon(disk, tmp_path / "cdrs.jsonl", clock)


def _daemon(disk: Path, jsonl: Path, clock: FakeClock) -> tuple[App, Path]:
    environ = {
        "SIPCDR_CAPTURE__SIP_UDP": "127.0.0.1:0",
        "SIPCDR_CAPTURE__HEP_UDP": "",
        "SIPCDR_CAPTURE__HEP_TCP": "",
        "SIPCDR_METRICS__LISTEN": "127.0.0.1:0",
        "SIPCDR_STATE__DIR": str(disk / "var"),
        "SIPCDR_STATE__SPARE_BYTES": str(256 * 1024),
        "SIPCDR_SINKS__JSONL__PATH": str(jsonl),
        "SIPCDR_SINKS__POSTGRES__DSN": "postgresql://sipcdr@127.0.0.1:9/sipcdr",
        "SIPCDR_SPOOL__SEGMENT_BYTES": str(64 * 1024),
        "SIPCDR_SPOOL__SIGNALING_MIN_FREE_BYTES": str(64 * 1024),
    }
    return App(load_config(None, environ), clock=clock), disk


async def _started(app: App) -> None:
    await app.start()
    assert app._ticker is not None
    app._ticker.cancel()  # the test ticks
    # PostgreSQL never comes: the stop need not wait for it.
    app.outputs.close = functools.partial(app.outputs.close, drain_timeout_s=0)  # type: ignore[method-assign]


def _tick(app: App, clock: FakeClock, seconds: int = 1) -> None:
    for _ in range(seconds):
        clock.advance(1.0)
        app.tick(time.time())


def _messages(calls: list[Call], start: int, end: int) -> list[bytes]:
    return [m for call in calls for m in answered_call_messages(call)[start:end]]


async def test_intake_resumes_once_the_disk_takes_cdrs_again_without_room_for_the_spare(
    daemon: tuple[App, Path], clock: FakeClock
) -> None:
    """The spare is given up, its room runs out (CDRs wait in memory), then space comes
    back, too little for a spare: once the CDRs are written, new calls are taken in."""
    app, disk = daemon
    await _started(app)
    try:
        calls = [Call(call_id=f"c-{n}@x", from_tag=f"t{n}") for n in range(400)]
        for data in _messages(calls, 0, 4):
            app.pipeline.process(packet(time.time(), data))
        filler = fill(disk, leave_bytes=0)
        for data in _messages(calls, 4, 6):
            app.pipeline.process(packet(time.time(), data))
        assert app.spare.releases == 1 and app.pipeline.intake.paused
        writer = app.outputs.cdr_writer
        assert writer is not None and writer.spool.reserved > 0  # the spare's room ran out
        assert writer.spool.stats.dropped.get("write_error", 0) == 0
        _tick(app, clock)
        assert not app.spare.withheld  # nothing left to keep: the sinks may free room
        assert app.pipeline.intake.paused and app._intake_block_reason() == "write_error"
        filler.unlink()
        fill(disk, leave_bytes=300 * 1024)  # less than a spare and a quarter
        _tick(app, clock)
        assert writer.spool.reserved == 0  # the disk takes CDRs again
        _tick(app, clock, seconds=6)
        assert not app.pipeline.intake.paused
        assert not app.spare.ready  # no room for it yet: it comes back when there is
        app.pipeline.process(packet(time.time(), Call(call_id="after@x").request("INVITE")))
        assert app.correlator.is_open("after@x")
    finally:
        await app.stop()
    await asyncio.sleep(0)


async def test_the_room_a_spare_gives_goes_to_cdrs_not_to_signaling(
    daemon: tuple[App, Path], clock: FakeClock
) -> None:
    app, disk = daemon
    await _started(app)
    try:
        calls = [Call(call_id=f"s-{n}@x", from_tag=f"t{n}") for n in range(20)]
        for data in _messages(calls, 0, 4):
            app.pipeline.process(packet(time.time(), data))
        signaling = app.outputs.spools[STREAM_SIGNALING]
        signaling.flush()
        fill(disk, leave_bytes=0)
        app.pipeline.process(packet(time.time(), _messages(calls, 4, 5)[0]))  # a BYE
        assert app.spare.releases == 1 and app.pipeline.intake.paused
        size = signaling.size_bytes
        refused = signaling.stats.dropped.get("disk_floor", 0)
        for data in _messages(calls[1:], 4, 6):
            app.pipeline.process(packet(time.time(), data))
        _tick(app, clock, seconds=3)
        assert signaling.size_bytes == size  # not a byte of the spare's room
        assert signaling.stats.dropped.get("disk_floor", 0) > refused
        writer = app.outputs.cdr_writer
        assert writer is not None and writer.spool.reserved == 0
        assert writer.spool.stats.appended.get("cdr", 0) == 20
    finally:
        await app.stop()


async def test_sinks_writing_to_the_full_disk_wait_while_the_spare_room_is_kept(
    tmp_path: Path, small_disk: SmallDisk, clock: FakeClock
) -> None:
    """The JSONL file on the state disk would copy every CDR into the spare's room: it
    waits, its records in the spool, and catches up once the disk has room again."""
    disk = small_disk(tmp_path / "disk", 4 * MIB)
    app, disk = _daemon(disk, disk / "cdrs.jsonl", clock)
    jsonl = disk / "cdrs.jsonl"
    await _started(app)
    try:
        calls = [Call(call_id=f"j-{n}@x", from_tag=f"t{n}") for n in range(20)]
        for data in _messages(calls, 0, 4):
            app.pipeline.process(packet(time.time(), data))
        filler = fill(disk, leave_bytes=0)
        for data in _messages(calls, 4, 6):
            app.pipeline.process(packet(time.time(), data))
        assert app.spare.releases == 1 and app.spare.withheld
        delivery = app.outputs.delivery
        assert delivery is not None and ("jsonl", "records") in delivery.held
        await asyncio.sleep(1.5)  # the delivery loop's turns: it waits
        assert jsonl.read_bytes() == b""
        writer = app.outputs.cdr_writer
        assert writer is not None and writer.spool.stats.appended.get("cdr", 0) == 20
        filler.unlink()
        _tick(app, clock, seconds=6)  # the spare is back: the room is free
        assert app.spare.ready and not delivery.held
        for _ in range(200):
            if len(jsonl.read_bytes().splitlines()) == 20:
                break
            await asyncio.sleep(0.02)
        assert len(jsonl.read_bytes().splitlines()) == 20
    finally:
        await app.stop()


async def test_a_spare_on_another_disk_than_the_spool_keeps_no_call_out(
    tmp_path: Path, small_disk: SmallDisk, clock: FakeClock
) -> None:
    """The spool has a disk of its own: the state disk filling up gives the spare to the
    journal, but CDRs are written as before, so new calls are still taken in."""
    disk = small_disk(tmp_path / "disk", 4 * MIB)
    (disk / "var").mkdir(mode=0o700)
    small_disk(disk / "var" / "spool", 4 * MIB)
    app, disk = _daemon(disk, tmp_path / "cdrs.jsonl", clock)
    await _started(app)
    try:
        calls = [Call(call_id=f"d-{n}@x", from_tag=f"t{n}") for n in range(20)]
        fill(disk, leave_bytes=0)
        for data in _messages(calls, 0, 6):
            app.pipeline.process(packet(time.time(), data))
        assert app.spare.releases == 1  # for the journal
        _tick(app, clock, seconds=2)
        assert not app.pipeline.intake.paused
        writer = app.outputs.cdr_writer
        assert writer is not None and writer.spool.stats.appended.get("cdr", 0) == 20
        app.pipeline.process(packet(time.time(), Call(call_id="new@x").request("INVITE")))
        assert app.correlator.is_open("new@x")
    finally:
        await app.stop()


def test_a_release_is_on_disk_before_it_is_reported(
    tmp_path: Path, small_disk: SmallDisk, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The marker is fsynced, then the folder that holds its name and the spare's
    removal: a power loss right after the release cannot take either back, so the
    next start keeps the room (the test above) rather than letting new calls take it."""
    disk = small_disk(tmp_path / "disk", 4 * MIB)
    spare = SpareSpace(disk / "spare", MIB, clock=clock)
    assert spare.ensure()
    fill(disk, leave_bytes=0)
    synced: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        synced.append(("folder" if stat.S_ISDIR(info.st_mode) else "file", info.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with capture_logs() as logs:
        assert spare.release()
    marker = disk / "spare.released"
    assert synced == [("file", marker.stat().st_ino), ("folder", disk.stat().st_ino)]
    assert not (disk / "spare").exists()
    assert [e["event"] for e in logs] == ["spare_space_released"]


def test_a_release_that_cannot_be_recorded_is_said_and_kept_by_this_run(
    tmp_path: Path, small_disk: SmallDisk, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = small_disk(tmp_path / "disk", 4 * MIB)
    spare = SpareSpace(disk / "spare", MIB, clock=clock)
    assert spare.ensure()
    fill(disk, leave_bytes=0)

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with capture_logs() as logs:
        assert spare.release()
    assert spare.withheld and spare.released
    assert [e["event"] for e in logs] == ["spare_release_not_recorded", "spare_space_released"]
    assert logs[0]["log_level"] == "error"


def test_a_marker_beside_a_whole_spare_is_removed_at_start(
    tmp_path: Path, small_disk: SmallDisk, clock: FakeClock
) -> None:
    """A crash after the spare was allocated again but before its marker was removed:
    the room is back, so nothing is kept from new calls."""
    disk = small_disk(tmp_path / "disk", 4 * MIB)
    assert SpareSpace(disk / "spare", MIB, clock=clock).ensure()
    marker = disk / "spare.released"
    marker.touch(mode=0o600)
    restarted = SpareSpace(disk / "spare", MIB, clock=clock)
    with capture_logs() as logs:
        assert restarted.ensure()
    assert not restarted.withheld and not restarted.released
    assert not marker.exists() and logs == []
