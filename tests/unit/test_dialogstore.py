"""Open calls across a crash: the dialog journal and checkpoints against a correlator
that never crashed, fed the same messages. A crash is the process stopping between
two messages (or between two writes) with nothing flushed or closed."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
import uvloop
from sipcalls import CALLEE_ADDR, CALLER_ADDR, Call, CdrCollector, packet
from sipcdr.dialog import Correlator, DialogLimits
from sipcdr.dialogstore import MAGIC, DialogStore, read_checkpoint
from sipcdr.dialogstore import appender as appender_module
from sipcdr.dialogstore import checkpoint as checkpoint_module
from sipcdr.dialogstore import store as store_module
from sipcdr.engine import Destinations
from sipcdr.model import Cdr
from sipcdr.pipeline import CdrSink, Pipeline
from sipcdr.sinks.outputs import SpoolCdrWriter
from sipcdr.spool import Spool
from smalldisk import SmallDisk, fill

T0 = 1_700_000_000.0
LIMITS = DialogLimits(max_duration_s=100.0, answered_sweep_s=1.0)

# ("msg", time, data, src, dst) | ("expire", time) | ("checkpoint",)
Event = tuple[Any, ...]


def msg(t: float, data: bytes, from_callee: bool = False) -> Event:
    src, dst = (CALLEE_ADDR, CALLER_ADDR) if from_callee else (CALLER_ADDR, CALLEE_ADDR)
    return ("msg", T0 + t, data, src, dst)


def scenario() -> list[Event]:
    """Every way a call changes and ends, interleaved, with the chatter that changes
    nothing: retransmissions, ACKs, a re-INVITE, late copies, non-call requests."""
    a, b, c, d = Call("a@x"), Call("b@x"), Call("c@x"), Call("d@x")
    e, f, g, h = Call("e@x"), Call("f@x"), Call("g@x"), Call("h@x")
    events = [
        msg(0.0, a.request("INVITE")),
        msg(0.01, a.response(100, "Trying", to_tag=None), True),
        msg(0.5, a.response(180, "Ringing"), True),
        msg(0.6, a.response(180, "Ringing"), True),  # retransmission
        msg(1.0, a.response(200, "OK"), True),
        msg(1.1, a.response(200, "OK"), True),  # retransmission
        msg(1.2, a.request("ACK", branch="z9hG4bK-ack", to_tag="callee-tag")),
        msg(2.0, b.request("INVITE")),
        msg(2.5, b.response(180, "Ringing"), True),
        msg(3.0, c.request("INVITE")),
        msg(3.5, c.response(486, "Busy Here"), True),
        msg(3.6, c.request("ACK", branch="z9hG4bK-inv-1")),
        msg(4.0, b.request("CANCEL", extra=['Reason: Q.850;cause=31;text="x"'])),
        msg(4.1, b.response(487, "Request Terminated"), True),
        msg(5.0, a.request("INVITE", 2, "z9hG4bK-re", to_tag="callee-tag")),  # re-INVITE
        msg(5.1, a.response(200, "OK", 2, branch="z9hG4bK-re"), True),
        msg(6.0, d.request("INVITE", 1, "z9hG4bK-d1")),
        msg(6.1, d.response(407, "Proxy Auth", 1, branch="z9hG4bK-d1"), True),
        msg(7.0, d.request("INVITE", 2, "z9hG4bK-d2")),
        msg(7.5, d.response(180, "Ringing", 2, branch="z9hG4bK-d2"), True),
        msg(8.0, d.response(200, "OK", 2, branch="z9hG4bK-d2"), True),
        msg(9.0, e.request("INVITE")),
        msg(9.5, e.response(180, "Ringing"), True),
        msg(10.0, f.request("INVITE")),
        msg(10.1, f.response(401, "Unauthorized"), True),
        msg(11.0, g.request("INVITE")),
        msg(11.2, g.response(302, "Moved"), True),
        msg(12.0, g.request("INVITE", 2, "z9hG4bK-g2")),  # a new attempt: its own call
        msg(12.5, g.response(200, "OK", 2, branch="z9hG4bK-g2"), True),
        msg(13.0, h.request("INVITE")),
        msg(13.5, h.response(200, "OK"), True),
        msg(14.0, Call("orphan@x").request("BYE", 2, "z9hG4bK-o", to_tag="t")),
        msg(14.1, Call("ping@x").request("OPTIONS")),
        msg(20.0, a.request("BYE", 3, "z9hG4bK-bye", to_tag="callee-tag")),
        msg(20.1, a.response(200, "OK", 3, "BYE", "z9hG4bK-bye"), True),
        msg(20.5, a.request("BYE", 3, "z9hG4bK-bye", to_tag="callee-tag")),  # late
        ("expire", T0 + 25.0),
        msg(
            30.0,
            d.request("BYE", 3, "z9hG4bK-db", to_tag="callee-tag", from_callee=True),
            True,
        ),
        msg(40.0, g.request("BYE", 3, "z9hG4bK-gb", to_tag="callee-tag")),
        ("expire", T0 + 120.0),  # h: silent for 100 s, closed at its last message
        ("expire", T0 + 131.0),  # f: no retry within 120 s of the 401
        ("expire", T0 + 190.0),  # e: rang for 180 s
    ]
    return events


class Closes:
    """What the spool writer's hook does for a spool that takes every CDR at once: its
    close is journaled right after it."""

    name = "closes"

    def __init__(self, store: DialogStore) -> None:
        self.store = store

    def write(self, cdr: Cdr) -> None:
        self.store.closed(cdr)

    def flush(self) -> None:
        return None


class Node:
    """One lifetime of the daemon's dialog path: correlator, pipeline, store, and a
    list standing in for the spool."""

    def __init__(self, directory: Path, spool: CdrCollector, limits: DialogLimits = LIMITS):
        self.correlator = Correlator(limits)
        self.spool = spool
        self.pipeline = Pipeline(self.correlator, [spool])
        self.store = DialogStore(directory, self.correlator)
        self.closes = Closes(self.store)

    async def boot(self) -> list[Cdr]:
        unwritten = self.store.recover()
        self.pipeline = self.chain((self.spool, self.closes))
        await self.store.start(self.pipeline.emit)
        return unwritten

    def chain(self, sinks: Sequence[CdrSink]) -> Pipeline:
        """The daemon's chain for this lifetime: the sinks, then the journal hooks."""
        return Pipeline(
            self.correlator, sinks, journal=self.store.message, decided=self.store.decided
        )

    def run(self, events: Sequence[Event]) -> None:
        for event in events:
            if event[0] == "msg":
                _, t, data, src, dst = event
                self.pipeline.process(packet(t, data, src, dst))
            elif event[0] == "expire":
                self.pipeline.expire(event[1])
            else:
                assert self.store.checkpoint()

    def crash(self) -> None:
        """SIGKILL: nothing more is written or flushed; the descriptors go."""
        store: Any = self.store
        if store._task is not None:
            store._task.cancel()
        if store._fd >= 0:
            os.close(store._fd)
            store._fd = -1


def reference(events: Sequence[Event], limits: DialogLimits = LIMITS) -> list[Cdr]:
    spool = CdrCollector()
    pipeline = Pipeline(Correlator(limits), [spool])
    for event in events:
        if event[0] == "msg":
            _, t, data, src, dst = event
            pipeline.process(packet(t, data, src, dst))
        elif event[0] == "expire":
            pipeline.expire(event[1])
    return spool.cdrs


