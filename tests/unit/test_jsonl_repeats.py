"""The JSONL sink after a crash: records the spool delivers again because its cursor
was not saved after they were written are already in the file, and are not written
twice; nothing else is ever skipped."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import orjson
import pytest
from sipcdr.sinks import jsonl
from sipcdr.sinks.base import KIND_ALERT, KIND_CDR, STREAM_RECORDS, SpoolRecord
from sipcdr.sinks.jsonl import JsonlSink
from smalldisk import SmallDisk, fill
from structlog.testing import capture_logs


def cdrs(first: int, last: int) -> list[SpoolRecord]:
    return [
        SpoolRecord(n, KIND_CDR, b"k", b'{"cdr_id":"c%d","pad":"%s"}' % (n, b"x" * 40))
        for n in range(first, last + 1)
    ]


def numbers(path: Path) -> list[int]:
    return [int(orjson.loads(line)["cdr_id"][1:]) for line in path.read_bytes().splitlines()]


async def written(
    path: Path, *batches: list[SpoolRecord], rotate_bytes: int = 1 << 30
) -> JsonlSink:
    """A sink that starts (as after a crash), is given `batches`, and stops."""
    sink = JsonlSink(path, rotate_bytes=rotate_bytes)
    await sink.start()
    for batch in batches:
        await sink.deliver(STREAM_RECORDS, batch)
    await sink.stop()
    return sink


async def test_the_batch_whose_cursor_was_not_saved_is_not_written_again(
    tmp_path: Path,
) -> None:
    path = tmp_path / "cdrs.jsonl"
    await written(path, cdrs(1, 10), cdrs(11, 20))  # killed before the cursor passed 20
    with capture_logs() as logs:
        again = await written(path, cdrs(11, 25))  # the spool's next batch after the start
    assert numbers(path) == list(range(1, 26))
    assert again.repeats_skipped == 10 and again.written == 5
    assert [(e["event"], e["records"]) for e in logs] == [("jsonl_repeats_skipped", 10)]


async def test_repeats_over_several_batches_of_another_size_are_skipped(tmp_path: Path) -> None:
    """A cursor that went back further (not saved for a while, or a power loss), and
    batches cut differently this time."""
    path = tmp_path / "cdrs.jsonl"
    await written(path, cdrs(1, 10), cdrs(11, 20), cdrs(21, 30))
    again = await written(path, cdrs(8, 14), cdrs(15, 21), cdrs(22, 30), cdrs(31, 33))
    assert numbers(path) == list(range(1, 34))
    assert again.repeats_skipped == 23


async def test_a_torn_last_line_is_cut_and_its_record_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "cdrs.jsonl"
    await written(path, cdrs(1, 20))
    torn = cdrs(21, 21)[0].value
    with path.open("ab") as handle:
        handle.write(torn[: len(torn) // 2])  # killed in the middle of the write
    again = await written(path, cdrs(11, 25))
    assert numbers(path) == list(range(1, 26))
    assert again.repeats_skipped == 10


async def test_repeats_of_a_batch_that_filled_the_file_are_found_in_the_rotated_one(
    tmp_path: Path,
) -> None:
    """Killed after the batch was written and the file rotated, before the cursor."""
    path = tmp_path / "cdrs.jsonl"
    await written(path, cdrs(1, 10), rotate_bytes=200)
    assert path.read_bytes() == b""
    again = await written(path, cdrs(1, 12))
    assert numbers(path) == [11, 12] and again.repeats_skipped == 10
    assert sorted(n for f in tmp_path.glob("cdrs.jsonl*") for n in numbers(f)) == list(range(1, 13))


async def test_records_not_in_the_file_are_all_written(tmp_path: Path) -> None:
    path = tmp_path / "cdrs.jsonl"
    await written(path, cdrs(1, 10))
    again = await written(path, cdrs(11, 20))  # the cursor was saved: nothing repeats
    assert numbers(path) == list(range(1, 21)) and again.repeats_skipped == 0
    # Records that agree with the file only in part: the part that is there is the
    # only thing left out, in the order the file has it; nothing is lost.
    other = [r._replace(value=r.value.replace(b"x", b"y")) for r in cdrs(9, 12)]
    again = await written(path, cdrs(19, 20) + other)
    assert numbers(path) == [*range(1, 21), 9, 10, 11, 12]


async def test_only_cdr_lines_are_compared_when_alerts_are_not_written(tmp_path: Path) -> None:
    path = tmp_path / "cdrs.jsonl"
    alert = SpoolRecord(99, KIND_ALERT, b"k", b'{"alert_id":"a"}')
    await written(path, [*cdrs(1, 5), alert, *cdrs(6, 8)])
    again = await written(path, [*cdrs(4, 5), alert, *cdrs(6, 10)])
    assert numbers(path) == list(range(1, 11)) and again.repeats_skipped == 5


async def test_repeats_from_before_the_window_are_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past `TAIL_BYTES` the sink does not look: such a repeat is written again (and
    readers dedupe by cdr_id), never taken for a record that is there."""
    monkeypatch.setattr(jsonl, "TAIL_BYTES", 5 * len(cdrs(1, 1)[0].value) + 5)
    path = tmp_path / "cdrs.jsonl"
    await written(path, cdrs(1, 20))
    again = await written(path, cdrs(11, 22))
    assert numbers(path) == [*range(1, 21), *range(11, 23)]
    assert again.repeats_skipped == 0
    again = await written(path, cdrs(19, 24))  # within the window: left out
    assert numbers(path)[-2:] == [23, 24] and again.repeats_skipped == 4


