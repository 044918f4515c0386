"""The capture process's CPU per message, one setting against another in the same run.

`sipcdr run` as in `e2e.py` (PostgreSQL with signaling kept, Kafka on tansu, JSONL,
delivery in its own process), fed by `sipcdr replay` at each rate. Each round starts
a daemon with the baseline setting and one with the contender, in turn (the order
alternates between rounds), so a burst of load from elsewhere on the machine falls on
both. Per step: the main process's CPU per message it received (that process is the
capture side: receive, parse, correlate, fraud, signaling and CDR spools, journal),
loss, and, where `perf` can count system calls, the receive wake-ups (epoll waits)
and writes (write + writev) per message.

The default compares the dialog journal written once per event loop turn
(`[state] journal_batch = true`) with one write per record (false).

    python benchmarks/capture.py [--rates 10000,15000] [--seconds 4] [--rounds 3]
        [--setting SIPCDR_STATE__JOURNAL_BATCH] [--baseline false] [--contender true]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from daemonproc import start_daemon
from e2e import TOPIC, Run, Services, Sinks, Step, machine, run_step, services
from pgserver import open_tmp_dir

SYSCALLS = {
    "wakeups": ("epoll_wait", "epoll_pwait"),
    "reads": ("recvmsg", "recvfrom", "recvmmsg"),
    "writes": ("write", "writev"),
}


@dataclass
class Counted:
    step: Step
    syscalls: dict[str, float] = field(default_factory=dict)  # per message received


@contextlib.contextmanager
def counting(pid: int) -> Iterator[dict[str, float]]:
    """System calls of `pid` (its main thread and threads) while the block runs, by
    `SYSCALLS` group; empty where perf cannot count them."""
    counts: dict[str, float] = {}
    perf = shutil.which("perf")
    if perf is None:
        yield counts
        return
    events = [f"syscalls:sys_enter_{name}" for names in SYSCALLS.values() for name in names]
    process = subprocess.Popen(
        [perf, "stat", "-x", ",", "-e", ",".join(events), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield counts
    finally:
        process.send_signal(signal.SIGINT)
        _, report = process.communicate(timeout=30)
    by_event: dict[str, float] = {}
    for line in report.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[2].startswith("syscalls:sys_enter_"):
            with contextlib.suppress(ValueError):
                by_event[parts[2].removeprefix("syscalls:sys_enter_")] = float(parts[0])
    for group, names in SYSCALLS.items():
        if any(name in by_event for name in names):
            counts[group] = sum(by_event.get(name, 0.0) for name in names)


def one_step(
    folder: Path, up: Services, env: dict[str, str], index: int, rate: int, seconds: float
) -> Counted:
    daemon = start_daemon(folder, **env)
    sinks = Sinks(up.dsn, up.bootstrap, folder / "var" / "cdrs.jsonl")
    try:
        sinks.open()
        sinks.wait_for_schema()
        run = Run(daemon, sinks, folder, daemon.endpoint("sip_udp"), False, up.others)
        time.sleep(1.0)  # the start's checkpoint and connections out of the way
        with counting(daemon.process.pid) as calls:
            step = run_step(run, index, rate, seconds)
    finally:
        sinks.close()
        daemon.stop()
    taken = max(step.received, 1.0)
    return Counted(step, {group: count / taken for group, count in calls.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="10000,15000", help="messages/s, a list")
    parser.add_argument("--seconds", type=float, default=4.0, help="each step this long")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--setting", default="SIPCDR_STATE__JOURNAL_BATCH")
    parser.add_argument("--baseline", default="false")
    parser.add_argument("--contender", default="true")
    args = parser.parse_args()
    rates = [int(rate) for rate in args.rates.split(",")]
    variants = {"baseline": args.baseline, "contender": args.contender}
    print(f"sipcdr capture process on {machine()}")
    print(
        f"{args.setting}: baseline {args.baseline}, contender {args.contender}; "
        f"{args.seconds:g} s per step, {args.rounds} rounds, alternated"
    )
    results: dict[tuple[str, int], list[Counted]] = {}
    index = 0
    with (
        tempfile.TemporaryDirectory(prefix="sipcdr-capture-") as name,
        open_tmp_dir() as pg_dir,
        services(Path(name), pg_dir) as up,
    ):
        base_env = {
            "SIPCDR_SINKS__POSTGRES__DSN": up.dsn,
            "SIPCDR_SINKS__POSTGRES__STORE_SIGNALING": "true",
            "SIPCDR_SINKS__KAFKA__BOOTSTRAP": up.bootstrap,
            "SIPCDR_SINKS__KAFKA__IDEMPOTENCE": "false",  # tansu refuses InitProducerId
            "SIPCDR_SINKS__KAFKA__TOPIC_CDRS": TOPIC,
            "SIPCDR_SINKS__KAFKA__TOPIC_FRAUD": f"{TOPIC}.fraud",
            "SIPCDR_SPOOL__DELIVERY_PROCESSES": "auto",
        }
        for round_number in range(args.rounds):
            order = list(variants.items())
            if round_number % 2:
                order.reverse()
            for rate in rates:
                for label, value in order:
                    env = {**base_env, args.setting: value}
                    counted = one_step(Path(name), up, env, index, rate, args.seconds)
                    index += 1
                    results.setdefault((label, rate), []).append(counted)
                    step = counted.step
                    calls = " ".join(f"{k} {v:.3f}" for k, v in counted.syscalls.items())
                    print(
                        f"  round {round_number + 1} {rate:>6,}/s {label:<9} capture "
                        f"{step.capture_cpu_per_k * 1000:5.1f} µs/msg, all "
                        f"{step.cpu_per_k * 1000:5.1f}; received {step.received:,.0f} of "
                        f"{step.offered:,}; {'no loss' if step.lossless else 'LOSS'}; "
                        f"per msg: {calls or 'no perf'}",
                        flush=True,
                    )
    med = statistics.median
    print(f"medians of {args.rounds} rounds (capture process CPU per message received):")
    for rate in rates:
        base = results["baseline", rate]
        other = results["contender", rate]
        base_us = med(c.step.capture_cpu_per_k * 1000 for c in base)
        other_us = med(c.step.capture_cpu_per_k * 1000 for c in other)
        line = (
            f"  {rate:>6,}/s: baseline {base_us:5.1f} µs, contender {other_us:5.1f} µs "
            f"({other_us / base_us:.2f}x); lossless runs "
            f"{sum(c.step.lossless for c in base)}/{len(base)} vs "
            f"{sum(c.step.lossless for c in other)}/{len(other)}"
        )
        for group in SYSCALLS:
            if all(group in c.syscalls for c in (*base, *other)):
                line += (
                    f"; {group}/msg {med(c.syscalls[group] for c in base):.3f}"
                    f" vs {med(c.syscalls[group] for c in other):.3f}"
                )
        print(line)


if __name__ == "__main__":
    main()