def by_id(cdrs: Sequence[Cdr]) -> dict[str, dict[str, object]]:
    ids = [cdr.cdr_id for cdr in cdrs]
    assert len(ids) == len(set(ids)), "a CDR was written twice"
    return {cdr.cdr_id: cdr.to_record() for cdr in cdrs}


def state_of(correlator: Correlator, now: float) -> dict[str, object]:
    """What a restart must rebuild: every open call's fields (but its last-message
    time, which only checkpoints carry) and the Call-IDs closed within the late window
    at `now` (older ones go at the first timer run, which replay does not repeat)."""
    snap = orjson.loads(correlator.snapshot())
    fields = snap["fields"]
    skip, key = fields.index("last_time"), fields.index("call_id")
    rows = {row[key]: [v for i, v in enumerate(row) if i != skip] for row in snap["dialogs"]}
    assert len(rows) == correlator.open_dialogs
    late_since = now - correlator.limits.transaction_timeout_s
    closed = {
        call_id: entry[1:] for call_id, entry in snap["closed"].items() if entry[0] > late_since
    }
    return {"open": rows, "closed": closed}


@pytest.mark.parametrize("checkpoint_at", [None, 8, 24])
async def test_a_crash_after_any_message_loses_no_call_and_writes_no_cdr_twice(
    tmp_path: Path, checkpoint_at: int | None
) -> None:
    events = scenario()
    expected = by_id(reference(events))
    assert len(expected) == 9  # a, b, c, d, e, f, g's two attempts, h
    if checkpoint_at is not None:
        events.insert(checkpoint_at, ("checkpoint",))
    for crash_at in range(len(events) + 1):
        directory = tmp_path / f"crash{crash_at}"
        directory.mkdir()
        spool = CdrCollector()
        first = Node(directory, spool)
        await first.boot()
        first.run(events[:crash_at])
        now = max([T0, *(e[1] for e in events[:crash_at] if len(e) > 1)])
        at_crash = state_of(first.correlator, now)
        first.crash()

        second = Node(directory, spool)
        assert await second.boot() == []  # every close before the crash was journaled
        # The same state as the process that crashed (hence as a correlator that never
        # did), rebuilt from the checkpoint and the journal.
        assert state_of(second.correlator, now) == at_crash, crash_at
        second.run(events[crash_at:])
        assert by_id(spool.cdrs) == expected, crash_at
        await second.store.stop()


def first_bye_of(events: Sequence[Event], call_id: bytes) -> int:
    return next(
        i
        for i, e in enumerate(events)
        if e[0] == "msg" and e[2].startswith(b"BYE ") and b"Call-ID: " + call_id in e[2]
    )


class Killed(BaseException):
    """The process dies inside a sink's write (not an error the pipeline catches)."""


class DyingSink:
    def __init__(self, inner: Any, call_id: str) -> None:
        self.name = inner.name
        self.inner = inner
        self.call_id = call_id

    def write(self, cdr: Cdr) -> None:
        if cdr.call_id == self.call_id:
            raise Killed
        self.inner.write(cdr)

    def flush(self) -> None:
        self.inner.flush()


async def test_a_crash_between_the_journal_and_the_spool_writes_the_cdr_at_start(
    tmp_path: Path,
) -> None:
    events = scenario()
    expected = by_id(reference(events))
    bye_at = first_bye_of(events, b"a@x")
    spool = CdrCollector()
    first = Node(tmp_path, spool)
    await first.boot()
    first.run(events[:bye_at])
    first.pipeline = first.chain((DyingSink(spool, "a@x"), first.closes))
    with pytest.raises(Killed):
        first.run(events[bye_at : bye_at + 1])  # journaled, killed before the spool
    first.crash()
    assert "a@x" not in {cdr.call_id for cdr in spool.cdrs}

    second = Node(tmp_path, spool)
    assert [cdr.call_id for cdr in await second.boot()] == ["a@x"]
    second.run(events[bye_at + 1 :])
    assert by_id(spool.cdrs) == expected
    # Written once, and it is closed for good: the next crash does not write it again.
    second.crash()
    third = Node(tmp_path, spool)
    assert await third.boot() == []


async def test_a_crash_between_the_spool_and_the_close_record_writes_the_same_cdr_again(
    tmp_path: Path,
) -> None:
    """The one window where a CDR reaches the spool twice: the process dies between
    two consecutive writes. It is the same record under the same cdr_id."""
    events = scenario()
    bye_at = first_bye_of(events, b"a@x")
    spool = CdrCollector()
    first = Node(tmp_path, spool)
    await first.boot()
    first.run(events[:bye_at])
    first.pipeline = first.chain((spool, DyingSink(first.closes, "a@x")))
    with pytest.raises(Killed):
        first.run(events[bye_at : bye_at + 1])
    first.crash()
    second = Node(tmp_path, CdrCollector())
    again = await second.boot()
    assert [cdr.to_record() for cdr in again] == [
        cdr.to_record() for cdr in spool.cdrs if cdr.call_id == "a@x"
    ]


async def test_evictions_and_timers_are_not_repeated_by_replay(tmp_path: Path) -> None:
    limits = DialogLimits(max_open_dialogs=2, ring_timeout_s=30.0)
    calls = [Call(f"ev{n}@x") for n in range(4)]
    events = [msg(float(n), call.request("INVITE")) for n, call in enumerate(calls[:3])]
    events += [("expire", T0 + 31.5), msg(40.0, calls[3].request("INVITE"))]
    expected = by_id(reference(events, limits))
    assert len(expected) == 2  # ev0 evicted by ev2, ev1 timed out; ev2, ev3 open
    spool = CdrCollector()
    first = Node(tmp_path, spool, limits)
    await first.boot()
    first.run(events)
    first.crash()
    second = Node(tmp_path, spool, limits)
    assert await second.boot() == []
    assert by_id(spool.cdrs) == expected
    assert sorted(orjson.loads(second.correlator.snapshot())["closed"]) == ["ev0@x", "ev1@x"]
    assert second.correlator.open_dialogs == 2


async def test_timers_that_ran_out_while_down_close_at_the_last_message(tmp_path: Path) -> None:
    spool = CdrCollector()
    first = Node(tmp_path, spool)
    await first.boot()
    ringing, answered = Call("ringing@x"), Call("answered@x")
    first.run(
        [
            msg(0.0, ringing.request("INVITE")),
            msg(0.4, ringing.response(180, "Ringing"), True),
            msg(1.0, answered.request("INVITE")),
            msg(2.0, answered.response(200, "OK"), True),
        ]
    )
    first.crash()
    second = Node(tmp_path, spool)
    await second.boot()
    second.pipeline.expire(T0 + 3600.0)  # down for an hour
    closed = {cdr.call_id: cdr for cdr in spool.cdrs}
    assert (closed["ringing@x"].disposition, closed["ringing@x"].end_time) == (
        "no_answer",
        T0 + 0.4,
    )
    assert closed["answered@x"].end_reason == "timeout_no_bye"
    assert (closed["answered@x"].answer_time, closed["answered@x"].end_time) == (T0 + 2, T0 + 2)


