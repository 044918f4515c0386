"""`sipcdr import` delivers through the daemon's own spool and sinks: a capture larger
than the spool's limit waits for the sinks instead of dropping anything, and an
import whose sink is unreachable says so and exits 1."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import asyncpg
import dpkt
import pytest
from daemonproc import daemon_environ
from sipcalls import Call, write_calls_pcap
from sipcdr.config import (
    Config,
    JsonlConfig,
    PostgresConfig,
    SinksConfig,
    SpoolConfig,
    StateConfig,
)
from sipcdr.importer import import_files
from sipcdr.spool import MAGIC
from sipcdr.storage.migrations import MIGRATION_LOCK_KEY
from smalldisk import SmallDisk
from test_delivery_end_to_end import MESSAGES_PER_CALL, pg_cdr_ids, pg_count

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
# Delivery in the import's process, and in a process of its own (`[spool]
# delivery_processes`; a capture this small is delivered in one process otherwise).
APART = pytest.mark.parametrize("apart", ["0", "1"], ids=["one_process", "apart"])


def write_capture(path: Path, calls: int) -> None:
    """`calls` whole calls, 10 ms apart."""
    write_calls_pcap(
        path, [Call(call_id=f"imp-{n}@x", from_tag=f"t{n}") for n in range(calls)], 0.01
    )


def run_import(
    workdir: Path, capture: Path, *options: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "sipcdr.cli", "import", str(capture)),
            *("--summary-json", "s.json", *options),
        ],
        cwd=workdir,
        env=daemon_environ(**env),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@APART
def test_an_import_larger_than_the_spool_waits_for_the_sinks(
    tmp_path: Path, pg_dsn: str, apart: str
) -> None:
    calls = 1500
    capture = tmp_path / "calls.pcap"
    write_capture(capture, calls)
    done = run_import(
        tmp_path,
        capture,
        SIPCDR_SINKS__POSTGRES__DSN=pg_dsn,
        SIPCDR_SPOOL__DELIVERY_PROCESSES=apart,
        SIPCDR_SPOOL__MAX_BYTES=str(1024 * 1024),  # ~1,000 CDRs, well under the capture
        SIPCDR_SPOOL__SIGNALING_MAX_BYTES=str(1024 * 1024),
        SIPCDR_SPOOL__SEGMENT_BYTES=str(64 * 1024),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("import_delivery_process_started" in done.stderr) == (apart == "1")
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["cdrs_written"] == calls
    assert summary["undelivered"] == {}
    assert summary["spool_refused"] == {}
    lines = (tmp_path / "var" / "cdrs.jsonl").read_text().splitlines()
    assert len({json.loads(line)["cdr_id"] for line in lines}) == calls
    ids = pg_cdr_ids(pg_dsn)
    assert len(ids) == len(set(ids)) == calls
    assert pg_count(pg_dsn, "sip_messages") == calls * MESSAGES_PER_CALL
    assert not any((tmp_path / "var" / "import-spool").iterdir())  # cleaned up


@APART
def test_an_import_whose_database_is_down_fails_and_can_be_run_again(
    tmp_path: Path, pg_dsn: str, apart: str
) -> None:
    capture = tmp_path / "calls.pcap"
    write_capture(capture, 5)
    down = run_import(
        tmp_path,
        capture,
        "--delivery-timeout",
        "3",
        SIPCDR_SINKS__POSTGRES__DSN="postgresql://postgres@127.0.0.1:1/none",
        SIPCDR_SPOOL__DELIVERY_PROCESSES=apart,
    )
    assert down.returncode == 1
    assert "not delivered" in down.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["undelivered"] == {"postgres/records": 5, "postgres/signaling": 30}
    again = run_import(
        tmp_path,
        capture,
        SIPCDR_SINKS__POSTGRES__DSN=pg_dsn,
        SIPCDR_SPOOL__DELIVERY_PROCESSES=apart,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(set(pg_cdr_ids(pg_dsn))) == 5


@APART
def test_an_import_that_outgrows_its_spool_while_the_sink_is_down_gives_up_in_time(
    tmp_path: Path, apart: str
) -> None:
    capture = tmp_path / "calls.pcap"
    write_capture(capture, 1500)
    started = time.monotonic()
    done = run_import(
        tmp_path,
        capture,
        "--delivery-timeout",
        "2",
        SIPCDR_SINKS__POSTGRES__DSN="postgresql://postgres@127.0.0.1:1/none",
        SIPCDR_SINKS__JSONL__PATH="",
        SIPCDR_SPOOL__DELIVERY_PROCESSES=apart,
        SIPCDR_SPOOL__MAX_BYTES=str(1024 * 1024),
        SIPCDR_SPOOL__SIGNALING_MAX_BYTES=str(1024 * 1024),
        SIPCDR_SPOOL__SEGMENT_BYTES=str(64 * 1024),
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 1
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["aborted"] == "the spool stayed full and the sinks took nothing for 2 s"
    assert 0 < summary["sip_messages"] < 1500 * MESSAGES_PER_CALL  # how far it got
    assert elapsed < 30  # one timeout, not a second one for the drain


def test_an_import_waits_while_the_disk_refuses_cdrs_and_loses_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk refuses every spool write for the import's first second: the CDRs
    closed meanwhile wait in the reserve, parsing waits for the disk, and once it
    takes writes again every CDR arrives."""
    calls = 600
    capture = tmp_path / "calls.pcap"
    write_capture(capture, calls)
    config = Config(
        sinks=SinksConfig(
            jsonl=JsonlConfig(path=str(tmp_path / "cdrs.jsonl")),
            postgres=PostgresConfig(dsn=""),
        ),
        state=StateConfig(dir=tmp_path / "var"),
    )
    real_write = os.write
    disk_full = threading.Event()
    disk_full.set()
    refused: list[int] = []
    record_start = MAGIC.to_bytes(2, "little")

    def full_disk_for_spool_records(fd: int, data: bytes) -> int:
        if disk_full.is_set() and bytes(data[:2]) == record_start:
            refused.append(len(data))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk_for_spool_records)
    threading.Timer(1.0, disk_full.clear).start()
    started = time.monotonic()
    summary = import_files(config, [capture], progress=False, delivery_timeout_s=30)
    assert time.monotonic() - started >= 1.0  # it waited for the disk
    assert len(refused) > 5  # each retry of the reserve, refused
    assert summary["cdrs_written"] == calls
    assert summary["spool_refused"] == {}
    assert summary["undelivered"] == {}
    lines = (tmp_path / "cdrs.jsonl").read_bytes().splitlines()
    assert len({json.loads(line)["cdr_id"] for line in lines}) == calls


