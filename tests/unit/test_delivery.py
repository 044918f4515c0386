"""Delivery loops with in-memory sinks: confirm-then-advance, retry after failure,
independent sinks, drain on stop, bounded memory under a stalled sink."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import orjson
import pytest
from sipcalls import Call, CdrCollector, packet
from sipcdr.clock import FakeClock, settle
from sipcdr.config import (
    Config,
    JsonlConfig,
    PostgresConfig,
    SinksConfig,
    SpoolConfig,
    output_settings,
)
from sipcdr.delivery import MIN_BACKOFF_S, PROBE_INTERVAL_S, SLOW_BATCH_S, Delivery
from sipcdr.delivery import loop as delivery_module
from sipcdr.dialog import Correlator
from sipcdr.intake import IntakeGate
from sipcdr.pipeline import Pipeline
from sipcdr.sinks.base import KIND_ALERT, KIND_CDR, STREAM_RECORDS, RecordsRejected, SpoolRecord
from sipcdr.sinks.jsonl import JsonlSink
from sipcdr.sinks.outputs import Outputs
from sipcdr.spool import Spool
from sipcdr.telemetry.metrics import Metrics, Sources
from smalldisk import SmallDisk, fill
from structlog.testing import capture_logs


class MemorySink:
    streams: tuple[str, ...] = (STREAM_RECORDS,)

    def __init__(self, name: str) -> None:
        self.name = name
        self.got: list[bytes] = []
        self.failing = False
        self.gone = False  # not even a probe is answered
        self.calls = 0
        self.probes = 0
        self.largest_batch = 0
        self.gate: asyncio.Event | None = None
        self.probe_gate: asyncio.Event | None = None  # a probe waits for it
        self.probe_ends_in = 0.0  # a cancelled probe takes this long to end
        self.stopped = False

    async def start(self) -> None:
        self.stopped = False

    async def prepare(self) -> None:
        if self.failing:
            raise ConnectionError("server down")

    async def probe(self) -> None:
        self.probes += 1
        if self.probe_gate is not None:
            try:
                await self.probe_gate.wait()
            except asyncio.CancelledError:
                await asyncio.sleep(self.probe_ends_in)  # closing its connection
                raise
        if self.gone:
            raise ConnectionError("no route to host")

    async def deliver(self, stream: str, records: Sequence[SpoolRecord]) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            raise ConnectionError("server down")
        self.largest_batch = max(self.largest_batch, len(records))
        self.got.extend(record.value for record in records)

    async def stop(self) -> None:
        self.stopped = True


def _append(spool: Spool, count: int, start: int = 0) -> list[bytes]:
    values = [b'{"n":%d}' % n for n in range(start, start + count)]
    for value in values:
        assert spool.append(KIND_CDR, b"k", value)
    return values


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def _probed(sink: MemorySink, times: int) -> None:
    await _until(lambda: sink.probes == times)


async def test_each_sink_gets_every_record_in_order(tmp_path: Path) -> None:
    a, b = MemorySink("a"), MemorySink("b")
    with Spool(tmp_path, ("a", "b")) as spool:
        delivery = Delivery({STREAM_RECORDS: spool}, [a, b], batch_records=7)
        await delivery.start()
        values = _append(spool, 50)
        await _until(lambda: len(a.got) == 50 and len(b.got) == 50)
        await delivery.stop()
    assert a.got == values
    assert b.got == values
    assert a.largest_batch <= 7
    assert a.stopped


async def test_a_failing_sink_retries_the_same_batch_and_does_not_hold_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery_module, "MIN_BACKOFF_S", 0.01)
    down, healthy = MemorySink("down"), MemorySink("healthy")
    down.failing = True
    with Spool(tmp_path, ("down", "healthy")) as spool:
        delivery = Delivery({STREAM_RECORDS: spool}, [down, healthy])
        await delivery.start()
        values = _append(spool, 20)
        await _until(lambda: len(healthy.got) == 20 and down.calls >= 3)
        (state, reader), _ = delivery.readers()
        assert state.sink == "down"
        assert not state.up
        assert state.failures >= 3
        assert reader.lag_records == 20
        down.failing = False
        await _until(lambda: len(down.got) == 20, timeout=10)
        # The loop marks the sink up once the sink's call has returned to it.
        await _until(lambda: state.up)
        assert reader.lag_records == 0
        await delivery.stop()
    assert down.got == values  # nothing lost, nothing twice (the failures wrote nothing)


async def test_records_wait_on_disk_and_resume_after_a_restart(tmp_path: Path) -> None:
    sink = MemorySink("s")
    sink.failing = True
    with Spool(tmp_path, ("s",)) as spool:
        delivery = Delivery({STREAM_RECORDS: spool}, [sink])
        await delivery.start()
        values = _append(spool, 10)
        await delivery.stop(drain_timeout_s=0.2)
    again = MemorySink("s")
    with Spool(tmp_path, ("s",)) as spool:
        delivery = Delivery({STREAM_RECORDS: spool}, [again])
        await delivery.start()
        more = _append(spool, 3, start=10)
        await _until(lambda: len(again.got) == 13)
        await delivery.stop()
    assert again.got == values + more


async def test_stop_drains_what_the_sink_can_take(tmp_path: Path) -> None:
    sink = MemorySink("s")
    sink.gate = asyncio.Event()
    with Spool(tmp_path, ("s",)) as spool:
        delivery = Delivery({STREAM_RECORDS: spool}, [sink], batch_records=10)
        await delivery.start()
        _append(spool, 100)
        asyncio.get_running_loop().call_later(0.2, sink.gate.set)
        await delivery.stop(drain_timeout_s=5)
    assert len(sink.got) == 100


async def test_a_stalled_sink_holds_at_most_one_batch_in_memory(tmp_path: Path) -> None:
    """The spool grows on disk; what the loop holds is one batch, whatever the backlog."""
    sink = MemorySink("s")
    sink.gate = asyncio.Event()
    with Spool(tmp_path, ("s",), segment_bytes=64 * 1024) as spool:
        delivery = Delivery({STREAM_RECORDS: spool}, [sink], batch_records=100)
        await delivery.start()
        _append(spool, 20_000)
        await asyncio.sleep(0.1)
        assert spool.segments > 3  # the backlog is on disk
        sink.gate.set()
        await _until(lambda: len(sink.got) == 20_000, timeout=20)
        assert sink.largest_batch <= 100
        await delivery.stop()
        assert spool.segments == 1


async def _jsonl_outputs(tmp_path: Path) -> Outputs:
    """Outputs to a JSONL file alone, opened."""
    config = Config(
        sinks=SinksConfig(
            jsonl=JsonlConfig(path=str(tmp_path / "cdrs.jsonl")),
            postgres=PostgresConfig(dsn=""),
        )
    )
    outputs = Outputs(output_settings(config), spool_dir=tmp_path / "spool")
    await outputs.open()
    return outputs


async def test_outputs_export_lag_and_failures(tmp_path: Path) -> None:
    outputs = await _jsonl_outputs(tmp_path)
    assert outputs.cdr_writer is not None
    assert outputs.signaling is None  # nothing keeps signaling without PostgreSQL
    outputs.cdr_writer.spool.append(KIND_CDR, b"k", orjson.dumps({"cdr_id": "x"}))
    await _until((tmp_path / "cdrs.jsonl").exists)
    metrics = Metrics(lambda: Sources(outputs=outputs))
    await outputs.close()  # read after the close: the final numbers
    text = (tmp_path / "cdrs.jsonl").read_bytes()
    assert orjson.loads(text) == {"cdr_id": "x"}
    value = metrics.registry.get_sample_value
    assert value("sipcdr_sink_records_total", {"sink": "jsonl", "stream": "records"}) == 1
    assert value("sipcdr_sink_lag_records", {"sink": "jsonl", "stream": "records"}) == 0
    assert value("sipcdr_spool_records_total", {"stream": "records", "kind": "cdr"}) == 1


async def test_an_fsync_failing_at_rotation_is_logged_once_with_its_total(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing a segment at rotation fsyncs it; a failure there raises nowhere (the new
    segment is in use), so the tick's loss report must say it."""
    outputs = await _jsonl_outputs(tmp_path)
    assert outputs.cdr_writer is not None
    spool = outputs.cdr_writer.spool
    spool.append(KIND_CDR, b"k", orjson.dumps({"cdr_id": "x"}))
    real_fsync = os.fsync
    failures = [OSError(errno.EIO, os.strerror(errno.EIO))]

    def fsync(fd: int) -> None:
        if failures:
            raise failures.pop()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    spool._start_segment()  # as a full segment's append does
    monkeypatch.undo()
    assert not failures and spool.stats.sync_failures == 1
    with capture_logs() as logs:
        outputs.log_losses()
        outputs.log_losses()  # once, not at every tick
    reported = [e for e in logs if e["event"] == "spool_sync_failures"]
    assert reported == [
        {"event": "spool_sync_failures", "stream": "records", "total": 1, "log_level": "error"}
    ]
    await outputs.close()