def record_ends(journal: Path) -> list[int]:
    data = journal.read_bytes()
    ends, at = [], len(MAGIC)
    while at < len(data):
        _crc, length = struct.unpack_from("<II", data, at)
        at += 8 + length
        ends.append(at)
    return ends


async def test_a_torn_journal_tail_replays_the_whole_records_before_it(tmp_path: Path) -> None:
    events = [e for e in scenario() if e[0] == "msg"][:20]
    source = tmp_path / "source"
    source.mkdir()
    first = Node(source, CdrCollector())
    await first.boot()
    first.run(events)
    first.crash()
    (journal,) = source.glob("*.journal")
    ends = record_ends(journal)
    data = journal.read_bytes()
    assert ends[-1] == len(data)

    async def recovered(cut: int) -> tuple[dict[str, object], int]:
        directory = tmp_path / "cut"
        shutil.rmtree(directory, ignore_errors=True)
        shutil.copytree(source, directory)
        (directory / journal.name).write_bytes(data[:cut])
        node = Node(directory, CdrCollector())
        node.store.recover()
        return state_of(node.correlator, T0), node.store.stats.torn_tails

    whole = {end: (await recovered(end))[0] for end in [len(MAGIC), *ends[-4:]]}
    for cut in range(ends[-4], len(data)):
        state, torn = await recovered(cut)
        boundary = max(end for end in whole if end <= cut)
        assert state == whole[boundary], cut
        assert torn == (0 if cut == boundary else 1), cut


async def test_a_damaged_record_stops_replay_there_and_is_counted(tmp_path: Path) -> None:
    events = [e for e in scenario() if e[0] == "msg"][:12]
    first = Node(tmp_path, CdrCollector())
    await first.boot()
    first.run(events)
    first.crash()
    (journal,) = tmp_path.glob("*.journal")
    ends = record_ends(journal)
    data = bytearray(journal.read_bytes())
    data[ends[2] + 20] ^= 0xFF  # inside the fourth record
    journal.write_bytes(bytes(data))
    second = Node(tmp_path, CdrCollector())
    with structlog.testing.capture_logs() as logs:
        second.store.recover()
    assert second.store.stats.torn_tails == 1
    assert second.store.stats.replayed_records == 3
    assert second.store.stats.torn_bytes == len(data) - ends[2]
    damaged = [entry for entry in logs if entry["event"] == "dialog_journal_damaged"]
    assert damaged[0]["log_level"] == "error"


async def test_an_unreadable_checkpoint_is_set_aside_and_the_journal_still_replays(
    tmp_path: Path,
) -> None:
    first = Node(tmp_path, CdrCollector())
    await first.boot()
    first.run([msg(0.0, Call("before@x").request("INVITE"))])
    assert first.store.checkpoint()
    first.run([msg(1.0, Call("after@x").request("INVITE"))])
    first.crash()
    (checkpoint,) = tmp_path.glob("dialogs.*.json")
    checkpoint.write_bytes(b'{"version": 2, "fields": ["call_id"], "dialogs": [[1]]}')
    second = Node(tmp_path, CdrCollector())
    with structlog.testing.capture_logs() as logs:
        second.store.recover()
    assert [e["log_level"] for e in logs if e["event"] == "dialog_checkpoint_unreadable"] == [
        "error"
    ]
    assert (tmp_path / (checkpoint.name + ".unreadable")).exists()
    assert second.store.stats.unreadable_checkpoints == 1
    # The calls that began in the journal are back; those only in the checkpoint not.
    assert second.correlator.is_open("after@x")
    assert not second.correlator.is_open("before@x")


async def test_files_are_private_and_the_journal_starts_over_at_each_checkpoint(
    tmp_path: Path,
) -> None:
    node = Node(tmp_path, CdrCollector())
    await node.boot()
    node.run([msg(0.0, Call("x@x").request("INVITE"))])
    assert node.store.journal_bytes > len(MAGIC)
    assert node.store.checkpoint()
    assert node.store.journal_bytes == len(MAGIC)
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["dialogs.3.journal", "dialogs.3.json"]
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    await node.store.stop()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dialogs.4.json"]


async def test_a_legacy_snapshot_is_read_once(tmp_path: Path) -> None:
    old = Correlator()
    call = Call("legacy@x")
    old.feed(packet(T0, call.request("INVITE")), _parse(call.request("INVITE")))
    snap = orjson.loads(old.snapshot())
    rows = [dict(zip(snap["fields"], row, strict=True)) for row in snap["dialogs"]]
    (tmp_path / "dialogs.json").write_bytes(orjson.dumps({"version": 1, "dialogs": rows}))
    node = Node(tmp_path, CdrCollector())
    await node.boot()
    assert node.correlator.is_open("legacy@x")
    assert not (tmp_path / "dialogs.json").exists()
    await node.store.stop()


def _parse(data: bytes) -> Any:
    from sipcdr.sip import parse

    return parse(data)


# The real calls, kept before a test routes the journal's through a stand-in.
_WRITE = os.write
_WRITEV = os.writev


def journal_os(monkeypatch: pytest.MonkeyPatch, stand_in: Any) -> None:
    """Route the journal appender's writes through `stand_in`. Compiled, the appender
    reads `os.writev` from the os module itself rather than from its own namespace, so
    it is replaced there too (the appender alone calls it)."""
    monkeypatch.setattr(appender_module, "os", stand_in)
    monkeypatch.setattr(os, "writev", stand_in.writev)


class FullDisk:
    """os for the store, whose writes fail with ENOSPC while `full` is set."""

    def __init__(self) -> None:
        self.full = False

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def _check(self) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")

    def write(self, fd: int, data: Any) -> int:
        self._check()
        return _WRITE(fd, data)

    def writev(self, fd: int, buffers: Sequence[bytes]) -> int:
        self._check()
        return _WRITEV(fd, buffers)


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[FullDisk]:
    disk = FullDisk()
    # The journal's writes and the checkpoint file's.
    journal_os(monkeypatch, disk)
    monkeypatch.setattr(store_module, "os", disk)
    monkeypatch.setattr(checkpoint_module, "os", disk)
    yield disk


async def test_a_stop_on_a_full_disk_keeps_the_previous_checkpoint_and_the_journal(
    tmp_path: Path, full_disk: FullDisk
) -> None:
    spool = CdrCollector()
    first = Node(tmp_path, spool)
    await first.boot()
    first.run([msg(0.0, Call("one@x").request("INVITE"))])
    assert first.store.checkpoint()
    first.run(
        [
            msg(1.0, Call("one@x").response(200, "OK"), True),
            msg(2.0, Call("two@x").request("INVITE")),
        ]
    )
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    full_disk.full = True
    with structlog.testing.capture_logs() as logs:
        await first.store.stop()
    full_disk.full = False
    # Nothing half-written, nothing replaced.
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    (failed,) = [entry for entry in logs if entry["event"] == "dialog_checkpoint_failed"]
    assert failed["open_dialogs"] == 2
    assert failed["recoverable_from_journal"] is True
    assert failed["log_level"] == "warning"  # nothing lost: the journal rebuilds them
    assert "one@x" not in repr(logs)

    second = Node(tmp_path, spool)
    await second.boot()
    assert second.correlator.is_open("two@x")
    bye = Call("one@x").request("BYE", 2, "z9hG4bK-b", to_tag="callee-tag")
    second.run([msg(61.0, bye)])
    assert [(cdr.call_id, cdr.billsec) for cdr in spool.cdrs] == [("one@x", 60.0)]


