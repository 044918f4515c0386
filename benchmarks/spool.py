"""What durability costs: spool appends against a bare `os.write` floor, in one run.

Three contenders write the same CDR-sized JSON values (~900 bytes) to a fresh file:

- floor: one `os.write` per record, no framing (what any durable file sink costs)
- spool: `Spool.append` (framing, CRC32, one write per record: the CDR stream)
- spool buffered: the signaling stream's batched writes
- spool, disk refusing: `Spool.append` while every write fails with ENOSPC, so each
  record waits in the in-memory reserve (the hot path on a full disk)
- read back: one reader taking every record in batches of 1,000 (the spool's open,
  which scans the newest segment for a torn tail, included), and the reader alone,
  the spool open before the clock starts: a window of the segment per read against
  each record read with a seek and two reads of its own (as before), alternated in
  every round

- reader, signaling: one reader taking a signaling spool's records (captured SIP
  messages as `SignalingRecorder` spools them, what the delivery process reads most)
  in batches of 1,000, as `SpoolReader` reads a window now against the window loop as
  it was (a header unpack and a CRC unpack per record, the kind checked and looked up
  apart, the record made by its generated `__new__`), alternated in every round; the
  ratio is now / before in records per second

and, against the former code kept here (`FormerSpool`: `append` calling the former
`_encode`, its pack, CRC and join looked up for every record; built on the writer's
source, since the compiled writer cannot be subclassed, so the ratio also holds what
compiling the writer gained), alternated in every
round, CPU time: the CDR stream's append, the buffered append, and the spool writer's
whole work per CDR (`SpoolCdrWriter.write`: the record, its JSON, the append) for
rated CDRs of `benchmarks/fraud.py`'s traffic; each pair must leave the same bytes in
its segments;

and, per SIP message, what keeping signaling for `sip_messages` adds to parsing:
`sip.parse` alone against parse plus `SignalingRecorder` (the captured bytes, buffered
append; `benchmarks/signaling.py` sets it against the JSON record spooled before).

Figures are the median of several rounds; the ratio is against the baseline of the
same round (the floor, or parsing alone), so a noisy machine moves all of them
together.

    python benchmarks/spool.py [--rounds 5] [--number 50000]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import os
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from samples import MESSAGES
from sipcdr.hotpath import load_interpreted
from sipcdr.model import Cdr, Packet
from sipcdr.sinks.base import KIND_CDR, KIND_SIP
from sipcdr.sinks.outputs import SpoolCdrWriter
from sipcdr.sinks.signaling import SignalingRecorder
from sipcdr.sip import parse
from sipcdr.spool import Appended, Spool
from sipcdr.spool import reader as spool_reader
from sipcdr.spool.reader import SpoolReader
from sipcdr.spool.records import (
    _CRC,
    _HEAD,
    _KIND_CODES,
    _KIND_NAMES,
    HEADER_BYTES,
    MAGIC,
    MAX_VALUE_BYTES,
)
from sipcdr.spool.records import _WRITE_BUFFER_BYTES as WRITE_BUFFER_BYTES
from sipcdr.spool.records import SpoolRecord as Record

VALUE = orjson.dumps(
    {
        "cdr_id": "6f1c1d3e-8f51-5d0b-9a55-3b0a2f1e9c11",
        "call_id": "a84b4c76e66710@pc33.atlanta.example.com",
        "caller": "4930123456",
        "callee": "4989765432",
        "from_uri": "sip:+4930123456@carrier-a.example.net",
        "to_uri": "sip:+4989765432@carrier-b.example.net",
        "request_uri": "sip:+4989765432@192.0.2.20:5060",
        "src_ip": "192.0.2.10",
        "src_port": 5060,
        "dst_ip": "192.0.2.20",
        "dst_port": 5060,
        "trunk": "carrier-a",
        "start_time": "2026-11-23T14:40:45.123456Z",
        "ring_time": "2026-11-23T14:40:45.523456Z",
        "answer_time": "2026-11-23T14:40:49.123456Z",
        "end_time": "2026-11-23T14:42:45.123456Z",
        "duration": 120.0,
        "billsec": 116.0,
        "pdd_ms": 400,
        "disposition": "answered",
        "sip_code": 200,
        "sip_reason": "OK",
        "q850_cause": 16,
        "hangup_by": "caller",
        "end_reason": "bye",
        "user_agent": "Acme-SBC/4.2",
        "rated": False,
        "fraud_flags": [],
        "capture_node": "2001",
        "schema_version": 1,
    }
)
KEY = b"a84b4c76e66710@pc33.atlanta.example.com"


# -- the former writing code, for the same-run comparison ----------------------------


def _former_encode(kind: str, key: bytes, value: bytes, seq: int, seed: int) -> bytes:
    head = _HEAD.pack(MAGIC, _KIND_CODES[kind], len(key), len(value), seq)
    crc = zlib.crc32(value, zlib.crc32(key, zlib.crc32(head, seed)))
    return b"".join((head, _CRC.pack(crc), key, value))


# The writer's source: the compiled writer cannot be subclassed.
if TYPE_CHECKING:
    _SourceSpool = Spool
else:
    _SourceSpool = load_interpreted()["sipcdr.spool.writer"].Spool


class FormerSpool(_SourceSpool):
    """`Spool.append` with the former `_encode`, on the writer's source: the ratio
    holds what compiling the writer gained too."""

    def append(self, kind: str, key: bytes, value: bytes, tag: object = None) -> Appended:
        if self.full and self.full_policy == "drop_newest":
            self._refuse("full")
            return Appended.REFUSED
        if len(key) > 0xFFFF or len(value) > MAX_VALUE_BYTES:
            self._refuse("too_large")
            return Appended.REFUSED
        if self.buffered:
            if (self.below_floor or self.room_withheld) and self.refuse_below_floor:
                self._refuse("disk_floor")
                return Appended.REFUSED
            seq = self.next_seq
            self.next_seq = seq + 1
            record = _former_encode(kind, key, value, seq, self._seed)
            self._buffer.append(record)
            self._buffered_bytes += len(record)
            if self._buffered_bytes >= WRITE_BUFFER_BYTES and not self._flush_buffer():
                return Appended.REFUSED
            return Appended.WRITTEN
        reserve = self._reserve
        record = _former_encode(kind, key, value, self.next_seq + len(reserve), self._seed)
        if not reserve and self._write_numbered([record]):
            return Appended.WRITTEN
        if len(reserve) < self.reserve_records:
            reserve.append((record, tag))
            self.stats.held += 1
            return Appended.HELD
        self._refuse("write_error")
        return Appended.REFUSED


def rated_cdrs(flows: int) -> list[Cdr]:
    """The CDRs of `benchmarks/fraud.py`'s traffic (50 trunks, one rate plan), enriched
    and rated as the engine does."""
    from fraud import Traffic, _config, _Discard
    from sipcdr.config import load_config
    from sipcdr.dialog import Correlator
    from sipcdr.engine import Destinations, build_engine
    from sipcdr.enrich import EnrichRateStage

    with tempfile.TemporaryDirectory() as folder:
        config = load_config(_config(Path(folder), False), {})
        engine = build_engine(config, Destinations(cdrs=(_Discard(),)))
        stage = EnrichRateStage(engine.enrich, engine.rates.stage)
        feed = Correlator(config.dialog, egress=bool(config.trunks)).feed
        closed: list[Cdr] = []
        for packet, _trunk in Traffic(flows).items:
            closed.extend(feed(packet, parse(packet.payload)))
        return [stage.on_cdr(cdr) for cdr in closed]


def against_former(rounds: int, number: int, flows: int) -> None:
    """Each pair alternated in every round, CPU time, the collector off while timing;
    each pair's segments must hold the same bytes."""
    cdrs = rated_cdrs(flows)
    payloads = list(MESSAGES.values())

    def appends(kind: type[Spool], buffered: bool) -> Callable[[Path], float]:
        def run(directory: Path) -> float:
            with kind(directory, ("r",), buffered=buffered) as spool:
                append = spool.append
                started = time.process_time()
                if buffered:  # the signaling stream: a captured message's size
                    for n in range(number):
                        append(KIND_SIP, KEY, payloads[n % 3])
                else:
                    for _ in range(number):
                        append(KIND_CDR, KEY, VALUE)
                return (time.process_time() - started) / number * 1e6

        return run

    def writes(kind: type[Spool]) -> Callable[[Path], float]:
        def run(directory: Path) -> float:
            with kind(directory, ("r",)) as spool:
                write = SpoolCdrWriter(spool).write
                started = time.process_time()
                for cdr in cdrs:
                    write(cdr)
                return (time.process_time() - started) / len(cdrs) * 1e6

        return run

    pairs = {
        "append, CDR stream": (appends(Spool, False), appends(FormerSpool, False)),
        "append, buffered (signaling)": (appends(Spool, True), appends(FormerSpool, True)),
        "SpoolCdrWriter.write, rated CDR": (writes(Spool), writes(FormerSpool)),
    }
    now: dict[str, list[float]] = {name: [] for name in pairs}
    former: dict[str, list[float]] = {name: [] for name in pairs}
    # One seed for every spool opened, so that both leave the same bytes.
    urandom, os.urandom = os.urandom, lambda size: bytes(range(1, size + 1))
    gc.collect()
    gc.disable()
    try:
        for round_no in range(rounds):
            with tempfile.TemporaryDirectory() as tmp:
                for index, (name, (ours, theirs)) in enumerate(pairs.items()):
                    a, b = Path(tmp) / f"now{index}", Path(tmp) / f"former{index}"
                    if round_no % 2:
                        former[name].append(theirs(b))
                        now[name].append(ours(a))
                    else:
                        now[name].append(ours(a))
                        former[name].append(theirs(b))
                    if _segments(a) != _segments(b):
                        sys.exit(f"{name}: other bytes than the former code's")
    finally:
        gc.enable()
        os.urandom = urandom
    print(
        f"against the former code, {rounds} alternated rounds, CPU time ({len(cdrs):,} rated"
        f" CDRs; load {os.getloadavg()[0]:.1f})"
    )
    for name in pairs:
        now_us, old_us = statistics.median(now[name]), statistics.median(former[name])
        per_round = [a / b for a, b in zip(now[name], former[name], strict=True)]
        print(
            f"  {name:<32}{now_us:>7.2f} us  former {old_us:>6.2f} us  {now_us / old_us:.2f}x"
            f"  (rounds {min(per_round):.2f}-{max(per_round):.2f}x)"
        )


