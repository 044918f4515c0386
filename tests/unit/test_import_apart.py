"""When `sipcdr import` delivers from a process of its own (`import_delivery`), and
what the import then knows of its sinks: whether they lack records the spool holds."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from sipcdr.config import Config, load_config, output_settings
from sipcdr.delivery import LoopState
from sipcdr.import_delivery import APART_FROM_BYTES, delivers_apart
from sipcdr.privacy.stats import PrivacyStats
from sipcdr.sinks.base import KIND_CDR
from sipcdr.sinks.outputs import Outputs
from sipcdr.sinks.remote import DeliverySnapshot, LoopSnapshot, take_snapshot


def capture_of(tmp_path: Path, size: int) -> Path:
    path = tmp_path / f"capture-{size}.pcap"
    with path.open("wb") as handle:
        handle.truncate(size)  # sparse: only its size is read
    return path


def config_of(tmp_path: Path, **environ: str) -> Config:
    return load_config(None, {"SIPCDR_STATE__DIR": str(tmp_path), **environ})


@pytest.mark.parametrize(
    ("processes", "cores", "size", "apart"),
    [
        ("auto", 2, APART_FROM_BYTES, True),
        ("auto", 2, APART_FROM_BYTES - 1, False),  # a second process's start costs more
        ("auto", 1, APART_FROM_BYTES, False),  # one core: the two would take turns
        ("1", 1, 1, True),
        ("0", 8, APART_FROM_BYTES, False),
    ],
)
def test_an_import_delivers_apart_when_it_pays_or_is_told_to(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    processes: str,
    cores: int,
    size: int,
    apart: bool,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)))
    config = config_of(tmp_path, SIPCDR_SPOOL__DELIVERY_PROCESSES=processes)
    assert delivers_apart(config, [capture_of(tmp_path, size)]) is apart


def test_the_files_sizes_add_up_and_one_missing_counts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    half = capture_of(tmp_path, APART_FROM_BYTES // 2)
    other = capture_of(tmp_path, APART_FROM_BYTES - APART_FROM_BYTES // 2)
    config = config_of(tmp_path)
    assert delivers_apart(config, [half, other])
    assert not delivers_apart(config, [half, tmp_path / "missing.pcap"])


def test_cdrs_alone_are_delivered_in_the_import_unless_told_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JSONL alone keeps no signaling: a second process costs more than it saves."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    capture = capture_of(tmp_path, APART_FROM_BYTES)
    jsonl_only = config_of(tmp_path, SIPCDR_SINKS__POSTGRES__DSN="")
    assert not delivers_apart(jsonl_only, [capture])
    no_signaling = config_of(tmp_path, SIPCDR_SINKS__POSTGRES__STORE_SIGNALING="false")
    assert not delivers_apart(no_signaling, [capture])
    told = config_of(tmp_path, SIPCDR_SINKS__POSTGRES__DSN="", SIPCDR_SPOOL__DELIVERY_PROCESSES="1")
    assert delivers_apart(told, [capture])


def test_below_the_signaling_floor_an_import_delivers_in_its_own_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """There it waits for its sinks after every slice: the two would take turns."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    capture = capture_of(tmp_path, APART_FROM_BYTES)
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    above = config_of(tmp_path, SIPCDR_SPOOL__SIGNALING_MIN_FREE_BYTES=str(free // 2))
    assert delivers_apart(above, [capture])
    below = config_of(tmp_path, SIPCDR_SPOOL__SIGNALING_MIN_FREE_BYTES=str(free * 2))
    assert not delivers_apart(below, [capture])


def test_without_a_sink_nothing_is_delivered_apart(tmp_path: Path) -> None:
    config = config_of(
        tmp_path,
        SIPCDR_SPOOL__DELIVERY_PROCESSES="1",
        SIPCDR_SINKS__JSONL__PATH="",
        SIPCDR_SINKS__POSTGRES__DSN="",
    )
    assert not delivers_apart(config, [capture_of(tmp_path, APART_FROM_BYTES)])


def snapshot(confirmed_seq: int, held: bool = False) -> DeliverySnapshot:
    state = LoopState("postgres", "records", tried=True)
    return DeliverySnapshot(loops=[LoopSnapshot(state, confirmed_seq, 0, 0, held)])


async def test_the_import_reads_how_far_the_other_process_delivered(tmp_path: Path) -> None:
    """Below the signaling floor an import waits while a sink lacks records: with the
    sinks in the other process, by the counts it last sent."""
    settings = dataclasses.replace(output_settings(Config()), state_dir=tmp_path, postgres=None)
    outputs = Outputs(settings, role="capture")
    await outputs.open()
    try:
        assert outputs.cdr_writer is not None and outputs.delivery is None
        assert not outputs._behind()  # nothing written, nothing heard
        spool = outputs.spools["records"]
        for n in range(3):
            spool.append(KIND_CDR, b"k%d" % n, b"{}")
        outputs.remote = snapshot(spool.next_seq - 1)
        assert outputs._behind()
        outputs.remote = snapshot(spool.next_seq)
        assert not outputs._behind()
        # Held back (for the restriction list): as in one process, not waited for.
        outputs.remote = snapshot(spool.next_seq - 1, held=True)
        assert not outputs._behind()
    finally:
        await outputs.close()
    assert os.listdir(tmp_path / "spool" / "records")  # the writer's own folder


async def test_the_counts_say_which_loops_are_held_back(tmp_path: Path) -> None:
    """What the other process's `_behind` skips comes from the delivering side's own
    holds, not from a guess at which sinks they concern."""
    settings = dataclasses.replace(output_settings(Config()), state_dir=tmp_path, postgres=None)
    outputs = Outputs(settings)
    await outputs.open()
    try:
        assert outputs.delivery is not None
        assert [loop.held for loop in take_snapshot(outputs, PrivacyStats()).loops] == [False]
        outputs.delivery.held = {("jsonl", "records")}  # as the spare file holds a sink
        assert [loop.held for loop in take_snapshot(outputs, PrivacyStats()).loops] == [True]
    finally:
        await outputs.close(drain_timeout_s=0)