@APART
def test_an_import_onto_a_disk_smaller_than_the_signaling_floor_delivers_everything(
    tmp_path: Path, pg_dsn: str, small_disk: SmallDisk, apart: str
) -> None:
    """32 MiB of state disk, the default 1 GiB floor: the import never has the room the
    floor asks for, so it waits for its sinks slice by slice instead of refusing
    signaling."""
    disk = small_disk(tmp_path / "disk", 32 * 1024 * 1024)
    calls = 300
    capture = tmp_path / "calls.pcap"
    write_capture(capture, calls)
    done = run_import(
        tmp_path,
        capture,
        SIPCDR_STATE__DIR=str(disk / "var"),
        SIPCDR_SINKS__POSTGRES__DSN=pg_dsn,
        SIPCDR_SINKS__JSONL__PATH="",
        SIPCDR_SPOOL__DELIVERY_PROCESSES=apart,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("import_delivery_process_started" in done.stderr) == (apart == "1")
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["spool_refused"] == {}
    assert summary["undelivered"] == {}
    assert pg_count(pg_dsn, "sip_messages") == calls * MESSAGES_PER_CALL
    assert len(set(pg_cdr_ids(pg_dsn))) == calls


def write_ringing_capture(path: Path, calls: int) -> None:
    """`calls` INVITEs nobody answers, 1 ms apart, then an OPTIONS 200 s later: one
    timer run closes every call at once."""
    caller, callee = socket.inet_aton("192.0.2.10"), socket.inet_aton("203.0.113.20")
    with path.open("wb") as handle:
        writer = dpkt.pcap.Writer(handle)
        stamp = 1_795_000_000.0
        datas = [
            Call(call_id=f"ring-{n}@x", from_tag=f"r{n}").request("INVITE") for n in range(calls)
        ]
        datas.append(Call(call_id="ping@x").request("OPTIONS"))
        for n, data in enumerate(datas):
            udp = dpkt.udp.UDP(sport=5060, dport=5060, data=data)
            udp.ulen = len(udp)
            ip = dpkt.ip.IP(src=caller, dst=callee, p=dpkt.ip.IP_PROTO_UDP, data=udp)
            ip.len = len(ip)
            frame = dpkt.ethernet.Ethernet(type=dpkt.ethernet.ETH_TYPE_IP, data=ip)
            writer.writepkt(bytes(frame), ts=stamp + (200.0 if n == calls else n / 1000))
        writer.close()


def test_a_timer_run_closing_more_calls_than_a_slice_waits_for_a_refusing_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 5000
    capture = tmp_path / "calls.pcap"
    write_ringing_capture(capture, calls)
    config = Config(
        sinks=SinksConfig(
            jsonl=JsonlConfig(path=str(tmp_path / "cdrs.jsonl")),
            postgres=PostgresConfig(dsn=""),
        ),
        spool=SpoolConfig(cdr_reserve_records=100),
        state=StateConfig(dir=tmp_path / "var"),
    )
    real_write = os.write
    disk_full = threading.Event()
    disk_full.set()
    record_start = MAGIC.to_bytes(2, "little")

    def full_disk_for_spool_records(fd: int, data: bytes) -> int:
        if disk_full.is_set() and bytes(data[:2]) == record_start:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk_for_spool_records)
    threading.Timer(1.0, disk_full.clear).start()
    summary = import_files(config, [capture], progress=False, delivery_timeout_s=30)
    assert summary["cdrs_written"] == calls
    assert summary["spool_refused"] == {}
    lines = (tmp_path / "cdrs.jsonl").read_bytes().splitlines()
    records = [json.loads(line) for line in lines]
    # The fraud detectors run on an import too: their alerts share the file.
    assert len({r["cdr_id"] for r in records if "alert_id" not in r}) == calls