async def test_journal_writes_on_a_full_disk_are_counted_and_a_failed_stop_is_an_error(
    tmp_path: Path, full_disk: FullDisk
) -> None:
    node = Node(tmp_path, CdrCollector())
    await node.boot()
    size = node.store.journal_bytes
    full_disk.full = True
    node.run([msg(0.0, Call("lost@x").request("INVITE"))])  # never raises into capture
    assert node.store.stats.journal_write_errors == 1
    assert node.store.journal_bytes == size
    assert node.correlator.is_open("lost@x")
    with structlog.testing.capture_logs() as logs:
        await node.store.stop()
    (failed,) = [entry for entry in logs if entry["event"] == "dialog_checkpoint_failed"]
    assert (failed["log_level"], failed["recoverable_from_journal"]) == ("error", False)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_checkpoint_is_due_after_the_interval_and_only_when_messages_came(
    tmp_path: Path,
) -> None:
    now = [100.0]
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    correlator = Correlator()
    store = DialogStore(tmp_path, correlator, checkpoint_interval_s=10.0, clock=clock)
    store.recover()
    store._messages_at_checkpoint = 0
    store._last_checkpoint = 100.0
    now[0] = 111.0
    assert not store.checkpoint_due()  # nothing arrived
    correlator.stats.messages += 1
    assert store.checkpoint_due()
    now[0] = 105.0
    assert not store.checkpoint_due()
    # A checkpoint that blocked for 2 s is spaced to take at most 5 % of the time.
    store._last_checkpoint_s = 2.0
    now[0] = 139.0
    assert not store.checkpoint_due()
    now[0] = 140.0
    assert store.checkpoint_due()


async def test_a_background_checkpoint_is_the_state_between_two_messages(tmp_path: Path) -> None:
    """The periodic checkpoint writes its file in a thread: the snapshot is taken and
    the journal switched at once, messages go on into the new journal meanwhile."""
    node = Node(tmp_path, CdrCollector())
    await node.boot()
    node.run([msg(0.0, Call("one@x").request("INVITE"))])
    writing = asyncio.create_task(node.store._checkpoint_in_background())
    await asyncio.sleep(0)  # snapshot taken, journal switched, file being written
    node.run([msg(1.0, Call("two@x").request("INVITE"))])
    await writing
    node.crash()
    checkpoint, unwritten = read_checkpoint((tmp_path / "dialogs.3.json").read_bytes())
    column = checkpoint["fields"].index("call_id")  # type: ignore[attr-defined]
    assert [row[column] for row in checkpoint["dialogs"]] == ["one@x"]  # type: ignore[attr-defined]
    assert unwritten == []
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "dialogs.3.journal",
        "dialogs.3.json",
    ]
    second = Node(tmp_path, CdrCollector())
    with structlog.testing.capture_logs() as logs:
        await second.boot()
    (recovered,) = [entry for entry in logs if entry["event"] == "dialogs_recovered"]
    assert (recovered["from_checkpoint"], recovered["journal_records"]) == (1, 1)
    assert second.correlator.is_open("one@x") and second.correlator.is_open("two@x")
    await second.store.stop()


async def test_a_stop_waits_for_a_checkpoint_being_written(tmp_path: Path) -> None:
    node = Node(tmp_path, CdrCollector())
    await node.boot()
    node.run([msg(0.0, Call("one@x").request("INVITE"))])
    writing = asyncio.create_task(node.store._checkpoint_in_background())
    await asyncio.sleep(0)
    node.run([msg(1.0, Call("two@x").request("INVITE"))])
    await node.store.stop()
    await writing
    assert node.store.stats.checkpoints == 3  # at start, in the background, at the stop
    assert node.store.stats.checkpoint_failures == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dialogs.4.json"]


# -- CDRs the spool holds in memory --------------------------------------------------------


class SpoolNode:
    """A lifetime of the daemon's dialog path with the real spool writer, its spool on a
    small disk of its own (the store's files are on another one)."""

    def __init__(self, directory: Path, spool_dir: Path, *, batched: bool = False) -> None:
        self.correlator = Correlator(LIMITS)
        self.spool = Spool(spool_dir, ("s",), reserve_records=100)
        self.spool.open()
        self.writer = SpoolCdrWriter(self.spool)
        self.pipeline = Pipeline(self.correlator, [self.writer])
        self.store = DialogStore(directory, self.correlator, batch_writes=batched)
        # As the daemon wires it (`DialogStore.ahead`): the turn's journal records are
        # written before any CDR reaches the spool writer.
        self.sinks: list[CdrSink] = [self.store.barrier, self.writer]

    async def boot(self) -> list[Cdr]:
        unwritten = self.store.recover()
        self.writer.on_written = self.store.closed
        self.store.held = self.writer.held
        self.pipeline = Pipeline(
            self.correlator,
            self.sinks,
            journal=self.store.message,
            decided=self.store.decided,
        )
        await self.store.start(self.pipeline.emit)
        return unwritten

    def run(self, events: Sequence[Event]) -> None:
        Node.run(self, events)  # type: ignore[arg-type]

    def crash(self) -> None:
        Node.crash(self)  # type: ignore[arg-type]
        self.spool.close()  # what it wrote stays; the reserve is gone with the process

    def cdr_ids(self) -> list[str]:
        reader = self.spool.reader("s")
        return [orjson.loads(r.value)["cdr_id"] for r in reader.read(1000, 1 << 30)]


def answered(call: Call, at: float) -> list[Event]:
    return [msg(at, call.request("INVITE")), msg(at + 1, call.response(200, "OK"), True)]


def bye(call: Call, at: float) -> Event:
    return msg(at, call.request("BYE", 2, "z9hG4bK-b", to_tag="callee-tag"))


@pytest.mark.parametrize("checkpoint_while_held", [False, True])
async def test_a_cdr_the_disk_holds_is_not_journaled_closed_and_a_crash_does_not_lose_it(
    tmp_path: Path, small_disk: SmallDisk, checkpoint_while_held: bool
) -> None:
    """The spool's disk refuses CDRs: they wait in memory, their calls are not recorded
    as closed; after a SIGKILL the next start writes them (from the journal, or from the
    checkpoint taken while they were held), each once."""
    disk = small_disk(tmp_path / "spooldisk", 256 * 1024)
    state = tmp_path / "state"
    state.mkdir()
    calls = [Call(f"held-{n}@x", from_tag=f"h{n}") for n in range(5)]
    first = SpoolNode(state, disk / "spool")
    await first.boot()
    first.run([event for n, call in enumerate(calls) for event in answered(call, n)])
    filler = fill(disk, leave_bytes=0)
    first.run([bye(call, 60 + n) for n, call in enumerate(calls)])
    assert first.spool.reserved == 5
    assert first.store.stats.journal_closes == 0  # nothing is recorded as written
    if checkpoint_while_held:
        assert first.store.checkpoint()  # the journal with their BYEs is deleted
        assert not any(b"BYE" in path.read_bytes() for path in state.glob("*.journal"))
    first.crash()
    filler.unlink()

    second = SpoolNode(state, disk / "spool")
    again = await second.boot()
    assert sorted(cdr.call_id for cdr in again) == sorted(call.call_id for call in calls)
    assert {cdr.billsec for cdr in again} == {59.0}
    assert second.spool.reserved == 0
    assert sorted(second.cdr_ids()) == sorted(cdr.cdr_id for cdr in again)
    second.crash()
    third = SpoolNode(state, disk / "spool")
    assert await third.boot() == []  # written once: their closes were journaled
    third.crash()


