"""The window reader against a writer in another process writing as it reads: records
torn at the tail as a reader sees them mid-write, records straddling windows, larger
than a window and exactly a window, rotations and segments the writer deletes once
read. Every record arrives once, in order, none counted damaged."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest
from sipcdr.sinks.base import KIND_CDR
from sipcdr.spool import Spool
from sipcdr.spool import reader as spool_reader
from sipcdr.spool import writer as writer_module
from sipcdr.spool.records import HEADER_BYTES
from sipcdr.spool.tail import SpoolTail

KEY = b"key"


def _value(seq: int, window: int) -> bytes:
    """Sizes that put records across, at and beyond a window's edges."""
    sizes = (
        1,
        37,
        window - HEADER_BYTES - len(KEY),  # the whole record exactly a window
        window - HEADER_BYTES - len(KEY) + 1,
        window // 2 + 5,
        3 * window + 11,
        200,
    )
    size = sizes[seq % len(sizes)]
    return (b"%d:" % seq + bytes([seq % 251]) * size)[: max(size, 1)]


def _write(folder: Path, count: int, window: int, segment_bytes: int) -> None:
    # Each write in two parts a moment apart: the reader meets records cut short at
    # the tail, as a write the kernel has copied only part of shows.
    whole_write = os.write

    def in_two(fd: int, data: bytes | memoryview) -> int:
        if len(data) < 2 * HEADER_BYTES:
            return whole_write(fd, data)
        half = len(data) // 2
        written = whole_write(fd, data[:half])
        time.sleep(0.0002)
        return written + whole_write(fd, data[half:])

    writer_module.os.write = in_two  # type: ignore[attr-defined]  # this process only
    spool = Spool(folder, ("a",), segment_bytes=segment_bytes, readers_elsewhere=True)
    spool.open()
    for seq in range(1, count + 1):
        spool.append(KIND_CDR, KEY, _value(seq, window))
        if seq % 7 == 0:
            time.sleep(0.0005)
    spool.flush()
    spool.close()


@pytest.mark.parametrize("window", [4096, 64 * 1024])
def test_a_concurrent_writer_loses_and_repeats_nothing(
    tmp_path: Path, window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_reader, "_WINDOW_BYTES", window)
    waited = [0]
    cut_back = spool_reader.SpoolReader._cut_back

    def counted(self: spool_reader.SpoolReader) -> bool:
        waited[0] += 1
        return cut_back(self)

    monkeypatch.setattr(spool_reader.SpoolReader, "_cut_back", counted)
    folder = tmp_path / "s"
    count = 1500
    # The folder and the first segment exist before the reader opens.
    first = Spool(folder, ("a",), segment_bytes=8 * window, readers_elsewhere=True)
    first.open()
    first.close()
    tail = SpoolTail(folder, ("a",))
    tail.open()
    reader = tail.reader("a")
    writer = multiprocessing.get_context("fork").Process(
        target=_write, args=(folder, count, window, 8 * window)
    )
    writer.start()
    got: list[int] = []
    rounds = 0
    deadline = time.monotonic() + 120
    while len(got) < count and time.monotonic() < deadline:
        tail.refresh()
        batch = reader.read(1 + rounds % 17, window * (1 + rounds % 5))
        rounds += 1
        for record in batch:
            assert record.value == _value(record.seq, window), record.seq
            got.append(record.seq)
        if rounds % 5 == 0:
            reader.rewind()  # a failed batch: read again from the cursor
            del got[len(got) - len(batch) :]
        else:
            reader.commit()
        if not batch:
            time.sleep(0.001)
    writer.join(30)
    assert writer.exitcode == 0
    assert got == list(range(1, count + 1))
    assert reader.corrupt_records == 0
    assert waited[0]  # records were met cut short at the tail
    tail.close()
