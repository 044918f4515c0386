"""`sipcdr replay`: send the SIP of a capture to a listener, plain or in HEPv3.

Pacing: the capture's own (default), a fixed rate, or as fast as the socket takes
it. With several loops each pass rewrites the Call-ID header of every message, so one
capture becomes many distinct calls: the load generator of the end-to-end benchmark.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sipcdr import hep
from sipcdr.capture.pcapfile import iter_packets
from sipcdr.model import Packet
from sipcdr.sip import SipParseError, parse

_IP_PROTOCOL = {"udp": 17, "tcp": 6, "sctp": 132}
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


def _loop_packets(packets: list[Packet], loop: int) -> Iterator[tuple[Packet, bytes]]:
    for packet in packets:
        payload = packet.payload
        if loop:
            try:
                msg = parse(payload)
            except SipParseError:
                continue
            if msg.call_id:
                payload = _rename_call_id(payload, msg.call_id.encode(), loop)
        yield packet, payload


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
) -> ReplayResult:
    """Send every SIP message of `path` to `target` over UDP.

    `rate` messages per second when given; else the capture's pace when
    `original_pace`, else as fast as possible.
    """
    packets = list(iter_packets(path))
    family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    sent = skipped = 0
    started = time.monotonic()
    first_ts = packets[0].timestamp if packets else 0.0
    # Later loops keep the capture's times shifted past its end, so calls stay ordered.
    span = (packets[-1].timestamp - first_ts + 1.0) if packets else 0.0
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        for loop in range(loops):
            loop_start = time.monotonic()
            yielded = 0
            for packet, payload in _loop_packets(packets, loop):
                yielded += 1
                if rate:
                    due = started + sent / rate
                elif original_pace:
                    due = loop_start + (packet.timestamp - first_ts)
                else:
                    due = 0.0
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                if as_hep:
                    data = hep.encode(
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
                sock.sendto(data, target)
                sent += 1
            skipped += len(packets) - yielded
    return ReplayResult(sent, skipped, time.monotonic() - started)
