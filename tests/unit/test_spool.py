"""The durable spool: cursors, segments, size policies, and what a crash leaves behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sipcdr.clock import FakeClock
from sipcdr.hotpath import load_interpreted
from sipcdr.sinks.base import KIND_ALERT, KIND_CDR, KIND_SIP
from sipcdr.spool import HEADER_BYTES, Appended, Spool, SpoolError
from sipcdr.spool import records as spool_records
from smalldisk import SmallDisk, fill

READERS = ("s", "t", "x", "fast", "slow")


def _fill(spool: Spool, count: int, start: int = 0, kind: str = KIND_CDR) -> list[bytes]:
    values = []
    for n in range(start, start + count):
        value = b'{"n":%d,"pad":"%s"}' % (n, b"x" * (n % 50))
        assert spool.append(kind, b"call-%d" % n, value)
        values.append(value)
    return values


def _read_all(spool: Spool, name: str, *, commit: bool = True) -> list[bytes]:
    reader = spool.reader(name)
    out: list[bytes] = []
    while batch := reader.read(7, 1 << 20):
        out.extend(record.value for record in batch)
        if commit:
            reader.commit()
    return out


def test_records_come_back_in_order_with_kind_key_and_seq(tmp_path: Path) -> None:
    with Spool(tmp_path, READERS) as spool:
        spool.append(KIND_CDR, b"a", b"1")
        spool.append(KIND_ALERT, b"b", b"22")
        spool.append(KIND_SIP, b"", b"333")
        batch = spool.reader("x").read(10, 1 << 20)
    assert [(r.seq, r.kind, r.key, r.value) for r in batch] == [
        (1, KIND_CDR, b"a", b"1"),
        (2, KIND_ALERT, b"b", b"22"),
        (3, KIND_SIP, b"", b"333"),
    ]


def test_each_reader_has_its_own_cursor_and_resumes_after_reopen(tmp_path: Path) -> None:
    with Spool(tmp_path, READERS) as spool:
        values = _fill(spool, 30)
        fast = spool.reader("fast")
        slow = spool.reader("slow")
        assert [r.value for r in fast.read(100, 1 << 20)] == values
        fast.commit()
        assert [r.value for r in slow.read(10, 1 << 20)] == values[:10]
        slow.commit()
        slow.read(10, 1 << 20)  # read but never confirmed: must come again
    with Spool(tmp_path, READERS) as spool:
        more = _fill(spool, 5, start=30)
        assert _read_all(spool, "fast") == more
        assert _read_all(spool, "slow") == values[10:] + more


def test_rewind_gives_the_unconfirmed_batch_again(tmp_path: Path) -> None:
    with Spool(tmp_path, READERS) as spool:
        values = _fill(spool, 10)
        reader = spool.reader("s")
        first = reader.read(4, 1 << 20)
        reader.rewind()
        assert reader.read(4, 1 << 20) == first
        reader.commit()
        assert [r.value for r in reader.read(100, 1 << 20)] == values[4:]
        assert reader.lag_records == 6  # read, not confirmed


def test_segments_rotate_and_are_deleted_once_every_reader_passed(tmp_path: Path) -> None:
    with Spool(tmp_path, ("a", "b"), segment_bytes=500) as spool:
        a = spool.reader("a")
        values = _fill(spool, 60)
        assert spool.segments > 5
        before = spool.segments
        assert [r.value for r in a.read(1000, 1 << 30)] == values
        a.commit()
        assert spool.segments == before  # b still needs them
        assert _read_all(spool, "b") == values
        assert spool.segments == 1
        assert len(list(tmp_path.glob("*.seg"))) == 1
        assert spool.size_bytes < 500  # the active segment stays


def test_drop_newest_refuses_and_counts_when_full(tmp_path: Path) -> None:
    with Spool(tmp_path, ("s",), max_bytes=2000, full_policy="drop_newest") as spool:
        reader = spool.reader("s")
        accepted = 0
        for n in range(100):
            accepted += spool.append(KIND_CDR, b"k", b"v" * 40 + str(n).encode())
        assert 20 < accepted < 100
        assert spool.stats.dropped == {"full": 100 - accepted}
        assert spool.full
        while reader.read(10, 1 << 20):
            reader.commit()
        assert not spool.full  # caught up: room again
        assert spool.append(KIND_CDR, b"k", b"after")


def test_block_keeps_every_record_and_says_full_until_below_the_resume_mark(
    tmp_path: Path,
) -> None:
    with Spool(tmp_path, ("s",), max_bytes=2000, segment_bytes=300, full_policy="block") as spool:
        reader = spool.reader("s")
        values = _fill(spool, 60)
        assert spool.full
        assert not spool.stats.dropped
        assert [r.value for r in reader.read(1000, 1 << 30)] == values
        reader.commit()
        assert not spool.full


def test_a_torn_tail_is_cut_off_and_counted_and_the_rest_survives(tmp_path: Path) -> None:
    with Spool(tmp_path, READERS) as spool:
        values = _fill(spool, 10)
        segment = next(tmp_path.glob("*.seg"))
    with segment.open("ab") as handle:  # a record whose write was cut short
        handle.write(b"\x50\x53\x01\x00\x00\xff\x00\x00\x00" + b"\x0b" * 9)
    with Spool(tmp_path, READERS) as spool:
        assert spool.stats.torn_tails == 1
        assert spool.stats.torn_tail_bytes == 18
        more = _fill(spool, 2, start=10)
        assert _read_all(spool, "s") == values + more
        assert [r.seq for r in spool.reader("t").read(100, 1 << 20)] == list(range(1, 13))


def test_a_corrupt_record_inside_a_segment_is_skipped_and_counted(tmp_path: Path) -> None:
    with Spool(tmp_path, READERS) as spool:
        values = _fill(spool, 10)
        segment = next(tmp_path.glob("*.seg"))
        data = bytearray(segment.read_bytes())
        # Flip one byte of the fourth record's value.
        offset = sum(HEADER_BYTES + len(b"call-%d" % n) + len(values[n]) for n in range(3))
        data[offset + HEADER_BYTES + 8] ^= 0xFF
        segment.write_bytes(bytes(data))
        reader = spool.reader("s")
        got = [r.value for r in reader.read(100, 1 << 20)]
    assert got == values[:3] + values[4:]
    assert reader.corrupt_records == 1


def test_an_unreadable_cursor_starts_over_from_the_oldest_record(tmp_path: Path) -> None:
    with Spool(tmp_path, READERS) as spool:
        values = _fill(spool, 5)
        _read_all(spool, "s")
    (tmp_path / "cursors" / "s.cursor").write_bytes(b"\xff" * 1024)  # both slots spoilt
    with Spool(tmp_path, READERS) as spool:
        reader = spool.reader("s")
        assert reader.cursor_reset
        assert [r.value for r in reader.read(100, 1 << 20)] == values


def test_the_buffered_stream_writes_on_flush(tmp_path: Path) -> None:
    with Spool(tmp_path, READERS, buffered=True) as spool:
        reader = spool.reader("s")
        _fill(spool, 3, kind=KIND_SIP)
        assert reader.read(10, 1 << 20) == []
        spool.flush()
        assert len(reader.read(10, 1 << 20)) == 3


def test_a_second_process_cannot_open_the_same_spool(tmp_path: Path) -> None:
    with Spool(tmp_path, READERS):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                Spool(tmp_path, READERS).open()
            except SpoolError:
                os._exit(0)
            os._exit(1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.binary(max_size=300), min_size=1, max_size=40),
    cut=st.integers(min_value=0, max_value=20_000),
)
def test_any_truncation_keeps_a_prefix_and_nothing_else(
    tmp_path_factory: pytest.TempPathFactory, values: list[bytes], cut: int
) -> None:
    directory = tmp_path_factory.mktemp("spool")
    with Spool(directory, READERS) as spool:
        for value in values:
            spool.append(KIND_CDR, b"k", value)
        segment = next(directory.glob("*.seg"))
    data = segment.read_bytes()
    segment.write_bytes(data[: min(cut, len(data))])
    with Spool(directory, READERS) as spool:
        got = [r.value for r in spool.reader("s").read(1000, 1 << 30)]
        assert got == values[: len(got)]
        spool.append(KIND_CDR, b"k", b"next")
        assert [r.value for r in spool.reader("s").read(1000, 1 << 30)][-1:] == [b"next"]


def test_damage_inside_the_newest_segment_keeps_the_records_after_it(tmp_path: Path) -> None:
    with Spool(tmp_path, READERS) as spool:
        values = _fill(spool, 10)
        segment = next(tmp_path.glob("*.seg"))
    data = bytearray(segment.read_bytes())
    offset = sum(HEADER_BYTES + len(b"call-%d" % n) + len(values[n]) for n in range(3))
    data[offset + HEADER_BYTES + 8] ^= 0xFF  # the fourth record's value
    segment.write_bytes(bytes(data))
    with Spool(tmp_path, READERS) as spool:
        assert spool.stats.torn_tails == 0  # not a tail: nothing cut
        assert spool.next_seq == 11
        reader = spool.reader("s")
        got = [r.value for r in reader.read(100, 1 << 20)]
        assert got == values[:3] + values[4:]
        for _ in range(3):  # retries after failed deliveries read the gap again
            reader.rewind()
            reader.read(100, 1 << 20)
        assert reader.corrupt_records == 1
        # Each sink's reader counts the lost record for itself; nothing sums them into
        # the writer's counts, so one lost record is not counted once per sink.
        other = spool.reader("t")
        other.read(100, 1 << 20)
        assert other.corrupt_records == 1
        assert not hasattr(spool.stats, "corrupt_records")


def test_a_segment_that_cannot_be_opened_keeps_appends_in_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Spool(tmp_path, ("s",), segment_bytes=300) as spool:
        real_open = os.open
        failures = iter([True, True])

        def flaky_open(
            path: object, flags: int, mode: int = 0o777, *, dir_fd: int | None = None
        ) -> int:
            if str(path).endswith(".seg") and next(failures, False):
                raise OSError(24, "Too many open files")
            return real_open(path, flags, mode, dir_fd=dir_fd)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "open", flaky_open)
        values = _fill(spool, 40)
        assert spool.stats.rotation_failures == 2
        assert not spool.stats.dropped
        assert _read_all(spool, "s") == values


def test_a_rewind_that_cannot_open_its_segment_still_gives_the_batch_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Spool(tmp_path, ("s",)) as spool:
        values = _fill(spool, 10)
        reader = spool.reader("s")
        assert len(reader.read(4, 1 << 20)) == 4  # the sink fails this batch
        real_open = Path.open

        def no_file_handles(self: Path, *args: object, **kwargs: object) -> object:
            raise OSError(24, "Too many open files")

        monkeypatch.setattr(Path, "open", no_file_handles)
        with pytest.raises(OSError):
            reader.rewind()
        monkeypatch.setattr(Path, "open", real_open)
        assert [r.value for r in reader.read(100, 1 << 20)] == values


def test_an_fsync_error_at_rotation_loses_no_later_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Spool(tmp_path, ("s",), segment_bytes=300) as spool:
        real_fsync = os.fsync
        failures = iter([True])

        def flaky_fsync(fd: int) -> None:
            if next(failures, False):
                raise OSError(5, "Input/output error")
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", flaky_fsync)
        values = _fill(spool, 40)
        # Rotated all the same: the old segment may not be on disk, which is counted.
        assert (spool.stats.sync_failures, spool.stats.rotation_failures) == (1, 0)
        assert not spool.stats.dropped
        assert _read_all(spool, "s") == values


def test_damage_before_the_cursor_neither_skips_nor_recounts(tmp_path: Path) -> None:
    with Spool(tmp_path, ("s",)) as spool:
        values = _fill(spool, 10)
        reader = spool.reader("s")
        assert len(reader.read(5, 1 << 20)) == 5
        reader.commit()  # records 1-5 delivered
        segment = next(tmp_path.glob("*.seg"))
    data = bytearray(segment.read_bytes())
    offset = sum(HEADER_BYTES + len(b"call-%d" % n) + len(values[n]) for n in range(4))
    data[offset + HEADER_BYTES + 8] ^= 0xFF  # record 5, already delivered, rots
    segment.write_bytes(bytes(data))
    for _restart in range(2):
        with Spool(tmp_path, ("s",)) as spool:
            reader = spool.reader("s")
            assert [r.value for r in reader.read(100, 1 << 20)] == values[5:]
            assert reader.corrupt_records == 0


def test_a_failed_batch_write_of_the_buffered_stream_is_counted_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lost records are dropped (write_error) and nothing else: their numbers are
    given back, so readers see no gap to count and no backlog that never clears."""
    with Spool(tmp_path, ("s",), buffered=True) as spool:
        _fill(spool, 3, kind=KIND_SIP)  # buffered, not yet written
        monkeypatch.setattr(os, "write", _full_disk)
        spool.flush()  # the three buffered records are lost, and counted
        monkeypatch.undo()
        later = _fill(spool, 2, start=3, kind=KIND_SIP)
        spool.flush()
        reader = spool.reader("s")
        got = reader.read(100, 1 << 20)
        reader.commit()
        assert reader.lag_records == 0
    assert spool.stats.dropped == {"write_error": 3}
    assert spool.stats.appended == {KIND_SIP: 2}
    assert [r.seq for r in got] == [1, 2]
    assert [r.value for r in got] == later
    assert reader.corrupt_records == 0


