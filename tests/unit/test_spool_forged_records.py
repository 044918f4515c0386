"""Records that captured bytes carry are never taken for the spool's own: a search for
the next record after damage (a flipped bit, a write a crash tore) may land inside a
captured value, and each segment's CRC starts from a seed in nothing captured. Segments
of earlier versions (plain CRC32, named by their first number alone) are still read,
and the writer goes on in seeded ones."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest
from sipcdr.sinks.base import KIND_CDR, KIND_SIP
from sipcdr.spool import Appended, Spool, SpoolReader
from sipcdr.spool.tail import SpoolTail

MIB = 1 << 20
LAST_SEQ = (1 << 64) - 1


def plain_record(value: bytes, seq: int, key: bytes = b"k") -> bytes:
    """A record as earlier versions framed it (CRC32 from 0): what a sender who read
    the documented layout can put in a SIP message's body."""
    head = struct.pack("<HBHIQ", 0x5350, 1, len(key), len(value), seq)
    return head + struct.pack("<I", zlib.crc32(head + key + value)) + key + value


def captured(*forged: bytes) -> bytes:
    """A SIP message whose body holds forged records, and text after them."""
    body = b"".join(forged) + b"\r\n-- sent from a forger's phone --\r\n"
    return (
        b"MESSAGE sip:bob@example.com SIP/2.0\r\nCall-ID: forge@x\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )


def newest_segment(directory: Path) -> Path:
    return max(directory.glob("*.seg"), key=lambda path: path.name)


def values(spool: Spool | SpoolTail, name: str) -> list[bytes]:
    return [record.value for record in spool.reader(name).read(1000, 64 * MIB)]


def test_a_torn_write_holding_forged_records_is_cut_at_open(tmp_path: Path) -> None:
    """A crash tore the write of a captured message whose body holds a whole forged
    record, numbered as the next record would be: the open cuts the torn bytes off,
    takes no number from them, and the next record gets the number."""
    forged = plain_record(b'{"cdr_id": "forged"}', 2)
    with Spool(tmp_path, ("r",)) as spool:
        assert spool.append(KIND_CDR, b"k", b"genuine") == Appended.WRITTEN
    message = captured(forged)
    whole = _encoded_by_a_spool(tmp_path / "scratch", KIND_SIP, message)
    segment = newest_segment(tmp_path)
    torn = whole[: whole.index(forged) + len(forged) + 5]
    assert len(torn) < len(whole)
    with segment.open("ab") as handle:
        handle.write(torn)
    with Spool(tmp_path, ("r",)) as spool:
        assert spool.next_seq == 2
        assert spool.stats.torn_tails == 1
        assert spool.append(KIND_CDR, b"k", b"after") == Appended.WRITTEN
        assert values(spool, "r") == [b"genuine", b"after"]
        assert spool.reader("r").corrupt_records == 0


def test_a_damaged_record_is_skipped_past_the_records_forged_in_its_value(
    tmp_path: Path,
) -> None:
    """A flipped bit in a record whose captured value holds forged records, numbered
    as the next ones would be: every reader, in this process and in another, skips to
    the genuine record after it and counts one record lost."""
    forged = [plain_record(b"forged %d" % n, 2 + n) for n in range(3)]
    with Spool(tmp_path, ("here", "there")) as spool:
        spool.append(KIND_SIP, b"forge@x", captured(*forged))
        spool.append(KIND_CDR, b"k", b"genuine")
    segment = newest_segment(tmp_path)
    data = bytearray(segment.read_bytes())
    data[0] ^= 0xFF  # the first record's mark
    segment.write_bytes(bytes(data))
    with Spool(tmp_path, ("here", "there"), readers_elsewhere=False) as spool:
        assert values(spool, "here") == [b"genuine"]
        assert spool.reader("here").corrupt_records == 1
    tail = SpoolTail(tmp_path, ("there",))
    tail.open()
    try:
        assert values(tail, "there") == [b"genuine"]
        assert tail.reader("there").corrupt_records == 1
    finally:
        tail.close()


def test_segments_of_earlier_versions_are_read_and_appends_go_to_a_seeded_one(
    tmp_path: Path,
) -> None:
    """A spool an earlier version wrote (plain CRC32, `<first seq>.seg`): its records
    are delivered, in order with the new ones, by a reader here and a tail; the new
    records go to a segment whose name carries its seed."""
    old = tmp_path / f"{1:020d}.seg"
    old.write_bytes(b"".join(plain_record(b"old %d" % seq, seq) for seq in (1, 2, 3)))
    os.chmod(old, 0o600)
    with Spool(tmp_path, ("here", "there")) as spool:
        assert spool.next_seq == 4
        spool.append(KIND_CDR, b"k", b"new 4")
        names = sorted(path.name for path in tmp_path.glob("*.seg"))
        assert names[0] == old.name and names[1].startswith(f"{4:020d}-"), names
        assert values(spool, "here") == [b"old 1", b"old 2", b"old 3", b"new 4"]
    tail = SpoolTail(tmp_path, ("there",))
    tail.open()
    try:
        assert values(tail, "there") == [b"old 1", b"old 2", b"old 3", b"new 4"]
        assert tail.reader("there").corrupt_records == 0
    finally:
        tail.close()


def test_an_earlier_versions_segment_with_no_whole_record_is_replaced_by_a_seeded_one(
    tmp_path: Path,
) -> None:
    """The newest segment an earlier version left holds torn bytes only: the writer
    deletes it and writes a seeded segment of the same first number, one seed across
    its rotations."""
    old = tmp_path / f"{1:020d}.seg"
    old.write_bytes(plain_record(b"torn", 1)[:-2])
    with Spool(tmp_path, ("r",), segment_bytes=1) as spool:
        assert spool.append(KIND_CDR, b"k", b"first") == Appended.WRITTEN
        assert spool.append(KIND_CDR, b"k", b"second") == Appended.WRITTEN
        names = sorted(path.name for path in tmp_path.glob("*.seg"))
        assert not old.exists()
        assert names[0].startswith(f"{1:020d}-") and all("-" in name for name in names), names
        seeds = {name.removesuffix(".seg").split("-")[1] for name in names}
        assert len(seeds) == 1  # one writer, one seed, across its rotation
        assert values(spool, "r") == [b"first", b"second"]


def test_a_delivery_process_reading_an_earlier_versions_spool_across_the_writers_open(
    tmp_path: Path,
) -> None:
    """A tail has read an earlier version's spool to its empty newest segment when the
    writer opens and writes captured values full of forged records: the tail takes the
    genuine records only, none lost."""
    (tmp_path / f"{1:020d}.seg").write_bytes(
        b"".join(plain_record(b"old %d" % seq, seq) for seq in (1, 2, 3))
    )
    (tmp_path / f"{4:020d}.seg").write_bytes(b"")
    tail = SpoolTail(tmp_path, ("there",))
    tail.open()
    try:
        assert values(tail, "there") == [b"old 1", b"old 2", b"old 3"]
        forged = [plain_record(b"forged", seq) for seq in (4, 5, 6, LAST_SEQ)]
        message = captured(*forged)
        with Spool(tmp_path, ("there",), readers_elsewhere=True) as spool:
            spool.append(KIND_SIP, b"forge@x", message)
            spool.append(KIND_CDR, b"k", b"genuine 5")
            tail.note_next_seq(spool.next_seq)
            assert values(tail, "there") == [message, b"genuine 5"]
        assert tail.reader("there").corrupt_records == 0
    finally:
        tail.close()


def test_the_open_takes_no_number_from_a_forged_record_in_an_earlier_versions_torn_write(
    tmp_path: Path,
) -> None:
    """An earlier version crashed while writing a captured message that holds a record
    forged with the plain CRC32 it used, numbered 2**64 - 1: the first open after the
    upgrade cuts it off with the torn bytes, and appends go on."""
    forged = plain_record(b'{"cdr_id": "forged"}', LAST_SEQ)
    sip = plain_record(captured(forged), 3, key=b"forge@x")
    segment = tmp_path / f"{1:020d}.seg"
    segment.write_bytes(
        plain_record(b"old 1", 1)
        + plain_record(b"old 2", 2)
        + sip[: sip.index(forged) + len(forged) + 5]
    )
    with Spool(tmp_path, ("r",)) as spool:
        assert spool.next_seq == 3
        assert spool.stats.torn_tails == 1
        assert spool.append(KIND_CDR, b"k", b"new 3") == Appended.WRITTEN
        assert values(spool, "r") == [b"old 1", b"old 2", b"new 3"]


@pytest.mark.parametrize("number", [1, 2, LAST_SEQ])
def test_the_open_takes_no_number_below_or_far_past_the_one_before(
    tmp_path: Path, number: int
) -> None:
    """A record forged in an earlier version's torn write, numbered as a record before
    it or near 2**64: not taken, so the numbering neither goes back (the next records
    then read as delivered already) nor ends."""
    forged = plain_record(b"forged", number)
    sip = plain_record(captured(forged), 3, key=b"forge@x")
    (tmp_path / f"{1:020d}.seg").write_bytes(
        plain_record(b"old 1", 1)
        + plain_record(b"old 2", 2)
        + sip[: sip.index(forged) + len(forged) + 5]
    )
    with Spool(tmp_path, ("r",)) as spool:
        assert spool.next_seq == 3
        spool.append(KIND_CDR, b"k", b"new 3")
        assert values(spool, "r") == [b"old 1", b"old 2", b"new 3"]
        assert spool.reader("r").corrupt_records == 0


def test_an_earlier_versions_numbers_spent_on_refused_writes_are_kept_at_open(
    tmp_path: Path,
) -> None:
    """Earlier versions spent the numbers of a buffered batch the disk refused: records
    follow a gap no bytes stand for, hundreds of numbers on in a few bytes. The open
    keeps them all, and the numbering goes on after them."""
    records = [plain_record(b"old %d" % seq, seq) for seq in (1, 2, 303, 304, 305, 306)]
    (tmp_path / f"{1:020d}.seg").write_bytes(b"".join(records))
    with Spool(tmp_path, ("r",)) as spool:
        assert spool.next_seq == 307
        assert spool.stats.torn_tails == 0
        spool.append(KIND_CDR, b"k", b"new 307")
        got = spool.reader("r").read(100, MIB)
        assert [record.seq for record in got] == [1, 2, 303, 304, 305, 306, 307]
    tail = SpoolTail(tmp_path, ("r",))
    tail.open()
    try:
        assert tail.next_seq == 308
    finally:
        tail.close()


def test_an_earlier_versions_segment_that_cannot_be_deleted_stops_the_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rather than write on with seed 0 into it: the open fails, saying why."""
    old = tmp_path / f"{1:020d}.seg"
    old.write_bytes(b"")

    def refused(path: object) -> None:
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(os, "unlink", refused)
    spool = Spool(tmp_path, ("r",))
    with pytest.raises(PermissionError):
        spool.open()
    monkeypatch.undo()
    spool.close()
    assert [path.name for path in tmp_path.glob("*.seg")] == [old.name]


def test_clean_segments_are_read_a_window_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every record of seeded segments is taken by the window reads (a wrong seed there
    would send each to the record-by-record path, slower but with the same result),
    and a start from a cursor skips by windows too."""
    found: list[int] = []
    one_by_one = SpoolReader._next_record

    def counted(reader: SpoolReader, end: int) -> tuple[int, int, bytes, bytes, int] | None:
        record = one_by_one(reader, end)
        if record is not None:
            found.append(record[0])
        return record

    monkeypatch.setattr(SpoolReader, "_next_record", counted)
    with Spool(tmp_path, ("r", "late"), segment_bytes=4096) as spool:
        for n in range(300):
            spool.append(KIND_CDR, b"k", b"value %d" % n)
        assert spool.segments > 2
        assert len(values(spool, "r")) == 300
        assert found == []
        late = spool.reader("late")
        late.confirmed_seq = 150
        late.rewind()
        assert [record.seq for record in late.read(1000, MIB)] == list(range(150, 301))
        assert found == [150]  # the record it stops at is looked at alone, once


def test_each_open_draws_its_own_seed(tmp_path: Path) -> None:
    seeds = set()
    for _ in range(3):
        with Spool(tmp_path, ("r",)) as spool:
            spool.append(KIND_CDR, b"k", b"v")
            seeds.add(newest_segment(tmp_path).name.split("-")[1])
    assert len(seeds) == 3
    with Spool(tmp_path, ("r",)) as spool:
        assert values(spool, "r") == [b"v"] * 3


def test_files_not_named_as_segments_are_left_alone(tmp_path: Path) -> None:
    strays = [
        f"{1:020d}-xyz.seg",
        f"{1:020d}-0000000g.seg",
        f"{1:020d}-ABCDEF01.seg",
        "notes.seg",
        f"{1:020d}-.seg",
        f"{1 << 63:020d}.seg",
        f"{(1 << 64) + 5:020d}.seg",
    ]
    for name in strays:
        (tmp_path / name).write_bytes(plain_record(b"stray", 1))
    (tmp_path / f"{7:020d}.seg").mkdir()
    (tmp_path / f"{8:020d}.seg").symlink_to(f"{8:020d}.seg")  # a loop
    with Spool(tmp_path, ("r",)) as spool:
        assert spool.next_seq == 1
        spool.append(KIND_CDR, b"k", b"v")
        assert values(spool, "r") == [b"v"]
    assert all((tmp_path / name).exists() for name in strays)


def _encoded_by_a_spool(directory: Path, kind: str, value: bytes) -> bytes:
    """The bytes a spool writes for one record of `kind` (the first of a new spool)."""
    with Spool(directory, ("r",)) as spool:
        spool.append(kind, b"forge@x", value)
    return newest_segment(directory).read_bytes()
