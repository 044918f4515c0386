"""`sipcdr replay`: send the SIP of a capture to a listener, plain or in HEPv3, over
UDP, or HEPv3 over TCP or TLS as a stream agent does.

Over TCP and TLS the end of the replay is confirmed by the daemon: the stream is
half-closed and the replay waits for the daemon to close its side (TLS: with a
close_notify), which it does only after reading every frame. A TLS handshake the
daemon refuses, or a client certificate it rejects after the handshake (TLS 1.3), is
an error here. Errors say what went wrong in the listener's terms: nothing listening,
a reset (and what a reset means on that kind of port), a certificate or key file that
cannot be used (named; an encrypted key is refused, never asked a passphrase for).

Pacing: the capture's own (default; gaps longer than `max_gap_s` shortened to it, so
a capture with an hour of silence does not replay that hour), a fixed rate, or as fast
as the socket takes it. A `progress` callback hears how far the replay is, at most
every `PROGRESS_EVERY_S`. With several loops each pass renames the Call-ID of every
message, so one capture becomes many distinct calls: the load generator of the
end-to-end benchmark. It must never be what limits that benchmark, so each message is
parsed once, before sending, and cut where the loop's suffix goes (`build_templates`);
a pass then costs one join per message (HEP: a few concatenations, the time stamped
per batch), and a fixed rate reads the clock once per batch. `workers` forks senders
that share the passes and the rate.
"""

from __future__ import annotations

import errno
import itertools
import multiprocessing
import os
import re
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from sipcdr import hepencode
from sipcdr.capture import tls as tls_files
from sipcdr.capture.listeners import MAX_CLOCK_SKEW_S
from sipcdr.capture.pcapfile import iter_packets
from sipcdr.model import Packet
from sipcdr.sip import SipParseError, parse

_IP_PROTOCOL = {"udp": 17, "tcp": 6, "sctp": 132}
TRANSPORTS: Final = ("udp", "tcp", "tls")
# Connecting, a TLS handshake, and the daemon's confirmation at the end each take
# milliseconds on a working path; this only bounds a dead one.
STREAM_TIMEOUT_S: Final = 10.0
# Long silences in a capture (a night between two calls) are shortened to this.
DEFAULT_MAX_GAP_S: Final = 1.0
PROGRESS_EVERY_S: Final = 5.0
# At a fixed rate the clock is read once per batch of this many seconds' worth of
# messages (at most MAX_BATCH): reading it per message would cap the rate.
BATCH_S: Final = 0.001
MAX_BATCH: Final = 128
WORKER_POLL_S: Final = 0.05
_CALL_ID_HEADER = re.compile(rb"(?im)^((?:call-id|i)[ \t]*:[ \t]*)([^\r\n]+?)(?=[ \t]*\r?$)")


@dataclass(frozen=True, slots=True)
class ReplayResult:
    sent: int
    skipped: int  # not parseable as SIP: sent unchanged on loop 0, skipped on rewrites
    seconds: float


@dataclass(frozen=True, slots=True)
class _Template:
    """One message, split once so that every loop costs a join, not a parse.

    A loop's datagram is `suffix.join(pieces)`, the suffix going right after the
    Call-ID in its header; in HEP, `pre + stamp + post` in front of it, the HEP length
    fields already counting the suffix (fixed-width per run) and `stamp` the 14 bytes
    from the seconds of the time chunk to the end of the microseconds chunk."""

    index: int  # in the capture: its offset at the capture's pace
    pieces: tuple[bytes, ...]
    pre: bytes
    post: bytes
    timestamp: float


def _split_call_id(payload: bytes, call_id: bytes) -> tuple[bytes, ...]:
    """`payload` cut after each Call-ID header value equal to `call_id` (only there:
    a short Call-ID such as "1" also occurs elsewhere)."""
    cuts = [match.end(2) for match in _CALL_ID_HEADER.finditer(payload) if match[2] == call_id]
    bounds = [0, *cuts, len(payload)]
    return tuple(payload[a:b] for a, b in itertools.pairwise(bounds))