def _full_disk(fd: int, data: bytes) -> int:
    raise OSError(errno.ENOSPC, "No space left on device")


def _short_writes(monkeypatch: pytest.MonkeyPatch, fraction: float = 0.5) -> None:
    """os.write writes only the first part of what it is given, as on a disk that fills
    up mid-write, and says so."""
    real_write = os.write

    def short(fd: int, data: bytes) -> int:
        return real_write(fd, bytes(data)[: max(1, int(len(data) * fraction))])

    monkeypatch.setattr(os, "write", short)


class _CountingWrites:
    """os.write that fails with ENOSPC while `full` is set; counts every call."""

    def __init__(self) -> None:
        self.full = False
        self.calls = 0
        self._write = os.write

    def __call__(self, fd: int, data: bytes) -> int:
        self.calls += 1
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._write(fd, data)


def test_cdrs_the_disk_refuses_wait_in_the_reserve_and_are_written_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = _CountingWrites()
    monkeypatch.setattr(os, "write", disk)
    written: list[object] = []
    with Spool(tmp_path, ("s",), reserve_records=10) as spool:
        spool.on_reserve_written = written.extend
        values = _fill(spool, 3)
        disk.full = True
        calls = disk.calls
        outcomes = []
        for n in range(3, 7):
            value = b"%d" % n
            outcomes.append(spool.append(KIND_CDR, b"k", value, tag=f"cdr-{n}"))
            values.append(value)
        assert outcomes == [Appended.HELD] * 4
        # The first refusal held it; the later appends joined the reserve without
        # trying the disk again: that is left to the tick.
        assert disk.calls == calls + 1
        spool.flush()  # the tick retries, and the disk is still full
        assert spool.reserved == 4
        assert written == []
        disk.full = False
        assert spool.append(KIND_CDR, b"k", b"7", tag="cdr-7") == Appended.HELD  # behind them
        values.append(b"7")
        spool.flush()  # the tick: the disk takes the reserve again
        assert spool.reserved == 0
        assert written == [f"cdr-{n}" for n in range(3, 8)]  # once each, in order
        assert spool.append(KIND_CDR, b"k", b"8") == Appended.WRITTEN
        values.append(b"8")
        reader = spool.reader("s")
        got = reader.read(100, 1 << 20)
    assert [r.value for r in got] == values
    assert [r.seq for r in got] == list(range(1, 10))
    assert spool.stats.appended == {KIND_CDR: 9}
    assert spool.stats.dropped == {}
    assert reader.corrupt_records == 0


