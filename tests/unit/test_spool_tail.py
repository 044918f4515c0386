"""A spool read by another process than its writer's (`SpoolTail`): it follows the
growing tail, waits for a record being written rather than count it damaged, never
skips what was written just before a rotation, and the writer deletes segments by
the readers' cursor files alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sipcdr.sinks.base import KIND_CDR
from sipcdr.spool import Spool
from sipcdr.spool import reader as spool_reader
from sipcdr.spool.records import _encode
from sipcdr.spool.tail import SpoolTail

MIB = 1024 * 1024


def _pair(
    folder: Path, segment_bytes: int = 64 * MIB, consumers: tuple[str, ...] = ("a",)
) -> tuple[Spool, SpoolTail]:
    spool = Spool(folder, consumers, segment_bytes=segment_bytes, readers_elsewhere=True)
    spool.open()
    tail = SpoolTail(folder, consumers)
    tail.open()
    return spool, tail


def _values(records: list) -> list[bytes]:  # type: ignore[type-arg]
    return [record.value for record in records]


def test_a_tail_reads_what_the_writer_appends_as_it_grows(tmp_path: Path) -> None:
    spool, tail = _pair(tmp_path / "s")
    reader = tail.reader("a")
    assert reader.read(100, MIB) == []
    spool.append(KIND_CDR, b"k", b"one")
    assert _values(reader.read(100, MIB)) == [b"one"]
    spool.append(KIND_CDR, b"k", b"two")
    spool.append(KIND_CDR, b"k", b"three")
    assert _values(reader.read(100, MIB)) == [b"two", b"three"]
    assert reader.corrupt_records == 0
    spool.close()
    tail.close()


def test_a_record_cut_short_at_the_tail_is_waited_for_not_counted(tmp_path: Path) -> None:
    spool, tail = _pair(tmp_path / "s")
    spool.append(KIND_CDR, b"k", b"whole")
    reader = tail.reader("a")
    assert _values(reader.read(100, MIB)) == [b"whole"]
    record = _encode(KIND_CDR, b"k", b"being written", spool.next_seq, spool._seed)
    segment = sorted((tmp_path / "s").glob("*.seg"))[-1]
    with segment.open("ab") as handle:  # as a write in progress shows to a reader
        handle.write(record[:20])
    assert reader.read(100, MIB) == []
    assert reader.corrupt_records == 0
    with segment.open("ab") as handle:
        handle.write(record[20:])
    assert _values(reader.read(100, MIB)) == [b"being written"]
    assert reader.corrupt_records == 0
    tail.close()
    spool.close()


def test_every_record_is_read_across_rotations(tmp_path: Path) -> None:
    spool, tail = _pair(tmp_path / "s", segment_bytes=1)  # a segment per record
    reader = tail.reader("a")
    got: list[bytes] = []
    for n in range(30):
        spool.append(KIND_CDR, b"k", f"r{n}".encode())
        if n % 7 == 0:  # the reader at the end of a segment when the next one appears
            got += _values(reader.read(100, MIB))
    got += _values(reader.read(100, MIB))
    assert got == [f"r{n}".encode() for n in range(30)]
    assert reader.corrupt_records == 0
    tail.close()
    spool.close()


def test_the_writer_deletes_what_the_cursor_files_say_was_delivered(tmp_path: Path) -> None:
    spool, tail = _pair(tmp_path / "s", segment_bytes=1, consumers=("a", "b"))
    for n in range(10):
        spool.append(KIND_CDR, b"k", f"r{n}".encode())
    segments = spool.segments
    first, second = tail.reader("a"), tail.reader("b")
    assert len(first.read(100, MIB)) == 10
    first.commit()
    spool.flush()
    assert spool.segments == segments  # "b" has not confirmed anything
    assert len(second.read(5, MIB)) == 5
    second.commit()
    spool.flush()
    assert spool.segments == segments - 5
    assert _values(second.read(100, MIB)) == [f"r{n}".encode() for n in range(5, 10)]
    tail.close()
    spool.close()


def test_retention_moves_a_tail_reader_past_what_it_deleted(tmp_path: Path) -> None:
    spool, tail = _pair(tmp_path / "s", segment_bytes=1)
    for n in range(6):
        spool.append(KIND_CDR, b"k", f"r{n}".encode())
    reader = tail.reader("a")
    assert len(reader.read(2, MIB)) == 2
    reader.commit()
    dropped = spool.expire_segments(before=4e9)  # every closed segment
    assert dropped == 4  # the unconfirmed ones, by the cursor file
    spool.append(KIND_CDR, b"k", b"after")
    assert _values(reader.read(100, MIB)) == [b"after"]
    assert reader.corrupt_records == 0
    tail.close()
    spool.close()


def test_a_tail_opened_later_resumes_from_the_cursor(tmp_path: Path) -> None:
    spool, tail = _pair(tmp_path / "s")
    for n in range(4):
        spool.append(KIND_CDR, b"k", f"r{n}".encode())
    reader = tail.reader("a")
    assert len(reader.read(2, MIB)) == 2
    reader.commit()
    tail.close()  # the delivery process ends (or is killed: the cursor is on disk)
    again = SpoolTail(tmp_path / "s", ("a",))
    again.open()
    assert _values(again.reader("a").read(100, MIB)) == [b"r2", b"r3"]
    again.close()
    spool.close()


def test_a_reader_whose_segment_the_writer_deleted_reads_on(tmp_path: Path) -> None:
    """Read and confirmed to the end of a segment, which the writer then deletes: the
    next read lists the folder again, drops that segment and goes on."""
    spool, tail = _pair(tmp_path / "s", segment_bytes=1)
    reader = tail.reader("a")
    spool.append(KIND_CDR, b"k", b"first")  # fills segment 1; the writer moves on
    assert _values(reader.read(1, MIB)) == [b"first"]
    reader.commit()
    spool.flush()  # the cursor file says segment 1 is delivered: deleted
    assert not list((tmp_path / "s").glob(f"{1:020d}-*.seg"))
    spool.append(KIND_CDR, b"k", b"second")
    assert _values(reader.read(100, MIB)) == [b"second"]
    assert reader.corrupt_records == 0
    tail.close()
    spool.close()


def test_a_cursor_ahead_of_the_spool_holds_back_what_is_appended_since(tmp_path: Path) -> None:
    """Cursors are not fsynced and a delivery process reads the spool before its
    fsync: after a power cut a cursor may point past the records the disk kept. The
    numbers the writer hands out next are new records: none may be skipped."""
    ahead = tmp_path / "ahead"
    with Spool(ahead, ("a",)) as spool:
        for n in range(100):
            spool.append(KIND_CDR, b"k", b"old %d" % n)
        reader = spool.reader("a")
        assert len(reader.read(1000, MIB)) == 100
        reader.commit()  # the cursor says 101
    folder = tmp_path / "s"
    with Spool(folder, ("a",)) as spool:  # what the disk kept: 50 records
        for n in range(50):
            spool.append(KIND_CDR, b"k", b"old %d" % n)
    (folder / "cursors" / "a.cursor").write_bytes((ahead / "cursors" / "a.cursor").read_bytes())

    spool = Spool(folder, ("a",), segment_bytes=1024, readers_elsewhere=True)
    spool.open()
    new = [b"new %d" % n for n in range(100)]  # records 51 .. 150
    for value in new:
        spool.append(KIND_CDR, b"k", value)
    spool.flush()  # the writer deletes segments by the cursor files
    tail = SpoolTail(folder, ("a",))
    tail.open()  # the delivery process starts after them
    got = _values(tail.reader("a").read(1000, 64 * MIB))
    assert [value for value in got if value.startswith(b"new")] == new
    spool.close()
    tail.close()


@pytest.mark.parametrize("window", [64, 4096, 1 << 20])
def test_reading_by_windows_gives_what_reading_record_by_record_does(
    tmp_path: Path, window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Differential: records larger than a window, damage in the middle of a segment,
    a record still being written at the end, rotations, batches cut by count and by
    bytes: a reader taking whole windows at once reads, skips and counts exactly what
    one taking each record alone (a window too small for any) does."""
    folder = tmp_path / "s"
    spool = Spool(folder, ("a", "b"), segment_bytes=3 * MIB, readers_elsewhere=True)
    spool.open()
    values = [(b"v%d-" % n) * (n % 13 + 1) if n % 50 else b"L" * (MIB + 3 * n) for n in range(400)]
    for value in values:
        spool.append(KIND_CDR, b"key", value)
    spool.flush()
    segment = sorted(folder.glob("*.seg"))[0]
    with segment.open("r+b") as handle:  # damage: a record's bytes changed
        handle.seek(segment.stat().st_size // 3)
        handle.write(b"\xff" * 40)
    newest = sorted(folder.glob("*.seg"))[-1]
    record = _encode(KIND_CDR, b"k", b"being written", spool.next_seq, spool._seed)
    with newest.open("ab") as appending:
        appending.write(record[:30])
    tail = SpoolTail(folder, ("a", "b"))
    tail.open()

    def everything(name: str) -> tuple[list[tuple[int, bytes]], int]:
        reader = tail.reader(name)
        got: list[tuple[int, bytes]] = []
        for n, (limit, max_bytes) in enumerate([(7, MIB), (1000, 64 * MIB), (3, 10)] * 200):
            batch = reader.read(limit, max_bytes)
            if n % 4 == 0:  # failed: read again from the cursor, mid-segment
                reader.rewind()
                assert reader.read(limit, max_bytes) == batch
            got += [(r.seq, r.value) for r in batch]
            reader.commit()
        return got, reader.corrupt_records

    monkeypatch.setattr(spool_reader, "_WINDOW_BYTES", 1)  # never a whole record
    one_by_one = everything("a")
    monkeypatch.setattr(spool_reader, "_WINDOW_BYTES", window)
    by_windows = everything("b")
    assert by_windows == one_by_one
    # A tail opened again starts from each cursor: positioned by windows as well.
    for name, size in (("a", 1), ("b", window)):
        monkeypatch.setattr(spool_reader, "_WINDOW_BYTES", size)
        tail.reader(name).confirmed_seq = 150
        tail.reader(name).rewind()
    assert tail.reader("b").read(1000, 64 * MIB) == tail.reader("a").read(1000, 64 * MIB)
    got, corrupt = by_windows
    assert corrupt > 0 and 300 < len(got) < len(values)
    assert [value for _seq, value in got] == [values[seq - 1] for seq, _value in got]
    tail.close()
    spool.close()


def test_a_torn_tail_cut_back_and_written_again_is_read_as_written(tmp_path: Path) -> None:
    """A write the disk refused half-way is cut back and its records written again
    (`Spool._write`): a reader that saw the torn bytes while waiting for the rest reads
    what is there now, not what it saw, for records beyond a window as well."""
    spool, tail = _pair(tmp_path / "s")
    reader = tail.reader("a")
    spool.append(KIND_CDR, b"k", b"first")
    assert _values(reader.read(100, 64 * MIB)) == [b"first"]
    segment = sorted((tmp_path / "s").glob("*.seg"))[-1]
    whole = segment.stat().st_size
    torn = _encode(KIND_CDR, b"k", b"T" * (3 * MIB), spool.next_seq, spool._seed)
    with segment.open("ab") as handle:  # the part of a write that went through
        handle.write(torn[: 2 * MIB])
    assert reader.read(100, 64 * MIB) == []  # waited for, as being written
    os.truncate(segment, whole)  # cut back to the last whole record
    again = [b"A" * (MIB + 5), b"B" * 10, b"C" * (2 * MIB + 7), b"D" * 20]
    for value in again:
        spool.append(KIND_CDR, b"k", value)
    got = []
    for _ in range(10):
        got += _values(reader.read(100, 64 * MIB))
    assert got == again
    assert reader.corrupt_records == 0
    spool.close()
    tail.close()


def test_a_tail_cut_back_after_its_size_was_taken_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer cuts a torn write back between the reader's look at the file's size
    and its reads: the bytes no longer there are not passed over as damage, and the
    records written there again are read."""
    spool, tail = _pair(tmp_path / "s")
    reader = tail.reader("a")
    spool.append(KIND_CDR, b"k", b"first")
    assert _values(reader.read(100, 64 * MIB)) == [b"first"]
    segment = sorted((tmp_path / "s").glob("*.seg"))[-1]
    whole = segment.stat().st_size
    torn = _encode(KIND_CDR, b"k", b"T" * (3 * MIB), spool.next_seq, spool._seed)
    with segment.open("ab") as handle:
        handle.write(torn[: 2 * MIB])
    stale = segment.stat().st_size
    os.truncate(segment, whole)
    monkeypatch.setattr(spool_reader.SpoolReader, "_end", lambda self: stale)
    assert reader.read(100, 64 * MIB) == []
    monkeypatch.undo()
    spool.append(KIND_CDR, b"k", b"again")
    assert _values(reader.read(100, 64 * MIB)) == [b"again"]
    assert reader.corrupt_records == 0
    spool.close()
    tail.close()