async def test_a_batch_that_fails_after_its_repeats_is_compared_again_when_retried(
    tmp_path: Path, small_disk: SmallDisk
) -> None:
    disk = small_disk(tmp_path / "disk", 256 * 1024)
    path = disk / "cdrs.jsonl"
    await written(path, cdrs(1, 20))
    filler = fill(disk, leave_bytes=1024)
    sink = JsonlSink(path)
    await sink.start()
    with pytest.raises(OSError):
        await sink.deliver(STREAM_RECORDS, cdrs(11, 200))  # the new ones do not fit
    assert numbers(path) == list(range(1, 21))
    filler.unlink()
    await sink.deliver(STREAM_RECORDS, cdrs(11, 200))  # the spool sends it again, whole
    await sink.stop()
    assert numbers(path) == list(range(1, 201))
    assert sink.repeats_skipped == 10


@pytest.mark.parametrize("kind", ["folder", "fifo"])
async def test_a_rotated_name_that_is_no_file_neither_stops_nor_hangs_the_start(
    tmp_path: Path, kind: str
) -> None:
    """The file is empty, so the newest rotated name is looked at: a folder or a FIFO
    of that name has no lines to compare, and its start goes on (a FIFO opened for
    reading would wait for a writer for ever)."""
    path = tmp_path / "cdrs.jsonl"
    other = tmp_path / "cdrs.jsonl.20991231T235959Z"
    if kind == "folder":
        other.mkdir(mode=0o700)
    else:
        os.mkfifo(other, 0o600)
    # In a thread of its own: a start that waits on the FIFO blocks its event loop.
    start = asyncio.ensure_future(asyncio.to_thread(asyncio.run, written(path, cdrs(1, 3))))
    done, _ = await asyncio.wait({start}, timeout=10)
    if not done:
        os.close(os.open(other, os.O_WRONLY | os.O_NONBLOCK))  # lets the stuck open return
        await start
        pytest.fail("the start waited on the FIFO")
    assert numbers(path) == [1, 2, 3] and start.result().repeats_skipped == 0