class PickySink(MemorySink):
    """Refuses any batch holding a value with "bad" in it, like a database refusing a
    value out of range."""

    async def deliver(self, stream: str, records: Sequence[SpoolRecord]) -> None:
        self.calls += 1
        if any(b"bad" in record.value for record in records):
            raise RecordsRejected("value out of range")
        self.got.extend(record.value for record in records)


async def test_a_refused_record_is_set_aside_and_the_rest_delivered_once(tmp_path: Path) -> None:
    sink = PickySink("picky")
    with Spool(tmp_path, ("picky",)) as spool:
        delivery = Delivery({STREAM_RECORDS: spool}, [sink], batch_records=16)
        await delivery.start()
        values = _append(spool, 40)
        spool.append(KIND_CDR, b"k", b'{"bad":1}')
        values += _append(spool, 40, start=40)
        spool.append(KIND_CDR, b"k", b'{"bad":2}')
        await _until(delivery.caught_up)
        ((state, _reader),) = delivery.readers()
        await delivery.stop()
    assert sink.got == values
    assert state.rejected == 2
    assert state.up  # refused content is not an outage
    kept = [
        orjson.loads(line)
        for line in (tmp_path / "rejected" / "picky.jsonl").read_bytes().splitlines()
    ]
    assert [item["value"] for item in kept] == ['{"bad":1}', '{"bad":2}']
    assert kept[0]["reason"] == "value out of range"


