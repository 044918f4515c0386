"""`sipcdr run` killed with SIGKILL while calls are in progress and others are being
set up and torn down: the calls answered before the kill get their correct CDR from
the BYE that arrives after the restart, and no CDR is written twice."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import random
import socket
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonproc import Daemon, daemon_environ, start_daemon, wait_for
from sipcalls import Call, answered_call_messages
from sipcdr.app import App
from sipcdr.config import load_config
from sipcdr.dialogstore import read_checkpoint

pytestmark = pytest.mark.integration

HELD_CALLS = 100
LOAD_CALLS_IN_FLIGHT = 20
LOAD_PACE_PER_S = 2000  # messages a second of other calls, before and at the kill
LATE_CALLS = 40  # calls begun on a full disk: more than the journal's last block holds


class Load:
    """Whole calls, many in flight at once, until stopped: the kill lands mid-stream."""

    def __init__(
        self, target: tuple[str, int], pace: float = LOAD_PACE_PER_S, prefix: str = "load"
    ) -> None:
        self.target = target
        self.prefix = prefix
        self.pace = pace
        self.stopped = threading.Event()
        self.calls = 0
        self.completed: dict[str, float] = {}  # Call-ID: when its last message went
        self._thread = threading.Thread(target=self._run, name="sip-load", daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        flows: list[list[bytes]] = []
        sent = 0
        started = time.monotonic()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            while not self.stopped.is_set():
                while len(flows) < LOAD_CALLS_IN_FLIGHT:
                    call = Call(f"{self.prefix}-{self.calls}@x", from_tag=f"l{self.calls}")
                    flows.append(answered_call_messages(call))
                    self.calls += 1
                flow = flows[sent % len(flows)]
                data = flow.pop(0)
                udp.sendto(data, self.target)
                if not flow:
                    flows.remove(flow)
                    self.completed[_call_id(data)] = time.monotonic()
                sent += 1
                ahead = sent / self.pace - (time.monotonic() - started)
                if ahead > 0.005:
                    time.sleep(ahead)


def _call_id(data: bytes) -> str:
    for line in data.split(b"\r\n"):
        if line.lower().startswith(b"call-id:"):
            return line.split(b":", 1)[1].strip().decode()
    raise AssertionError("no Call-ID")


def jsonl_records(daemon: Daemon) -> dict[str, list[dict[str, object]]]:
    records: dict[str, list[dict[str, object]]] = defaultdict(list)
    for record in daemon.cdrs():
        records[str(record["cdr_id"])].append(record)
    return records


@pytest.mark.parametrize(
    "checkpoint_interval_s",
    [
        None,  # the default, 10 s: every held call is in the journal only
        "0.5",  # the kill finds them in a checkpoint, and more calls in the journal
    ],
)
def test_sigkill_under_load_then_the_byes_after_the_restart_bill_from_the_answer(
    tmp_path: Path, daemons: list[Daemon], checkpoint_interval_s: str | None
) -> None:
    env = {}
    if checkpoint_interval_s is not None:
        env["SIPCDR_STATE__CHECKPOINT_INTERVAL_S"] = checkpoint_interval_s
    first = start_daemon(tmp_path, **env)
    daemons.append(first)
    target = first.endpoint("sip_udp")
    held = [Call(f"held-{n}@x", from_tag=f"h{n}") for n in range(HELD_CALLS)]
    answered_at: dict[str, float] = {}
    with Load(target) as load, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for call in held:  # INVITE, 180, 200, ACK: answered, in progress
            for data in answered_call_messages(call)[:4]:
                if data.startswith(b"SIP/2.0 200"):
                    # Read before sending: the daemon on the other core may take and
                    # stamp the datagram before this process runs again.
                    answered_at[call.call_id] = time.time()
                udp.sendto(data, target)
            time.sleep(0.002)
        # Datagrams from one socket are taken in order: once this call's CDR is out,
        # every held call's 200 was processed.
        for data in answered_call_messages(Call("marker@x", from_tag="m")):
            udp.sendto(data, target)
        wait_for(
            lambda: any(r["call_id"] == "marker@x" for r in first.cdrs()),
            timeout=30,
        )
        time.sleep(1.0)  # more calls come and go; checkpoints, when that frequent
        killed_at = time.time()
        first.process.kill()  # SIGKILL: no drain, no shutdown hook
        first.process.wait(timeout=10)
    assert load.calls > LOAD_CALLS_IN_FLIGHT  # calls were being set up and torn down

    second = start_daemon(tmp_path, **env)
    daemons.append(second)
    recovered = [
        json.loads(line)
        for line in second.log.read_text().splitlines()
        if '"event": "dialogs_recovered"' in line
    ]
    assert recovered[0]["open_dialogs"] >= HELD_CALLS
    assert recovered[0]["journal_records"] > 0
    if checkpoint_interval_s is None:
        assert recovered[0]["from_checkpoint"] == 0
        assert recovered[0]["journal_records"] >= HELD_CALLS * 3  # INVITE, 180, 200
    else:
        assert recovered[0]["from_checkpoint"] >= HELD_CALLS
    byes_from = time.time()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for call in held:
            bye, bye_ok = answered_call_messages(call)[4:]
            udp.sendto(bye, second.endpoint("sip_udp"))
            udp.sendto(bye_ok, second.endpoint("sip_udp"))
    held_ids = {call.call_id for call in held}

    def held_cdrs() -> int:
        return len({r["cdr_id"] for r in second.cdrs() if r["call_id"] in held_ids})

    wait_for(lambda: held_cdrs() == HELD_CALLS, timeout=30)
    assert second.stop() == 0

    records = jsonl_records(second)
    # A CDR may be delivered to the file again after a kill (the sink's cursor), but
    # never closed twice: every line under one cdr_id is the same record.
    twice = [ids for ids, lines in records.items() if any(line != lines[0] for line in lines)]
    assert twice == []
    by_call = {str(lines[0]["call_id"]): lines[0] for lines in records.values()}
    calls = [str(lines[0]["call_id"]) for lines in records.values()]
    assert len(calls) == len(set(calls))  # one CDR per call
    for call in held:
        cdr = by_call[call.call_id]
        assert (cdr["disposition"], cdr["end_reason"], cdr["hangup_by"]) == (
            "answered",
            "bye",
            "caller",
        )
        answer = _epoch(str(cdr["answer_time"]))
        end = _epoch(str(cdr["end_time"]))
        # Answered before the kill, ended by the BYE after the restart: billsec runs
        # from the original 200.
        assert answered_at[call.call_id] - 0.001 <= answer <= killed_at
        assert end >= byes_from
        # billsec is rounded from the unrounded times, these are read back from text
        # with microseconds: the two roundings may differ in the last place.
        assert abs(float(str(cdr["billsec"])) - (end - answer)) <= 0.0011
        assert float(str(cdr["billsec"])) > byes_from - killed_at


KILLS = 3
SETTLED_S = 0.5  # a call whose last message went this long before a kill was taken in


def test_kills_at_random_times_lose_no_call_taken_in_and_bill_none_twice(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """SIGKILL at random moments of a heavier load, three times over: every call whose
    last message went well before a kill gets exactly one CDR, none twice under two
    cdr_ids, and no call that has a CDR is reopened by the start after the kill (a
    CDR never reaches the spool before the journal records that closed it)."""
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    settled: set[str] = set()
    daemon = start_daemon(tmp_path)
    daemons.append(daemon)
    for round_ in range(KILLS):
        with Load(daemon.endpoint("sip_udp"), pace=3000, prefix=f"r{round_}") as load:
            time.sleep(rng.uniform(0.7, 1.5))
            daemon.process.kill()
            killed = time.monotonic()
            daemon.process.wait(timeout=10)
        settled |= {c for c, at in load.completed.items() if killed - at >= SETTLED_S}
        daemon = start_daemon(tmp_path)
        daemons.append(daemon)
        reopened = set(newest_checkpoint_calls(tmp_path / "var"))
        time.sleep(1.0)  # what the spool holds reaches the JSONL file
        billed = {str(r["call_id"]) for r in daemon.cdrs()}
        # A kill between a CDR's spool write and its close record (microseconds, one
        # CDR at most) reopens that call; anything wider is the bug this test is for.
        assert len(billed & reopened) <= 1, f"seed {seed}"

    def missing() -> set[str]:
        return settled - {str(r["call_id"]) for r in daemon.cdrs()}

    with contextlib.suppress(pytest.fail.Exception):
        wait_for(lambda: not missing(), timeout=30)
    assert sorted(missing()) == [], f"seed {seed}"
    assert daemon.stop() == 0
    records = jsonl_records(daemon)
    twice = {ids: lines for ids, lines in records.items() if any(ln != lines[0] for ln in lines)}
    # The documented residue of that window: the CDR written again after the restart
    # lacks the fraud stage's flags of the first copy, and nothing else differs.
    assert len(twice) <= KILLS, f"seed {seed}"
    for lines in twice.values():
        differing = {key for line in lines for key in line if line.get(key) != lines[0].get(key)}
        assert all(key.startswith("fraud") for key in differing), f"seed {seed}: {differing}"
    calls = [str(lines[0]["call_id"]) for lines in records.values()]
    assert len(calls) == len(set(calls)), f"seed {seed}"  # one CDR per call
    assert len(settled) > 100


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB file system that the test fills: a real full disk."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"a full disk is a small tmpfs here, which needs root: {done.stderr}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def newest_checkpoint_calls(state: Path) -> list[str]:
    newest = max(state.glob("dialogs.*.json"), key=lambda p: int(p.name.split(".")[1]))
    saved, _unwritten = read_checkpoint(newest.read_bytes())
    column = saved["fields"].index("call_id")  # type: ignore[attr-defined]
    return sorted(row[column] for row in saved["dialogs"])  # type: ignore[attr-defined]


def test_sigterm_on_a_full_disk_keeps_the_previous_checkpoint_and_the_calls(
    tmp_path: Path, small_disk: Path, daemons: list[Daemon]
) -> None:
    state = small_disk / "var"
    jsonl = tmp_path / "cdrs.jsonl"
    env = {
        "SIPCDR_STATE__DIR": str(state),
        "SIPCDR_SINKS__JSONL__PATH": str(jsonl),
        "SIPCDR_STATE__CHECKPOINT_INTERVAL_S": "0.2",
        "SIPCDR_STATE__SPARE_BYTES": "0",  # a disk full with nothing set aside
    }
    held = [Call(f"kept-{n}@x", from_tag=f"k{n}") for n in range(5)]
    first = start_daemon(tmp_path, **env)
    daemons.append(first)
    target = first.endpoint("sip_udp")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for call in held:
            for data in answered_call_messages(call)[:4]:
                udp.sendto(data, target)
        held_ids = sorted(call.call_id for call in held)
        wait_for(lambda: newest_checkpoint_calls(state) == held_ids, timeout=30)
        filler = fill(small_disk)
        checkpoint = max(state.glob("dialogs.*.json"), key=lambda p: int(p.name.split(".")[1]))
        saved = checkpoint.read_bytes()
        # A message that changes no call: journals nothing, but makes a checkpoint due.
        udp.sendto(Call("ping@x").request("OPTIONS"), target)
        wait_for(lambda: first.metric("sipcdr_dialog_checkpoints_total", outcome="failed") > 0)
        # Taken in while the disk is full: once the journal file's last block is full
        # too, their records cannot be written.
        late = [Call(f"late-{n}@x", from_tag=f"l{n}") for n in range(LATE_CALLS)]
        for call in late:
            for data in answered_call_messages(call)[:3]:
                udp.sendto(data, target)
        wait_for(
            lambda: (
                first.metric("sipcdr_dialog_state_errors_total", what="journal_write_error") > 0
            ),
            timeout=30,
        )
        wait_for(lambda: first.metric("sipcdr_open_dialogs") == len(held) + LATE_CALLS)
        # The metrics show the journal error as it happens; the checkpoint that fails
        # after it, and says so at ERROR, is the next one due.
        wait_for(lambda: _logged(first, "dialog_checkpoint_failed", "error"), timeout=30)
    assert first.stop() == 0

    log = [json.loads(line) for line in first.log.read_text().splitlines() if line]
    failed = [e for e in log if e["event"] == "dialog_checkpoint_failed"]
    # Once when the checkpoints began to fail, once when the journal did, at the stop.
    assert [(e["level"], e["at_stop"]) for e in failed] == [
        ("warning", False),
        ("error", False),
        ("error", True),
    ]
    assert failed[-1]["open_dialogs"] == len(held) + LATE_CALLS
    assert failed[-1]["recoverable_from_journal"] is False
    assert any(e["event"] == "dialog_journal_write_failed" for e in log)
    assert not any("@x" in line for line in first.log.read_text().splitlines())
    # The last good checkpoint is untouched and nothing half-written is left.
    assert checkpoint.read_bytes() == saved
    assert not list(state.glob("*.tmp"))

    filler.unlink()
    second = start_daemon(tmp_path, **env)
    daemons.append(second)
    byes_from = time.time()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for call in [*held, *late]:
            udp.sendto(answered_call_messages(call)[4], second.endpoint("sip_udp"))

    def records() -> dict[str, dict[str, object]]:
        lines = jsonl.read_text().splitlines() if jsonl.exists() else []
        return {str(r["call_id"]): r for r in map(json.loads, lines)}

    wait_for(lambda: set(held_ids) <= set(records()), timeout=30)
    assert second.stop() == 0
    for call in held:
        cdr = records()[call.call_id]
        assert (cdr["disposition"], cdr["end_reason"]) == ("answered", "bye")
        assert _epoch(str(cdr["answer_time"])) < byes_from <= _epoch(str(cdr["end_time"]))
    # Calls whose INVITE found no room in the journal are not rebuilt: their BYEs are
    # orphans after the restart.
    assert len([call for call in late if call.call_id in records()]) < LATE_CALLS


async def test_a_start_tried_again_in_the_same_process_journals_and_listens_afresh(
    tmp_path: Path,
) -> None:
    """The first start fails late (the metrics port is taken) after the dialog store
    started; the second, in the same process, must work as a first one would."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    environ = daemon_environ(
        SIPCDR_STATE__DIR=str(tmp_path / "var"),
        SIPCDR_SINKS__JSONL__PATH=str(tmp_path / "cdrs.jsonl"),
        SIPCDR_METRICS__LISTEN=f"127.0.0.1:{blocker.getsockname()[1]}",
    )
    app = App(load_config(None, {k: v for k, v in environ.items() if k.startswith("SIPCDR_")}))
    with pytest.raises(OSError):
        await app.start()
    blocker.close()
    await app.start()
    try:
        assert [len(app.bound[kind]) for kind in ("sip_udp", "hep_udp", "hep_tcp")] == [1, 1, 1]
        target = app.bound["sip_udp"][0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for data in answered_call_messages(Call("again@x"))[:3]:
                udp.sendto(data, target)
        for _ in range(200):
            if app.dialogs.stats.journal_messages >= 3:
                break
            await asyncio.sleep(0.01)
        assert app.dialogs.stats.journal_messages == 3
        assert app.dialogs.stats.journal_write_errors == 0
    finally:
        await app.stop()


def _logged(daemon: Daemon, event: str, level: str) -> bool:
    entries = (json.loads(line) for line in daemon.log.read_text().splitlines() if line)
    return any(e["event"] == event and e["level"] == level for e in entries)