def loop_suffix(loop: int, loops: int) -> bytes:
    """What loop `loop` (from 1) appends to every Call-ID: as wide for every loop of
    the run, so the HEP length fields are computed once."""
    width = len(str(max(loops - 1, 1)))
    return b"-L%0*d" % (width, loop)


_CHUNK = struct.Struct(">HHH")
_U16 = struct.Struct(">H")
_STAMP = struct.Struct(">I6sI")
_USEC_CHUNK = _CHUNK.pack(0, 0x000A, 10)
_STAMP_BYTES: Final = _STAMP.size


def hep_stamp(timestamp: float) -> bytes:
    """The time chunks' variable bytes for `timestamp` (see _Template)."""
    seconds = int(timestamp)
    micros = min(int((timestamp - seconds) * 1_000_000), 999_999)
    return _STAMP.pack(seconds, _USEC_CHUNK, micros)


def _hep_frame_parts(
    packet: Packet, length: int, capture_id: int, auth_key: str | None
) -> tuple[bytes, bytes]:
    """`pre` and `post` of a HEP frame around a `length`-byte payload (see _Template)."""
    frame = hepencode.encode(
        src_ip=packet.src_ip,
        dst_ip=packet.dst_ip,
        src_port=packet.src_port,
        dst_port=packet.dst_port,
        timestamp=0.0,
        payload=b"",
        ip_protocol=_IP_PROTOCOL.get(packet.transport, 17),
        capture_id=capture_id,
        auth_key=auth_key,
    )
    total = len(frame) + length
    if total > 0xFFFF:
        raise ValueError(f"packet too large for HEPv3: {total} bytes")
    # The time chunk follows family, protocol, the two addresses and the two ports.
    address = 16 if ":" in packet.src_ip else 4
    at = 6 + 7 + 7 + 2 * (6 + address) + 8 + 8 + 6
    if _CHUNK.unpack_from(frame, at - 6) != (0, 0x0009, 10):
        raise AssertionError("hepencode.encode changed its chunk order")  # pragma: no cover
    pre = frame[:4] + _U16.pack(total) + frame[6:at]
    post = frame[at + _STAMP_BYTES : -2] + _U16.pack(6 + length)
    return pre, post


def _template(
    index: int,
    packet: Packet,
    pieces: tuple[bytes, ...],
    length: int,
    as_hep: bool,
    keys: tuple[int, str | None],
) -> _Template:
    pre = post = b""
    if as_hep:
        pre, post = _hep_frame_parts(packet, length, *keys)
    return _Template(index, pieces, pre, post, packet.timestamp)


def build_templates(
    packets: list[Packet],
    loops: int,
    *,
    as_hep: bool,
    capture_id: int = 0,
    auth_key: str | None = None,
) -> tuple[list[_Template], list[_Template]]:
    """The templates of loop 0 (every packet, unchanged) and of the later loops (the
    SIP ones, their Call-IDs to be suffixed); each packet is parsed once here."""
    first: list[_Template] = []
    later: list[_Template] = []
    suffix_length = len(loop_suffix(1, loops))
    keys = (capture_id, auth_key)
    for index, packet in enumerate(packets):
        payload = packet.payload
        first.append(_template(index, packet, (payload,), len(payload), as_hep, keys))
        if loops < 2:
            continue
        try:
            call_id = parse(payload).call_id
        except SipParseError:
            continue  # sent as it is once, never renamed
        pieces = _split_call_id(payload, call_id.encode()) if call_id else (payload,)
        length = len(payload) + (len(pieces) - 1) * suffix_length
        later.append(_template(index, packet, pieces, length, as_hep, keys))
    return first, later