async def test_jsonl_writes_cdr_lines_only_and_rotates_by_size(tmp_path: Path) -> None:
    path = tmp_path / "cdrs.jsonl"
    sink = JsonlSink(path, rotate_bytes=4096)
    await sink.start()
    records = [
        SpoolRecord(
            n, KIND_CDR if n % 10 else KIND_ALERT, b"k", b'{"n":%d,"pad":"%s"}' % (n, b"x" * 80)
        )
        for n in range(1, 201)
    ]
    for start in range(0, 200, 25):
        await sink.deliver(STREAM_RECORDS, records[start : start + 25])
    await sink.stop()
    await sink.stop()  # idempotent
    files = sorted(tmp_path.glob("cdrs.jsonl*"))
    assert len(files) > 2  # rotated
    assert all(f.stat().st_size < 4096 + 25 * 120 for f in files)
    lines = [line for f in files for line in f.read_bytes().splitlines()]
    assert sorted(orjson.loads(line)["n"] for line in lines) == [n for n in range(1, 201) if n % 10]


async def test_a_commit_that_raises_delivers_again_and_the_loop_lives_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery_module, "MIN_BACKOFF_S", 0.01)
    sink = MemorySink("s")
    with Spool(tmp_path, ("s",)) as spool:
        reader = spool.reader("s")
        real_commit = reader.commit
        failures = iter([True])

        def failing_commit() -> None:
            if next(failures, False):
                raise OSError(errno.EIO, "Input/output error")
            real_commit()

        monkeypatch.setattr(reader, "commit", failing_commit)
        delivery = Delivery({STREAM_RECORDS: spool}, [sink])
        await delivery.start()
        values = _append(spool, 5)
        await _until(lambda: reader.lag_records == 0)
        more = _append(spool, 5, start=5)
        await _until(lambda: len(sink.got) == 15)
        await delivery.stop()
    assert sink.got == values + values + more  # the first batch twice, nothing lost


