from __future__ import annotations
import os, signal, time, stat
from pathlib import Path
import pytest
from daemonproc import start_daemon, wait_for, Daemon
from test_delivery_process import delivery_pids, send_calls, closed_cdrs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

def test_parent_killed(tmp_path: Path, daemons: list[Daemon]) -> None:
    d = start_daemon(tmp_path)
    daemons.append(d)
    wait_for(lambda: len(delivery_pids(d)) == 1)
    child = delivery_pids(d)[0]
    for p in sorted((tmp_path).rglob("*")):
        m = p.lstat().st_mode
        if (stat.S_ISREG(m) and m & 0o077) or (stat.S_ISDIR(m) and m & 0o077):
            print("perm", oct(m), p)
    send_calls(d, [f"k{n}" for n in range(2000)], pace_per_s=4000)
    os.kill(d.process.pid, signal.SIGKILL)
    d.process.wait()
    t = time.monotonic()
    d2 = start_daemon(tmp_path)
    daemons.append(d2)
    print("child alive after new start", Path(f"/proc/{child}").exists())
    while Path(f"/proc/{child}").exists() and time.monotonic() - t < 60:
        time.sleep(0.2)
    print("old child ended after", time.monotonic() - t, Path(f"/proc/{child}").exists())
    time.sleep(3)
    ids = [str(r["cdr_id"]) for r in d2.cdrs()]
    print("jsonl", len(ids), len(set(ids)))
    print(d2.metric("sipcdr_cdrs_total"), [l for l in d2.metrics().splitlines() if l.startswith("sipcdr_sink_records_total") or l.startswith("sipcdr_sink_lag")])
    assert d2.stop() == 0
    ids = [str(r["cdr_id"]) for r in d2.cdrs()]
    print("final jsonl", len(ids), len(set(ids)))
    for p in sorted((tmp_path).rglob("*")):
        m = p.lstat().st_mode
        if (stat.S_ISREG(m) and m & 0o077) or (stat.S_ISDIR(m) and m & 0o077):
            print("perm", oct(m), p)
