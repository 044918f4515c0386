"""The compiled spool writer and dialog journal appender write the bytes their source
writes, and count alike, on a disk that refuses and cuts writes short.

Both are compiled with the hot path (`hotpath.COMPILED_MODULES`); each is run compiled
and from its source (`hotpath.load_interpreted`) through the same appends, flushes,
closes and decisions, every message of the corpora among them, while `os.write` and
`os.writev` refuse (ENOSPC) or cut short a seeded share of the writes, room is made
at every other refusal, and (for the spool) a limit a reader keeps clearing and a
free-space floor refuse records too. The same seed gives both the same disk as long
as they make the same calls, so any difference in what they write, count or answer
shows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import importlib
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sipcdr.clock import FakeClock
from sipcdr.dialog import Correlator
from sipcdr.dialogstore.stats import DialogStoreStats
from sipcdr.hotpath import COMPILED_MODULES, hot_path, load_interpreted
from sipcdr.model import Cdr
from sipcdr.sinks.base import KIND_CDR, KIND_SIP
from test_journal_records import a_cdr
from test_signaling_spool import MESSAGES

Modules = dict[str, ModuleType]
COMPARED = ("sipcdr.spool.segments", "sipcdr.spool.writer", "sipcdr.dialogstore.appender")
_WRITE = os.write
_WRITEV = os.writev


@pytest.fixture(scope="module")
def compiled() -> Modules:
    return {name: importlib.import_module(name) for name in COMPARED}


@pytest.fixture(scope="module")
def interpreted() -> Modules:
    return load_interpreted()


class FaultyDisk:
    """`os.write` and `os.writev` that, while `on`, refuse a seeded share of writes
    with ENOSPC and put only part of another share on disk."""

    def __init__(self, seed: int, refused: float = 0.08, cut: float = 0.06) -> None:
        self._random = random.Random(seed)
        self._refused = refused
        self._cut = cut
        self.on = False
        self.faults = 0

    def _fault(self, data: bytes, fd: int) -> int | None:
        if not self.on:
            return None
        draw = self._random.random()
        if draw < self._refused:
            self.faults += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if draw < self._refused + self._cut and len(data) > 1:
            self.faults += 1
            return _WRITE(fd, data[: self._random.randrange(1, len(data))])
        return None

    def write(self, fd: int, data: Any) -> int:
        cut = self._fault(bytes(data), fd)
        return _WRITE(fd, data) if cut is None else cut

    def writev(self, fd: int, buffers: Sequence[bytes]) -> int:
        cut = self._fault(b"".join(buffers), fd)
        return _WRITEV(fd, buffers) if cut is None else cut


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], FaultyDisk]]:
    """A fresh disk of the seed given, each in turn taking the os module's writes."""

    def made(seed: int) -> FaultyDisk:
        faulty = FaultyDisk(seed)
        monkeypatch.setattr(os, "write", faulty.write)
        monkeypatch.setattr(os, "writev", faulty.writev)
        return faulty

    yield made


def test_the_compared_modules_are_compiled_where_the_hot_path_is(compiled: Modules) -> None:
    assert set(COMPARED) <= set(COMPILED_MODULES)
    kind, _why = hot_path()
    for module in compiled.values():
        assert (kind == "compiled") == (not str(module.__file__).endswith(".py"))


def _values() -> list[tuple[str, bytes, bytes]]:
    """Records as the capture side appends them: each corpus message's headers under
    its Call-ID, with a CDR-sized record every sixth."""
    values = []
    for n, (packet, msg) in enumerate(MESSAGES):
        values.append((KIND_SIP, msg.call_id.encode(), packet.payload))
        if n % 6 == 5:
            values.append((KIND_CDR, msg.call_id.encode(), packet.payload[:700]))
    return values


