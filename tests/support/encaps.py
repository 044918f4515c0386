"""Frames with SIP (or anything) inside the encapsulations sipcdr unwraps, built byte by
byte with struct, for the decoder, import and live-capture filter tests.

``tunnelled(kind, packet)`` wraps an IPv4 or IPv6 packet the way each encapsulation
reaches a collector and returns the Ethernet frame seen there.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

# Addresses of the tunnel endpoints; the packets inside use their own.
OUTER_SRC = "100.64.0.1"
OUTER_DST = "100.64.0.2"
MAC = b"\x02\x00\x00\x00\x00\x0a\x02\x00\x00\x00\x00\x0b"

ENCAPSULATIONS = ("pppoe", "mpls", "gtpu", "vxlan", "geneve", "tzsp")
UDP_PORTS = {"gtpu": 2152, "vxlan": 4789, "geneve": 6081, "tzsp": 37008}

ETH_IPV4, ETH_IPV6, ETH_BRIDGED = 0x0800, 0x86DD, 0x6558


def ipv4(payload: bytes, src: str, dst: str, proto: int = 17) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        1,
        0,
        64,
        proto,
        0,
        socket.inet_pton(socket.AF_INET, src),
        socket.inet_pton(socket.AF_INET, dst),
    )
    return header + payload


def ipv6(payload: bytes, src: str, dst: str, nh: int = 17) -> bytes:
    return (
        struct.pack("!IHBB", 6 << 28, len(payload), nh, 64)
        + socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + payload
    )


def udp(payload: bytes, sport: int, dport: int) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def eth(body: bytes, etype: int) -> bytes:
    return MAC + struct.pack("!H", etype) + body


def ip_ethertype(packet: bytes) -> int:
    return ETH_IPV4 if packet[0] >> 4 == 4 else ETH_IPV6


def pppoe(packet: bytes, protocol: int | None = None, compressed: bool = False) -> bytes:
    """RFC 2516 session stage: version/type 0x11, code 0, session id, length, then the
    PPP frame: protocol field and packet."""
    if protocol is None:
        protocol = 0x0021 if packet[0] >> 4 == 4 else 0x0057
    field = struct.pack("!B", protocol) if compressed else struct.pack("!H", protocol)
    ppp = field + packet
    return struct.pack("!BBHH", 0x11, 0, 0x2A, len(ppp)) + ppp


def mpls(payload: bytes, labels: Sequence[int] = (16,), bottom: bool = True) -> bytes:
    """RFC 3032 label stack entries (label, TC 0, S on the last, TTL 64)."""
    stack = b""
    for index, label in enumerate(labels):
        last = bottom and index == len(labels) - 1
        stack += struct.pack("!I", label << 12 | int(last) << 8 | 64)
    return stack + payload


def gtpu(
    packet: bytes,
    *,
    teid: int = 0x1F2E3D4C,
    sequence: int | None = None,
    extensions: Sequence[tuple[int, bytes]] = (),
    message_type: int = 255,
) -> bytes:
    """3GPP TS 29.281 GTPv1-U: a G-PDU by default; ``extensions`` are (type, content)
    pairs, each content padded so the header is a multiple of 4 bytes."""
    flags = 0x30
    optional = b""
    if sequence is not None or extensions:
        flags |= 0x02 if sequence is not None else 0
        flags |= 0x04 if extensions else 0
        first = extensions[0][0] if extensions else 0
        optional = struct.pack("!HBB", sequence or 0, 0, first)
        for index, (_kind, content) in enumerate(extensions):
            following = extensions[index + 1][0] if index + 1 < len(extensions) else 0
            body = content + b"\x00" * (-(len(content) + 2) % 4)
            optional += struct.pack("!B", (len(body) + 2) // 4) + body + bytes([following])
    rest = optional + packet
    return struct.pack("!BBHI", flags, message_type, len(rest), teid) + rest


def vxlan(frame: bytes, vni: int = 4242, flags: int = 0x08) -> bytes:
    """RFC 7348: flags (I), reserved, VNI, reserved; then an Ethernet frame."""
    return struct.pack("!B3xI", flags, vni << 8) + frame


def geneve(payload: bytes, ptype: int = ETH_BRIDGED, options: bytes = b"") -> bytes:
    """RFC 8926: version 0, options length in 4-byte units, protocol type, VNI."""
    assert len(options) % 4 == 0
    return struct.pack("!BBHI", len(options) // 4, 0, ptype, 77 << 8) + options + payload


def tzsp(frame: bytes, tags: bytes = b"\x01", encapsulation: int = 1, kind: int = 0) -> bytes:
    """TZSP version 1: type (0 received), encapsulation (1 Ethernet), tags up to END."""
    return struct.pack("!BBH", 1, kind, encapsulation) + tags + frame


def tunnelled(kind: str, packet: bytes) -> bytes:
    """The Ethernet frame carrying the IP ``packet`` through encapsulation ``kind``."""
    inner_frame = eth(packet, ip_ethertype(packet))
    if kind == "pppoe":
        return eth(pppoe(packet), 0x8864)
    if kind == "mpls":
        return eth(mpls(packet, labels=(1000, 2000)), 0x8847)
    if kind == "gtpu":
        # A PDU session container (type 0x85), as 5G and many LTE user planes send.
        body = gtpu(packet, sequence=7, extensions=[(0x85, b"\x00\x09")])
    elif kind == "vxlan":
        body = vxlan(inner_frame)
    elif kind == "geneve":
        body = geneve(inner_frame, options=struct.pack("!HBB", 0x0108, 1, 1) + bytes(4))
    elif kind == "tzsp":
        body = tzsp(inner_frame, tags=b"\x00\x28\x02\x05\xdc\x01")
    else:
        raise ValueError(kind)
    return eth(ipv4(udp(body, 40000, UDP_PORTS[kind]), OUTER_SRC, OUTER_DST), ETH_IPV4)