def test_a_held_record_is_encoded_once_however_often_the_write_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded = []
    real_encode = spool_records._encode

    def counting(kind: str, key: bytes, value: bytes, seq: int, seed: int) -> bytes:
        encoded.append(value)
        return real_encode(kind, key, value, seq, seed)

    # From its source: the compiled writer calls its encoder directly.
    writer = load_interpreted()["sipcdr.spool.writer"]
    monkeypatch.setattr(writer, "_encode", counting)
    disk = _CountingWrites()
    monkeypatch.setattr(os, "write", disk)
    with writer.Spool(tmp_path, ("s",), reserve_records=100) as spool:
        disk.full = True
        _fill(spool, 50)
        for _ in range(20):
            spool.flush()  # five times a second in the daemon
        disk.full = False
        spool.flush()
        assert [r.seq for r in spool.reader("s").read(100, 1 << 20)] == list(range(1, 51))
    assert len(encoded) == 50


def test_only_what_the_full_reserve_cannot_hold_is_lost_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Spool(tmp_path, ("s",), reserve_records=2) as spool:
        monkeypatch.setattr(os, "write", _full_disk)
        taken = [spool.append(KIND_CDR, b"k", b"%d" % n) for n in range(5)]
        assert taken == [Appended.HELD] * 2 + [Appended.REFUSED] * 3
        assert spool.stats.dropped == {"write_error": 3}
        monkeypatch.undo()
        spool.flush()  # the tick writes the reserve once the disk takes it
        assert spool.reserved == 0
        assert [r.value for r in spool.reader("s").read(100, 1 << 20)] == [b"0", b"1"]