class Disk:
    """The free space `os.statvfs` reports, falling by a seeded amount each time it is
    read and filling up again at times: the writer's floor is crossed both ways."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)
        self.free = 8 << 20

    def statvfs(self, path: object) -> os.statvfs_result:
        self.free -= self._random.randrange(0, 2 << 20)
        if self.free < 0 or self._random.random() < 0.1:
            self.free = 8 << 20
        blocks = self.free // 4096
        return os.statvfs_result((4096, 4096, blocks, blocks, blocks, 0, 0, 0, 0, 255))


def spool_run(
    writer: ModuleType, directory: Path, faulty: FaultyDisk, buffered: bool, tight: bool
) -> tuple[object, ...]:
    """Everything a spool shows of the appends: what each answered, the tags written
    from the reserve, the counts, the records read back and the segment files. Room is
    made at every other refusal for want of space; `tight`: a spool limit a reader
    must keep clearing (drop_newest when full), and a free-space floor."""
    answers: list[int] = []
    from_reserve: list[object] = []
    asked = [0]

    def make_room() -> bool:
        asked[0] += 1
        return asked[0] % 2 == 0

    clock = FakeClock()
    with writer.Spool(
        directory,
        ("a",),
        segment_bytes=64 * 1024,
        max_bytes=512 * 1024 if tight else 1 << 30,
        full_policy="drop_newest",
        buffered=buffered,
        reserve_records=40,
        min_free_bytes=(4 << 20) if tight else 0,
        clock=clock,
    ) as spool:
        spool.on_reserve_written = from_reserve.extend
        spool.on_no_space = make_room
        reader = spool.reader("a")
        read: list[tuple[int, str, bytes, bytes]] = []
        faulty.on = True
        for n, (kind, key, value) in enumerate(_values()):
            answers.append(int(spool.append(kind, key, value, n)))
            if n % 23 == 0:
                spool.flush()
                clock.advance(0.4)
            if n % 101 == 0:
                spool.sync()
            if tight and n % 37 == 0:  # delivery keeping up, now and then
                read += [(r.seq, r.kind, r.key, r.value) for r in reader.read(500, 1 << 30)]
                reader.commit()
        faulty.on = False
        spool.flush()
        read += [(r.seq, r.kind, r.key, r.value) for r in reader.read(100_000, 1 << 30)]
        shown = (spool.next_seq, spool.full, list(spool.reserved_tags()), asked[0])
    # After the close: what it wrote or lost of the reserve is counted too.
    stats = dataclasses.astuple(spool.stats)
    files = {path.name: path.read_bytes() for path in sorted(directory.glob("*.seg*"))}
    return answers, from_reserve, stats, shown, read, files


@pytest.mark.parametrize(
    ("buffered", "tight"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_the_spool_writer_writes_alike_on_a_faulty_disk(
    compiled: Modules,
    interpreted: Modules,
    disk: Callable[[int], FaultyDisk],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    buffered: bool,
    tight: bool,
) -> None:
    outcomes = []
    for name, modules in (("compiled", compiled), ("source", interpreted)):
        faulty = disk(7)
        monkeypatch.setattr(os, "statvfs", Disk(5).statvfs)
        # The segments' seeds, drawn alike for both, so their names and CRCs compare.
        monkeypatch.setattr(os, "urandom", random.Random(3).randbytes)
        writer = modules["sipcdr.spool.writer"]
        outcomes.append(spool_run(writer, tmp_path / name, faulty, buffered, tight))
        assert faulty.faults > 20
    mine, theirs = outcomes
    answers, read, files = mine[0], mine[4], mine[5]
    assert isinstance(answers, list) and isinstance(read, list) and isinstance(files, dict)
    assert len(read) > 1000 and (tight or len(files) > 10)  # rotated, most records kept
    if tight:  # refused for the limit or the floor, and segments deleted as read
        assert answers.count(0) > 50 and len(files) < 20
    assert mine[:4] == theirs[:4]  # answers, tags from the reserve, counts, state
    assert read == theirs[4]
    assert files == theirs[5]


def journal_run(
    appender_module: ModuleType, path: Path, faulty: FaultyDisk, cdr: Cdr, batched: bool
) -> tuple[object, ...]:
    """The journal's bytes and counts after every corpus message, close decisions,
    timer runs and close records, on `faulty`; batched, in an event loop whose turns
    end every few messages."""
    asked = [0]

    def make_room() -> bool:
        asked[0] += 1
        return asked[0] % 2 == 0

    appender = appender_module.JournalAppender(Correlator(), DialogStoreStats(), make_room, batched)
    appender._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    async def feed() -> None:
        faulty.on = True
        for n, (packet, _msg) in enumerate(MESSAGES):
            # Now and then a port the layout cannot hold: no record, counted.
            appender.message(packet if n % 97 else packet._replace(src_port=70_000))
            if n % 7 == 0:
                appender.decided([cdr], None if n % 14 else float(n))
            if n % 11 == 0:
                if n % 22:
                    appender.write_pending()  # the barrier, before a CDR goes to the spool
                appender.closed(cdr)  # else after records still waiting (held CDRs)
            if n % 5 == 0:
                await asyncio.sleep(0)
        appender.write_pending()
        faulty.on = False

    try:
        asyncio.run(feed())
    finally:
        os.close(appender._fd)
    shown = (
        appender._size,
        appender._intact,
        appender._pending,
        appender._turn_end_queued,
        asked[0],
    )
    return dataclasses.astuple(appender.stats), shown, path.read_bytes()


@pytest.mark.parametrize("batched", [False, True])
def test_the_journal_appender_writes_alike_on_a_faulty_disk(
    compiled: Modules,
    interpreted: Modules,
    disk: Callable[[int], FaultyDisk],
    tmp_path: Path,
    batched: bool,
) -> None:
    cdr = a_cdr()
    first = disk(11)
    mine = journal_run(
        compiled["sipcdr.dialogstore.appender"], tmp_path / "compiled", first, cdr, batched
    )
    second = disk(11)
    theirs = journal_run(
        interpreted["sipcdr.dialogstore.appender"], tmp_path / "source", second, cdr, batched
    )
    assert first.faults == second.faults > 20
    stats, shown, data = mine
    messages, closes, decisions, errors = stats[:4]  # type: ignore[index]
    assert messages > 1000 and closes > 50 and decisions > 100 and errors > 20
    assert isinstance(shown, tuple) and shown[4] > 100  # asked to make room
    assert mine[:2] == theirs[:2]
    assert data == theirs[2]
