"""Delivery apart, as the capture process sees it: the delivery process's counts reach
its metrics (the lag against its own writer), its readiness reaches /readyz, and what
it is told of the sinks matches what it builds."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle
import subprocess
import sys
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from types import SimpleNamespace

import pytest
from sipcdr import deliverer
from sipcdr.config import Config, load_config, output_settings
from sipcdr.deliverer import DeliveryApart, make_picklable
from sipcdr.delivery import LoopState
from sipcdr.privacy.stats import PrivacyStats
from sipcdr.sinks.outputs import Outputs
from sipcdr.sinks.remote import DeliverySnapshot, LoopSnapshot, carry_counts, sink_plans
from sipcdr.spool import SpoolStats
from sipcdr.telemetry.metrics import Metrics, Sources
from structlog.testing import capture_logs


def _snapshot() -> DeliverySnapshot:
    state = LoopState("postgres", "records", delivered=41, failures=3, rejected=2, up=False)
    return DeliverySnapshot(
        loops=[LoopSnapshot(state, confirmed_seq=90, cursor_write_failures=5, corrupt_records=7)],
        jsonl_rotation_failures=11,
        postgres_rows={"inserted": {"cdrs": 41}, "duplicate": {"cdrs": 4}},
        privacy=PrivacyStats(restricted_subjects=6),
        withheld={"cdr": 8},
        held_for_restrictions=True,
    )


def test_the_delivery_process_counts_reach_the_capture_process_metrics() -> None:
    spool = SimpleNamespace(next_seq=100, stats=SpoolStats(), size_bytes=0, full=False, reserved=0)
    outputs = SimpleNamespace(
        spools={"records": spool},
        remote=pickle.loads(pickle.dumps(_snapshot())),  # as it crosses the pipe
        delivery=None,
        sinks=[],
        held_for_restrictions=True,
    )
    restarts = SimpleNamespace(restarts=3)
    metrics = Metrics(lambda: Sources(outputs=outputs, delivery_process=restarts))  # type: ignore[arg-type]
    value = metrics.registry.get_sample_value
    labels = {"sink": "postgres", "stream": "records"}
    assert value("sipcdr_sink_lag_records", labels) == 10  # 100 written, 90 confirmed
    assert value("sipcdr_sink_up", labels) == 0
    assert value("sipcdr_sink_records_total", labels) == 41
    assert value("sipcdr_sink_failures_total", labels) == 3
    assert value("sipcdr_sink_rejected_total", labels) == 2
    assert value("sipcdr_spool_cursor_write_failures_total", labels) == 5
    assert value("sipcdr_spool_corrupt_records_total", labels) == 7
    assert value("sipcdr_jsonl_rotation_failures_total") == 11
    rows = {"table": "cdrs", "outcome": "duplicate"}
    assert value("sipcdr_postgres_rows_total", rows) == 4
    assert value("sipcdr_delivery_process_restarts_total") == 3
    assert value("sipcdr_delivery_waiting_for_restrictions") == 1


async def test_readiness_follows_the_delivery_process(tmp_path: Path) -> None:
    config = Config()
    settings = dataclasses.replace(output_settings(config), state_dir=tmp_path)
    outputs = Outputs(settings, role="capture")
    await outputs.open()
    try:
        assert not outputs.sinks and outputs.delivery is None  # built by the other process
        assert not outputs.sinks_ready()  # nothing heard from it yet
        snapshot = _snapshot()
        snapshot.loops[0].state.tried = True
        outputs.remote = snapshot
        assert outputs.sinks_ready()  # down, but its records spool within the limits
    finally:
        await outputs.close()


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {
            "SIPCDR_SINKS__POSTGRES__DSN": "postgresql://sipcdr@127.0.0.1:9/sipcdr",
            "SIPCDR_SINKS__POSTGRES__STORE_SIGNALING": "false",
            "SIPCDR_SINKS__KAFKA__BOOTSTRAP": "127.0.0.1:9",
        },
        {
            "SIPCDR_SINKS__POSTGRES__DSN": "",
            "SIPCDR_SINKS__KAFKA__BOOTSTRAP": "127.0.0.1:9",
            "SIPCDR_SINKS__KAFKA__TOPIC_SIP": "",
        },
    ],
)
async def test_the_plans_name_the_sinks_and_streams_the_outputs_build(
    tmp_path: Path, environ: dict[str, str]
) -> None:
    """The capture process keeps segments for the plans' readers, the delivery process
    reads for the sinks it builds: a stream one leaves out would be deleted unread."""
    config = load_config(None, {"SIPCDR_STATE__DIR": str(tmp_path), **environ})
    settings = output_settings(config)
    if settings.postgres is not None and settings.postgres.embedded:
        # The default's sinks, without starting an embedded server.
        assert [(plan.name, plan.streams) for plan in sink_plans(settings)] == [
            ("jsonl", ("records",)),
            ("postgres", ("records", "signaling")),
        ]
        return
    outputs = Outputs(settings)
    await outputs.open()
    try:
        built = [(sink.name, tuple(sink.streams)) for sink in outputs.sinks]
    finally:
        await outputs.close(drain_timeout_s=0)
    assert [(plan.name, plan.streams) for plan in sink_plans(settings)] == built


def test_the_configuration_crosses_to_the_delivery_process() -> None:
    config = Config()
    make_picklable(config)
    assert pickle.loads(ForkingPickler.dumps(config)) == config


def test_counts_carry_over_a_restart_of_the_delivery_process() -> None:
    """A delivery process started again counts from zero; the capture process adds
    what the ones before it counted, so no exported counter goes back."""
    earlier = _snapshot()
    fresh = DeliverySnapshot(
        loops=[
            LoopSnapshot(
                LoopState("postgres", "records", delivered=1, up=True),
                confirmed_seq=95,
                cursor_write_failures=0,
                corrupt_records=0,
            )
        ],
        jsonl_rotation_failures=0,
        postgres_rows={"inserted": {"cdrs": 1}},
        withheld={"cdr": 1},
    )
    fresh.privacy.runs["ok"] = 1
    carry_counts(earlier, fresh)
    loop = fresh.loops[0]
    assert (loop.state.delivered, loop.state.failures, loop.state.rejected) == (42, 3, 2)
    assert (loop.cursor_write_failures, loop.corrupt_records) == (5, 7)
    assert loop.confirmed_seq == 95 and loop.state.up  # what it says now, not added
    assert fresh.jsonl_rotation_failures == 11
    assert fresh.postgres_rows == {"inserted": {"cdrs": 42}, "duplicate": {"cdrs": 4}}
    assert fresh.withheld == {"cdr": 9}
    assert fresh.privacy.runs == {"ok": 1, "failed": 0}
    assert fresh.privacy.restricted_subjects == 0  # a level, as last read: not added


def test_a_frozen_delivery_process_never_blocks_the_capture_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    spool = SimpleNamespace(next_seq=1)
    outputs = SimpleNamespace(spools={"records": spool}, remote=None)
    apart = DeliveryApart(Config(), outputs, PrivacyStats())  # type: ignore[arg-type]
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    # Where a blocking send would hang the test, this one fails with BlockingIOError,
    # which `send` takes for a process gone.
    os.set_blocking(ours.fileno(), False)
    apart.process._conn = ours
    try:
        for _ in range(3600):  # an hour of ticks, never read (SIGSTOP, swapped out)
            spool.next_seq += 100
            apart.tick()
            now[0] += 1.0
        assert apart.process._conn is ours  # every send went through
        monkeypatch.undo()  # `poll` counts its timeout by the clock
        queued = 0
        while theirs.poll():
            theirs.recv()
            queued += 1
        assert queued <= deliverer.SILENT_AFTER_S + 1
    finally:
        ours.close()
        theirs.close()


def test_counts_sent_into_a_full_pipe_are_whole_or_not_sent() -> None:
    """The delivery process's end of the pipe is non-blocking (its event loop reads
    it), and sends into it while the capture process does not read (stopped, swapped
    out) fail until there is room. A stream socket takes a write below its buffer
    unit whole or not at all, so no message arrives cut off, as long as the largest
    counts stay well under it."""
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    os.set_blocking(ours.fileno(), False)  # as uvloop's add_reader leaves it
    os.set_blocking(theirs.fileno(), False)  # a torn message fails here, not hangs
    largest = DeliverySnapshot(
        loops=[
            LoopSnapshot(
                LoopState(sink, stream, delivered=2**62, last_error="x" * 500),
                confirmed_seq=2**63,
                cursor_write_failures=2**40,
                corrupt_records=2**40,
            )
            for sink in ("postgres", "kafka", "jsonl")
            for stream in ("records", "signaling")
        ],
        postgres_rows={"inserted": dict.fromkeys(("cdrs", "sip_messages", "alerts"), 2**62)},
        withheld=dict.fromkeys(("cdr", "alert", "signaling"), 2**62),
    )
    assert len(ForkingPickler.dumps(largest)) < 8192
    try:
        for _ in range(5000):  # far more than the pipe holds
            deliverer._send(ours, largest)
        received = 0
        while theirs.poll():
            assert isinstance(theirs.recv(), DeliverySnapshot)
            received += 1
        assert 0 < received < 5000
    finally:
        ours.close()
        theirs.close()


_PRIORITY_PROBE = """
import os, subprocess, sys, threading
from sipcdr.deliverer import _lower_priority
_lower_priority(3)
seen = []
thread = threading.Thread(
    target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
)
thread.start()
thread.join()
child = subprocess.run(
    [sys.executable, "-c", "import os; print(os.nice(0))"], capture_output=True, check=True
)
print(os.nice(0), seen[0], int(child.stdout))
"""


def test_delivery_lowers_its_own_priority_for_its_threads_and_children_too() -> None:
    """Linux keeps a nice value per thread: the threads the delivery process starts
    later (its executor's) and the processes it starts (an embedded PostgreSQL) take
    the lowered one, and the process that started it keeps its own."""
    before = os.nice(0)
    done = subprocess.run(
        [sys.executable, "-c", _PRIORITY_PROBE], capture_output=True, check=True, text=True
    )
    expected = min(before + 3, 19)
    # The last line: the logs go to standard output before it.
    assert [int(value) for value in done.stdout.splitlines()[-1].split()] == [expected] * 3
    assert os.nice(0) == before


def test_a_priority_that_cannot_be_lowered_is_said_and_delivery_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[int] = []

    def refused(increment: int) -> int:
        asked.append(increment)
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "nice", refused)
    with capture_logs() as logs:
        deliverer._lower_priority(0)  # 0: left as it is, not asked
        deliverer._lower_priority(5)
    assert asked == [5]
    assert [(log["event"], log["log_level"]) for log in logs] == [
        ("delivery_priority_unchanged", "warning")
    ]