async def test_a_cursor_that_cannot_be_saved_neither_stops_nor_repeats_delivery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that refuses even the in-place cursor write: every record reaches the
    sink once, delivered segments are deleted, and the cursor is saved once it can be."""
    monkeypatch.setattr(delivery_module, "MIN_BACKOFF_S", 0.01)
    sink = MemorySink("s")
    with Spool(tmp_path, ("s",), segment_bytes=4096) as spool:
        reader = spool.reader("s")

        def failing_disk(fd: int, data: bytes, offset: int) -> int:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "pwrite", failing_disk)
        delivery = Delivery({STREAM_RECORDS: spool}, [sink], batch_records=50)
        await delivery.start()
        values = _append(spool, 300)
        await _until(lambda: reader.lag_records == 0)
        values += _append(spool, 300, start=300)
        await _until(lambda: reader.lag_records == 0)
        assert sink.got == values  # each once, in order
        assert reader.cursor_write_failures >= 12
        assert spool.segments <= 2
        monkeypatch.undo()
        await _until(lambda: not reader.cursor_unsaved)  # the spool's sync saves it
        await delivery.stop()
    with Spool(tmp_path, ("s",)) as spool:
        assert spool.reader("s").read(10, 1 << 20) == []


async def test_jsonl_on_a_full_disk_cuts_the_torn_batch_back_and_catches_up(
    tmp_path: Path, small_disk: SmallDisk
) -> None:
    disk = small_disk(tmp_path / "disk", 256 * 1024)
    filler = fill(disk, leave_bytes=8 * 1024)
    path = disk / "cdrs.jsonl"
    sink = JsonlSink(path)
    await sink.start()
    records = [
        SpoolRecord(n, KIND_CDR, b"k", b'{"n":%d,"pad":"%s"}' % (n, b"x" * 200))
        for n in range(1, 101)
    ]
    await sink.deliver(STREAM_RECORDS, records[:20])  # 4.5 KB: fits
    with pytest.raises(OSError) as failed:
        await sink.deliver(STREAM_RECORDS, records[20:60])  # 9 KB: written in part
    assert failed.value.errno == errno.ENOSPC
    text = path.read_bytes()
    assert text.endswith(b"\n")
    assert [orjson.loads(line)["n"] for line in text.splitlines()] == list(range(1, 21))
    filler.unlink()
    await sink.deliver(STREAM_RECORDS, records[20:])  # the failed batch, retried, and more
    await sink.stop()
    lines = path.read_bytes().splitlines()
    assert [orjson.loads(line)["n"] for line in lines] == list(range(1, 101))


async def test_a_rotation_that_fails_after_its_batch_is_on_disk_writes_nothing_twice(
    tmp_path: Path, small_disk: SmallDisk
) -> None:
    """A real disk out of inodes: the file is renamed, but no new one can be created.
    The batch before the rotation is kept and not failed (the spool would deliver it
    again); the next one fails until an inode is free, then everything is there once."""
    disk = small_disk(tmp_path / "disk", 1024 * 1024, inodes=3)  # root, file, spare
    spare = disk / "spare"
    spare.write_bytes(b"")  # holds the last inode
    path = disk / "cdrs.jsonl"
    sink = JsonlSink(path, rotate_bytes=1000)
    await sink.start()
    records = [
        SpoolRecord(n, KIND_CDR, b"k", b'{"n":%d,"pad":"%s"}' % (n, b"x" * 90))
        for n in range(1, 21)
    ]
    await sink.deliver(STREAM_RECORDS, records[:10])  # past rotate_bytes: rotated, no new file
    assert sink.rotation_failures == 1
    with pytest.raises(OSError):
        await sink.deliver(STREAM_RECORDS, records[10:20])  # no file to write to
    spare.unlink()
    await sink.deliver(STREAM_RECORDS, records[10:20])  # the failed batch, retried
    assert sink.rotation_failures == 2  # renamed again, and again no inode for a new one
    await sink.stop()
    lines = [
        line for file in sorted(disk.glob("cdrs.jsonl*")) for line in file.read_bytes().splitlines()
    ]
    assert sorted(orjson.loads(line)["n"] for line in lines) == list(range(1, 21))


async def test_jsonl_cuts_off_a_torn_line_it_finds_at_start(tmp_path: Path) -> None:
    path = tmp_path / "cdrs.jsonl"
    path.write_bytes(b'{"n":1}\n{"n":2}\n{"n":3,"pa')  # a crash in the middle of a write
    sink = JsonlSink(path)
    await sink.start()
    records = [SpoolRecord(n, KIND_CDR, b"k", b'{"n":%d}' % n) for n in (3, 4)]
    await sink.deliver(STREAM_RECORDS, records)
    await sink.stop()
    assert [orjson.loads(line)["n"] for line in path.read_bytes().splitlines()] == [1, 2, 3, 4]


async def test_outputs_hold_refused_cdrs_block_intake_and_export_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = Config(
        sinks=SinksConfig(
            jsonl=JsonlConfig(path=str(tmp_path / "cdrs.jsonl")),
            postgres=PostgresConfig(dsn=""),
        ),
        spool=SpoolConfig(cdr_reserve_records=3),
    )
    outputs = Outputs(output_settings(config), spool_dir=tmp_path / "spool")
    await outputs.open()
    assert outputs.cdr_writer is not None
    spool = outputs.cdr_writer.spool
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    for n in range(5):
        spool.append(KIND_CDR, b"k", orjson.dumps({"cdr_id": str(n)}))
    metrics = Metrics(lambda: Sources(outputs=outputs))
    value = metrics.registry.get_sample_value
    assert outputs.intake_block_reason == "write_error"
    assert outputs.must_wait
    assert value("sipcdr_spool_reserve_records", {"stream": "records"}) == 3
    assert value("sipcdr_spool_dropped_total", {"stream": "records", "reason": "write_error"}) == 2
    monkeypatch.setattr(os, "write", real_write)
    outputs.flush()  # the tick: the disk takes the reserve again
    assert outputs.intake_block_reason is None
    await _until((tmp_path / "cdrs.jsonl").exists)
    await outputs.close()
    assert value("sipcdr_spool_reserve_records", {"stream": "records"}) == 0
    lines = (tmp_path / "cdrs.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["cdr_id"] for line in lines] == ["0", "1", "2"]


@pytest.mark.parametrize("reason", ["spool_full", "write_error"])
def test_a_paused_intake_refuses_new_calls_but_ends_open_ones(reason: str) -> None:
    collector = CdrCollector()
    pipeline = Pipeline(Correlator(), [collector])
    open_call, new_call = Call("open@x"), Call("new@x")
    for n, data in enumerate(
        [
            open_call.request("INVITE"),
            open_call.response(200, "OK"),
            open_call.request("ACK", branch="z9hG4bK-ack", to_tag="callee-tag"),
        ]
    ):
        pipeline.process(packet(100.0 + n, data))
    pipeline.intake.paused = True  # the CDR spool is full, or its disk fails, under "block"
    pipeline.intake.reason = reason
    pipeline.process(packet(110.0, new_call.request("INVITE")))
    pipeline.process(packet(130.0, open_call.request("BYE", 2, "z9hG4bK-bye", to_tag="callee-tag")))
    assert pipeline.stats.calls_refused == {reason: 1}
    assert [cdr.call_id for cdr in collector.cdrs] == ["open@x"]
    assert collector.cdrs[0].end_reason == "bye"
    assert collector.cdrs[0].billsec == 29.0
    assert not pipeline.correlator.is_open("new@x")


def _outage_events(logs: Sequence[Mapping[str, object]]) -> list[object]:
    return [
        entry["event"] for entry in logs if entry["event"] in ("sink_unavailable", "sink_recovered")
    ]


async def test_a_slow_batch_to_a_destination_that_answers_keeps_the_loop_up(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    sink = MemorySink("slow")
    sink.gate = asyncio.Event()
    with Spool(tmp_path, ("slow",)) as spool, capture_logs() as logs:
        delivery = Delivery({STREAM_RECORDS: spool}, [sink], clock=clock)
        await delivery.start()
        _append(spool, 3)
        await _until(lambda: sink.calls == 1)
        clock.advance(SLOW_BATCH_S - 0.01)
        await settle()
        assert sink.probes == 0  # a batch confirmed within SLOW_BATCH_S asks nothing
        for asked in range(1, 6):  # asked again every SLOW_BATCH_S, answered each time
            clock.advance(SLOW_BATCH_S)
            await _probed(sink, asked)
        ((state, _reader),) = delivery.readers()
        assert state.up
        sink.gate.set()
        await _until(lambda: len(sink.got) == 3)
        await delivery.stop()
    assert _outage_events(logs) == []


async def test_a_batch_out_for_less_than_the_slow_batch_time_makes_no_watcher_task(
    tmp_path: Path,
) -> None:
    """Nearly every batch is confirmed in milliseconds: a timer, not a task, waits for
    the slow ones, and the task that probes is made only when the time has come."""
    clock = FakeClock()
    sink = MemorySink("quick")
    sink.gate = asyncio.Event()
    sink.gone = True

    def watchers() -> list[str]:
        return [
            task.get_name()
            for task in asyncio.all_tasks()
            if task.get_name().startswith("sipcdr-watch-")
        ]

    with Spool(tmp_path, ("quick",)) as spool:
        delivery = Delivery({STREAM_RECORDS: spool}, [sink], clock=clock)
        await delivery.start()
        values = _append(spool, 3)
        ((state, _reader),) = delivery.readers()
        await _until(lambda: sink.calls == 1)
        clock.advance(SLOW_BATCH_S - 0.01)
        await settle()
        assert watchers() == []
        clock.advance(0.01)
        await _until(lambda: not state.up)
        assert sink.probes == 1  # the watcher, made at its time, probed
        sink.gone = False
        sink.gate.set()
        await _until(lambda: state.up)
        await delivery.stop()
        assert watchers() == []
    assert sink.got == values


async def test_a_batch_held_by_a_destination_that_is_gone_is_reported_while_it_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client retrying on its own (aiokafka, for up to two request timeouts) must not
    hide an outage: the loop probes, and the batch it waits for is not failed for that."""
    clock = FakeClock()
    sink = MemorySink("stuck")
    sink.gate = asyncio.Event()
    sink.gone = True
    with Spool(tmp_path, ("stuck",)) as spool, capture_logs() as logs:
        delivery = Delivery({STREAM_RECORDS: spool}, [sink], clock=clock)
        await delivery.start()
        values = _append(spool, 3)
        ((state, _reader),) = delivery.readers()
        await _until(lambda: sink.calls == 1)
        clock.advance(SLOW_BATCH_S)
        await _until(lambda: not state.up)
        assert (sink.calls, state.failures) == (1, 0)  # still the first attempt
        assert f"batch unconfirmed after {SLOW_BATCH_S:.1f} s" in state.last_error
        assert "does not answer" in state.last_error
        clock.advance(10.0)  # the outage lasts from the batch's start: 12 s in all
        sink.gone = False
        sink.gate.set()
        await _until(lambda: state.up)
        await delivery.stop()
    assert sink.got == values
    assert _outage_events(logs) == ["sink_unavailable", "sink_recovered"]
    (warning,) = [entry for entry in logs if entry["event"] == "sink_unavailable"]
    assert warning["log_level"] == "warning"
    (recovered,) = [entry for entry in logs if entry["event"] == "sink_recovered"]
    assert recovered["down_s"] == SLOW_BATCH_S + 10.0