def client_context(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """An agent's TLS context: trusts `ca` (the system's CAs when None) and presents
    `cert`/`key` when the daemon asks for a client certificate. Raises
    `tls.TlsSetupError` naming the option (`--ca`, `--cert`, `--key`) at fault."""
    if ca is not None:
        tls_files.check_cas(ca, "--ca")
    context = ssl.create_default_context(cafile=None if ca is None else str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        tls_files.load_key_pair(context, cert, key, ("--cert", "--key"))
    return context


class ReplayError(OSError):
    """The replay cannot start: a target that does not resolve, a capture without SIP."""


def resolve(target: tuple[str, int], stream: bool) -> tuple[int, tuple[str, int]]:
    """The address family and socket address of `target`; ReplayError naming the host
    when it does not resolve."""
    host, port = target
    kind = socket.SOCK_STREAM if stream else socket.SOCK_DGRAM
    try:
        family, _type, _proto, _name, address = socket.getaddrinfo(host, port, type=kind)[0]
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ReplayError(f"--to {host}:{port}: cannot resolve {host!r} ({reason})") from None
    return int(family), (str(address[0]), int(address[1]))


def send_offsets(timestamps: list[float], max_gap_s: float) -> list[float]:
    """When to send each message at the capture's pace, in seconds from the first:
    the capture's own spacing, with every gap longer than `max_gap_s` shortened to it
    (and a clock stepping back in the capture sends at once, never waits)."""
    offsets: list[float] = []
    at = 0.0
    previous = timestamps[0] if timestamps else 0.0
    for timestamp in timestamps:
        at += min(max(timestamp - previous, 0.0), max_gap_s)
        offsets.append(at)
        previous = timestamp
    return offsets


def clock_guard_note(packets: list[Packet], now: float) -> str | None:
    """What `--original-times` will do to these packets at a daemon: HEP times further
    than MAX_CLOCK_SKEW_S from its clock are replaced by the receive time (counted), so
    a capture recorded earlier keeps none of its own times. None when they are recent."""
    if not packets:
        return None
    off = max(abs(packets[0].timestamp - now), abs(packets[-1].timestamp - now))
    if off <= MAX_CLOCK_SKEW_S:
        return None
    return (
        f"--original-times: the capture's times are {_duration(off)} from now; a daemon "
        f"replaces HEP times more than {MAX_CLOCK_SKEW_S:.0f} s off its clock by the "
        "receive time (sipcdr_hep_timestamp_replaced_total), so the calls get the send times. "
        "To keep the capture's times, use `sipcdr import` instead"
    )


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400.0), ("hours", 3600.0), ("minutes", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _connect(
    target: tuple[str, int], tls: ssl.SSLContext | None, server_name: str | None
) -> socket.socket:
    try:
        sock = socket.create_connection(target, timeout=STREAM_TIMEOUT_S)
    except ConnectionRefusedError:
        host, port = target
        raise ConnectionRefusedError(
            f"nothing listens on {host}:{port} (connection refused)"
        ) from None
    if tls is None:
        return sock
    try:
        return tls.wrap_socket(sock, server_hostname=server_name or target[0])
    except ConnectionResetError:
        sock.close()
        # A HEP/TCP listener answers a ClientHello, which is no HEP frame, with a reset;
        # a HEP/TLS one resets only a connection it refuses on arrival.
        raise ConnectionResetError(
            "the listener reset the connection during the TLS handshake: a HEP/TCP port "
            "(use --tcp), or refused by its limits or allow-list"
        ) from None
    except BaseException:
        sock.close()
        raise


def _finish_stream(sock: socket.socket) -> None:
    """Half-close and read until the daemon closes: it has then read every frame.
    Over TLS this is also where a refused client certificate shows (TLS 1.3 finishes
    the agent's side of the handshake before the daemon checks it): the daemon's alert
    raises here. The TCP half-close goes around SSLSocket.shutdown, which would drop
    the TLS layer before the daemon's answer is read."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_WR)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        # The listener reset the connection before the last frame was sent.
        raise ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET)) from exc
    answered = 0
    while chunk := sock.recv(4096):
        answered += len(chunk)
    if answered and not isinstance(sock, ssl.SSLSocket):
        raise ConnectionError(f"the listener answered with {answered} bytes")  # never does


class _Pacer:
    """When each batch may go, and how many messages it holds: a fixed rate checks the
    clock once per batch of about BATCH_S worth of messages, not once per message."""

    __slots__ = ("batch", "offsets", "rate", "started")

    def __init__(self, rate: float | None, offsets: list[float] | None) -> None:
        self.rate = rate
        self.offsets = offsets  # the capture's pace: one message per batch
        self.started = time.monotonic()
        if offsets is not None:
            self.batch = 1
        elif rate:
            self.batch = max(1, min(MAX_BATCH, int(rate * BATCH_S)))
        else:
            self.batch = MAX_BATCH

    def wait(self, sent: int, loop_start: float, index: int) -> None:
        if self.rate:
            due = self.started + sent / self.rate
        elif self.offsets is not None:
            due = loop_start + self.offsets[index]
        else:
            return
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one sender sends: its loops of the run, at its share of the rate."""

    first: list[_Template]
    later: list[_Template]
    loops: range
    total_loops: int
    rate: float | None
    offsets: list[float] | None
    as_hep: bool
    original_times: bool
    span: float  # later loops shift the capture's times by this, so calls stay ordered


def _send(
    plan: _Plan,
    send: Callable[[list[bytes]], None],
    tick: Callable[[int], None],
) -> int:
    """Send `plan` through `send` a batch at a time; `tick(sent)` after each batch."""
    pacer = _Pacer(plan.rate, plan.offsets)
    batch = pacer.batch
    sent = 0
    for loop in plan.loops:
        templates = plan.later if loop else plan.first
        suffix = loop_suffix(loop, plan.total_loops) if loop else b""
        shift = loop * plan.span
        loop_start = time.monotonic()
        for at in range(0, len(templates), batch):
            chunk = templates[at : at + batch]
            pacer.wait(sent, loop_start, chunk[0].index)
            if not plan.as_hep:
                datagrams = [suffix.join(t.pieces) for t in chunk]
            elif plan.original_times:
                datagrams = [
                    t.pre + hep_stamp(t.timestamp + shift) + t.post + suffix.join(t.pieces)
                    for t in chunk
                ]
            else:
                # Like a live agent, stamp the send time (to the batch: under a millisecond).
                stamp = hep_stamp(time.time())
                datagrams = [t.pre + stamp + t.post + suffix.join(t.pieces) for t in chunk]
            send(datagrams)
            sent += len(datagrams)
            tick(sent)
    return sent


def _sender(
    target: tuple[str, int],
    transport: str,
    tls: ssl.SSLContext | None,
    server_name: str | None,
) -> tuple[socket.socket, Callable[[list[bytes]], None]]:
    if transport != "udp":
        sock = _connect(target, tls if transport == "tls" else None, server_name)
        sendall = sock.sendall
        return sock, lambda frames: sendall(b"".join(frames))
    family, address = resolve(target, False)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sendto = sock.sendto

    def send(datagrams: list[bytes]) -> None:
        for datagram in datagrams:
            sendto(datagram, address)

    return sock, send


def _run_plan(
    plan: _Plan,
    target: tuple[str, int],
    transport: str,
    tls: ssl.SSLContext | None,
    server_name: str | None,
    tick: Callable[[int], None],
) -> int:
    try:
        sock, send = _sender(target, transport, tls, server_name)
        with sock:
            sent = _send(plan, send, tick)
            if transport != "udp":
                _finish_stream(sock)
        return sent
    except ConnectionError as exc:
        if transport != "tcp" or isinstance(exc, ConnectionRefusedError):
            raise
        # A HEP/TCP listener closes with a reset only when it takes nothing more.
        raise ConnectionError(
            f"the listener reset the connection ({exc.strerror or exc}): refused by its "
            "limits or allow-list, bad framing, or a HEP/TLS port (use --tls)"
        ) from exc


def _worker(
    plan: _Plan,
    args: tuple[tuple[str, int], str, ssl.SSLContext | None, str | None],
    counters: Any,
    slot: int,
    errors: Any,
) -> None:
    def tick(sent: int) -> None:
        counters[slot] = sent

    try:
        _run_plan(plan, *args, tick)
    except OSError as exc:
        errors.put(OSError(exc.errno, str(exc)) if exc.errno else OSError(str(exc)))
        raise SystemExit(1) from None


def replay(
    path: Path,
    target: tuple[str, int],
    *,
    as_hep: bool = False,
    rate: float | None = None,
    loops: int = 1,
    original_pace: bool = True,
    capture_id: int = 0,
    auth_key: str | None = None,
    original_times: bool = False,
    transport: str = "udp",
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
    max_gap_s: float = DEFAULT_MAX_GAP_S,
    progress: Callable[[int, int], None] | None = None,
    packets: list[Packet] | None = None,
    workers: int = 1,
) -> ReplayResult:
    """Send every SIP message of `path` to `target` over `transport` (one of
    TRANSPORTS; tcp and tls carry HEPv3 frames, so they need `as_hep`). `tls` is
    the client context for "tls" (`client_context`); `server_name` the name the
    daemon's certificate must carry, by default the target host.

    `rate` messages per second when given; else the capture's pace when
    `original_pace` (gaps capped at `max_gap_s`), else as fast as possible.
    `progress(sent, total)` is called at most every PROGRESS_EVERY_S and at the end.
    `packets`: those of `path`, when the caller has read them already.
    `workers` sender processes share the loops (loop k goes to worker k mod workers,
    so each call stays in one sender, in order) and the rate; not at the capture's pace.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport {transport!r}: expected one of {TRANSPORTS}")
    if transport != "udp" and not as_hep:
        raise ValueError(f"over {transport} the daemon takes HEP frames only: use as_hep")
    if workers < 1 or (workers > 1 and original_pace and not rate):
        raise ValueError("workers: at least 1, and more than 1 only with a rate or as fast")
    if transport == "tls" and tls is None:
        tls = client_context()
    if packets is None:
        packets = list(iter_packets(path))
    resolve(target, transport != "udp")
    first, later = build_templates(
        packets, loops, as_hep=as_hep, capture_id=capture_id, auth_key=auth_key
    )
    total = len(packets) * loops
    span = (packets[-1].timestamp - packets[0].timestamp + 1.0) if packets else 0.0
    offsets = None
    if not rate and original_pace:
        offsets = send_offsets([packet.timestamp for packet in packets], max_gap_s)
    workers = min(workers, max(loops, 1))
    plans = [
        _Plan(
            first, later, range(worker, loops, workers), loops,
            rate / workers if rate else None, offsets, as_hep, original_times, span,
        )
        for worker in range(workers)
    ]  # fmt: skip
    expected = len(first) + (loops - 1) * len(later) if loops else 0
    started = time.monotonic()
    reported = started

    def tick(sent: int) -> None:
        nonlocal reported
        if progress is not None and time.monotonic() - reported >= PROGRESS_EVERY_S:
            reported = time.monotonic()
            progress(sent, total)

    if workers == 1:
        sent = _run_plan(plans[0], target, transport, tls, server_name, tick)
    else:
        sent = _run_workers(plans, (target, transport, tls, server_name), tick)
    if progress is not None:
        progress(sent, total)
    return ReplayResult(sent, total - expected, time.monotonic() - started)


def _run_workers(
    plans: list[_Plan],
    args: tuple[tuple[str, int], str, ssl.SSLContext | None, str | None],
    tick: Callable[[int], None],
) -> int:
    """Each plan in a forked process of its own; their counts read as they go."""
    context = multiprocessing.get_context("fork")
    counters = context.RawArray("q", len(plans))
    errors = context.SimpleQueue()
    procs = [
        context.Process(target=_worker, args=(plan, args, counters, slot, errors), daemon=True)
        for slot, plan in enumerate(plans)
    ]
    for proc in procs:
        proc.start()
    try:
        while any(proc.is_alive() for proc in procs):
            tick(sum(counters))
            time.sleep(WORKER_POLL_S)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
    if not errors.empty():
        raise errors.get()
    failed = [proc.exitcode for proc in procs if proc.exitcode]
    if failed:
        raise OSError(f"a sender process ended with status {failed[0]}")
    return int(sum(counters))
