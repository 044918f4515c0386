"""What keeping open calls across a crash costs, in one run.

Per SIP message, the daemon's path (parse, correlate, CDR appended to the spool)
against the same path with the dialog journal:

- write per record (`[state] journal_batch = false`): one `write` per message that
  changed a call and per close (SIGKILL-safe at once)
- per turn (the default): the records of one event loop turn in one `write` at its
  end, and before any CDR goes to the spool file; here a turn takes `--turn` messages,
  as a wake-up of the receive loop takes several datagrams
- per turn, the former appender (kept here, `FormerStore`): each record through
  `_append`, the end-of-turn write queued again after every write the barrier or a
  close record made, the four strings of each message encoded afresh; its journal
  must hold the very bytes the current one writes

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
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dialogs import _flow, _packet
from sipcdr.dialog import Correlator, DialogLimits
from sipcdr.dialogstore import DialogStore
from sipcdr.dialogstore.appender import BATCH_MAX_BYTES, BATCH_MAX_RECORDS
from sipcdr.dialogstore.journal import (
    _FRAME,
    _MESSAGE,
    _TEXT,
    KIND_CLOSED,
    KIND_MESSAGE,
    MAX_RECORD_BYTES,
    closed_record,
)
from sipcdr.model import Cdr, Packet
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


def _former_message_record(packet: Packet) -> bytes | None:
    timestamp, src_ip, src_port, dst_ip, dst_port, transport, payload, node = packet
    src = src_ip.encode("utf-8", _TEXT)
    dst = dst_ip.encode("utf-8", _TEXT)
    proto = transport.encode("utf-8", _TEXT)
    capture_node = node.encode("utf-8", _TEXT)
    try:
        head = _MESSAGE.pack(
            KIND_MESSAGE,
            timestamp,
            src_port,
            dst_port,
            len(capture_node),
            len(src),
            len(dst),
            len(proto),
        )
    except struct.error:
        return None
    return b"".join((head, src, dst, proto, capture_node, payload))


class FormerStore(DialogStore):
    """The store with the appender as it was: every record through `_append`, counted
    by kind in a list, the end-of-turn write queued again after every earlier write."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._pending_kinds = [0, 0, 0]
        self._write_scheduled = False

    def message(self, packet: Packet) -> None:
        record = _former_message_record(packet)
        if record is None:
            self.stats.journal_write_errors += 1
            self._intact = False
            return
        self._former_append(record, 0)

    def closed(self, cdr: Cdr) -> None:
        if self._stopped:
            return
        self._former_append(closed_record(cdr, max(cdr.end_time, self.correlator.now)), 1)
        if self._pending:
            self.write_pending()

    def _former_append(self, body: bytes, kind: int) -> None:
        length = len(body)
        if length > MAX_RECORD_BYTES:
            self.stats.journal_write_errors += 1
            self._intact = False
            return
        pending = self._pending
        pending.append(_FRAME.pack(zlib.crc32(body), length))
        pending.append(body)
        self._pending_bytes += length + _FRAME.size
        self._pending_kinds[kind] += 1
        if self._write_scheduled:
            if len(pending) >= 2 * BATCH_MAX_RECORDS or self._pending_bytes >= BATCH_MAX_BYTES:
                self.write_pending()
            return
        if self.batch_writes:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                pass
            else:
                loop.call_soon(self.write_pending)
                self._write_scheduled = True
                return
        self.write_pending()

    def write_pending(self) -> None:
        self._write_scheduled = False
        pending = self._pending
        if not pending:
            return
        kinds, length = self._pending_kinds, self._pending_bytes
        self._pending, self._pending_bytes, self._pending_kinds = [], 0, [0, 0, 0]
        written = self._write(pending, length)
        stats = self.stats
        if written == length:
            stats.journal_messages += kinds[0]
            stats.journal_closes += kinds[1]
            stats.journal_decisions += kinds[2]
            return
        at = 0
        for index in range(0, len(pending), 2):
            size = len(pending[index]) + len(pending[index + 1])
            if at + size > written:
                stats.journal_write_errors += (len(pending) - index) // 2
                break
            at += size
            kind = pending[index + 1][0]
            if kind == KIND_MESSAGE:
                stats.journal_messages += 1
            elif kind == KIND_CLOSED:
                stats.journal_closes += 1
            else:
                stats.journal_decisions += 1
        self._intact = False


def per_message_us(
    flows: list[list[bytes]],
    directory: Path,
    journal: bool | None,
    turn: int,
    store_class: type[DialogStore] = DialogStore,
) -> float:
    """Microseconds per message through the daemon's pipeline, CDRs to a real spool, an
    event loop turn every `turn` messages; `journal`: none, or batched per turn."""
    return asyncio.run(_per_message_us(flows, directory, journal, turn, store_class))


async def _per_message_us(
    flows: list[list[bytes]],
    directory: Path,
    journal: bool | None,
    turn: int,
    store_class: type[DialogStore],
) -> float:
    correlator = Correlator()
    spool = Spool(directory / "spool", ("bench",))
    spool.open()
    writer = SpoolCdrWriter(spool)
    pipeline = Pipeline(correlator, [writer])
    store = None
    if journal is not None:
        store = store_class(directory / "dialogs", correlator, batch_writes=journal)
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


def appender_calls(flows: list[list[bytes]]) -> list[tuple[str, Any]]:
    """The journal's calls as the daemon makes them for `flows`: each message that
    changed a call, then for each CDR the barrier and the close record."""
    correlator = Correlator()
    calls: list[tuple[str, Any]] = []
    for n, flow in enumerate(flows):
        for data in flow:
            packet = _packet(1_700_000_000.0 + n, data)
            closed = correlator.feed(packet, parse(data))
            if correlator.changed:
                calls.append(("message", packet))
            calls.extend(("cdr", cdr) for cdr in closed)
    return calls


