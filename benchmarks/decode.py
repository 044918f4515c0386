"""Frame decoding cost: ``SipExtractor.feed`` per frame, plain and through each
encapsulation, against dpkt parsing the same frame, measured in one run.

Media is most of what a capture link carries, so the figure that matters is what a
frame of RTP costs before it is dropped: plain, and inside each encapsulation
(unwrapped first, then dropped by its first byte). dpkt's ``Ethernet`` parses the
headers it knows (Ethernet, PPPoE, MPLS, IP, UDP; not GTP-U, VXLAN, GENEVE or TZSP,
which it leaves as UDP payload); it is the baseline, not a contender doing the same
work. Each figure is the fastest of many short rounds, the cases interleaved: a frame
costs a microsecond or two, and on a shared machine slower rounds measure the
neighbours.

A second table times frames built to be expensive: header chains a sender can make as
long as a datagram (TZSP padding and tags, GTP-U extension headers), which the decoder
must cap or skip in C rather than walk byte by byte.

    python benchmarks/decode.py [--rounds 25] [--number 5000]
"""

from __future__ import annotations

import argparse
import socket
import struct
import time
from collections.abc import Callable

import dpkt
from sipcdr.decode.extract import SipExtractor

SIP = (
    b"INVITE sip:+4930333444@example.net SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 10.1.0.1:5060;branch=z9hG4bK-1\r\n"
    b"From: <sip:+4940111222@example.com>;tag=a\r\nTo: <sip:+4930333444@example.net>\r\n"
    b"Call-ID: bench@10.1.0.1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
)
RTP = b"\x80\x08\x12\x34" + bytes(168)  # 20 ms of G.711
MAC = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02"


def ipv4(payload: bytes, src: str = "10.1.0.1", dst: str = "10.1.0.2") -> bytes:
    return (
        struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(payload), 1, 0, 64, 17, 0)
        + socket.inet_aton(src)
        + socket.inet_aton(dst)
        + payload
    )


def udp(payload: bytes, sport: int, dport: int) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def eth(body: bytes, etype: int = 0x0800) -> bytes:
    return MAC + struct.pack("!H", etype) + body


def outer(body: bytes, dport: int) -> bytes:
    return eth(ipv4(udp(body, 40000, dport), "100.64.0.1", "100.64.0.2"))


def gre(body: bytes, flags: int, ptype: int, extra: bytes = b"") -> bytes:
    """``body`` in GRE (``extra``: the key or sequence number ``flags`` announce) in
    IPv4, as an Ethernet frame."""
    header = struct.pack("!HH", flags, ptype) + extra
    datagram = header + body
    return eth(
        struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(datagram), 1, 0, 64, 47, 0)
        + socket.inet_aton("100.64.0.1")
        + socket.inet_aton("100.64.0.2")
        + datagram
    )


def encapsulations(packet: bytes) -> dict[str, bytes]:
    """The IPv4 ``packet`` as each encapsulation delivers it, as an Ethernet frame."""
    inner = eth(packet)
    sequence = struct.pack("!I", 7)
    # ERSPAN II: version 1, VLAN, COS/En/T, session 1, index; III: version 2 and a
    # 12-byte header, frame type 0 (Ethernet), no platform subheader.
    erspan2 = struct.pack("!HHI", 1 << 12, 1, 0)
    erspan3 = struct.pack("!HHIHH", 2 << 12, 1, 0, 0, 0)
    pppoe = struct.pack("!BBHHH", 0x11, 0, 1, len(packet) + 2, 0x0021) + packet
    labels = struct.pack("!II", 1000 << 12 | 64, 2000 << 12 | 1 << 8 | 64)
    gtpu = struct.pack("!BBHIHBB", 0x34, 255, len(packet) + 8, 1, 0, 0, 0x85)
    gtpu += b"\x01\x00\x09\x00" + packet
    return {
        "plain": eth(packet),
        "PPPoE": eth(pppoe, 0x8864),
        "MPLS, 2 labels": eth(labels + packet, 0x8847),
        "GTP-U, 1 extension": outer(gtpu, 2152),
        "VXLAN": outer(struct.pack("!B3xI", 0x08, 1 << 8) + inner, 4789),
        "GENEVE": outer(struct.pack("!BBHI", 0, 0, 0x6558, 1 << 8) + inner, 6081),
        "TZSP": outer(b"\x01\x00\x00\x01\x01" + inner, 37008),
        "GRE, bridged Ethernet": gre(inner, 0, 0x6558),
        "ERSPAN II": gre(erspan2 + inner, 0x1000, 0x88BE, sequence),
        "ERSPAN III": gre(erspan3 + inner, 0x1000, 0x22EB, sequence),
    }


