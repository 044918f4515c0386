"""UDP receive paths on loopback: raw drain rate, and where sipcdr's own path saturates.

Part 1 asks which way of receiving datagrams in Python drains a socket fastest: a
counting DatagramProtocol on the default asyncio loop and on uvloop, an asyncio-dgram
`recv()` loop, a blocking `recv_into` loop in a thread, and uvloop waking a callback
that drains up to 32 datagrams with `recvfrom` (one callback a wake-up rather than one
a datagram; Python has no `recvmmsg`), each on a socket for which
`udp_socket` asks a 32 MiB SO_RCVBUF (the report says what the kernel granted). A
sender in another process sends the INVITE sample once as fast as it can and once
paced at a realistic rate.

Part 2 runs the daemon's receive path itself (uvloop, `SipUdpProtocol` or
`HepUdpProtocol`, a real `Pipeline` and `Correlator`) against complete call flows at
rising offered rates, and checks that overload loss is counted: kernel drops plus
messages processed must add up to what was sent.

A run ends when the sender has finished and nothing has arrived for a quiet period.
Figures are medians of several rounds; ratios are against contender (b) measured in
the same run, so a noisy machine moves all of them together.

    python benchmarks/receive.py [--rounds 5] [--count 200000] [--offered-rate 50000]
    python benchmarks/receive.py --quick   # a few seconds, to keep it from rotting
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ipaddress
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncio_dgram
import uvloop
from samples import BYE, INVITE, OK_200
from sipcdr import hep, hepencode
from sipcdr.capture.listeners import (
    MAX_DATAGRAM,
    AllowList,
    HepGate,
    HepUdpProtocol,
    ListenerStats,
    SipUdpProtocol,
    udp_drops,
    udp_socket,
)
from sipcdr.dialog import Correlator
from sipcdr.model import Packet
from sipcdr.pipeline import Pipeline
from sipcdr.sinks.signaling import SignalingRecorder
from sipcdr.spool import Spool

HOST = "127.0.0.1"
RCVBUF_BYTES = 32 * 1024 * 1024
SAMPLE_S = 0.005  # how often a run looks at its counter; bounds the error on its duration
# Stands for the call number in every message of a flow. It is as wide as the "%08x"
# the sender writes there, so a HEP packet built around it keeps valid length fields.
MARK = b"~CALLNO~"
CALL_ID = b"8f2d3c4b5a69@198.51.100.10"
CALLER = ("198.51.100.10", 5060)
CALLEE = ("203.0.113.5", 5060)

# Runs as `python -I -c`, so it imports nothing of ours and starts in milliseconds.
# It lives for the whole benchmark and takes one job per line on stdin. Messages are
# built before the clock starts: the send loop must be as cheap as it can be so that
# the receiver, not the sender, is what the blast measures.
_SENDER = r"""
import base64, json, socket, sys, time
MARK = b"~CALLNO~"
for line in sys.stdin:
    job = json.loads(line)
    templates = [base64.b64decode(t) for t in job["templates"]]
    count, rate, k = job["count"], job["rate"], len(templates)
    if any(MARK in t for t in templates):
        msgs = [templates[i % k].replace(MARK, b"%08x" % (i // k)) for i in range(count)]
    else:
        msgs = [templates[i % k] for i in range(count)]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((job["host"], job["port"]))  # send() skips parsing the address each time
    send, clock, sleep = sock.send, time.monotonic, time.sleep
    errors = 0
    start = clock()
    if rate <= 0:
        for m in msgs:
            try:
                send(m)
            except OSError:
                errors += 1
    else:
        i = 0
        while i < count:
            due = min(count, int((clock() - start) * rate) + 1)
            while i < due:
                try:
                    send(msgs[i])
                except OSError:
                    errors += 1
                i += 1
            ahead = i / rate - (clock() - start)
            if ahead > 0:
                sleep(ahead)
    end = clock()
    sock.close()
    sys.stdout.write(json.dumps({"sent": count - errors, "start": start, "end": end}) + "\n")
    sys.stdout.flush()
"""


@dataclass(frozen=True, slots=True)
class Sent:
    sent: int
    start: float  # time.monotonic(), which is system-wide on Linux: comparable here
    end: float


class Sender:
    """The sending process, kept for the whole benchmark to pay its start-up once."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _SENDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

    @property
    def pid(self) -> int:
        return self._proc.pid

    def start(self, port: int, templates: Sequence[bytes], count: int, rate: float) -> None:
        assert self._proc.stdin is not None
        job = {
            "host": HOST,
            "port": port,
            "templates": [base64.b64encode(t).decode() for t in templates],
            "count": count,
            "rate": rate,
        }
        self._proc.stdin.write(json.dumps(job).encode() + b"\n")
        self._proc.stdin.flush()

    def poll(self) -> Sent | None:
        """The sender's report once it has finished, else None; never blocks."""
        out = self._proc.stdout
        assert out is not None
        if not select.select([out], [], [], 0)[0]:
            if self._proc.poll() is not None:
                raise RuntimeError(f"sender exited with {self._proc.returncode}")
            return None
        report = json.loads(out.readline())
        return Sent(int(report["sent"]), float(report["start"]), float(report["end"]))

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


@dataclass(frozen=True, slots=True)
class Run:
    offered: int
    taken: int  # datagrams the receiver took off the socket
    drops: int | None  # kernel drops on the socket during the run (None: not reported)
    seconds: float  # first send to last datagram taken
    send_seconds: float
    cpu_seconds: float  # receiving process, all threads
    processed: int = 0  # part 2: messages parsed by the pipeline
    lost_in_pipeline: int = 0  # part 2: parse errors and drops before parsing
    cdrs: int = 0

    @property
    def rate(self) -> float:
        return self.taken / self.seconds if self.seconds > 0 else 0.0

    @property
    def loss(self) -> float:
        return 1 - self.taken / self.offered if self.offered else 0.0

    @property
    def unaccounted(self) -> int | None:
        if self.drops is None:
            return None
        return self.offered - self.taken - self.drops

    @property
    def cpu_share(self) -> float:
        return self.cpu_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu_seconds / self.taken * 1e6 if self.taken else 0.0


class Recorder:
    """Ends a run: the sender is done and the counter has not moved for `quiet` s.

    The counter is sampled instead of timestamping each datagram, so the contenders
    pay for counting and nothing else; the last sample that saw it move is taken as
    the time of the last datagram (late by at most SAMPLE_S plus one loop turn).
    """

    def __init__(self, sender: Sender, sock: socket.socket, quiet: float, budget: float) -> None:
        self._sender = sender
        self._sock = sock
        self._quiet = quiet
        self.count = 0
        self.last_change = time.monotonic()
        self._deadline = self.last_change + budget
        self.sent: Sent | None = None
        self._drops_before = udp_drops(sock)
        self.drops: int | None = None
        self._cpu_before = time.process_time()
        self.cpu_seconds = 0.0

    def tick(self, count: int) -> bool:
        now = time.monotonic()
        if count != self.count:
            self.count = count
            self.last_change = now
            return False
        if now > self._deadline:
            raise TimeoutError(f"run not over after its time budget; {count} taken")
        if now - self.last_change < self._quiet:
            return False
        if self.sent is None:
            self.sent = self._sender.poll()
            if self.sent is None:
                return False
        # Read before the caller tears down: closing the transport closes the socket.
        self.cpu_seconds = time.process_time() - self._cpu_before
        after = udp_drops(self._sock)
        if after is not None and self._drops_before is not None:
            self.drops = after - self._drops_before
        return True

    async def wait_async(self, probe: Callable[[], int]) -> None:
        while not self.tick(probe()):
            await asyncio.sleep(SAMPLE_S)

    def wait_sync(self, probe: Callable[[], int]) -> None:
        while not self.tick(probe()):
            time.sleep(SAMPLE_S)

    def result(self) -> Run:
        assert self.sent is not None
        return Run(
            offered=self.sent.sent,
            taken=self.count,
            drops=self.drops,
            seconds=self.last_change - self.sent.start,
            send_seconds=self.sent.end - self.sent.start,
            cpu_seconds=self.cpu_seconds,
        )


# A receiver takes the bound socket, calls `go` once it is ready to receive (which
# starts the sender) and returns once the recorder says the run is over.
Receiver = Callable[[socket.socket, Callable[[], None], Recorder], None]
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class Counter(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.count = 0

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.count += 1


def endpoint_receiver(
    loop_factory: LoopFactory,
    protocol: Callable[[socket.socket], asyncio.DatagramProtocol],
    probe: Callable[[asyncio.DatagramProtocol], int],
) -> Receiver:
    def receive(sock: socket.socket, go: Callable[[], None], rec: Recorder) -> None:
        async def main() -> None:
            proto = protocol(sock)
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(lambda: proto, sock=sock)
            try:
                go()
                await rec.wait_async(lambda: probe(proto))
            finally:
                transport.close()

        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(main())

    return receive


def _count_of(proto: asyncio.DatagramProtocol) -> int:
    assert isinstance(proto, Counter)
    return proto.count


def dgram_receive(sock: socket.socket, go: Callable[[], None], rec: Recorder) -> None:
    async def main() -> None:
        stream = await asyncio_dgram.from_socket(sock)
        counter = Counter()

        async def drain() -> None:
            recv = stream.recv
            while True:
                await recv()
                counter.count += 1

        task = asyncio.create_task(drain())
        try:
            go()
            await rec.wait_async(lambda: counter.count)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            stream.close()

    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        runner.run(main())


def thread_receive(sock: socket.socket, go: Callable[[], None], rec: Recorder) -> None:
    # Fully blocking (no timeout): a timeout would add a poll() before every recv.
    sock.setblocking(True)
    counter = Counter()

    def drain() -> None:
        buffer = bytearray(MAX_DATAGRAM)
        recv_into = sock.recv_into
        while recv_into(buffer):  # an empty datagram is the signal to stop
            counter.count += 1

    worker = threading.Thread(target=drain, name="recv_into", daemon=True)
    worker.start()
    try:
        go()
        rec.wait_sync(lambda: counter.count)
    finally:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as poke:
            poke.sendto(b"", sock.getsockname())
        worker.join(timeout=10)


# Datagrams a readiness callback of (e) takes at most, as uvloop's own reads do.
READS_PER_WAKEUP = 32


def reader_receive(sock: socket.socket, go: Callable[[], None], rec: Recorder) -> None:
    """uvloop told of readiness only (`add_reader`), the socket drained by a loop of
    `recvfrom` calls in the callback, each datagram handed to the same counting
    `datagram_received`: one Python callback per wake-up instead of one per datagram,
    but a Python-level call per datagram to read it."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        counter = Counter()
        recvfrom = sock.recvfrom
        handle = counter.datagram_received

        def readable() -> None:
            for _ in range(READS_PER_WAKEUP):
                try:
                    data, addr = recvfrom(MAX_DATAGRAM)
                except BlockingIOError:
                    return
                handle(data, addr)

        loop.add_reader(sock.fileno(), readable)
        try:
            go()
            await rec.wait_async(lambda: counter.count)
        finally:
            loop.remove_reader(sock.fileno())

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


CONTENDERS: dict[str, Receiver] = {
    "(a) asyncio + DatagramProtocol": endpoint_receiver(
        asyncio.new_event_loop, lambda _sock: Counter(), _count_of
    ),
    "(b) uvloop + DatagramProtocol": endpoint_receiver(
        uvloop.new_event_loop, lambda _sock: Counter(), _count_of
    ),
    "(c) asyncio-dgram recv()": dgram_receive,
    "(d) thread + blocking recv_into": thread_receive,
    "(e) uvloop add_reader + recvfrom": reader_receive,
}
BASELINE = "(b) uvloop + DatagramProtocol"


def measure(
    receiver: Receiver,
    sender: Sender,
    templates: Sequence[bytes],
    count: int,
    rate: float,
    quiet: float,
) -> Run:
    sock = udp_socket(HOST, 0, RCVBUF_BYTES)
    port = sock.getsockname()[1]
    # Generous: even at 5,000 messages/s a run is far inside this.
    budget = 30.0 + count / 5000
    try:
        rec = Recorder(sender, sock, quiet, budget)
        receiver(sock, lambda: sender.start(port, templates, count, rate), rec)
    finally:
        sock.close()
    return rec.result()


# -- part 2: call flows through the real pipeline ----------------------------------------


def call_flow() -> list[tuple[bytes, bool]]:
    """INVITE, 180, 200, ACK, BYE, 200 of one call, each flagged True when the caller
    sends it; MARK in the Call-ID makes every call distinct."""
    call_id = MARK + b"-" + CALL_ID
    invite = INVITE.replace(CALL_ID, call_id)
    ok = OK_200.replace(CALL_ID, call_id)
    ringing = ok.replace(b"200 OK", b"180 Ringing")
    ack = BYE.replace(CALL_ID, call_id).replace(b"BYE sip", b"ACK sip")
    ack = ack.replace(b"103 BYE", b"102 ACK")
    bye = BYE.replace(CALL_ID, call_id)
    head = ok.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    head = [h for h in head if not h.startswith((b"Content-Type:", b"Content-Length:"))]
    bye_ok = b"\r\n".join(head).replace(b"102 INVITE", b"103 BYE") + b"\r\nContent-Length: 0"
    bye_ok += b"\r\n\r\n"
    return [
        (invite, True),
        (ringing, False),
        (ok, False),
        (ack, True),
        (bye, True),
        (bye_ok, False),
    ]


def hep_flow() -> list[bytes]:
    packets = []
    for payload, from_caller in call_flow():
        src, dst = (CALLER, CALLEE) if from_caller else (CALLEE, CALLER)
        packets.append(
            hepencode.encode(
                src_ip=src[0],
                dst_ip=dst[0],
                src_port=src[1],
                dst_port=dst[1],
                timestamp=1_700_000_000.25,
                payload=payload,
                capture_id=2001,
                node_name="sbc-1",
            )
        )
    return packets


def check_flows() -> None:
    """Both flows must make one CDR out of six parsed messages before anything is
    timed: a flow the correlator rejected would measure the wrong thing."""
    plain = [m.replace(MARK, b"%08x" % 7) for m, _caller in call_flow()]
    wrapped = [hep.decode(p.replace(MARK, b"%08x" % 7)).payload for p in hep_flow()]
    for flow in (plain, wrapped):
        pipeline = Pipeline(Correlator(), sinks=[])
        for data in flow:
            pipeline.process(Packet(0.0, *CALLER, *CALLEE, "udp", data, "check"))
        messages = pipeline.stats.messages
        if sum(messages.values()) != 6 or pipeline.cdrs_written != 1:
            raise SystemExit(f"call flow not usable: {messages} {pipeline.cdrs_written}")


def sipcdr_measure(
    kind: str,
    sender: Sender,
    templates: Sequence[bytes],
    count: int,
    rate: float,
    quiet: float,
    signaling_dir: Path | None = None,
) -> Run:
    spool = None
    recorder = None
    if signaling_dir is not None:
        # As the daemon runs by default: every message kept for sip_messages.
        spool = Spool(signaling_dir / f"{kind}-{time.monotonic_ns()}", ("postgres",), buffered=True)
        spool.open()
        recorder = SignalingRecorder(spool)
    pipeline = Pipeline(Correlator(), sinks=[], signaling=recorder)
    allow = AllowList([ipaddress.ip_network("127.0.0.0/8")])
    listened = ListenerStats()

    def protocol(sock: socket.socket) -> asyncio.DatagramProtocol:
        if kind == "SIP":
            return SipUdpProtocol(pipeline, allow, sock.getsockname()[:2], listened)
        return HepUdpProtocol(pipeline, allow, HepGate({}), listened)

    receiver = endpoint_receiver(
        uvloop.new_event_loop, protocol, lambda _proto: sum(listened.received.values())
    )
    run = measure(receiver, sender, templates, count, rate, quiet)
    if spool is not None:
        spool.close()
    processed = sum(pipeline.stats.messages.values())
    return Run(
        offered=run.offered,
        taken=run.taken,
        drops=run.drops,
        seconds=run.seconds,
        send_seconds=run.send_seconds,
        cpu_seconds=run.cpu_seconds,
        processed=processed,
        lost_in_pipeline=sum(listened.dropped.values())
        + sum(pipeline.stats.parse_errors.values())
        + sum(pipeline.stats.internal_errors.values()),
        cdrs=pipeline.cdrs_written,
    )


class ForeignLoad:
    """CPU the rest of the machine used during a part, in cores (Linux /proc only).

    On a shared machine another job can take the receiver's core and the figures then
    measure that job; saying so beats printing them as if they were clean.
    """

    def __init__(self, sender: Sender) -> None:
        self._pids = ("self", str(sender.pid))
        self._start = self._sample()

    def _sample(self) -> tuple[float, int, int] | None:
        try:
            # user, nice, system of the machine: interrupt time has no owner to subtract
            machine = sum(int(f) for f in Path("/proc/stat").read_text().split()[1:4])
            ours = 0
            for pid in self._pids:
                stat = Path(f"/proc/{pid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                ours += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            return None
        return time.monotonic(), machine, ours

    def cores(self) -> float | None:
        end = self._sample()
        if end is None or self._start is None:
            return None
        (t0, machine0, ours0), (t1, machine1, ours1) = self._start, end
        ticks = (machine1 - machine0) - (ours1 - ours0)
        return max(0, ticks) / os.sysconf("SC_CLK_TCK") / (t1 - t0)


def load_note(cores: float | None) -> str:
    if cores is None:
        return "other processes' CPU: not known here"
    note = f"other processes used {cores:.2f} cores meanwhile"
    return note + (": contended, rerun on a quiet machine" if cores > 0.15 else "")


# -- report ------------------------------------------------------------------------------


def rcvbuf_note() -> str:
    with contextlib.closing(udp_socket(HOST, 0, RCVBUF_BYTES)) as sock:
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    # Linux reports twice what it granted (the other half is for its bookkeeping). Less
    # than asked means the request was cut to net.core.rmem_max, and the loss figures
    # below are those of the smaller buffer.
    note = f"SO_RCVBUF via udp_socket: asked {RCVBUF_BYTES >> 20} MiB, granted {got >> 21} MiB"
    if got < 2 * RCVBUF_BYTES:
        note += " (capped by net.core.rmem_max: not forced)"
    return note


def _n(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


HEADER = (
    f"  {'':<34}{'offered':>9}{'sent/s':>9}{'taken':>9}{'loss %':>8}{'k.drops':>9}"
    f"{'unacct':>7}{'taken/s':>9}{'cpu %':>6}{'us/dgram':>9}"
)


def _row(name: str, runs: Sequence[Run]) -> str:
    """Column medians; `unacct` is the worst round, since any non-zero is a bug."""
    med = statistics.median
    drops = [r.drops for r in runs]
    known = [d for d in drops if d is not None]
    unacct = [u for r in runs if (u := r.unaccounted) is not None]
    return (
        f"  {name:<34}{_n(med(r.offered for r in runs)):>9}"
        f"{_n(med(r.offered / r.send_seconds for r in runs)):>9}"
        f"{_n(med(r.taken for r in runs)):>9}{med(r.loss for r in runs):>8.1%}"
        f"{_n(med(known) if len(known) == len(drops) else None):>9}"
        f"{_n(max(unacct, key=abs) if len(unacct) == len(runs) else None):>7}"
        f"{_n(med(r.rate for r in runs)):>9}{med(r.cpu_share for r in runs):>6.0%}"
        f"{med(r.cpu_us for r in runs):>9.2f}"
    )


PIPELINE_HEADER = (
    f"  {'':<15}{'offered':>9}{'processed':>10}{'k.drops':>9}{'loss %':>8}{'unacct':>7}"
    f"{'CDRs':>8}{'calls':>8}{'proc/s':>9}{'cpu %':>7}{'us/msg':>8}"
)


def _pipeline_row(name: str, run: Run) -> str:
    unacct = (
        None
        if run.drops is None
        else run.offered - run.processed - run.lost_in_pipeline - run.drops
    )
    loss = 1 - run.processed / run.offered if run.offered else 0.0
    return (
        f"  {name:<15}{_n(run.offered):>9}{_n(run.processed):>10}{_n(run.drops):>9}"
        f"{loss:>8.1%}{_n(unacct):>7}{_n(run.cdrs):>8}{_n(run.offered // 6):>8}"
        f"{_n(run.processed / run.seconds if run.seconds > 0 else 0):>9}"
        f"{run.cpu_share:>7.0%}{run.cpu_us:>8.1f}"
    )


def _median_run(runs: Sequence[Run]) -> Run:
    """The round with the median count processed, whole, so that its own figures add up."""
    return sorted(runs, key=lambda r: r.processed)[len(runs) // 2]


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--rounds", type=int, default=5, help="rounds of part 1")
    args.add_argument("--count", type=int, default=150_000, help="datagrams per blast")
    args.add_argument("--offered-rate", type=float, default=50_000, help="paced run, per s")
    args.add_argument("--duration", type=float, default=2.0, help="seconds of each paced run")
    args.add_argument(
        "--rates", default="5000,10000,20000,40000", help="part 2 offered rates, messages/s"
    )
    args.add_argument("--pipeline-count", type=int, default=60_000, help="part 2 max run")
    args.add_argument("--pipeline-rounds", type=int, default=3)
    args.add_argument("--quiet", type=float, default=0.2, help="seconds without a datagram")
    args.add_argument("--quick", action="store_true", help="tiny counts, one round")
    args.add_argument(
        "--signaling",
        action="store_true",
        help="part 2 keeps every message for sip_messages, as the daemon does by default",
    )
    opts = args.parse_args(argv)
    if opts.quick:
        opts.rounds = opts.pipeline_rounds = 1
        opts.count = 3000
        opts.offered_rate = 5000
        opts.duration = 0.2
        opts.rates = "3000"
        opts.pipeline_count = 1200
        opts.quiet = 0.1
    rates = [float(r) for r in opts.rates.split(",") if r]
    check_flows()

    sender = Sender()
    scratch = tempfile.TemporaryDirectory()
    signaling_dir = Path(scratch.name) if opts.signaling else None
    try:
        paced_count = int(opts.offered_rate * opts.duration)
        blast: dict[str, list[Run]] = {name: [] for name in CONTENDERS}
        paced: dict[str, list[Run]] = {name: [] for name in CONTENDERS}
        load = ForeignLoad(sender)
        for _ in range(opts.rounds):
            # Interleaved rounds: a burst of noise hits every contender, not just one.
            for name, receiver in CONTENDERS.items():
                blast[name].append(measure(receiver, sender, [INVITE], opts.count, 0, opts.quiet))
                paced[name].append(
                    measure(receiver, sender, [INVITE], paced_count, opts.offered_rate, opts.quiet)
                )

        raw_load = load.cores()

        load = ForeignLoad(sender)
        flows = {"SIP": [m for m, _caller in call_flow()], "HEP": hep_flow()}
        loads = [(rate, int(rate * opts.duration)) for rate in rates]
        loads.append((0.0, opts.pipeline_count))
        loads = [(rate, count - count % 6) for rate, count in loads]  # whole calls only
        pipeline_runs: dict[tuple[str, float], list[Run]] = {}
        for _ in range(opts.pipeline_rounds):
            for rate, count in loads:
                for kind, templates in flows.items():
                    pipeline_runs.setdefault((kind, rate), []).append(
                        sipcdr_measure(
                            kind, sender, templates, count, rate, opts.quiet, signaling_dir
                        )
                    )
        pipeline_load = load.cores()
    finally:
        sender.close()
        scratch.cleanup()

    med = statistics.median
    sender_rate = med(r.offered / r.send_seconds for runs in blast.values() for r in runs)
    print(
        f"part 1: raw receive of the {len(INVITE):,}-byte INVITE on {HOST}, "
        f"median of {opts.rounds} rounds"
    )
    print(rcvbuf_note())
    print(load_note(raw_load))
    print(f"blast: {opts.count:,} datagrams at the sender's best ({sender_rate:,.0f}/s)")
    print(HEADER)
    for name, runs in blast.items():
        print(_row(name, runs))
    # One Python sender cannot outrun the fastest receivers, so a blast without loss
    # shows the sender's pace; the CPU per datagram still tells receivers apart.
    print("  (no loss: the receiver kept up and taken/s is the sender's; compare us/dgram)")
    print(f"paced: {opts.offered_rate:,.0f}/s for {opts.duration:g} s")
    print(HEADER)
    for name, runs in paced.items():
        print(_row(name, runs))

    base_rate = med(r.rate for r in blast[BASELINE])
    base_blast_us = med(r.cpu_us for r in blast[BASELINE])
    base_us = med(r.cpu_us for r in paced[BASELINE])
    print(f"ratios vs {BASELINE} (same run; cpu: lower is better):")
    for name in CONTENDERS:
        if name != BASELINE:
            print(
                f"  {name:<34}blast taken/s {med(r.rate for r in blast[name]) / base_rate:5.2f}x"
                f"  blast cpu/dgram {med(r.cpu_us for r in blast[name]) / base_blast_us:5.2f}x"
                f"  paced cpu/dgram {med(r.cpu_us for r in paced[name]) / base_us:5.2f}x"
            )

    print()
    print(
        "part 2: sipcdr receive path (uvloop, real Pipeline + Correlator, "
        f"{'signaling kept in a spool' if opts.signaling else 'no sinks'}), "
        f"6-message calls, median of {opts.pipeline_rounds} rounds"
    )
    print(load_note(pipeline_load))
    print(PIPELINE_HEADER)
    for kind in flows:
        for rate, _count in loads:
            label = f"{kind} {rate / 1000:g}k/s" if rate else f"{kind} max"
            print(_pipeline_row(label, _median_run(pipeline_runs[kind, rate])))
    # Both sides saturated, so the CPU per message compares like with like: what share
    # of a message's cost is getting it off the socket.
    print(f"ratios vs {BASELINE}, both saturated (same run):")
    for kind in flows:
        top = _median_run(pipeline_runs[kind, 0.0])
        top_rate = top.processed / top.seconds if top.seconds > 0 else 0.0
        print(
            f"  {kind} max: proc/s {top_rate / base_rate:5.2f}x of (b) blast taken/s,"
            f" cpu/msg {top.cpu_us / base_blast_us:5.1f}x of (b) blast cpu/dgram"
            f" (receiving is {base_blast_us / top.cpu_us:.0%} of it)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
