"""Test helpers: locate the shared capture corpus and pull UDP payloads out of pcap files.

The corpus lives outside the repository (``../shared/data`` next to the checkout).
Missing data must not turn a CI run green by skipping, so ``require_shared_data``
fails when ``CI`` is set and skips only on a developer machine.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import NamedTuple

import dpkt
import pytest

__all__ = ["SHARED_DATA", "UdpDatagram", "require_shared_data", "udp_datagrams", "udp_payloads"]

SHARED_DATA: Path = Path(__file__).resolve().parents[2].parent / "shared" / "data"

# Link-layer header types (tcpdump.org/linktypes.html); 12 and 14 are the
# platform DLT_RAW values that some writers store instead of LINKTYPE_RAW.
_LINKTYPE_NULL = 0
_LINKTYPE_ETHERNET = 1
_LINKTYPE_RAW = (12, 14, 101)
_LINKTYPE_LOOP = 108
_LINKTYPE_LINUX_SLL = 113
_LINKTYPE_LINUX_SLL2 = 276
_LINKTYPE_IPV4 = 228
_LINKTYPE_IPV6 = 229

_ETH_IPV4 = 0x0800
_ETH_IPV6 = 0x86DD
_ETH_VLAN = (0x8100, 0x88A8, 0x9100)
# AF_INET6 differs by the capturing OS: Linux 10, NetBSD/OpenBSD 24, FreeBSD 28, macOS 30.
_BSD_AF_INET6 = (10, 24, 28, 30)
_IPPROTO_UDP = 17
_IPV6_EXTENSIONS = (0, 43, 60)  # hop-by-hop, routing, destination options
_IPV6_AH = 51


class UdpDatagram(NamedTuple):
    timestamp: float
    src_ip: str
    dst_ip: str
    src_port: int
    dst_port: int
    payload: bytes


def require_shared_data() -> Path:
    """Return the shared data folder; fail under CI, skip elsewhere, when it is missing."""
    if SHARED_DATA.is_dir():
        return SHARED_DATA
    message = f"shared test data not found at {SHARED_DATA}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _ip_from_link(linktype: int, frame: bytes) -> bytes | None:
    if linktype == _LINKTYPE_ETHERNET:
        if len(frame) < 14:
            return None
        ethertype = int.from_bytes(frame[12:14], "big")
        offset = 14
        while ethertype in _ETH_VLAN:
            if len(frame) < offset + 4:
                return None
            ethertype = int.from_bytes(frame[offset + 2 : offset + 4], "big")
            offset += 4
        return frame[offset:] if ethertype in (_ETH_IPV4, _ETH_IPV6) else None
    if linktype == _LINKTYPE_LINUX_SLL:
        if len(frame) < 16:
            return None
        protocol = int.from_bytes(frame[14:16], "big")
        return frame[16:] if protocol in (_ETH_IPV4, _ETH_IPV6) else None
    if linktype == _LINKTYPE_LINUX_SLL2:
        if len(frame) < 20:
            return None
        protocol = int.from_bytes(frame[0:2], "big")
        return frame[20:] if protocol in (_ETH_IPV4, _ETH_IPV6) else None
    if linktype in (_LINKTYPE_NULL, _LINKTYPE_LOOP):
        if len(frame) < 4:
            return None
        # DLT_NULL stores the family in the capturing host's byte order, so try both.
        families = {int.from_bytes(frame[:4], "big")}
        if linktype == _LINKTYPE_NULL:
            families.add(int.from_bytes(frame[:4], "little"))
        if 2 in families or families & set(_BSD_AF_INET6):
            return frame[4:]
        return None
    if linktype in _LINKTYPE_RAW or linktype in (_LINKTYPE_IPV4, _LINKTYPE_IPV6):
        return frame
    raise ValueError(f"unsupported link type {linktype}")


def _udp_from_ip(packet: bytes) -> tuple[str, str, bytes] | None:
    """(source, destination, UDP datagram) of an unfragmented IPv4/IPv6 packet, else None."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < 20:
            return None
        header_len = (packet[0] & 0x0F) * 4
        total_len = int.from_bytes(packet[2:4], "big")
        more_fragments_or_offset = int.from_bytes(packet[6:8], "big") & 0x3FFF
        if more_fragments_or_offset or packet[9] != _IPPROTO_UDP:
            return None
        # Zero total length appears on captures taken before TSO segmentation.
        end = total_len if header_len <= total_len <= len(packet) else len(packet)
        src = socket.inet_ntop(socket.AF_INET, packet[12:16])
        dst = socket.inet_ntop(socket.AF_INET, packet[16:20])
        return src, dst, packet[header_len:end]
    if version == 6:
        if len(packet) < 40:
            return None
        next_header = packet[6]
        payload_len = int.from_bytes(packet[4:6], "big")
        end = 40 + payload_len if payload_len and 40 + payload_len <= len(packet) else len(packet)
        offset = 40
        while next_header in _IPV6_EXTENSIONS or next_header == _IPV6_AH:
            if end < offset + 8:
                return None
            if next_header == _IPV6_AH:
                ext_len = (packet[offset + 1] + 2) * 4
            else:
                ext_len = (packet[offset + 1] + 1) * 8
            next_header = packet[offset]
            offset += ext_len
        if next_header != _IPPROTO_UDP:  # includes fragments (44): no reassembly here
            return None
        src = socket.inet_ntop(socket.AF_INET6, packet[8:24])
        dst = socket.inet_ntop(socket.AF_INET6, packet[24:40])
        return src, dst, packet[offset:end]
    return None


def udp_datagrams(path: Path) -> list[UdpDatagram]:
    """Every unfragmented UDP datagram over IPv4/IPv6 in a pcap or pcapng file."""
    with path.open("rb") as handle:
        magic = handle.read(4)
        handle.seek(0)
        reader = (
            dpkt.pcapng.Reader(handle) if magic == b"\x0a\x0d\x0d\x0a" else dpkt.pcap.Reader(handle)
        )
        linktype = int(reader.datalink())
        result: list[UdpDatagram] = []
        for timestamp, frame in reader:
            packet = _ip_from_link(linktype, bytes(frame))
            if packet is None:
                continue
            found = _udp_from_ip(packet)
            if found is None or len(found[2]) < 8:
                continue
            src, dst, datagram = found
            udp_len = int.from_bytes(datagram[4:6], "big")
            end = udp_len if 8 <= udp_len <= len(datagram) else len(datagram)
            result.append(
                UdpDatagram(
                    float(timestamp),
                    src,
                    dst,
                    int.from_bytes(datagram[0:2], "big"),
                    int.from_bytes(datagram[2:4], "big"),
                    datagram[8:end],
                )
            )
        return result


def udp_payloads(path: Path) -> list[tuple[float, bytes]]:
    """(capture timestamp, UDP payload) for every unfragmented UDP datagram in the file."""
    return [(d.timestamp, d.payload) for d in udp_datagrams(path)]