async def test_a_held_cdr_is_journaled_closed_once_the_spool_writes_it(
    tmp_path: Path, small_disk: SmallDisk
) -> None:
    disk = small_disk(tmp_path / "spooldisk", 256 * 1024)
    state = tmp_path / "state"
    state.mkdir()
    call = Call("later@x")
    node = SpoolNode(state, disk / "spool")
    await node.boot()
    node.run(answered(call, 0.0))
    filler = fill(disk, leave_bytes=0)
    node.run([bye(call, 30.0)])
    assert node.store.stats.journal_closes == 0
    filler.unlink()
    node.spool.flush()  # the tick
    assert node.store.stats.journal_closes == 1
    node.crash()
    second = SpoolNode(state, disk / "spool")
    assert await second.boot() == []
    assert len(second.cdr_ids()) == 1
    second.crash()


async def test_a_stop_with_cdrs_held_keeps_them_in_the_last_checkpoint(
    tmp_path: Path, small_disk: SmallDisk
) -> None:
    disk = small_disk(tmp_path / "spooldisk", 256 * 1024)
    state = tmp_path / "state"
    state.mkdir()
    call = Call("stop@x")
    node = SpoolNode(state, disk / "spool")
    await node.boot()
    node.run(answered(call, 0.0))
    filler = fill(disk, leave_bytes=0)
    node.run([bye(call, 30.0)])
    assert await node.store.stop()
    (checkpoint,) = state.glob("dialogs.*.json")
    _snapshot, unwritten = read_checkpoint(checkpoint.read_bytes())
    assert [cdr.call_id for cdr in unwritten] == ["stop@x"]
    assert node.writer.take_held()[0].to_record() == unwritten[0].to_record()
    node.spool.close()
    assert node.spool.stats.dropped == {}
    filler.unlink()
    second = SpoolNode(state, disk / "spool")
    assert [cdr.to_record() for cdr in await second.boot()] == [unwritten[0].to_record()]
    assert second.cdr_ids() == [unwritten[0].cdr_id]
    await second.store.stop()


# -- what a restart rebuilds exactly ---------------------------------------------------------


async def test_a_timer_close_caught_before_its_close_record_is_written_again_the_same(
    tmp_path: Path,
) -> None:
    """A retransmitted 180 moved the call's last-message time (not journaled); the ring
    timer closes it there. A crash between the spool and the close record: the next
    start writes the same CDR, not one ending at the last journaled message."""
    call = Call("ring@x")
    events = [
        msg(0.0, call.request("INVITE")),
        msg(1.0, call.response(180, "Ringing"), True),
        msg(50.0, call.response(180, "Ringing"), True),  # a retransmission
    ]
    spool = CdrCollector()
    first = Node(tmp_path, spool)
    await first.boot()
    first.run(events)
    first.pipeline = first.chain((spool, DyingSink(first.closes, "ring@x")))
    with pytest.raises(Killed):
        first.run([("expire", T0 + 200.0)])
    first.crash()
    (original,) = spool.cdrs
    assert original.end_time == T0 + 50.0
    second = Node(tmp_path, CdrCollector())
    again = await second.boot()
    assert [cdr.to_record() for cdr in again] == [original.to_record()]