async def test_a_batch_found_whole_in_the_file_is_on_disk_before_it_counts_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between the write and its fsync, the lines are in the page cache only:
    the start reads them back all the same. A batch left out whole writes nothing, so
    without an fsync of its own its cursor would move past records a power loss can
    still take from the file."""
    path = tmp_path / "cdrs.jsonl"
    await written(path, cdrs(1, 20))  # 11 to 20: written, never fsynced
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    sink = JsonlSink(path)
    await sink.start()
    await sink.deliver(STREAM_RECORDS, cdrs(11, 20))
    assert sink.repeats_skipped == 10 and synced
    synced.clear()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "EIO")))
    await sink.stop()
    sink = JsonlSink(path)
    await sink.start()
    with pytest.raises(OSError, match="EIO"):  # not on disk: not confirmed, sent again
        await sink.deliver(STREAM_RECORDS, cdrs(11, 20))
    monkeypatch.setattr(os, "fsync", real)
    await sink.deliver(STREAM_RECORDS, cdrs(11, 21))
    await sink.stop()
    assert numbers(path) == list(range(1, 22)) and sink.repeats_skipped == 10


async def test_a_write_abandoned_by_a_timeout_cannot_undo_the_retry_that_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delivery loop gives up on a `deliver` after its timeout and sends the batch
    again, but the thread writing the first try goes on. Were the two to run at once, a
    first try whose fsync then failed would cut the file back to where it began, taking
    the retry's confirmed lines with it."""
    path = tmp_path / "cdrs.jsonl"
    sink = JsonlSink(path)
    await sink.start()
    entered, go = threading.Event(), threading.Event()
    real = os.fsync
    calls = 0

    def fsync(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # the first try: a disk that stalls, then fails
            entered.set()
            go.wait(10)
            raise OSError(5, "EIO")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    first = asyncio.create_task(sink.deliver(STREAM_RECORDS, cdrs(1, 5)))
    await asyncio.to_thread(entered.wait, 10)
    first.cancel()  # the loop's deliver timeout
    with pytest.raises(asyncio.CancelledError):
        await first
    retry = asyncio.create_task(sink.deliver(STREAM_RECORDS, cdrs(1, 5)))
    await asyncio.sleep(0.3)
    go.set()
    await retry  # confirmed: the loop moves the cursor past 1 to 5
    await asyncio.sleep(0.3)  # the first try's thread is done by now
    await sink.stop()
    assert numbers(path) == [1, 2, 3, 4, 5]


async def test_a_tail_of_blank_lines_keeps_no_more_digests_than_records_can_fill(
    tmp_path: Path,
) -> None:
    """8 MiB of newlines (a damaged file, a tool that padded it) were 8 million digests:
    seconds of the event loop at start and most of a gigabyte held until the first
    batch. No record is that short, so no more lines are kept than records of
    `MIN_RECORD_BYTES` fill the window; the repeats at the end are still found."""
    path = tmp_path / "cdrs.jsonl"
    path.write_bytes(b"\n" * jsonl.TAIL_BYTES)
    path.chmod(0o600)
    await written(path, cdrs(1, 3))
    sink = JsonlSink(path)
    await sink.start()
    assert sink._tail is not None
    assert len(sink._tail) <= jsonl.TAIL_BYTES // jsonl.MIN_RECORD_BYTES
    await sink.deliver(STREAM_RECORDS, cdrs(2, 4))
    await sink.stop()
    assert path.read_bytes().split(b"\n")[-5:-1] == [r.value for r in cdrs(1, 4)]
    assert sink.repeats_skipped == 2


async def test_a_write_that_does_not_return_fails_the_next_batch_instead_of_queuing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stalled disk: each retry would otherwise leave one more thread waiting behind
    the first, until none is left for the rest of the daemon."""
    monkeypatch.setattr(jsonl, "WRITE_WAIT_S", 0.2)
    monkeypatch.setattr(jsonl, "STOP_WAIT_S", 0.2)
    path = tmp_path / "cdrs.jsonl"
    sink = JsonlSink(path)
    await sink.start()
    go = threading.Event()
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (go.wait(10), real(fd)))
    first = asyncio.create_task(sink.deliver(STREAM_RECORDS, cdrs(1, 5)))
    await asyncio.sleep(0.1)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    with pytest.raises(OSError, match="previous write"):
        await sink.deliver(STREAM_RECORDS, cdrs(1, 5))
    with capture_logs() as logs:
        await sink.stop()  # left open to the write, not closed under it
    assert [log["event"] for log in logs] == ["jsonl_write_still_running"]
    go.set()
    await asyncio.sleep(0.3)
    await sink.stop()
    assert sink._file is None and numbers(path) == [1, 2, 3, 4, 5]


async def test_a_batch_is_its_values_line_by_line_written_and_fsynced_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cdrs.jsonl"
    synced_on: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced_on.append(threading.get_ident())
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    sink = JsonlSink(path)
    await sink.start()
    first, second = cdrs(1, 3), cdrs(4, 4)
    await sink.deliver(STREAM_RECORDS, first)
    await sink.deliver(STREAM_RECORDS, second)
    await sink.stop()
    assert path.read_bytes() == b"".join(record.value + b"\n" for record in first + second)
    assert len(synced_on) == 2  # once a batch
    assert threading.get_ident() not in synced_on
