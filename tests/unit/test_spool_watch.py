"""The delivery process is woken by the writer's writes (`SpoolWatch`, inotify on the
stream's folder) instead of looking every 25 ms: a write wakes the readers, wake-ups
are spaced, and nothing depends on them: with every notification lost, the loops'
own slow look still delivers every record, a writer that restarts is followed, and a
watch that ends hands the loops back to polling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from sipcdr.delivery import Delivery
from sipcdr.sinks.base import KIND_CDR, STREAM_RECORDS, SpoolRecord
from sipcdr.spool import Spool
from sipcdr.spool.tail import _IN_IGNORED, _IN_MODIFY, _IN_Q_OVERFLOW, SpoolTail, SpoolWatch

MIB = 1024 * 1024


class Collecting:
    """A sink that keeps what it is given."""

    name = "a"
    streams: tuple[str, ...] = (STREAM_RECORDS,)

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.batches = 0

    async def start(self) -> None: ...
    async def prepare(self) -> None: ...
    async def probe(self) -> None: ...
    async def flush(self) -> None: ...
    async def stop(self) -> None: ...

    async def deliver(self, stream: str, records: Sequence[SpoolRecord]) -> None:
        self.got.extend(record.value for record in records)
        self.batches += 1


def _writer(folder: Path) -> Spool:
    spool = Spool(folder, ("a",), segment_bytes=4096, readers_elsewhere=True)
    spool.open()
    return spool


def _tail(folder: Path) -> SpoolTail:
    tail = SpoolTail(folder, ("a",))
    tail.open()
    return tail


async def _until(condition: object, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.005)


async def test_a_write_wakes_the_readers(tmp_path: Path) -> None:
    spool = _writer(tmp_path / "s")
    tail = _tail(tmp_path / "s")
    woken = asyncio.Event()
    tail.reader("a").on_append.append(woken.set)
    watch = SpoolWatch([tail])
    assert watch.start() and watch.active
    await asyncio.sleep(0.05)
    assert not woken.is_set()  # nothing written: no wake-up
    spool.append(KIND_CDR, b"k", b"one")
    async with asyncio.timeout(5):
        await woken.wait()
    assert watch.wakes >= 1
    assert [r.value for r in tail.reader("a").read(10, MIB)] == [b"one"]
    watch.close()
    assert not watch.active
    tail.close()
    spool.close()


async def test_wake_ups_are_spaced_however_often_the_writer_writes(tmp_path: Path) -> None:
    spool = _writer(tmp_path / "s")
    tail = _tail(tmp_path / "s")
    watch = SpoolWatch([tail], wake_interval_s=0.2)
    assert watch.start()
    started = time.monotonic()
    for n in range(200):  # one write each, across rotations
        spool.append(KIND_CDR, b"k", b"r%d" % n)
        if n % 20 == 0:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)  # the last, delayed wake-up comes
    elapsed = time.monotonic() - started
    assert 1 <= watch.wakes <= 2 + elapsed / 0.2
    watch.close()
    tail.close()
    spool.close()


@pytest.mark.parametrize("lost", [False, True])
async def test_every_record_is_delivered_once_in_order_with_or_without_wake_ups(
    tmp_path: Path, lost: bool
) -> None:
    """With the watch the loops need no look of their own (30 s); with every
    notification lost (the watch's file no longer read) the slow look delivers all."""
    folder = tmp_path / "s"
    spool = _writer(folder)
    tail = _tail(folder)
    sink = Collecting()
    delivery = Delivery({STREAM_RECORDS: tail}, [sink])
    delivery.idle_wait_s = 0.2 if lost else 30.0
    watch = SpoolWatch([tail], wake_interval_s=0.005)
    assert watch.start()
    if lost:
        asyncio.get_running_loop().remove_reader(watch._fd)
    await delivery.start()
    expected = []
    for burst in range(10):
        for n in range(30):
            value = b"b%d-%d" % (burst, n)
            spool.append(KIND_CDR, b"k", value)
            expected.append(value)
        tail.note_next_seq(spool.next_seq)
        await asyncio.sleep(0.02)
    await _until(lambda: len(sink.got) >= len(expected))
    assert sink.got == expected
    assert (watch.wakes == 0) is lost
    await delivery.stop(drain_timeout_s=1)
    watch.close()
    tail.close()
    spool.close()


async def test_a_writer_that_restarts_is_followed(tmp_path: Path) -> None:
    """The capture process starts again: its writer opens the folder anew and begins a
    new segment. The watch is on the folder, so its writes wake the same readers."""
    folder = tmp_path / "s"
    spool = _writer(folder)
    tail = _tail(folder)
    sink = Collecting()
    delivery = Delivery({STREAM_RECORDS: tail}, [sink])
    delivery.idle_wait_s = 30.0  # only the watch wakes the loop
    watch = SpoolWatch([tail], wake_interval_s=0.005)
    assert watch.start()
    await delivery.start()
    spool.append(KIND_CDR, b"k", b"before")
    await _until(lambda: sink.got == [b"before"])
    spool.close()
    again = _writer(folder)
    again.append(KIND_CDR, b"k", b"after")
    again.append(KIND_CDR, b"k", b"and more")
    await _until(lambda: len(sink.got) == 3)
    assert sink.got == [b"before", b"after", b"and more"]
    await delivery.stop(drain_timeout_s=1)
    watch.close()
    tail.close()
    again.close()


async def test_a_delivery_process_started_again_resumes_with_a_new_watch(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    spool = _writer(folder)
    first = _tail(folder)
    sink = Collecting()
    delivery = Delivery({STREAM_RECORDS: first}, [sink])
    delivery.idle_wait_s = 30.0
    watch = SpoolWatch([first], wake_interval_s=0.005)
    assert watch.start()
    await delivery.start()
    spool.append(KIND_CDR, b"k", b"one")
    await _until(lambda: sink.got == [b"one"])
    await delivery.stop(drain_timeout_s=1)
    watch.close()
    first.close()
    spool.append(KIND_CDR, b"k", b"while none reads")
    second = _tail(folder)  # from the cursor on disk
    delivery = Delivery({STREAM_RECORDS: second}, [sink])
    delivery.idle_wait_s = 30.0
    watch = SpoolWatch([second], wake_interval_s=0.005)
    assert watch.start()
    await delivery.start()
    spool.append(KIND_CDR, b"k", b"two")
    await _until(lambda: len(sink.got) == 3)
    assert sink.got == [b"one", b"while none reads", b"two"]
    await delivery.stop(drain_timeout_s=1)
    watch.close()
    second.close()
    spool.close()


async def test_an_overflow_wakes_every_stream_and_a_watch_that_ends_hands_back(
    tmp_path: Path,
) -> None:
    spools = [_writer(tmp_path / name) for name in ("records", "signaling")]
    tails = [_tail(tmp_path / name) for name in ("records", "signaling")]
    woken: list[str] = []

    def noting(name: str) -> Callable[[], None]:
        return lambda: woken.append(name)

    for name, tail in zip(("records", "signaling"), tails, strict=True):
        tail.reader("a").on_append.append(noting(name))
    lost: list[bool] = []
    watch = SpoolWatch(tails, wake_interval_s=0.0, on_lost=lambda: lost.append(True))
    assert watch.start()
    watch.handle([(-1, _IN_Q_OVERFLOW)])
    assert sorted(woken) == ["records", "signaling"]
    woken.clear()
    records_wd, signaling_wd = sorted(watch._by_wd)
    watch.handle([(signaling_wd, _IN_MODIFY)])
    assert woken == ["signaling"]
    woken.clear()
    # One folder's watch ended (removed, moved, made anew): its stream is woken by no
    # write any more, and the loops' look every WATCHED_POLL_S is shared by all of
    # them, so the whole watch hands back to polling rather than leave it late.
    watch.handle([(records_wd, _IN_IGNORED)])
    assert not watch.active and lost == [True]
    assert sorted(set(woken)) == ["records", "signaling"]  # a last look at each
    woken.clear()
    watch.handle([(signaling_wd, _IN_IGNORED)])  # nothing more once handed back
    assert lost == [True]
    for tail, spool in zip(tails, spools, strict=True):
        tail.close()
        spool.close()


async def test_no_watch_where_the_folder_cannot_be_watched(tmp_path: Path) -> None:
    tail = SpoolTail(tmp_path / "missing", ("a",))
    watch = SpoolWatch([tail])
    assert not watch.start()
    assert not watch.active


async def test_one_stream_folder_made_anew_hands_every_loop_back_to_polling(
    tmp_path: Path,
) -> None:
    """A stream's folder moved away and made again under its name: the kernel's watch
    follows the old folder, so writes to the new one wake no one; the loops go back to
    looking every TAIL_POLL_S rather than leave that stream to the slow look."""
    spools = [_writer(tmp_path / name) for name in ("records", "signaling")]
    tails = [_tail(tmp_path / name) for name in ("records", "signaling")]
    lost: list[bool] = []
    watch = SpoolWatch(tails, wake_interval_s=0.0, on_lost=lambda: lost.append(True))
    assert watch.start()
    (tmp_path / "records").rename(tmp_path / "records.old")
    (tmp_path / "records").mkdir()
    await _until(lambda: lost)
    assert not watch.active and lost == [True]
    watch.close()
    for tail, spool in zip(tails, spools, strict=True):
        tail.close()
        spool.close()
