"""Captures for load: N whole calls (INVITE with SDP, 180, 200, ACK, BYE, 200, as
`receive.py` sends them), each Call-ID distinct and carrying a prefix, written as a
pcap that `sipcdr replay --loop` sends over and over."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import dpkt

sys.path.insert(0, str(Path(__file__).resolve().parent))

from receive import CALLEE, CALLER, MARK, call_flow

MESSAGES_PER_CALL = 6
MESSAGE_GAP_S = 0.001


def write_calls(path: Path, calls: int, prefix: str) -> int:
    """`calls` calls whose Call-IDs start with `prefix`; the number of messages."""
    flow = call_flow()
    count = 0
    with path.open("wb") as handle:
        writer = dpkt.pcap.Writer(handle, linktype=dpkt.pcap.DLT_EN10MB)
        for call in range(calls):
            mark = f"{prefix}{call:06d}".encode()
            for payload, from_caller in flow:
                src, dst = (CALLER, CALLEE) if from_caller else (CALLEE, CALLER)
                udp = dpkt.udp.UDP(sport=src[1], dport=dst[1], data=payload.replace(MARK, mark))
                udp.ulen = len(udp)
                ip = dpkt.ip.IP(
                    src=socket.inet_aton(src[0]), dst=socket.inet_aton(dst[0]), p=17, data=udp
                )
                ip.len = len(ip)
                frame = dpkt.ethernet.Ethernet(type=dpkt.ethernet.ETH_TYPE_IP, data=ip)
                writer.writepkt(bytes(frame), 1_700_000_000.0 + count * MESSAGE_GAP_S)
                count += 1
    return count