def adversarial(packet: bytes) -> dict[str, bytes]:
    """Headers padded out to a full datagram around the IPv4 ``packet``."""
    inner = eth(packet)
    # 1-unit extension headers (length, 2 bytes, next type), each pointing to another.
    chain = b"\x01\x00\x00\x85" * 350
    gtpu = struct.pack("!HBB", 0, 0, 0x85) + chain[:-1] + b"\x00" + packet
    gtpu = struct.pack("!BBHI", 0x34, 255, len(gtpu), 1) + gtpu
    return {
        "TZSP, 1,400 padding bytes": outer(
            b"\x01\x00\x00\x01" + bytes(1400) + b"\x01" + inner, 37008
        ),
        "TZSP, 700 empty tags": outer(
            b"\x01\x00\x00\x01" + b"\x0a\x00" * 700 + b"\x01" + inner, 37008
        ),
        "GTP-U, 350 extensions": outer(gtpu, 2152),
    }


def per_frame(feed: Callable[[float, bytes], object], frame: bytes, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        feed(1.0, frame)
    return (time.perf_counter() - start) / number


def dpkt_parse(_ts: float, frame: bytes) -> object:
    return dpkt.ethernet.Ethernet(frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--number", type=int, default=5000)
    args = parser.parse_args()
    extractor = SipExtractor(1, "bench")
    cases = [
        (f"{what}, {name}", frame)
        for what, payload in (("RTP", RTP), ("SIP", SIP))
        for name, frame in encapsulations(ipv4(udp(payload, 5060, 5060))).items()
    ]
    ours: dict[str, list[float]] = {name: [] for name, _ in cases}
    theirs: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _ in range(args.rounds):
        for name, frame in cases:
            ours[name].append(per_frame(extractor.feed, frame, args.number))
            theirs[name].append(per_frame(dpkt_parse, frame, args.number))
    plain = {what: min(ours[f"{what}, plain"]) for what in ("RTP", "SIP")}
    print(f"{'frame':32} {'sipcdr ns':>10} {'x plain':>8} {'dpkt ns':>9} {'dpkt/sipcdr':>12}")
    for name, _frame in cases:
        mine = min(ours[name])
        base = min(theirs[name])
        print(
            f"{name:32} {mine * 1e9:10.0f} {mine / plain[name[:3]]:8.2f}"
            f" {base * 1e9:9.0f} {base / mine:12.2f}"
        )
    hostile = list(adversarial(ipv4(udp(RTP, 5060, 5060))).items())
    costs: dict[str, list[float]] = {name: [] for name, _ in hostile}
    for _ in range(args.rounds):
        for name, frame in hostile:
            costs[name].append(per_frame(extractor.feed, frame, max(1, args.number // 20)))
    print(f"\n{'adversarial frame, RTP inside':32} {'sipcdr ns':>10} {'x plain':>8}")
    for name, _frame in hostile:
        mine = min(costs[name])
        print(f"{name:32} {mine * 1e9:10.0f} {mine / plain['RTP']:8.2f}")
    stats = extractor.stats
    print(f"SIP messages found: {stats.sip_messages}, media dropped: {stats.non_sip_payloads}")


if __name__ == "__main__":
    main()