def _segments(directory: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted(directory.glob("*.seg"))]


def floor(directory: Path, number: int) -> None:
    fd = os.open(directory / "floor", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        for _ in range(number):
            os.write(fd, VALUE)
    finally:
        os.close(fd)


def spool_append(directory: Path, number: int, *, buffered: bool = False) -> None:
    with Spool(directory / "spool", ("r",), buffered=buffered) as spool:
        append = spool.append
        for _ in range(number):
            append(KIND_CDR, KEY, VALUE)


@contextlib.contextmanager
def refusing_disk() -> Iterator[None]:
    """Every `os.write` fails as on a full disk, until the block ends."""
    real_write = os.write

    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    os.write = full
    try:
        yield
    finally:
        os.write = real_write


def spool_append_refused(directory: Path, number: int) -> None:
    spool = Spool(directory / "refused", ("r",), reserve_records=number)
    spool.open()
    append = spool.append
    with refusing_disk():
        for _ in range(number):
            append(KIND_CDR, KEY, VALUE)
        spool.flush()  # what the tick retries meanwhile
    assert spool.reserved == number
    spool.close()


def read_back(directory: Path, number: int) -> None:
    with Spool(directory / "spool", ("r",)) as spool:
        reader = spool.reader("r")
        total = 0
        while batch := reader.read(1000, 1 << 24):
            total += len(batch)
        assert total >= number


def reader_alone(directory: Path, number: int, *, by_windows: bool) -> float:
    """Records/s of the reader alone: the spool opened (and its reader made) before the
    clock starts."""
    window = spool_reader._WINDOW_BYTES
    if not by_windows:
        setattr(spool_reader, "_WINDOW_BYTES", 1)  # noqa: B010 (no record whole in a window)
    try:
        with Spool(directory / "spool", ("r", "w")) as spool:
            reader = spool.reader("r" if by_windows else "w")
            total = 0
            start = time.perf_counter()
            while batch := reader.read(1000, 1 << 24):
                total += len(batch)
            elapsed = time.perf_counter() - start
            assert total >= number
    finally:
        setattr(spool_reader, "_WINDOW_BYTES", window)  # noqa: B010
    return total / elapsed


class WindowAsBefore(SpoolReader):
    """`_read_window` as it was before one unpack per record."""

    def _read_window(
        self, end: int, limit: int, max_bytes: int, records: list[Record]
    ) -> tuple[int, bool]:
        assert self._handle is not None
        start = self._offset
        if end - start < HEADER_BYTES:
            return 0, False
        window = os.pread(
            self._handle.fileno(), min(end - start, spool_reader._WINDOW_BYTES), start
        )
        view = memoryview(window)
        length = len(window)
        assert self._segment is not None
        seed = self._segment.seed
        at = 0
        size = 0
        read_seq = self._read_seq
        while at + HEADER_BYTES <= length:
            magic, kind_code, key_len, value_len, seq = _HEAD.unpack_from(window, at)
            if magic != MAGIC or kind_code not in _KIND_NAMES or value_len > MAX_VALUE_BYTES:
                break
            body = at + HEADER_BYTES
            stop = body + key_len + value_len
            if stop > length:
                break
            head_crc = zlib.crc32(view[at : at + _HEAD.size], seed)
            crc = zlib.crc32(view[body:stop], head_crc)
            if crc != _CRC.unpack_from(window, at + _HEAD.size)[0]:
                break
            at = stop
            if seq < read_seq:
                continue
            if seq > read_seq:
                self._count_gap(read_seq, seq)
            read_seq = seq + 1
            value = window[body + key_len : stop]
            records.append(
                Record(seq, _KIND_NAMES[kind_code], window[body : body + key_len], value)
            )
            size += len(value)
            if len(records) >= limit or size >= max_bytes:
                break
        self._offset = start + at
        self._read_seq = read_seq
        more = at > 0 and at + HEADER_BYTES > length and start + at < end
        return size, more and len(records) < limit and size < max_bytes


def signaling_reader(directory: Path, *, before: bool) -> float:
    """Records per CPU second of one reader of the signaling spool `parse_and_record`
    wrote (CPU time: the machine may be shared)."""
    with Spool(directory / "signaling", ("r",), buffered=True) as spool:
        reader = (WindowAsBefore if before else SpoolReader)(spool, "before" if before else "now")
        total = 0
        start = time.process_time()
        while batch := reader.read(1000, 1 << 24):
            total += len(batch)
        elapsed = time.process_time() - start
        reader.close()
    return total / elapsed


def parse_only(directory: Path, number: int) -> None:
    payloads = list(MESSAGES.values())
    for n in range(number):
        parse(payloads[n % 3])


def parse_and_record(directory: Path, number: int) -> None:
    payloads = list(MESSAGES.values())
    # Milliseconds apart, as a call's messages are: the formatted second is reused.
    packets = [
        Packet(
            1_795_000_000.1 + n / 1000, "192.0.2.10", 5060, "203.0.113.20", 5060, "udp", p, "2001"
        )
        for n, p in enumerate(payloads)
    ]
    with Spool(directory / "signaling", ("r",), buffered=True) as spool:
        record = SignalingRecorder(spool)
        for n in range(number):
            packet = packets[n % 3]
            record(packet, parse(packet.payload))


def timed(run: Callable[[Path, int], None], directory: Path, number: int) -> float:
    start = time.perf_counter()
    run(directory, number)
    return number / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--number", type=int, default=50_000)
    parser.add_argument("--flows", type=int, default=3000, help="call flows for the CDRs")
    parser.add_argument(
        "--former-only", action="store_true", help="only the comparison with the former code"
    )
    args = parser.parse_args()
    against_former(args.rounds * 2, args.number, args.flows)
    if args.former_only:
        return
    results: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            base = timed(floor, directory, args.number)
            round_results = {
                "floor os.write": base,
                "spool append": timed(spool_append, directory, args.number),
                "spool append, buffered": timed(
                    lambda d, n: spool_append(d / "b", n, buffered=True), directory, args.number
                ),
                "spool append, refused": timed(spool_append_refused, directory, args.number),
                "spool read back": timed(read_back, directory, args.number),
                "reader alone, by windows": reader_alone(directory, args.number, by_windows=True),
                "reader alone, one by one": reader_alone(directory, args.number, by_windows=False),
            }
            for name, rate in round_results.items():
                results.setdefault(name, []).append(rate)
                ratios.setdefault(name, []).append(rate / base)
            parsed = timed(parse_only, directory, args.number)
            for name, rate in (
                ("sip.parse", parsed),
                ("parse + signaling record", timed(parse_and_record, directory, args.number)),
            ):
                results.setdefault(name, []).append(rate)
                ratios.setdefault(name, []).append(rate / parsed)
            # The spool parse_and_record wrote, read as before and now, in turns.
            pair = {}
            for before in (False, True) if len(ratios[name]) % 2 else (True, False):
                pair[before] = signaling_reader(directory, before=before)
            for name, rate in (
                ("signaling reader, before", pair[True]),
                ("signaling reader, now", pair[False]),
            ):
                results.setdefault(name, []).append(rate)
                ratios.setdefault(name, []).append(rate / pair[True])
    print(f"{args.number} records of {len(VALUE)} bytes, median of {args.rounds} rounds")
    print(
        f"{'contender':<26}{'records/s':>12}{'ratio':>10}"
        "  (floor, then parse alone, then the reader before)"
    )
    for name, rates in results.items():
        print(
            f"{name:<26}{statistics.median(rates):>12,.0f}{statistics.median(ratios[name]):>9.2f}x"
        )


if __name__ == "__main__":
    main()