def test_a_reserve_taken_back_is_neither_written_nor_counted_as_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a stop, the owner that kept the held records elsewhere takes them back."""
    spool = Spool(tmp_path, ("s",))
    spool.open()
    _fill(spool, 2)
    monkeypatch.setattr(os, "write", _full_disk)
    for n in range(3):
        spool.append(KIND_CDR, b"k", b"%d" % n, tag=n)
    assert spool.take_reserve() == [0, 1, 2]
    monkeypatch.undo()
    spool.close()
    assert spool.stats.dropped == {}
    with Spool(tmp_path, ("s",)) as reopened:
        assert len(reopened.reader("s").read(100, 1 << 20)) == 2


def test_a_write_refused_for_space_asks_for_room_and_is_tried_again_at_once(
    tmp_path: Path, small_disk: SmallDisk
) -> None:
    """A real 256 KiB disk, full: the spool's callback frees space (as the daemon's
    spare file does) and the record goes to disk, not to the reserve."""
    disk = small_disk(tmp_path / "disk", 256 * 1024)
    with Spool(disk / "spool", ("s",)) as spool:
        filler = fill(disk, leave_bytes=0)
        asked = []

        def make_room() -> bool:
            asked.append(True)
            filler.unlink()
            return True

        spool.on_no_space = make_room
        assert spool.append(KIND_CDR, b"k", b"x" * 5000) == Appended.WRITTEN
        assert asked == [True]
        assert spool.reserved == 0
        spool.on_no_space = lambda: False  # no more room to be made
        fill(disk, leave_bytes=0, name="filler2")
        assert spool.append(KIND_CDR, b"k", b"y" * 5000) == Appended.HELD


def test_a_reserve_left_at_close_is_counted_as_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path, ("s",))
    spool.open()
    monkeypatch.setattr(os, "write", _full_disk)
    _fill(spool, 3)
    spool.close()
    assert spool.stats.dropped == {"write_error": 3}
    assert spool.reserved == 0


@pytest.mark.parametrize("buffered", [False, True], ids=["cdr", "signaling"])
def test_a_short_write_is_cut_back_to_whole_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, buffered: bool
) -> None:
    kind = KIND_SIP if buffered else KIND_CDR
    with Spool(tmp_path, ("s",), buffered=buffered) as spool:
        values = _fill(spool, 5, kind=kind)
        spool.flush()
        _short_writes(monkeypatch)
        more = _fill(spool, 10, start=5, kind=kind)
        spool.flush()
        monkeypatch.undo()
        segment = next(tmp_path.glob("*.seg"))
        assert segment.stat().st_size == spool.size_bytes  # no torn record left behind
        last = _fill(spool, 2, start=15, kind=kind)
        spool.flush()
        got = spool.reader("s").read(100, 1 << 20)
    if buffered:
        # The whole records of the short batch write were kept; the rest were lost.
        kept = spool.stats.appended[KIND_SIP] - 7
        assert 0 < kept < 10
        assert spool.stats.dropped == {"write_error": 10 - kept}
        assert [r.value for r in got] == values + more[:kept] + last
    else:
        assert spool.stats.dropped == {}
        assert [r.value for r in got] == values + more + last
    assert [r.seq for r in got] == list(range(1, len(got) + 1))
    with Spool(tmp_path, ("s",), buffered=buffered) as reopened:
        assert reopened.stats.torn_tails == 0


def test_torn_bytes_that_cannot_be_cut_back_are_skipped_by_readers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Spool(tmp_path, ("s",)) as spool:
        values = _fill(spool, 3)
        _short_writes(monkeypatch)

        def no_truncate(fd: int, length: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "ftruncate", no_truncate)
        values += _fill(spool, 1, start=3)  # half of it on disk, all of it held
        monkeypatch.undo()
        values += _fill(spool, 2, start=4)  # held behind it
        spool.flush()  # the tick writes them
        whole = sum(HEADER_BYTES + len(b"call-%d" % n) + len(v) for n, v in enumerate(values))
        assert spool.size_bytes > whole  # the torn half is still there
        reader = spool.reader("s")
        got = reader.read(100, 1 << 20)
        assert [r.value for r in got] == values
        assert [r.seq for r in got] == list(range(1, 7))
        assert reader.corrupt_records == 0
    with Spool(tmp_path, ("s", "t")) as reopened:  # t: a new sink reads it all
        assert [r.value for r in reopened.reader("t").read(100, 1 << 20)] == values


class _FakeDisk:
    """os.statvfs of a filesystem whose free space the test sets; counts the calls."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.calls = 0

    def statvfs(self, path: object) -> os.statvfs_result:
        self.calls += 1
        # The type itself: the compiled writer checks what it is handed.
        blocks = self.free // 4096
        return os.statvfs_result((4096, 4096, blocks, blocks, blocks, 0, 0, 0, 0, 255))