async def test_delivery_resumes_within_a_probe_interval_of_the_return_not_the_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery_module, "MIN_BACKOFF_S", 60.0)
    clock = FakeClock()
    sink = MemorySink("back")
    sink.failing = sink.gone = True
    with Spool(tmp_path, ("back",)) as spool:
        delivery = Delivery({STREAM_RECORDS: spool}, [sink], clock=clock)
        await delivery.start()
        values = _append(spool, 3)
        await _until(lambda: sink.calls == 1 and sink.probes == 1)  # failed, then asked
        for asked in range(2, 6):  # asked again every PROBE_INTERVAL_S
            clock.advance(PROBE_INTERVAL_S)
            await _probed(sink, asked)
        assert sink.calls == 1  # the probes, not the batch, go out every interval
        sink.failing = sink.gone = False
        clock.advance(PROBE_INTERVAL_S)  # one interval after the return, not 60 s
        await _until(lambda: len(sink.got) == 3)
        assert sink.calls == 2
        await delivery.stop()
    assert sink.got == values


async def test_a_destination_that_answers_but_fails_waits_the_whole_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    sink = MemorySink("refusing")
    sink.failing = True  # it answers a probe, and refuses the batch
    with Spool(tmp_path, ("refusing",)) as spool:
        delivery = Delivery({STREAM_RECORDS: spool}, [sink], clock=clock)
        await delivery.start()
        _append(spool, 3)
        await _until(lambda: sink.calls == 1 and sink.probes == 1)
        sink.failing = False
        clock.advance(MIN_BACKOFF_S - 0.01)  # past a probe interval's worth of polling
        await settle()
        assert sink.calls == 1  # still waiting out the backoff
        clock.advance(0.01)
        await _until(lambda: len(sink.got) == 3)
        await delivery.stop()
    assert sink.calls == 2
    assert sink.probes == 1  # once, to tell a refusal from an outage