# Delivered from a process of its own, to a database that is down.
APART_DATABASE_DOWN = {
    "SIPCDR_SINKS__POSTGRES__DSN": "postgresql://postgres@127.0.0.1:1/none",
    "SIPCDR_SINKS__JSONL__PATH": "",
    "SIPCDR_SPOOL__DELIVERY_PROCESSES": "1",
}


def wait_until_reading(importing: subprocess.Popen[str], workdir: Path) -> Path:
    """Its import spool, once it holds CDRs: the import reads packets, past its
    delivery process's start."""
    spools = workdir / "var" / "import-spool"
    deadline = time.monotonic() + 60
    while not any(s.stat().st_size for s in spools.glob("*/records/*.seg")):
        assert time.monotonic() < deadline and importing.poll() is None
        time.sleep(0.05)
    return spools


def spawned_children(pid: int) -> list[int]:
    """The processes `pid` started with multiprocessing's spawn."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    found = []
    for child in map(int, children):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
    return found


def test_an_import_whose_delivery_process_dies_says_so_at_once(tmp_path: Path) -> None:
    """Killed while the import waits for it (its database down, the spool full): the
    import does not wait out its delivery timeout, and names what was not delivered."""
    capture = tmp_path / "calls.pcap"
    write_capture(capture, 1500)
    command = [sys.executable, "-m", "sipcdr.cli", "import", str(capture)]
    env = daemon_environ(
        **APART_DATABASE_DOWN,
        SIPCDR_SPOOL__MAX_BYTES=str(1024 * 1024),
        SIPCDR_SPOOL__SIGNALING_MAX_BYTES=str(1024 * 1024),
        SIPCDR_SPOOL__SEGMENT_BYTES=str(64 * 1024),
    )
    options = ["--delivery-timeout", "200", "--summary-json", "s.json"]
    started = time.monotonic()
    with subprocess.Popen(
        [*command, *options], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    ) as importing:
        spools = wait_until_reading(importing, tmp_path)
        (delivering,) = spawned_children(importing.pid)
        os.kill(delivering, signal.SIGKILL)
        _, stderr = importing.communicate(timeout=120)
    assert importing.returncode == 1, stderr[-3000:]
    assert time.monotonic() - started < 60  # not the delivery timeout's 200 s
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["aborted"] == (
        "the delivery process ended, or stopped answering, before the import did"
    )
    assert summary["undelivered"]["postgres/records"] > 0
    assert not any(spools.iterdir())  # its spool removed all the same


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":  # ended, its parent not reaped it yet
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("stop", ["ctrl_c", "import_killed"])
def test_an_import_stopped_while_it_drains_leaves_no_delivery_process(
    tmp_path: Path, stop: str
) -> None:
    """The database down, the import waits for its delivery to drain: Ctrl-C ends both
    at once, and a killed import's delivery process ends on its own."""
    capture = tmp_path / "calls.pcap"
    write_capture(capture, 50)
    command = [sys.executable, "-m", "sipcdr.cli", "import", str(capture)]
    env = daemon_environ(**APART_DATABASE_DOWN)
    with subprocess.Popen(
        [*command, "--delivery-timeout", "200"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, as a terminal's
    ) as importing:
        wait_until_reading(importing, tmp_path)
        time.sleep(1.0)  # 50 calls are read at once: it waits in the drain now
        (delivering,) = spawned_children(importing.pid)
        stopped = time.monotonic()
        if stop == "ctrl_c":
            os.killpg(importing.pid, signal.SIGINT)
            _, stderr = importing.communicate(timeout=60)
            assert importing.returncode == 130, stderr[-3000:]
            assert time.monotonic() - stopped < 10  # not the 20 s of a stop by force
        else:
            importing.kill()
            importing.wait(timeout=10)
    assert gone_within(delivering, 10), "the delivery process outlived its import"


def test_ctrl_c_while_the_delivery_process_starts_ends_both_at_once(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Its sinks wait on a migration another session holds the lock of: Ctrl-C does
    not wait for a process that is not reading its pipe yet."""
    capture = tmp_path / "calls.pcap"
    write_capture(capture, 5)
    holder = HeldMigrationLock(pg_dsn)
    try:
        with subprocess.Popen(
            [sys.executable, "-m", "sipcdr.cli", "import", str(capture)],
            cwd=tmp_path,
            env=daemon_environ(
                SIPCDR_SINKS__POSTGRES__DSN=pg_dsn,
                SIPCDR_SINKS__JSONL__PATH="",
                SIPCDR_SPOOL__DELIVERY_PROCESSES="1",
            ),
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        ) as importing:
            deadline = time.monotonic() + 60
            while not spawned_children(importing.pid):
                assert time.monotonic() < deadline and importing.poll() is None
                time.sleep(0.05)
            (delivering,) = spawned_children(importing.pid)
            time.sleep(2.0)  # in its start, waiting for the lock
            assert importing.poll() is None
            stopped = time.monotonic()
            os.killpg(importing.pid, signal.SIGINT)
            _, stderr = importing.communicate(timeout=60)
        assert importing.returncode == 130, stderr[-3000:]
        assert time.monotonic() - stopped < 10  # not the 20 s grace of a drain
        assert gone_within(delivering, 10)
    finally:
        holder.release()


class HeldMigrationLock:
    """A session holding the schema migrations' advisory lock until `release`, from a
    thread of its own: a migration anywhere waits for it meanwhile."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._held = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._hold()), daemon=True)
        self._thread.start()
        assert self._held.wait(30), "the lock was not taken"

    async def _hold(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
            self._held.set()
            await asyncio.to_thread(self._release.wait)
        finally:
            await conn.close()

    def release(self) -> None:
        self._release.set()
        self._thread.join(30)


@APART
@pytest.mark.parametrize("to", ["import", "group"])
def test_sigterm_stops_an_import_as_ctrl_c_does(open_tmp_path: Path, apart: str, to: str) -> None:
    """A service manager's SIGTERM to the import alone, or `timeout`'s to its whole
    group: its embedded PostgreSQL is stopped, its spool removed and its delivery
    process ended, instead of the process vanishing where it stood."""
    capture = open_tmp_path / "calls.pcap"
    write_capture(capture, 20_000)
    env = daemon_environ(
        SIPCDR_SINKS__POSTGRES__DSN="embedded",
        SIPCDR_SINKS__JSONL__PATH="",
        SIPCDR_SPOOL__DELIVERY_PROCESSES=apart,
    )
    with subprocess.Popen(
        [sys.executable, "-m", "sipcdr.cli", "import", str(capture)],
        cwd=open_tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as importing:
        spools = wait_until_reading(importing, open_tmp_path)
        postmaster = int((open_tmp_path / "var" / "pg" / "postmaster.pid").read_text().split()[0])
        delivering = spawned_children(importing.pid)
        assert len(delivering) == int(apart)
        if to == "group":
            os.killpg(importing.pid, signal.SIGTERM)
        else:
            importing.send_signal(signal.SIGTERM)
        _, stderr = importing.communicate(timeout=60)
    assert importing.returncode == 143, stderr[-3000:]
    assert "sipcdr: import: terminated; run it again" in stderr
    assert "Traceback" not in stderr
    assert gone_within(postmaster, 10), "the embedded PostgreSQL outlived its import"
    assert all(gone_within(pid, 10) for pid in delivering)
    assert not any(spools.iterdir())