def test_signaling_stops_below_the_free_space_floor_counted_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = _FakeDisk(free=10 * 1024 * 1024)
    clock = FakeClock()
    monkeypatch.setattr(os, "statvfs", disk.statvfs)
    with Spool(tmp_path, ("s",), buffered=True, min_free_bytes=1024 * 1024, clock=clock) as spool:
        kept = _fill(spool, 5, kind=KIND_SIP)
        spool.flush()
        disk.free = 512 * 1024  # something else filled the disk
        clock.advance(1.5)
        spool.flush()  # the tick notices
        assert spool.below_floor
        refused = [spool.append(KIND_SIP, b"k", b"x" * 100) for _ in range(1000)]
        for _ in range(20):
            spool.flush()  # five times a second; the disk is read at most once a second
        assert not any(refused)
        assert spool.stats.dropped == {"disk_floor": 1000}
        assert disk.calls == 2
        disk.free = 100 * 1024 * 1024
        clock.advance(1.5)
        spool.flush()
        assert not spool.below_floor
        kept += _fill(spool, 3, start=5, kind=KIND_SIP)
        spool.flush()
        reader = spool.reader("s")
        assert [r.value for r in reader.read(100, 1 << 20)] == kept
        reader.commit()
        assert reader.lag_records == 0 and reader.corrupt_records == 0