async def test_recovered_cdrs_are_journaled_closed_even_when_no_checkpoint_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = scenario()
    bye_at = first_bye_of(events, b"a@x")
    spool = CdrCollector()
    first = Node(tmp_path, spool)
    await first.boot()
    first.run(events[:bye_at])
    first.pipeline = first.chain((DyingSink(spool, "a@x"), first.closes))
    with pytest.raises(Killed):
        first.run(events[bye_at : bye_at + 1])
    first.crash()

    def no_room(plan: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    second = Node(tmp_path, spool)
    monkeypatch.setattr(second.store, "_write_file", no_room)  # the start checkpoint fails
    assert [cdr.call_id for cdr in await second.boot()] == ["a@x"]
    second.crash()
    third = Node(tmp_path, spool)
    assert await third.boot() == []  # its close was journaled as the spool took it
    assert [cdr.call_id for cdr in spool.cdrs].count("a@x") == 1


async def test_a_restart_brings_a_clock_that_ran_ahead_back(tmp_path: Path) -> None:
    first = Node(tmp_path, CdrCollector())
    await first.boot()
    first.run([msg(365 * 86400.0, Call("ahead@x").request("INVITE"))])  # a year ahead
    first.crash()
    second = Node(tmp_path, CdrCollector())
    second.store._wall_clock = lambda: T0 + 10
    await second.boot()
    assert second.correlator.now == T0 + 10
    await second.store.stop()


# -- a full or failing disk ------------------------------------------------------------------


async def test_the_store_starts_on_a_full_disk_without_a_journal_and_takes_it_up_later(
    tmp_path: Path, full_disk: FullDisk
) -> None:
    now = [100.0]
    node = Node(tmp_path, CdrCollector())
    node.store = DialogStore(tmp_path, node.correlator, clock=lambda: now[0])
    node.closes = Closes(node.store)
    full_disk.full = True
    with structlog.testing.capture_logs() as logs:
        await node.boot()  # does not fail: capture goes on
    assert [e["log_level"] for e in logs if e["event"] == "dialog_journal_unavailable"] == ["error"]
    assert node.store.stats.journal_write_errors == 1
    assert not node.store.intact
    node.run([msg(0.0, Call("early@x").request("INVITE"))])  # not journaled, counted
    assert node.store.stats.journal_write_errors == 2
    full_disk.full = False
    now[0] += 10.0
    assert node.store.checkpoint_due()  # tried again though no message changed since
    assert node.store.checkpoint()
    assert node.store.intact
    node.run([msg(1.0, Call("late@x").request("INVITE"))])
    node.crash()
    second = Node(tmp_path, CdrCollector())
    await second.boot()
    assert second.correlator.is_open("early@x") and second.correlator.is_open("late@x")
    await second.store.stop()


async def test_a_start_fails_when_the_folder_itself_is_unusable(tmp_path: Path) -> None:
    node = Node(tmp_path / "missing", CdrCollector())
    node.store.recover()
    with pytest.raises(OSError):
        await node.store.start()


async def test_failed_checkpoints_are_spaced_out_and_the_journal_gauge_keeps_counting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    node = Node(tmp_path, CdrCollector())
    node.store = DialogStore(tmp_path, node.correlator, clock=lambda: now[0])
    node.closes = Closes(node.store)
    await node.boot()

    def no_room(plan: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(node.store, "_write_file", no_room)
    spacing = []
    for n in range(6):
        node.run([msg(float(n), Call(f"c{n}@x").request("INVITE"))])
        waited = 0.0
        while not node.store.checkpoint_due():
            now[0] += 1.0
            waited += 1.0
        spacing.append(waited)
        assert not node.store.checkpoint()
        journals = sum(path.stat().st_size for path in tmp_path.glob("*.journal"))
        assert node.store.journal_bytes == journals  # every journal a start would replay
    assert spacing == [10.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    node.crash()


async def test_the_background_task_survives_a_step_that_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = Node(tmp_path, CdrCollector())
    node.store = DialogStore(
        tmp_path, node.correlator, checkpoint_interval_s=0.01, fsync_interval_s=0.01
    )
    node.closes = Closes(node.store)
    await node.boot()
    failures = [RuntimeError("a bug")]
    unwritten_json = checkpoint_module._unwritten_json

    def failing_once(held: Sequence[Cdr]) -> bytes:
        """What the checkpoint takes of the held CDRs, whose next call raises."""
        if failures:
            raise failures.pop()
        return unwritten_json(held)

    monkeypatch.setattr(store_module, "_unwritten_json", failing_once)
    node.run([msg(0.0, Call("one@x").request("INVITE"))])
    written = node.store.stats.checkpoints
    for _ in range(200):
        await asyncio.sleep(0.01)
        if node.store.stats.checkpoints > written:
            break
    assert node.store.stats.internal_errors == 1
    assert node.store.stats.checkpoints > written  # and it went on
    await node.store.stop()


async def test_journals_are_replayed_in_pieces_not_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = Node(tmp_path, CdrCollector())
    await first.boot()
    first.run([e for e in scenario() if e[0] == "msg"][:10])
    first.crash()
    real = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        assert not path.name.endswith(".journal"), "a journal read whole"
        return real(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    second = Node(tmp_path, CdrCollector())
    second.store.recover()
    assert second.store.stats.replayed_records > 0


async def test_files_that_cannot_be_read_are_set_aside_counted_and_deleted_after_a_week(
    tmp_path: Path,
) -> None:
    first = Node(tmp_path, CdrCollector())
    await first.boot()
    first.run([msg(0.0, Call("one@x").request("INVITE"))])
    first.crash()
    (checkpoint,) = tmp_path.glob("dialogs.*.json")
    checkpoint.unlink()
    checkpoint.mkdir()  # read_bytes fails with EISDIR, as an I/O error would
    (journal,) = tmp_path.glob("dialogs.*.journal")
    assert journal.name == "dialogs.2.journal"
    (tmp_path / "dialogs.4.journal").mkdir()  # the newest generation: cannot be read
    (tmp_path / "dialogs.3.journal").write_bytes(b"")  # not the newest, emptied: damage
    old = tmp_path / "dialogs.0.json.unreadable"
    old.write_bytes(b"x")
    week_ago = time.time() - 8 * 86400
    os.utime(old, (week_ago, week_ago))
    second = Node(tmp_path, CdrCollector())
    with structlog.testing.capture_logs() as logs:
        await second.boot()  # no exception: capture starts
    stats = second.store.stats
    assert (stats.unreadable_checkpoints, stats.unreadable_journals) == (1, 1)
    assert stats.torn_tails == 1  # the emptied journal
    assert {e["event"] for e in logs if e["log_level"] == "error"} >= {
        "dialog_checkpoint_unreadable",
        "dialog_journal_unreadable",
    }
    assert second.correlator.is_open("one@x")  # from the journal after the checkpoint
    assert (tmp_path / (checkpoint.name + ".unreadable")).exists()  # kept for a look
    assert not old.exists()  # kept long enough: deleted by the start's checkpoint
    await second.store.stop()


async def test_a_checkpoint_with_a_changed_byte_is_not_restored(tmp_path: Path) -> None:
    first = Node(tmp_path, CdrCollector())
    await first.boot()
    first.run(
        [
            msg(0.0, Call("one@x").request("INVITE")),
            msg(2.0, Call("one@x").response(200, "OK"), True),
        ]
    )
    assert first.store.checkpoint()
    first.crash()
    (checkpoint,) = tmp_path.glob("dialogs.*.json")
    data = checkpoint.read_bytes()
    at = data.index(b"%d" % int(T0 + 2))
    checkpoint.write_bytes(data[:at] + b"%d" % int(T0 + 9) + data[at + 10 :])  # the answer
    second = Node(tmp_path, CdrCollector())
    second.store.recover()
    assert second.store.stats.unreadable_checkpoints == 1
    assert not second.correlator.is_open("one@x")


async def test_an_eviction_replays_as_it_happened_whatever_the_capture_times(
    tmp_path: Path,
) -> None:
    """Two HEP agents' clocks apart: the call that arrived first has the later INVITE
    time. Live, the call that arrived first is evicted; replay must evict that one too,
    not the one a restored timer queue would put first."""
    limits = DialogLimits(max_open_dialogs=2)
    first_in, second_in, third = Call("first@x"), Call("second@x"), Call("third@x")
    events = [
        msg(5.0, first_in.request("INVITE")),
        msg(1.0, second_in.request("INVITE")),
        ("checkpoint",),
        msg(6.0, third.request("INVITE")),
    ]
    expected = by_id(reference([e for e in events if e[0] != "checkpoint"], limits))
    assert [cdr["call_id"] for cdr in expected.values()] == ["first@x"]
    spool = CdrCollector()
    node = Node(tmp_path, spool, limits)
    await node.boot()
    node.run(events)
    node.crash()
    second = Node(tmp_path, CdrCollector(), limits)
    assert await second.boot() == []
    assert by_id(spool.cdrs) == expected
    assert second.correlator.is_open("second@x") and second.correlator.is_open("third@x")


async def test_a_cdr_the_spool_writes_after_the_stop_is_not_a_journal_error(
    tmp_path: Path,
) -> None:
    """Closing the spool writes what it still held when the stop's checkpoint could not
    keep it; the journal is closed by then, and the next start may write it again."""
    node = Node(tmp_path, CdrCollector())
    await node.boot()
    node.run([*answered(Call("late@x"), 0.0), bye(Call("late@x"), 10.0)])
    (cdr,) = node.spool.cdrs
    await node.store.stop()
    node.store.closed(cdr)
    assert node.store.stats.journal_write_errors == 0


# -- the journal written once per event loop turn -------------------------------------


class CountedWrites:
    """os for the store, counting the writes to its journal."""

    def __init__(self) -> None:
        self.writes = 0
        self.fail = False

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: Any) -> int:
        self._count()
        return _WRITE(fd, data)

    def writev(self, fd: int, buffers: Sequence[bytes]) -> int:
        self._count()
        return _WRITEV(fd, buffers)

    def _count(self) -> None:
        self.writes += 1
        if self.fail:
            raise OSError(errno.EIO, "Input/output error")


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> CountedWrites:
    writes = CountedWrites()
    journal_os(monkeypatch, writes)
    return writes


def journal_size(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.journal"))


def turns(events: Sequence[Event], size: int) -> list[list[Event]]:
    return [list(events[at : at + size]) for at in range(0, len(events), size)]


@pytest.mark.parametrize("turn", [1, 3, 50])
async def test_batched_records_go_out_once_a_turn_in_order_and_rebuild_the_same_calls(
    tmp_path: Path, counted: CountedWrites, turn: int
) -> None:
    """The messages of one event loop turn are journaled in one write at its end, none
    lost or reordered (the journal holds the very bytes of one write per record), and a
    crash after the turn rebuilds what a correlator that never crashed holds."""
    events = scenario()
    each_dir, batched_dir = tmp_path / "each", tmp_path / "batched"
    each_dir.mkdir()
    batched_dir.mkdir()
    each = Node(each_dir, CdrCollector())
    await each.boot()
    each.run(events)
    each.crash()

    first = Node(batched_dir, CdrCollector())
    first.store.batch_writes = True
    await first.boot()
    writes_at_start = counted.writes
    batches = turns(events, turn)
    for batch in batches:
        size, writes, cdrs = journal_size(batched_dir), counted.writes, len(first.spool.cdrs)
        first.run([event for event in batch if event[0] != "expire"])
        if len(first.spool.cdrs) == cdrs:
            assert journal_size(batched_dir) == size  # held until the turn ends
            assert counted.writes == writes
        else:  # before each CDR, and its close record right after it
            assert counted.writes - writes <= 2 * (len(first.spool.cdrs) - cdrs)
        for event in batch:
            if event[0] == "expire":
                first.run([event])  # a timer run: a turn of its own
                await asyncio.sleep(0)
        await asyncio.sleep(0)  # the end of the turn: no timer, no wait for more
    assert first.store.stats == each.store.stats
    assert first.store.stats.journal_write_errors == 0
    (each_journal,) = each_dir.glob("*.journal")
    (batched_journal,) = batched_dir.glob("*.journal")
    assert batched_journal.read_bytes() == each_journal.read_bytes()
    # + the timer turns, + a close record's own write for each CDR
    assert counted.writes - writes_at_start <= len(batches) + 3 + len(first.spool.cdrs)
    now = max(e[1] for e in events if len(e) > 1)
    at_crash = state_of(first.correlator, now)
    first.crash()
    second = Node(batched_dir, CdrCollector())
    assert await second.boot() == []  # every close was journaled
    assert state_of(second.correlator, now) == at_crash


async def test_a_crash_within_a_turn_loses_only_what_that_turn_took_in(
    tmp_path: Path, small_disk: SmallDisk
) -> None:
    """Killed before the turn ends: the messages taken since the last write are lost
    like datagrams still in the socket buffer, and nothing else. A CDR never reaches
    the spool before the records of the messages that closed it, so the call it
    closed is rebuilt closed, and its close record follows it at once."""
    disk = small_disk(tmp_path / "spooldisk", 1024 * 1024)
    state = tmp_path / "state"
    state.mkdir()
    done, open_call = Call("done@x", from_tag="d"), Call("open@x", from_tag="o")
    later = Call("later@x", from_tag="l")
    first = SpoolNode(state, disk / "spool", batched=True)
    await first.boot()
    first.run([*answered(open_call, 0.0), *answered(done, 1.0)])
    await asyncio.sleep(0)
    # One turn: a CDR closes (its BYE is written before the CDR reaches the spool),
    # then a new call begins, and the process is killed before the turn ends.
    first.run([bye(done, 30.0), msg(31.0, later.request("INVITE"))])
    (written,) = first.cdr_ids()
    first.crash()

    second = SpoolNode(state, disk / "spool", batched=True)
    again = await second.boot()
    # Its close record went out with it: the start does not write it again (a CDR
    # written again would go through the stages anew, without the call's fraud flags).
    assert again == []
    assert second.cdr_ids() == [written]
    assert second.correlator.is_open("open@x")
    assert not second.correlator.is_open("done@x")
    assert not second.correlator.is_open("later@x")  # taken in, never journaled
    second.crash()


async def test_a_turn_larger_than_the_bound_is_written_as_it_goes(
    tmp_path: Path, counted: CountedWrites
) -> None:
    node = Node(tmp_path, CdrCollector())
    node.store.batch_writes = True
    await node.boot()
    calls = [Call(f"many-{n}@x", from_tag=f"m{n}") for n in range(1100)]
    writes = counted.writes
    node.run([msg(n / 1000, call.request("INVITE")) for n, call in enumerate(calls)])
    # Bounded memory: written every BATCH_MAX_RECORDS, the rest at the end of the turn.
    assert counted.writes - writes == 1100 // appender_module.BATCH_MAX_RECORDS
    await asyncio.sleep(0)
    assert counted.writes - writes == 1100 // appender_module.BATCH_MAX_RECORDS + 1
    assert node.store.stats.journal_messages == 1100
    node.crash()
    second = Node(tmp_path, CdrCollector())
    await second.boot()
    assert second.correlator.open_dialogs == 1100


async def test_a_failed_batch_counts_every_record_it_held(
    tmp_path: Path, counted: CountedWrites
) -> None:
    node = Node(tmp_path, CdrCollector())
    node.store.batch_writes = True
    await node.boot()
    counted.fail = True
    node.run([msg(0.0, Call(f"lost-{n}@x").request("INVITE")) for n in range(3)])
    await asyncio.sleep(0)
    stats = node.store.stats
    assert (stats.journal_write_errors, stats.journal_messages) == (3, 0)
    assert not node.store.intact
    counted.fail = False
    node.run([msg(1.0, Call("kept@x").request("INVITE"))])
    await asyncio.sleep(0)
    assert (stats.journal_write_errors, stats.journal_messages) == (3, 1)
    node.crash()


async def test_batched_records_are_in_the_journal_a_checkpoint_ends_and_at_the_stop(
    tmp_path: Path,
) -> None:
    node = Node(tmp_path, CdrCollector())
    node.store.batch_writes = True
    await node.boot()
    node.run([msg(0.0, Call("before@x").request("INVITE"))])
    assert node.store.checkpoint()  # within the turn: the record joins the old journal
    node.run([msg(1.0, Call("after@x").request("INVITE"))])
    node.store.flush()  # the fsync writes what waits first
    assert node.store.stats.journal_messages == 2
    node.run([msg(2.0, Call("last@x").request("INVITE"))])
    assert await node.store.stop()
    second = Node(tmp_path, CdrCollector())
    await second.boot()
    assert all(second.correlator.is_open(c) for c in ("before@x", "after@x", "last@x"))
    second.crash()


def test_without_an_event_loop_each_record_is_written_at_once(tmp_path: Path) -> None:
    correlator = Correlator()
    store = DialogStore(tmp_path, correlator, batch_writes=True)
    store.recover()
    store._fd = os.open(tmp_path / "j", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    store._size = 0
    try:
        store.message(packet(T0, Call("sync@x").request("INVITE")))
        assert os.stat(tmp_path / "j").st_size > 0
        assert store.stats.journal_messages == 1
    finally:
        os.close(store._fd)


def test_the_barrier_goes_first_among_the_cdr_sinks_and_keeps_the_rest(tmp_path: Path) -> None:
    store = DialogStore(tmp_path, Correlator(), batch_writes=True)
    spool = CdrCollector()
    alerts: Any = object()
    placed = store.ahead(Destinations([spool], None, alerts))
    assert list(placed.cdrs) == [store.barrier, spool]
    assert placed.alerts is alerts


class ShortWrites:
    """os for the store whose journal `writev` puts only the first `room` bytes on disk
    (the disk fills up, or a signal cuts the write short), then refuses the rest with
    `error` (None: takes it whole)."""

    def __init__(self, room: int, error: int | None) -> None:
        self.room = room
        self.error = error
        self.cut = False

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def writev(self, fd: int, buffers: Sequence[bytes]) -> int:
        if self.cut and self.error is not None:
            raise OSError(self.error, os.strerror(self.error))
        if self.cut:
            return _WRITEV(fd, buffers)
        self.cut = True
        return _WRITE(fd, b"".join(buffers)[: self.room])


def record_sizes(directory: Path) -> list[int]:
    """The framed size of each record in the one journal of `directory`."""
    (journal,) = directory.glob("*.journal")
    data = journal.read_bytes()[len(MAGIC) :]
    sizes, at = [], 0
    while at < len(data):
        _, length = struct.unpack_from("<II", data, at)
        sizes.append(8 + length)
        at += 8 + length
    return sizes


@pytest.mark.parametrize("error", [errno.ENOSPC, None])
async def test_a_short_batch_write_keeps_the_whole_records_it_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int | None
) -> None:
    """A `writev` of a turn's records that stops part-way keeps every record it put on
    disk whole: the rest is written on (a signal cut it short) or, when the disk is
    full, only the records that did not fit are lost and counted; a short write alone
    is no reason to give up the spare."""
    measure = tmp_path / "measure"
    measure.mkdir()
    calls = [Call(f"short-{n}@x", from_tag=f"s{n}") for n in range(5)]
    invites = [msg(float(n), call.request("INVITE")) for n, call in enumerate(calls)]
    sizing = Node(measure, CdrCollector())
    await sizing.boot()
    sizing.run(invites)
    sizes = record_sizes(measure)
    sizing.crash()
    assert len(sizes) == 5

    state = tmp_path / "state"
    state.mkdir()
    node = Node(state, CdrCollector())
    node.store.batch_writes = True
    asked: list[bool] = []

    def no_room() -> bool:
        asked.append(True)
        return False

    node.store.on_no_space = no_room
    await node.boot()
    journal_os(monkeypatch, ShortWrites(sum(sizes[:3]) + 5, error))
    node.run(invites)
    await asyncio.sleep(0)
    stats = node.store.stats
    kept = 3 if error is not None else 5
    assert (stats.journal_messages, stats.journal_write_errors) == (kept, 5 - kept)
    assert asked == ([True] if error is not None else [])
    assert record_sizes(state) == sizes[:kept]
    node.crash()
    monkeypatch.undo()
    second = Node(state, CdrCollector())
    await second.boot()
    assert [second.correlator.is_open(c.call_id) for c in calls] == [True] * kept + [False] * (
        5 - kept
    )
    assert second.store.stats.torn_tails == 0
    second.crash()


def open_calls(correlator: Correlator) -> set[str]:
    snap = orjson.loads(correlator.snapshot())
    key = snap["fields"].index("call_id")
    return {row[key] for row in snap["dialogs"]}


@pytest.mark.parametrize("seed", range(12))
async def test_a_kill_anywhere_in_a_turn_rebuilds_a_prefix_and_every_spooled_close(
    tmp_path: Path, seed: int
) -> None:
    """Killed at a random message of a random turn (checkpoints at random too): the
    start rebuilds the calls of a prefix of the traffic that ends no earlier than the
    last turn written whole, nor than the last message that sent a CDR to the spool; a
    CDR in the spool is never billed again under another cdr_id."""
    rng = random.Random(seed)
    events = scenario()
    cut = rng.randrange(1, len(events) + 1)
    state, spool_dir = tmp_path / "state", tmp_path / "spool"
    state.mkdir()
    first = SpoolNode(state, spool_dir, batched=True)
    await first.boot()
    turn_end = 0  # events taken in by the last turn that ended
    spooled_by = 0  # events up to the last one that sent a CDR to the spool
    at = 0
    while at < cut:
        size = rng.randint(1, 6)
        for event in events[at : min(at + size, cut)]:
            before = len(first.cdr_ids())
            first.run([event])
            at += 1
            if len(first.cdr_ids()) > before:
                spooled_by = at
            if rng.random() < 0.1:
                first.store.checkpoint()
                turn_end = at  # a checkpoint writes what the turn held
        if at < cut:
            await asyncio.sleep(0)
            turn_end = at
    spooled = {
        orjson.loads(r.value)["call_id"]: orjson.loads(r.value)["cdr_id"]
        for r in first.spool.reader("s").read(1000, 1 << 30)
    }
    first.crash()

    second = SpoolNode(state, spool_dir, batched=True)
    again = await second.boot()
    rebuilt = open_calls(second.correlator)
    prefixes = []
    for length in range(len(events) + 1):
        oracle = Node(tmp_path / f"o{length}", CdrCollector())
        oracle.pipeline = Pipeline(oracle.correlator, [oracle.spool])
        oracle.run([e for e in events[:length] if e[0] != "checkpoint"])
        if open_calls(oracle.correlator) == rebuilt:
            prefixes.append(length)
    assert any(max(turn_end, spooled_by) <= length <= cut for length in prefixes), (
        cut,
        turn_end,
        spooled_by,
        prefixes,
        rebuilt,
    )
    for cdr in again:
        assert spooled.get(cdr.call_id, cdr.cdr_id) == cdr.cdr_id
    for call_id in spooled:
        assert call_id not in rebuilt
    second.crash()


class Journaling(asyncio.DatagramProtocol):
    """Each datagram through the daemon's chain into the store, as the listener does."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.received = 0

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.received += 1
        self.node.pipeline.process(packet(T0 + self.received / 1000, data))


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("busy", [False, True])
def test_each_wake_up_of_a_udp_socket_is_journaled_before_the_next(
    tmp_path: Path, counted: CountedWrites, loop_kind: str, busy: bool
) -> None:
    """On the daemon's loop (uvloop) and the default one, a burst of datagrams is
    journaled in fewer writes than datagrams (uvloop reads several a wake-up), and all
    of it is on disk as soon as the loop has gone round, even when another task keeps
    the loop from ever waiting."""

    async def body() -> tuple[int, int, list[int]]:
        node = Node(tmp_path, CdrCollector())
        node.store.batch_writes = True
        await node.boot()
        loop = asyncio.get_running_loop()
        protocol = Journaling(node)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: protocol, local_addr=("127.0.0.1", 0)
        )
        target = transport.get_extra_info("sockname")
        spinning = True

        async def spin() -> None:
            while spinning:
                await asyncio.sleep(0)

        spinner = asyncio.create_task(spin()) if busy else None
        behind: list[int] = []
        writes = counted.writes
        sent = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for burst in range(10):
                for n in range(20):
                    call = Call(f"burst-{burst}-{n}@x", from_tag=f"b{burst}-{n}")
                    udp.sendto(call.request("INVITE"), target)
                    sent += 1
                deadline = time.monotonic() + 5
                while protocol.received < sent and time.monotonic() < deadline:
                    await asyncio.sleep(0.001)
                await asyncio.sleep(0)  # the turn that read the last datagram has ended
                behind.append(sent - node.store.stats.journal_messages)
        spinning = False
        if spinner is not None:
            await spinner
        transport.close()
        taken = protocol.received
        node.crash()
        return taken, counted.writes - writes, behind

    runner = uvloop.run if loop_kind == "uvloop" else asyncio.run
    taken, writes, behind = runner(body())
    assert taken == 200
    assert behind == [0] * 10
    second = Node(tmp_path, CdrCollector())
    second.store.recover()
    assert second.correlator.open_dialogs == 200
    if loop_kind == "uvloop":
        assert writes <= 20  # a write a wake-up, each taking most of a burst
    else:
        assert writes <= 200  # the default loop reads one datagram a wake-up
