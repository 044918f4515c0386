"""What keeping open calls across a crash costs, in one run.

Per SIP message, the daemon's path (parse, correlate, CDR appended to the spool)
against the same path with the dialog journal:

- write per record (`[state] journal_batch = false`): one `write` per message that
  changed a call and per close (SIGKILL-safe at once)
- per turn (the default): the records of one event loop turn in one `write` at its
  end, and before any CDR goes to the spool file; here a turn takes `--turn` messages,
  as a wake-up of the receive loop takes several datagrams

Call flows are 7 messages (INVITE, 100, 180, 200, ACK, BYE, 200), of which 4 change
the call and one CDR close follows: 5 journal records a call. Then, at a number of
open calls: a checkpoint (snapshot, write, fsync, rename), and recovery (restore the
checkpoint, replay a journal).

Figures are medians of several rounds of CPU time; ratios are against the baseline of the same
round, so a noisy machine moves all of them together.

    python benchmarks/journal.py [--rounds 5] [--flows 3000] [--turn 16] [--open 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dialogs import _flow, _packet
from sipcdr.dialog import Correlator, DialogLimits
from sipcdr.dialogstore import DialogStore
from sipcdr.model import Cdr
from sipcdr.pipeline import CdrSink, Pipeline
from sipcdr.sinks.outputs import SpoolCdrWriter
from sipcdr.sip import parse
from sipcdr.spool import Spool


class _Closes:
    """A CDR sink that only journals each close, as the spool writer's hook does."""

    name = "closes"

    def __init__(self, store: DialogStore) -> None:
        self.store = store

    def write(self, cdr: Cdr) -> None:
        self.store.closed(cdr)

    def flush(self) -> None:
        return None


def per_message_us(
    flows: list[list[bytes]], directory: Path, journal: bool | None, turn: int
) -> float:
    """Microseconds per message through the daemon's pipeline, CDRs to a real spool, an
    event loop turn every `turn` messages; `journal`: none, or batched per turn."""
    return asyncio.run(_per_message_us(flows, directory, journal, turn))


async def _per_message_us(
    flows: list[list[bytes]], directory: Path, journal: bool | None, turn: int
) -> float:
    correlator = Correlator()
    spool = Spool(directory / "spool", ("bench",))
    spool.open()
    writer = SpoolCdrWriter(spool)
    pipeline = Pipeline(correlator, [writer])
    store = None
    if journal is not None:
        store = DialogStore(directory / "dialogs", correlator, batch_writes=journal)
        store.directory.mkdir()
        store.recover()
        await _start(store)
        writer.on_written = store.closed  # as the daemon: once the spool has the CDR
        # The daemon's chain: the journal's records before any CDR reaches the spool.
        sinks: list[CdrSink] = [store.barrier, writer]
        pipeline = Pipeline(correlator, sinks, journal=store.message, decided=store.decided)
    packets = [_packet(1_700_000_000.0 + n, data) for n, flow in enumerate(flows) for data in flow]
    # CPU time of this process (the writes' kernel time included): other work on a
    # shared machine does not count against a contender.
    started = time.process_time()
    for at in range(0, len(packets), turn):
        for packet in packets[at : at + turn]:
            pipeline.process(packet)
        await asyncio.sleep(0)
    elapsed = time.process_time() - started
    spool.close()
    if store is not None:
        os.close(store._fd)
    return elapsed / len(packets) * 1e6


async def _start(store: DialogStore) -> None:
    await store.start()
    assert store._task is not None
    store._task.cancel()  # the benchmark writes; no fsync timer between rounds


def open_calls(count: int) -> Correlator:
    correlator = Correlator(DialogLimits(max_open_dialogs=count + 1))
    for n in range(count):
        flow = _flow(n)
        for data in flow[:4] if n % 2 else flow[:3]:  # half answered, half ringing
            correlator.feed(_packet(1_700_000_000.0 + n * 0.001, data), parse(data))
    return correlator


def timed(action: Callable[[], object], clock: Callable[[], float] = time.process_time) -> float:
    """CPU time by default: what intake waits for, without the machine's other work."""
    started = clock()
    action()
    return clock() - started


def checkpoint_and_recovery(count: int, directory: Path) -> None:
    correlator = open_calls(count)
    store = DialogStore(directory, correlator)
    store.recover()
    asyncio.run(_start(store))
    # As the daemon's periodic checkpoint does: the snapshot and the journal switch on
    # the event loop (intake waits), the file written and fsynced in a thread.
    plans = []
    blocked = timed(lambda: plans.append(store._begin(final=False)))
    plan = plans[0]
    assert plan is not None
    written = timed(lambda: store._write_file(plan), time.perf_counter)
    store._finish(plan, None)
    size = sum(path.stat().st_size for path in directory.glob("*.json"))
    # A journal of whole calls after the checkpoint, then recovery from both.
    flows = [_flow(count + n) for n in range(count // 10)]
    pipeline = Pipeline(correlator, [_Closes(store)], journal=store.message)
    for n, flow in enumerate(flows):
        for data in flow:
            pipeline.process(_packet(1_700_001_000.0 + n * 0.001, data))
    records = store.stats.journal_messages + store.stats.journal_closes
    os.close(store._fd)
    fresh = DialogStore(directory, Correlator(DialogLimits(max_open_dialogs=count + 1)))
    recovery = timed(fresh.recover)
    print(f"at {count:,} open calls (half answered), checkpoint of {size / count:,.0f} B a call:")
    print(f"  snapshot + journal switch  {blocked * 1000:>8.0f} ms (intake waits)")
    print(f"  file write + fsync         {written * 1000:>8.0f} ms (in a thread, wall clock)")
    print(
        f"  recovery: checkpoint + {records:,} journal records"
        f" {recovery * 1000:>8.0f} ms ({fresh.correlator.open_dialogs:,} calls open)"
    )


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--rounds", type=int, default=5)
    args.add_argument("--flows", type=int, default=3000, help="call flows per round")
    args.add_argument("--open", type=int, default=100_000, help="open calls to checkpoint")
    args.add_argument("--turn", type=int, default=16, help="messages per event loop turn")
    opts = args.parse_args(argv)

    flows = [_flow(n) for n in range(opts.flows)]
    results: dict[str, list[float]] = {"baseline": [], "write": [], "turn": []}
    with tempfile.TemporaryDirectory() as tmp:
        contenders: list[tuple[str, bool | None]] = [
            ("baseline", None),
            ("write", False),
            ("turn", True),
        ]
        for round_no in range(opts.rounds):
            # Each round in another order: a drift of the machine spreads evenly.
            shift = round_no % len(contenders)
            for name, journal in contenders[shift:] + contenders[:shift]:
                directory = Path(tmp) / f"{name}{round_no}"
                directory.mkdir()
                results[name].append(per_message_us(flows, directory, journal, opts.turn))
        base = statistics.median(results["baseline"])
        print(
            f"median of {opts.rounds} rounds, {opts.flows} call flows of 7 messages each, "
            f"{opts.turn} messages an event loop turn"
        )
        print(f"  parse + correlate + spool  {base:>6.2f} us/msg  (baseline)")
        for name, label in (("write", "write per record"), ("turn", "write per turn")):
            cost = statistics.median(results[name])
            print(
                f"  + journal, {label:<16}{cost:>6.2f} us/msg  {cost / base:.2f}x"
                f"  (+{cost - base:.2f} us/msg, {(cost - base) * 7 / 5:.2f} us a record)"
            )
        directory = Path(tmp) / "checkpoint"
        directory.mkdir()
        checkpoint_and_recovery(opts.open, directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