def appender_us(
    calls: list[tuple[str, Any]], directory: Path, store_class: type[DialogStore], turn: int
) -> float:
    """CPU microseconds per journal record of the appender alone (its writes included),
    fed `calls` with an event loop turn every `turn` messages, on the daemon's event
    loop (uvloop, where installed)."""
    try:
        import uvloop  # as the daemon: only where installed
    except ImportError:
        return asyncio.run(_appender_us(calls, directory, store_class, turn))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_appender_us(calls, directory, store_class, turn))


async def _appender_us(
    calls: list[tuple[str, Any]], directory: Path, store_class: type[DialogStore], turn: int
) -> float:
    directory.mkdir()
    store = store_class(directory, Correlator(), batch_writes=True)
    store.recover()
    await _start(store)
    message, barrier, closed = store.message, store.barrier.write, store.closed
    started = time.process_time()
    for at in range(0, len(calls), turn):
        for what, item in calls[at : at + turn]:
            if what == "message":
                message(item)
            else:
                barrier(item)
                closed(item)
        await asyncio.sleep(0)
    elapsed = time.process_time() - started
    records = store.stats.journal_messages + store.stats.journal_closes
    os.close(store._fd)
    return elapsed / records * 1e6


def same_journal(ours: Path, former: Path) -> None:
    """The current appender writes the very bytes the former one did."""
    mine = sorted(ours.glob("**/*.journal"))
    theirs = sorted(former.glob("**/*.journal"))
    if [p.read_bytes() for p in mine] != [p.read_bytes() for p in theirs]:
        sys.exit("the journal differs from the former appender's")


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
    results: dict[str, list[float]] = {"baseline": [], "write": [], "turn": [], "former": []}
    added: dict[str, list[float]] = {"turn": [], "former": []}
    with tempfile.TemporaryDirectory() as tmp:
        contenders: list[tuple[str, bool | None, type[DialogStore]]] = [
            ("baseline", None, DialogStore),
            ("write", False, DialogStore),
            ("turn", True, DialogStore),
            ("former", True, FormerStore),
        ]
        for round_no in range(opts.rounds):
            # Each round in another order: a drift of the machine spreads evenly.
            shift = round_no % len(contenders)
            for name, journal, kind in contenders[shift:] + contenders[:shift]:
                directory = Path(tmp) / f"{name}{round_no}"
                directory.mkdir()
                results[name].append(per_message_us(flows, directory, journal, opts.turn, kind))
            for name, costs in added.items():
                costs.append(results[name][-1] - results["baseline"][-1])
            same_journal(Path(tmp) / f"turn{round_no}", Path(tmp) / f"former{round_no}")
        base = statistics.median(results["baseline"])
        print(
            f"median of {opts.rounds} rounds, {opts.flows} call flows of 7 messages each, "
            f"{opts.turn} messages an event loop turn"
        )
        print(f"  parse + correlate + spool  {base:>6.2f} us/msg  (baseline)")
        for name, label in (
            ("write", "write per record"),
            ("turn", "write per turn"),
            ("former", "per turn, former"),
        ):
            cost = statistics.median(results[name])
            print(
                f"  + journal, {label:<16}{cost:>6.2f} us/msg  {cost / base:.2f}x"
                f"  (+{cost - base:.2f} us/msg, {(cost - base) * 7 / 5:.2f} us a record)"
            )
        now, former = statistics.median(added["turn"]), statistics.median(added["former"])
        ratios = [n / f for n, f in zip(added["turn"], added["former"], strict=True) if f > 0]
        whole = statistics.median(results["turn"]) / statistics.median(results["former"])
        # A round whose former journal cost nothing over the baseline (noise on a
        # loaded machine, a quick run) gives no ratio.
        per_round_text = (
            f"median {statistics.median(ratios):.2f}x, {min(ratios):.2f}-{max(ratios):.2f}x"
            if ratios
            else "no round measured the former above the baseline"
        )
        against = f"{now / former:.2f}x" if former > 0 else "former not above the baseline"
        print(
            f"  the journal's own cost per turn: {now:.2f} us/msg against {former:.2f} with"
            f" the former appender ({against}; per round: {per_round_text});"
            f" whole path {whole:.2f}x"
            f" (load {os.getloadavg()[0]:.1f})"
        )
        calls = appender_calls(flows)
        alone: dict[str, list[float]] = {"now": [], "former": []}
        pairs = [("now", DialogStore), ("former", FormerStore)]
        for round_no in range(opts.rounds * 3):
            for name, kind in pairs if round_no % 2 else pairs[::-1]:
                where = Path(tmp) / f"alone-{name}{round_no}"
                alone[name].append(appender_us(calls, where, kind, opts.turn))
            same_journal(Path(tmp) / f"alone-now{round_no}", Path(tmp) / f"alone-former{round_no}")
        now, former = statistics.median(alone["now"]), statistics.median(alone["former"])
        per_round = [n / f for n, f in zip(alone["now"], alone["former"], strict=True)]
        print(
            f"the appender alone (its calls as the daemon makes them, writes included),"
            f" {opts.rounds * 3} alternated rounds: {now:.2f} us a record against {former:.2f}"
            f" with the former appender ({now / former:.2f}x; per round median"
            f" {statistics.median(per_round):.2f}x, {min(per_round):.2f}-{max(per_round):.2f}x;"
            f" load {os.getloadavg()[0]:.1f})"
        )
        directory = Path(tmp) / "checkpoint"
        directory.mkdir()
        checkpoint_and_recovery(opts.open, directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
