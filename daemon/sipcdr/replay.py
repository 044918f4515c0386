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
every `PROGRESS_EVERY_S`. With several loops each pass rewrites the Call-ID header of
every message, so one capture becomes many distinct calls: the load generator of the
end-to-end benchmark.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

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
_CALL_ID_HEADER = re.compile(rb"(?im)^((?:call-id|i)[ \t]*:[ \t]*)([^\r\n]+?)(?=[ \t]*\r?$)")


@dataclass(frozen=True, slots=True)
class ReplayResult:
    sent: int
    skipped: int  # not parseable as SIP: sent unchanged on loop 0, skipped on rewrites
    seconds: float


def _rename_call_id(payload: bytes, call_id: bytes, loop: int) -> bytes:
    """Only in the Call-ID header: a short Call-ID ("1") also occurs elsewhere."""
    renamed = call_id + b"-L%d" % loop

    def swap(match: re.Match[bytes]) -> bytes:
        return match[1] + renamed if match[2] == call_id else match[0]

    return _CALL_ID_HEADER.sub(swap, payload)


def _loop_packets(packets: list[Packet], loop: int) -> Iterator[tuple[int, Packet, bytes]]:
    for index, packet in enumerate(packets):
        payload = packet.payload
        if loop:
            try:
                msg = parse(payload)
            except SipParseError:
                continue
            if msg.call_id:
                payload = _rename_call_id(payload, msg.call_id.encode(), loop)
        yield index, packet, payload


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
    socket.socket.shutdown(sock, socket.SHUT_WR)
    answered = 0
    while chunk := sock.recv(4096):
        answered += len(chunk)
    if answered and not isinstance(sock, ssl.SSLSocket):
        raise ConnectionError(f"the listener answered with {answered} bytes")  # never does


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
) -> ReplayResult:
    """Send every SIP message of `path` to `target` over `transport` (one of
    TRANSPORTS; tcp and tls carry HEPv3 frames, so they need `as_hep`). `tls` is
    the client context for "tls" (`client_context`); `server_name` the name the
    daemon's certificate must carry, by default the target host.

    `rate` messages per second when given; else the capture's pace when
    `original_pace` (gaps capped at `max_gap_s`), else as fast as possible.
    `progress(sent, total)` is called at most every PROGRESS_EVERY_S and at the end.
    `packets`: those of `path`, when the caller has read them already.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport {transport!r}: expected one of {TRANSPORTS}")
    if transport != "udp" and not as_hep:
        raise ValueError(f"over {transport} the daemon takes HEP frames only: use as_hep")
    if transport == "tls" and tls is None:
        tls = client_context()
    if packets is None:
        packets = list(iter_packets(path))
    stream = transport != "udp"
    family, address = resolve(target, stream)
    total = len(packets) * loops
    sent = skipped = 0
    reported = time.monotonic()
    offsets = send_offsets([packet.timestamp for packet in packets], max_gap_s)
    started = time.monotonic()
    first_ts = packets[0].timestamp if packets else 0.0
    # Later loops keep the capture's times shifted past its end, so calls stay ordered.
    span = (packets[-1].timestamp - first_ts + 1.0) if packets else 0.0
    try:
        with (
            _connect(target, tls if transport == "tls" else None, server_name)
            if stream
            else socket.socket(family, socket.SOCK_DGRAM)
        ) as sock:
            for loop in range(loops):
                loop_start = time.monotonic()
                yielded = 0
                for index, packet, payload in _loop_packets(packets, loop):
                    yielded += 1
                    if rate:
                        due = started + sent / rate
                    elif original_pace:
                        due = loop_start + offsets[index]
                    else:
                        due = 0.0
                    delay = due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    if as_hep:
                        data = hepencode.encode(
                            src_ip=packet.src_ip,
                            dst_ip=packet.dst_ip,
                            src_port=packet.src_port,
                            dst_port=packet.dst_port,
                            # Like a live agent, stamp the send time; the capture's own times
                            # (shifted per loop) only when asked, for offline tests.
                            timestamp=(
                                packet.timestamp + loop * span if original_times else time.time()
                            ),
                            payload=payload,
                            ip_protocol=_IP_PROTOCOL.get(packet.transport, 17),
                            capture_id=capture_id,
                            auth_key=auth_key,
                        )
                    else:
                        data = payload
                    if stream:
                        sock.sendall(data)
                    else:
                        sock.sendto(data, address)
                    sent += 1
                    if progress is not None and time.monotonic() - reported >= PROGRESS_EVERY_S:
                        reported = time.monotonic()
                        progress(sent, total)
                skipped += len(packets) - yielded
            if stream:
                _finish_stream(sock)
    except ConnectionError as exc:
        if transport != "tcp" or isinstance(exc, ConnectionRefusedError):
            raise
        # A HEP/TCP listener closes with a reset only when it takes nothing more.
        raise ConnectionError(
            f"the listener reset the connection ({exc.strerror or exc}): refused by its "
            "limits or allow-list, bad framing, or a HEP/TLS port (use --tls)"
        ) from exc
    return ReplayResult(sent, skipped, time.monotonic() - started)
