"""Builds the SIP messages of one call for correlator tests, as real bytes for the real
parser: a test reads like the call flow it checks."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

import dpkt
from sipcdr.dialog import Correlator
from sipcdr.model import Cdr, Packet
from sipcdr.sip import parse

CALLER_ADDR = ("192.0.2.10", 5060)
PROXY_ADDR = ("198.51.100.1", 5060)
CALLEE_ADDR = ("203.0.113.20", 5060)


class Call:
    """One call's identity; `request`/`response` render its messages."""

    def __init__(
        self,
        call_id: str = "call-1@192.0.2.10",
        caller: str = "+4940111222",
        callee: str = "+4930333444",
        from_tag: str = "caller-tag",
        pai: str | None = None,
    ) -> None:
        self.call_id = call_id
        self.caller = caller
        self.callee = callee
        self.from_tag = from_tag
        self.pai = pai

    def request(
        self,
        method: str,
        cseq: int = 1,
        branch: str = "z9hG4bK-inv-1",
        to_tag: str | None = None,
        from_callee: bool = False,
        extra: Sequence[str] = (),
        vias: Sequence[str] = (),
    ) -> bytes:
        caller_addr = f"<sip:{self.caller}@example.com>;tag={self.from_tag}"
        callee_addr = f"<sip:{self.callee}@example.net>" + (f";tag={to_tag}" if to_tag else "")
        if from_callee:
            from_, to = callee_addr, caller_addr
        else:
            from_, to = caller_addr, callee_addr
        lines = [
            f"{method} sip:{self.callee}@example.net SIP/2.0",
            *(f"Via: SIP/2.0/UDP {via}" for via in vias),
            f"Via: SIP/2.0/UDP 192.0.2.10:5060;branch={branch}",
            "Max-Forwards: 70",
            f"From: {from_}",
            f"To: {to}",
            f"Call-ID: {self.call_id}",
            f"CSeq: {cseq} {method}",
        ]
        if self.pai and method == "INVITE":
            lines.append(f"P-Asserted-Identity: <sip:{self.pai}@carrier.example>")
        lines += [*extra, "User-Agent: TestUA/1.0", "Content-Length: 0", "", ""]
        return "\r\n".join(lines).encode()

    def response(
        self,
        code: int,
        reason: str = "",
        cseq: int = 1,
        method: str = "INVITE",
        branch: str = "z9hG4bK-inv-1",
        to_tag: str | None = "callee-tag",
        extra: Sequence[str] = (),
        vias: Sequence[str] = (),
    ) -> bytes:
        to = f"<sip:{self.callee}@example.net>" + (f";tag={to_tag}" if to_tag else "")
        lines = [
            f"SIP/2.0 {code} {reason or 'Reason'}",
            *(f"Via: SIP/2.0/UDP {via}" for via in vias),
            f"Via: SIP/2.0/UDP 192.0.2.10:5060;branch={branch}",
            f"From: <sip:{self.caller}@example.com>;tag={self.from_tag}",
            f"To: {to}",
            f"Call-ID: {self.call_id}",
            f"CSeq: {cseq} {method}",
            *extra,
            "Server: TestPBX/2.0",
            "Content-Length: 0",
            "",
            "",
        ]
        return "\r\n".join(lines).encode()


def packet(
    timestamp: float,
    data: bytes,
    src: tuple[str, int] = CALLER_ADDR,
    dst: tuple[str, int] = CALLEE_ADDR,
    node: str = "test",
) -> Packet:
    return Packet(timestamp, src[0], src[1], dst[0], dst[1], "udp", data, node)


def feed(
    correlator: Correlator,
    timestamp: float,
    data: bytes,
    src: tuple[str, int] = CALLER_ADDR,
    dst: tuple[str, int] = CALLEE_ADDR,
) -> list[Cdr]:
    return list(correlator.feed(packet(timestamp, data, src, dst), parse(data)))


def answered_call_messages(call: Call) -> list[bytes]:
    """An answered call, caller hangs up: INVITE, 180, 200, ACK, BYE, 200."""
    return [
        call.request("INVITE"),
        call.response(180, "Ringing"),
        call.response(200, "OK"),
        call.request("ACK", branch="z9hG4bK-ack", to_tag="callee-tag"),
        call.request("BYE", 2, "z9hG4bK-bye", to_tag="callee-tag"),
        call.response(200, "OK", 2, "BYE", "z9hG4bK-bye"),
    ]


class CdrCollector:
    """A pipeline sink that keeps the CDRs in memory."""

    name = "collector"

    def __init__(self) -> None:
        self.cdrs: list[Cdr] = []

    def write(self, cdr: Cdr) -> None:
        self.cdrs.append(cdr)

    def flush(self) -> None:
        return None


def write_calls_pcap(path: Path, calls: Sequence[Call], gap_s: float) -> None:
    """The calls' messages one after the other, `gap_s` apart, as Ethernet/IPv4/UDP
    frames in a pcap file, from 192.0.2.10 to 203.0.113.20."""
    caller, callee = socket.inet_aton("192.0.2.10"), socket.inet_aton("203.0.113.20")
    with path.open("wb") as handle:
        writer = dpkt.pcap.Writer(handle)
        stamp = 1_795_000_000.0
        for call in calls:
            for data in answered_call_messages(call):
                udp = dpkt.udp.UDP(sport=5060, dport=5060, data=data)
                udp.ulen = len(udp)
                ip = dpkt.ip.IP(src=caller, dst=callee, p=dpkt.ip.IP_PROTO_UDP, data=udp)
                ip.len = len(ip)
                frame = dpkt.ethernet.Ethernet(type=dpkt.ethernet.ETH_TYPE_IP, data=ip)
                writer.writepkt(bytes(frame), ts=stamp)
                stamp += gap_s
        writer.close()
