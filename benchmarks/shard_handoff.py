"""What spreading capture over several cores would cost, before building it: one
receiver that finds each message's Call-ID and hands the datagram to the shard that
owns it, against the work a shard then does (parse + correlate), in the same run.

The kernel cannot shard for us: SO_REUSEPORT spreads datagrams by their addresses,
and a mirrored dialog's messages come from several addresses (both directions, every
proxy leg) while a HEP agent sends everything from one; only the Call-ID keeps a
dialog on one correlator. So a sharded capture is a dispatcher in front of N shard
processes, and this prints the dispatcher's cost per message for two hand-offs:

- `sendto` per message over an AF_UNIX datagram socket (one syscall per message);
- batched: length-prefixed messages gathered per receive batch and written to a
  pipe in one `os.write` (what a dispatcher draining its socket per wake-up would do);
- and, for each, the shard's cost of reading the messages back.

Each figure is processor time per message, median of `--rounds`; each shard process
reports its own processor time when it has read its share. The baseline, parse +
correlate of the same messages, is timed in the same rounds. Receiving from the
network is left out of every figure: the single-process daemon pays it too.

    python benchmarks/shard_handoff.py [--flows 3000] [--rounds 7] [--shards 2]
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import statistics
import struct
import sys
import time
import zlib
from collections.abc import Callable
from multiprocessing import Pipe, get_context
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fraud import Traffic
from sipcdr.dialog import Correlator
from sipcdr.model import Packet
from sipcdr.sip import parse

BATCH = 64  # datagrams a dispatcher drains per wake-up at ~15,000 msg/s with 4 ms turns
LENGTH = struct.Struct("<I")
CALL_ID_HEADERS = (b"\r\nCall-ID:", b"\r\ni:", b"\r\ncall-id:", b"\r\nCALL-ID:", b"\r\nCall-Id:")


def call_id_of(data: bytes) -> bytes:
    """The Call-ID value by bytes.find: the spellings seen on the wire, compact form
    included; a dispatcher that found none would hand the message to shard 0, whose
    parser rejects or counts it as the single-process daemon does."""
    for name in CALL_ID_HEADERS:
        start = data.find(name)
        if start >= 0:
            start += len(name)
            end = data.find(b"\r\n", start)
            return data[start:end].strip()
    return b""


def shard_of(data: bytes, shards: int) -> int:
    return zlib.crc32(call_id_of(data)) % shards


def _drain_datagrams(fd: int, expected: int, report: Connection) -> None:
    started = time.process_time()
    sock = socket.socket(fileno=fd)
    for _ in range(expected):
        sock.recv(65536)
    report.send(time.process_time() - started)


def _drain_batches(fd: int, expected: int, report: Connection) -> None:
    started = time.process_time()
    _split_batches(fd, expected)
    report.send(time.process_time() - started)


def _split_batches(fd: int, expected: int) -> None:
    taken = 0
    pending = b""
    while taken < expected:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return
        data = pending + chunk if pending else chunk
        view = memoryview(data)
        offset = 0
        while offset + 4 <= len(data):
            (size,) = LENGTH.unpack_from(data, offset)
            if offset + 4 + size > len(data):
                break
            bytes(view[offset + 4 : offset + 4 + size])
            offset += 4 + size
            taken += 1
        pending = data[offset:]


def _time_sendto(payloads: list[bytes], shards: int) -> tuple[float, float]:
    """Dispatcher and shard CPU per message, one datagram per message."""
    context = get_context("fork")
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(shards)]
    for ours, _theirs in pairs:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    counts = [0] * shards
    for data in payloads:
        counts[shard_of(data, shards)] += 1
    workers = []
    for (_ours, theirs), count in zip(pairs, counts, strict=True):
        receive, report = Pipe(duplex=False)
        worker = context.Process(target=_drain_datagrams, args=(theirs.fileno(), count, report))
        worker.start()
        workers.append((worker, receive))
    senders = [ours.send for ours, _theirs in pairs]
    started = time.process_time()
    for data in payloads:
        senders[zlib.crc32(call_id_of(data)) % shards](data)
    dispatcher = time.process_time() - started
    shard = 0.0
    for worker, receive in workers:
        shard += receive.recv()
        worker.join()
    for ours, theirs in pairs:
        ours.close()
        theirs.close()
    return dispatcher / len(payloads), shard / len(payloads)


def _time_batched(payloads: list[bytes], shards: int) -> tuple[float, float]:
    """Dispatcher and shard CPU per message, messages gathered per receive batch."""
    context = get_context("fork")
    pipes = [os.pipe() for _ in range(shards)]
    counts = [0] * shards
    for data in payloads:
        counts[shard_of(data, shards)] += 1
    workers = []
    for (read_end, _write_end), count in zip(pipes, counts, strict=True):
        receive, report = Pipe(duplex=False)
        worker = context.Process(target=_drain_batches, args=(read_end, count, report))
        worker.start()
        workers.append((worker, receive))
    outs = [bytearray() for _ in range(shards)]
    pack = LENGTH.pack
    started = time.process_time()
    for begin in range(0, len(payloads), BATCH):
        for data in payloads[begin : begin + BATCH]:
            out = outs[zlib.crc32(call_id_of(data)) % shards]
            out += pack(len(data))
            out += data
        for (_read_end, write_end), out in zip(pipes, outs, strict=True):
            if out:
                os.write(write_end, out)
                out.clear()
    dispatcher = time.process_time() - started
    for _read_end, write_end in pipes:
        os.close(write_end)
    shard = 0.0
    for worker, receive in workers:
        shard += receive.recv()
        worker.join()
    for read_end, _write_end in pipes:
        os.close(read_end)
    return dispatcher / len(payloads), shard / len(payloads)


def _time_parse_correlate(packets: list[Packet]) -> float:
    correlator = Correlator()
    feed = correlator.feed
    started = time.process_time()
    for packet in packets:
        feed(packet, parse(packet.payload))
    return (time.process_time() - started) / len(packets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args()
    traffic = Traffic(args.flows)
    packets = [packet for packet, _trunk in traffic.items]
    payloads = [packet.payload for packet in packets]
    assert all(call_id_of(data) for data in payloads)
    figures: dict[str, list[float]] = {}
    gc.disable()
    for round_number in range(args.rounds):
        timings: list[tuple[str, Callable[[], tuple[float, float]]]] = [
            ("parse + correlate (baseline)", lambda: (_time_parse_correlate(packets), 0.0)),
            ("hand-off: sendto per message", lambda: _time_sendto(payloads, args.shards)),
            ("hand-off: batched pipe writes", lambda: _time_batched(payloads, args.shards)),
        ]
        for name, timing in timings if round_number % 2 else reversed(timings):
            dispatcher, shard = timing()
            figures.setdefault(name, []).append(dispatcher)
            if shard:
                figures.setdefault(f"{name}, the shard's read", []).append(shard)
        gc.collect()
    gc.enable()
    baseline = statistics.median(figures["parse + correlate (baseline)"])
    print(
        f"median of {args.rounds} rounds, {len(payloads):,} messages, {args.shards} shards; "
        "processor time per message"
    )
    for name, values in figures.items():
        median = statistics.median(values)
        rate = 1 / median if median else 0.0
        print(
            f"  {name:<45} {median * 1e6:6.2f} us  {median / baseline * 100:5.1f}% of baseline"
            f"  ({rate:,.0f} msg/s of one core)"
        )


if __name__ == "__main__":
    main()