async def test_a_cancel_while_a_probe_ends_does_not_rewind_a_delivered_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch is confirmed while its watcher is in a probe that takes a moment to
    end; a stop right then must find the batch committed, not deliver it again."""
    monkeypatch.setattr(delivery_module, "SLOW_BATCH_S", 0.01)
    sink = MemorySink("confirmed")
    sink.gate = asyncio.Event()
    sink.probe_gate = asyncio.Event()  # never set: the probe is still out
    sink.probe_ends_in = 0.5
    with Spool(tmp_path, ("confirmed",)) as spool:
        delivery = Delivery({STREAM_RECORDS: spool}, [sink])
        await delivery.start()
        _append(spool, 3)
        await _until(lambda: sink.probes == 1)
        sink.gate.set()
        await _until(lambda: len(sink.got) == 3)
        await asyncio.sleep(0.05)  # well inside the probe's end
        await delivery.stop(drain_timeout_s=0)
        ((_state, reader),) = delivery.readers()
        assert reader.lag_records == 0
    with Spool(tmp_path, ("confirmed",)) as spool:
        assert spool.reader("confirmed").read(10, 1 << 20) == []


async def test_a_drain_that_begins_during_a_probe_still_ends_the_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery_module, "MIN_BACKOFF_S", 60.0)
    sink = MemorySink("draining")
    sink.failing = True
    sink.probe_gate = asyncio.Event()
    with Spool(tmp_path, ("draining",)) as spool:
        delivery = Delivery({STREAM_RECORDS: spool}, [sink])
        await delivery.start()
        values = _append(spool, 3)
        await _until(lambda: sink.calls == 1 and sink.probes == 1)  # failed, now probing
        drained = asyncio.create_task(delivery.drain(5))
        await asyncio.sleep(0.05)  # the drain's pulse passes while the loop probes
        sink.failing = False
        sink.probe_gate.set()  # it answers: the loop would wait the whole 60 s backoff
        assert await drained
        await delivery.stop()
    assert sink.got == values


async def test_a_failed_watcher_is_a_warning_and_the_batch_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery_module, "SLOW_BATCH_S", 0.01)

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("the watcher's own bug")

    sink = MemorySink("watched")
    sink.gate = asyncio.Event()
    sink.gone = True
    with Spool(tmp_path, ("watched",)) as spool, capture_logs() as logs:
        delivery = Delivery({STREAM_RECORDS: spool}, [sink])
        monkeypatch.setattr(delivery, "_mark_down", broken)
        await delivery.start()
        values = _append(spool, 3)
        await _until(lambda: any(e["event"] == "delivery_watch_failed" for e in logs))
        sink.gate.set()
        await _until(lambda: len(sink.got) == 3)
        await delivery.stop()
    assert sink.got == values
    (failed,) = [entry for entry in logs if entry["event"] == "delivery_watch_failed"]
    assert failed["log_level"] == "warning"
    assert [entry for entry in logs if entry["log_level"] == "error"] == []


def test_intake_resumes_only_after_the_disk_has_kept_up_and_waits_longer_after_a_relapse() -> None:
    pipeline = Pipeline(Correlator(), [])
    now = [0.0]
    gate = IntakeGate(pipeline.intake, clock=lambda: now[0])
    with capture_logs() as logs:
        gate.update("write_error")
        assert pipeline.intake.paused and pipeline.intake.reason == "write_error"
        for _ in range(4):  # the tick: the disk took the reserve, but not for long yet
            now[0] += 1.0
            gate.update(None)
        assert pipeline.intake.paused
        now[0] += 1.0
        gate.update(None)
        assert not pipeline.intake.paused  # 5 s without a refusal
        now[0] += 1.0
        gate.update("write_error")  # a disk at the edge refuses again at once
        for _ in range(9):
            now[0] += 1.0
            gate.update(None)
        assert pipeline.intake.paused  # 10 s this time
        now[0] += 1.0
        gate.update(None)
        assert not pipeline.intake.paused
        now[0] += 600.0  # a long quiet spell: the next pause starts from 5 s again
        gate.update("spool_full")
        assert gate.resume_after_s == 5.0
    levels = [(e["event"], e["log_level"]) for e in logs]
    assert levels == [
        ("intake_paused", "error"),
        ("intake_resumed", "info"),
        ("intake_paused", "error"),
        ("intake_resumed", "info"),
        ("intake_paused", "error"),
    ]


def test_the_resume_wait_is_capped_near_half_a_minute_and_decays_after_a_calm_spell() -> None:
    pipeline = Pipeline(Correlator(), [])
    now = [0.0]
    gate = IntakeGate(pipeline.intake, clock=lambda: now[0])

    def relapse() -> float:
        """A pause right after the last resume; returns the wait it was given."""
        now[0] += 1.0
        gate.update("write_error")
        waited = gate.resume_after_s
        while pipeline.intake.paused:
            now[0] += 1.0
            gate.update(None)
        return waited

    assert [relapse() for _ in range(6)] == [5.0, 10.0, 20.0, 30.0, 30.0, 30.0]
    now[0] += 61.0  # a calm minute halves the wait for the next pause
    assert relapse() == 15.0
    now[0] += 3 * 61.0  # calm long enough: back to the base
    assert relapse() == 5.0


def test_intake_resumed_counts_every_call_refused_during_the_pause() -> None:
    """The figure in `intake_resumed` counts the whole pause, however often the
    metrics are scraped meanwhile."""
    pipeline = Pipeline(Correlator(), [])
    metrics = Metrics(lambda: Sources(pipeline=pipeline))
    labels = {"reason": "write_error"}
    now = [0.0]
    gate = IntakeGate(pipeline.intake, clock=lambda: now[0])
    with capture_logs() as logs:
        gate.update("write_error")
        offered = 0
        while pipeline.intake.paused:
            for _ in range(3):
                call = Call(f"refused-{offered}@x")
                pipeline.process(packet(100.0 + offered, call.request("INVITE")))
                offered += 1
            metrics.registry.get_sample_value("sipcdr_calls_refused_total", labels)  # a scrape
            now[0] += 1.0
            gate.update(None)
    assert offered == 15
    (resumed,) = [e for e in logs if e["event"] == "intake_resumed"]
    assert resumed["calls_refused"] == 15
    assert metrics.registry.get_sample_value("sipcdr_calls_refused_total", labels) == 15


async def test_a_held_loop_delivers_nothing_and_a_stop_does_not_wait_for_it(
    tmp_path: Path,
) -> None:
    held, free = MemorySink("held"), MemorySink("free")
    with Spool(tmp_path, ("held", "free")) as spool:
        delivery = Delivery({STREAM_RECORDS: spool}, [held, free])
        delivery.held.add(("held", STREAM_RECORDS))
        await delivery.start()
        values = _append(spool, 5)
        await _until(lambda: free.got == values)
        await asyncio.sleep(0.1)
        assert held.got == [] and delivery.caught_up()
        delivery.held.clear()
        await _until(lambda: held.got == values)
        delivery.held.add(("held", STREAM_RECORDS))
        more = _append(spool, 3, start=5)
        await _until(lambda: free.got == values + more)
        assert delivery.caught_up()  # what a drain waits for: not the held loop
        with capture_logs() as logs:
            await delivery.stop()  # the drain is over once the loops not held have all
    (left,) = [e for e in logs if e["event"] == "delivery_left_in_spool"]
    assert left["backlog"] == {"held/records": 3, "free/records": 0}
    assert free.got == values + more
    assert held.got == values  # the rest waits in the spool for the next start
    with Spool(tmp_path, ("held", "free")) as spool:
        assert [r.value for r in spool.reader("held").read(10, 1 << 20)] == more


def _has(sink: MemorySink, records: int) -> bool:
    return len(sink.got) == records


def _watcher_tasks() -> list[asyncio.Task[object]]:
    return [task for task in asyncio.all_tasks() if task.get_name().startswith("sipcdr-watch-")]


async def test_batches_confirmed_in_time_leave_no_timer_that_probes_later(tmp_path: Path) -> None:
    """Each batch's timer ends with the batch: none fires later, on another batch's
    time or after the last."""
    clock = FakeClock()
    sink = MemorySink("quick")
    with Spool(tmp_path, ("quick",)) as spool:
        delivery = Delivery({STREAM_RECORDS: spool}, [sink], clock=clock)
        await delivery.start()
        values: list[bytes] = []
        for _ in range(5):
            values += _append(spool, 2)
            wanted = len(values)
            await _until(partial(_has, sink, wanted))
            clock.advance(SLOW_BATCH_S / 4)
            await settle()
        clock.advance(SLOW_BATCH_S * 10)
        await settle()
        assert sink.probes == 0
        assert _watcher_tasks() == []
        ((state, _reader),) = delivery.readers()
        assert state.up
        await delivery.stop()
    assert sink.got == values


async def test_a_stop_during_a_batch_leaves_no_timer_to_make_a_watcher(tmp_path: Path) -> None:
    clock = FakeClock()
    sink = MemorySink("held")
    sink.gate = asyncio.Event()
    sink.gone = True
    with Spool(tmp_path, ("held",)) as spool:
        delivery = Delivery({STREAM_RECORDS: spool}, [sink], clock=clock)
        await delivery.start()
        _append(spool, 3)
        await _until(lambda: sink.calls == 1)
        clock.advance(SLOW_BATCH_S / 2)
        await delivery.stop(drain_timeout_s=0)
        clock.advance(SLOW_BATCH_S * 10)
        await settle()
        assert _watcher_tasks() == []
        assert sink.probes == 0