def test_writing_towards_the_floor_reads_the_free_space_again_before_it_could_cross(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within the second, a batch that could cross the floor checks again first."""
    disk = _FakeDisk(free=1024 * 1024 + 300 * 1024)
    monkeypatch.setattr(os, "statvfs", disk.statvfs)
    clock = FakeClock()  # time stands still
    with Spool(tmp_path, ("s",), buffered=True, min_free_bytes=1024 * 1024, clock=clock) as spool:
        value = b"x" * 1000
        for _ in range(600):  # ~600 KB in 256 KiB batches
            spool.append(KIND_SIP, b"k", value)
            disk.free = 1024 * 1024 + 300 * 1024 - spool.size_bytes
        spool.flush()
        assert spool.below_floor
        assert spool.stats.dropped.get("disk_floor", 0) > 0
        # No more than the room above the floor (plus one batch) was written.
        assert spool.size_bytes <= 300 * 1024 + 256 * 1024 + 1100


def test_a_cursor_file_is_rewritten_in_place_at_a_fixed_size(tmp_path: Path) -> None:
    with Spool(tmp_path, ("s",)) as spool:
        path = tmp_path / "cursors" / "s.cursor"
        inode = path.stat().st_ino
        _fill(spool, 50)
        reader = spool.reader("s")
        while reader.read(3, 1 << 20):
            reader.commit()
            assert (path.stat().st_ino, path.stat().st_size) == (inode, 8192)
    with Spool(tmp_path, ("s",)) as spool:
        assert spool.reader("s").confirmed_seq == 51


def test_a_torn_cursor_write_falls_back_to_the_previous_position(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Spool(tmp_path, ("s",)) as spool:
        values = _fill(spool, 10)
        reader = spool.reader("s")
        assert len(reader.read(4, 1 << 20)) == 4
        reader.commit()  # saved: from record 5 on
        real_pwrite = os.pwrite

        def torn(fd: int, data: bytes, offset: int) -> int:
            return real_pwrite(fd, data[: len(data) // 2], offset)

        monkeypatch.setattr(os, "pwrite", torn)
        assert len(reader.read(3, 1 << 20)) == 3
        reader.commit()  # half a slot written: torn
        assert reader.cursor_write_failures == 1
        assert reader.confirmed_seq == 8  # the sink goes on from where it is
        assert reader.read(100, 1 << 20)[0].value == values[7]
        reader.rewind()
    # As after a crash: the file holds a torn slot and the previous one.
    with Spool(tmp_path, ("s",)) as spool:
        reader = spool.reader("s")
        assert not reader.cursor_reset
        assert [r.value for r in reader.read(100, 1 << 20)] == values[4:]


def test_a_cursor_that_cannot_be_saved_keeps_its_position_and_frees_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Spool(tmp_path, ("s",), segment_bytes=300) as spool:
        values = _fill(spool, 40)
        assert spool.segments > 5

        def failing(fd: int, data: bytes, offset: int) -> int:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "pwrite", failing)
        assert _read_all(spool, "s") == values  # each record once
        reader = spool.reader("s")
        assert reader.lag_records == 0
        assert reader.cursor_write_failures > 0
        assert spool.segments == 1  # delivered segments are deleted all the same
        monkeypatch.undo()
        spool.flush()  # the tick saves it
        assert not reader.cursor_unsaved
    with Spool(tmp_path, ("s",)) as spool:
        assert spool.reader("s").read(100, 1 << 20) == []


def test_a_cursor_of_the_json_form_is_taken_over(tmp_path: Path) -> None:
    with Spool(tmp_path, ("s",)) as spool:
        values = _fill(spool, 10)
    cursors = tmp_path / "cursors"
    (cursors / "s.cursor").unlink()
    (cursors / "s.json").write_bytes(b'{"seq": 4}')
    with Spool(tmp_path, ("s",)) as spool:
        assert [r.value for r in spool.reader("s").read(100, 1 << 20)] == values[3:]
    assert not (cursors / "s.json").exists()
    assert (cursors / "s.cursor").stat().st_size == 8192


def test_cursor_slots_are_a_page_apart_and_the_older_1k_form_is_taken_over(
    tmp_path: Path,
) -> None:
    with Spool(tmp_path, ("s",)) as spool:
        values = _fill(spool, 10)
        reader = spool.reader("s")
        reader.read(3, 1 << 20)
        reader.commit()
        reader.read(2, 1 << 20)
        reader.commit()  # the second slot, a page after the first
    path = tmp_path / "cursors" / "s.cursor"
    data = path.read_bytes()
    slots = [spool_records._CURSOR.unpack_from(data, offset) for offset in (0, 4096)]
    assert sorted((generation, seq) for _m, generation, seq, _c in slots) == [(2, 4), (3, 6)]
    # The 1 KiB file of earlier versions: slots 512 bytes apart, the newer in the second.
    older = bytearray(1024)
    older[0:24] = spool_records._encode_cursor_slot(7, 3)
    older[512:536] = spool_records._encode_cursor_slot(8, 5)
    path.write_bytes(bytes(older))
    with Spool(tmp_path, ("s",)) as spool:
        assert not spool.reader("s").cursor_reset
        assert path.stat().st_size == 8192  # written anew in the current form
        assert [r.value for r in spool.reader("s").read(100, 1 << 20)] == values[4:]


def test_a_cursor_generation_that_cannot_go_on_keeps_its_position(tmp_path: Path) -> None:
    with Spool(tmp_path, ("s",)) as spool:
        values = _fill(spool, 10)
    path = tmp_path / "cursors" / "s.cursor"
    image = spool_records._encode_cursor_slot(2**64 - 1, 4).ljust(4096, b"\0") * 2
    path.write_bytes(image)
    with Spool(tmp_path, ("s",)) as spool:
        reader = spool.reader("s")
        assert [r.value for r in reader.read(2, 1 << 20)] == values[3:5]
        reader.commit()  # saved without overflowing the generation
        assert reader.cursor_write_failures == 0
    with Spool(tmp_path, ("s",)) as spool:
        assert spool.reader("s").confirmed_seq == 6


def test_a_cursor_file_that_cannot_be_created_whole_leaves_the_json_cursor_in_charge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Spool(tmp_path, ("s",)) as spool:
        values = _fill(spool, 10)
    cursors = tmp_path / "cursors"
    (cursors / "s.cursor").unlink()
    (cursors / "s.json").write_bytes(b'{"seq": 4}')

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with Spool(tmp_path, ("s",)) as spool:
        assert spool.reader("s").confirmed_seq == 4
    monkeypatch.undo()
    assert not (cursors / "s.cursor").exists()  # no empty file to hide the JSON one
    with Spool(tmp_path, ("s",)) as spool:
        assert [r.value for r in spool.reader("s").read(100, 1 << 20)] == values[3:]


def test_a_failed_fsync_is_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Spool(tmp_path, ("s",)) as spool:
        _fill(spool, 2)

        def failing(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fsync", failing)
        with pytest.raises(OSError):
            spool.sync()
        monkeypatch.undo()
        assert spool.stats.sync_failures == 1


def test_on_a_full_disk_a_delivered_active_segment_makes_room_for_the_reserve(
    tmp_path: Path, small_disk: SmallDisk
) -> None:
    """A real 256 KiB disk: the one segment fills it and the disk refuses the rest,
    which waits in the reserve. Once the sink has everything written, the segment
    gives way (it is deleted only when no longer active) and the reserve goes in."""
    disk = small_disk(tmp_path / "disk", 256 * 1024)
    with Spool(disk / "spool", ("s",), reserve_records=1000) as spool:
        reader = spool.reader("s")
        values = _fill(spool, 400)  # ~30 KB of records
        values += [b"x" * 1000 + b"%d" % n for n in range(300)]  # ~300 KB: too much
        for n, value in enumerate(values[400:]):
            assert spool.append(KIND_CDR, b"big-%d" % n, value)
        held = spool.reserved
        assert 0 < held < 300
        assert spool.segments == 1
        got = [r.value for r in reader.read(10_000, 1 << 30)]
        reader.commit()
        spool.flush()  # the tick
        assert spool.reserved < held
        while spool.reserved:
            got += [r.value for r in reader.read(10_000, 1 << 30)]
            reader.commit()
            spool.flush()
        got += [r.value for r in reader.read(10_000, 1 << 30)]
    assert got == values
    assert spool.stats.dropped == {}


def test_a_torn_write_whose_cut_back_fails_keeps_the_segment_the_next_records_go_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first write into a segment is cut short and cutting it back fails too: the
    torn bytes stay, counted as the segment's. Once every reader is past its records,
    rotating must not start a segment of the same name, whose deletion would take the
    file every later record is written to."""
    real_write, real_ftruncate = os.write, os.ftruncate
    faults = {"short": 1, "ftruncate": 1}

    def write(fd: int, data: bytes) -> int:
        if faults["short"]:
            faults["short"] -= 1
            return real_write(fd, bytes(data)[:10])  # the disk filled up mid-record
        return real_write(fd, data)

    def ftruncate(fd: int, length: int) -> None:
        if faults["ftruncate"]:
            faults["ftruncate"] -= 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_ftruncate(fd, length)

    with Spool(tmp_path, ("kafka",)) as spool:
        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "ftruncate", ftruncate)
        assert spool.append(KIND_CDR, b"call-0", b'{"n":0}') == Appended.HELD
        monkeypatch.undo()
        assert faults == {"short": 0, "ftruncate": 0}
        spool.flush()  # the reserve written, after the torn bytes
        values = [b'{"n":0}', *_fill(spool, 3, start=1)]
        assert _read_all(spool, "kafka") == values  # caught up: the segment may retire
        spool.flush()
        values += _fill(spool, 3, start=4)
        assert spool.stats.dropped == {}
    with Spool(tmp_path, ("kafka", "new")) as reopened:
        assert _read_all(reopened, "new") == values


def test_a_close_whose_fsync_fails_still_saves_the_cursors_and_lets_the_lock_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path, ("s",))
    spool.open()
    values = _fill(spool, 5)
    reader = spool.reader("s")
    assert [r.value for r in reader.read(3, 1 << 20)] == values[:3]
    reader.commit()

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError):
        spool.close()
    monkeypatch.undo()
    assert spool.stats.sync_failures == 1
    with Spool(tmp_path, ("s",)) as reopened:  # the lock let go, in this process too
        assert _read_all(reopened, "s") == values[3:]  # from the saved cursor
