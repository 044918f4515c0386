"""Tests for the frame and stream decoders of sipcdr.decode on frames built byte by byte."""

from __future__ import annotations

import socket
import struct
import zlib
from collections.abc import Sequence

import encaps
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sipcdr.decode.base import (
    MAX_DEPTH,
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    DecapStats,
    Segment,
    ip_text,
)
from sipcdr.decode.extract import SipExtractor
from sipcdr.decode.link import Decapsulator
from sipcdr.decode.startline import KEEPALIVE, NOT_SIP, match_start, sip_offset
from sipcdr.decode.tcp import TcpReassembler
from sipcdr.decode.tunnels import UDP_TUNNEL_PORTS

SIP = (
    b"OPTIONS sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK776asdhds\r\n"
    b"Call-ID: a84b4c76e66710@pc33.example.com\r\n"
    b"CSeq: 1 OPTIONS\r\n"
    b"Content-Length: 0\r\n\r\n"
)

SRC4 = "192.0.2.10"
DST4 = "198.51.100.20"
SRC6 = "2001:db8::10"
DST6 = "2001:db8:1::20"
MAC = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02"


# -- frame builders ---------------------------------------------------------------------


def a4(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, text)


def a6(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


def udp(payload: bytes, sport: int = 5060, dport: int = 5060) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(
    payload: bytes = b"",
    seq: int = 1000,
    flags: int = TCP_ACK | TCP_PSH,
    sport: int = 40000,
    dport: int = 5060,
) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0) + payload


def ipv4(
    body: bytes,
    proto: int = 17,
    src: str = SRC4,
    dst: str = DST4,
    ident: int = 1,
    frag: int = 0,
    options: bytes = b"",
) -> bytes:
    ihl = 5 + len(options) // 4
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        ihl * 4 + len(body),
        ident,
        frag,
        64,
        proto,
        0,
        a4(src),
        a4(dst),
    )
    return header + options + body


def ipv6(body: bytes, nh: int = 17, src: str = SRC6, dst: str = DST6) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), nh, 64, a6(src), a6(dst)) + body


def eth(body: bytes, etype: int = 0x0800, tags: Sequence[tuple[int, int]] = ()) -> bytes:
    """Ethernet with VLAN tags given outermost first as (tag protocol id, VLAN id)."""
    header = MAC
    for tpid, vid in tags:
        header += struct.pack("!HH", tpid, vid)
    return header + struct.pack("!H", etype) + body


def gre(
    body: bytes,
    ptype: int,
    *,
    checksum: bool = False,
    key: int | None = None,
    seq: int | None = None,
) -> bytes:
    flags = 0
    extra = b""
    if checksum:
        flags |= 0x8000
        extra += b"\x00\x00\x00\x00"
    if key is not None:
        flags |= 0x2000
        extra += struct.pack("!I", key)
    if seq is not None:
        flags |= 0x1000
        extra += struct.pack("!I", seq)
    return struct.pack("!HH", flags, ptype) + extra + body


def sctp(*chunks: bytes, sport: int = 5060, dport: int = 5060) -> bytes:
    return struct.pack("!HHII", sport, dport, 0x1234, 0) + b"".join(chunks)


def data_chunk(payload: bytes, tsn: int = 1, flags: int = 0x03, ppid: int = 0) -> bytes:
    chunk = struct.pack("!BBHIHHI", 0, flags, 16 + len(payload), tsn, 0, 0, ppid) + payload
    return chunk + b"\x00" * (-len(chunk) % 4)


def one(segments: tuple[Segment, ...]) -> Segment:
    assert len(segments) == 1, segments
    return segments[0]


def decode_eth(
    frame: bytes, dec: Decapsulator | None = None, ts: float = 1.0
) -> tuple[Segment, ...]:
    return (dec or Decapsulator()).decode(1, ts, frame)


# -- link layers ------------------------------------------------------------------------


def test_ethernet_ipv4_udp() -> None:
    seg = one(decode_eth(eth(ipv4(udp(SIP, 5062, 5060)))))
    assert (seg.src_ip, seg.src_port, seg.dst_ip, seg.dst_port) == (SRC4, 5062, DST4, 5060)
    assert seg.transport == "udp"
    assert seg.payload == SIP
    assert seg.timestamp == 1.0


def test_ethernet_padding_and_fcs_are_not_payload() -> None:
    seg = one(decode_eth(eth(ipv4(udp(b"x"))) + b"\x00" * 12 + b"FCS!"))
    assert seg.payload == b"x"


def test_vlan_tag() -> None:
    seg = one(decode_eth(eth(ipv4(udp(SIP)), tags=[(0x8100, 100)])))
    assert seg.payload == SIP


@pytest.mark.parametrize("outer", [0x88A8, 0x9100, 0x8100])
def test_qinq_stacked_tags(outer: int) -> None:
    frame = eth(ipv6(udp(SIP)), etype=0x86DD, tags=[(outer, 10), (0x8100, 20)])
    seg = one(decode_eth(frame))
    assert (seg.src_ip, seg.dst_ip, seg.payload) == (SRC6, DST6, SIP)


def test_linux_sll() -> None:
    header = struct.pack("!HHH8sH", 0, 1, 6, b"\x02" * 8, 0x0800)
    seg = one(Decapsulator().decode(113, 2.0, header + ipv4(udp(SIP))))
    assert (seg.src_ip, seg.payload) == (SRC4, SIP)


def test_linux_sll2() -> None:
    header = struct.pack("!HHIHBB8s", 0x86DD, 0, 3, 1, 0, 6, b"\x02" * 8)
    seg = one(Decapsulator().decode(276, 2.0, header + ipv6(udp(SIP))))
    assert (seg.src_ip, seg.payload) == (SRC6, SIP)


@pytest.mark.parametrize("linktype", [101, 12, 14, 228])
def test_raw_ipv4(linktype: int) -> None:
    seg = one(Decapsulator().decode(linktype, 1.0, ipv4(udp(SIP))))
    assert seg.payload == SIP


@pytest.mark.parametrize("linktype", [101, 229])
def test_raw_ipv6(linktype: int) -> None:
    seg = one(Decapsulator().decode(linktype, 1.0, ipv6(udp(SIP))))
    assert seg.dst_ip == DST6


@pytest.mark.parametrize(
    ("header", "body"),
    [
        (struct.pack("<I", 2), ipv4(udp(SIP))),  # little-endian capturing host
        (struct.pack(">I", 2), ipv4(udp(SIP))),  # big-endian capturing host
        (struct.pack("<I", 30), ipv6(udp(SIP))),  # macOS AF_INET6
        (struct.pack("<I", 24), ipv6(udp(SIP))),  # OpenBSD AF_INET6
    ],
)
def test_null_loopback(header: bytes, body: bytes) -> None:
    assert one(Decapsulator().decode(0, 1.0, header + body)).payload == SIP


def test_loop_is_network_order() -> None:
    dec = Decapsulator()
    assert one(dec.decode(108, 1.0, struct.pack(">I", 28) + ipv6(udp(SIP)))).payload == SIP
    assert dec.decode(108, 1.0, struct.pack(">I", 99) + ipv4(udp(SIP))) == ()
    assert dec.stats.non_ip == 1


def test_unsupported_link_type() -> None:
    with pytest.raises(ValueError, match="unsupported link type 105"):
        Decapsulator().link_decoder(105)


def test_non_ip_and_truncated_are_counted() -> None:
    dec = Decapsulator()
    assert decode_eth(eth(b"\x00" * 28, etype=0x0806), dec) == ()  # ARP
    assert decode_eth(eth(ipv4(udp(SIP)))[:30], dec) == ()
    assert decode_eth(MAC, dec) == ()
    frame = eth(ipv4(udp(SIP)))
    assert decode_eth(frame[:-5], dec) == ()  # IP total length beyond the capture
    assert (dec.stats.frames, dec.stats.non_ip, dec.stats.truncated) == (4, 1, 3)


def test_ipv4_options_and_zero_total_length() -> None:
    options = b"\x01\x01\x01\x00"  # NOP NOP NOP EOL
    seg = one(decode_eth(eth(ipv4(udp(SIP), options=options))))
    assert seg.payload == SIP
    # Offloaded segment as captured on the sender: total length 0, frame bounds it.
    packet = bytearray(ipv4(udp(SIP)))
    packet[2:4] = b"\x00\x00"
    assert one(decode_eth(eth(bytes(packet)))).payload == SIP


def test_malformed_ip_headers() -> None:
    dec = Decapsulator()
    bad_ihl = bytearray(ipv4(udp(SIP)))
    bad_ihl[0] = 0x43
    assert decode_eth(eth(bytes(bad_ihl)), dec) == ()
    assert dec.decode(101, 1.0, b"\x70" + bytes(40)) == ()
    assert dec.stats.malformed == 1
    assert dec.stats.non_ip == 1


def test_other_protocols_counted() -> None:
    dec = Decapsulator()
    assert decode_eth(eth(ipv4(b"\x08\x00" + bytes(6), proto=1)), dec) == ()  # ICMP
    assert dec.stats.other_protocol == 1


# -- IPv4 / IPv6 fragments --------------------------------------------------------------


def fragments4(datagram: bytes, size: int, ident: int = 7, proto: int = 17) -> list[bytes]:
    pieces = []
    for offset in range(0, len(datagram), size):
        more = 0x2000 if offset + size < len(datagram) else 0
        body = datagram[offset : offset + size]
        pieces.append(eth(ipv4(body, proto=proto, ident=ident, frag=more | (offset >> 3))))
    return pieces


BIG = SIP[:-4] + b"\r\nX-Filler: " + b"y" * 3000 + b"\r\n\r\n"


def test_ipv4_fragments_in_order() -> None:
    dec = Decapsulator()
    frames = fragments4(udp(BIG), 1480)
    assert len(frames) == 3
    results = [decode_eth(f, dec, ts=10.0 + i) for i, f in enumerate(frames)]
    assert results[0] == results[1] == ()
    seg = one(results[2])
    assert seg.payload == BIG
    assert seg.timestamp == 12.0  # the datagram is complete when its last piece arrives
    assert (dec.stats.fragments, dec.stats.reassembled, dec.pending_datagrams) == (3, 1, 0)


def test_ipv4_fragments_out_of_order_and_duplicated() -> None:
    dec = Decapsulator()
    first, second, third = fragments4(udp(BIG), 1480)
    assert decode_eth(third, dec) == ()
    assert decode_eth(first, dec) == ()
    assert decode_eth(first, dec) == ()
    assert one(decode_eth(second, dec)).payload == BIG


def test_ipv4_fragments_of_tcp() -> None:
    segment = tcp(SIP, seq=5)
    frames = fragments4(segment, 64, proto=6)
    results = [decode_eth(f) for f in frames]
    assert all(r == () for r in results)  # separate decapsulators: never complete
    dec = Decapsulator()
    seg = one(tuple(s for f in frames for s in decode_eth(f, dec)))
    assert (seg.transport, seg.seq, seg.payload) == ("tcp", 5, SIP)


def test_fragments_keyed_by_id_and_addresses() -> None:
    dec = Decapsulator()
    a1, a2, a3 = fragments4(udp(BIG), 1480, ident=1)
    b1, b2, b3 = fragments4(udp(BIG.replace(b"y", b"z")), 1480, ident=2)
    for frame in (a1, b1, b2, a2):
        assert decode_eth(frame, dec) == ()
    assert one(decode_eth(b3, dec)).payload == BIG.replace(b"y", b"z")
    assert one(decode_eth(a3, dec)).payload == BIG
    # Same id, other source: a different datagram.
    c1 = fragments4(udp(BIG), 1480, ident=1)[0]
    c1 = c1[:26] + a4("192.0.2.99") + c1[30:]
    assert decode_eth(c1, dec) == ()
    assert dec.pending_datagrams == 1


def test_fragment_timeout_in_capture_time() -> None:
    dec = Decapsulator(frag_timeout=5.0)
    first, second, third = fragments4(udp(BIG), 1480)
    assert decode_eth(first, dec, ts=100.0) == ()
    assert decode_eth(second, dec, ts=104.0) == ()
    # 6 s after the first piece: the datagram has expired; the last piece starts anew.
    assert decode_eth(third, dec, ts=106.0) == ()
    assert dec.stats.frag_expired == 1
    assert dec.pending_datagrams == 1
    dec.close()
    assert dec.stats.frag_expired == 2
    assert dec.pending_datagrams == 0


def test_fragment_table_is_bounded() -> None:
    dec = Decapsulator(max_fragmented_datagrams=4)
    for ident in range(10):
        decode_eth(fragments4(udp(BIG), 1480, ident=ident)[0], dec)
    assert dec.pending_datagrams == 4
    assert dec.stats.frag_evicted == 6


def test_fragment_limits() -> None:
    dec = Decapsulator(max_fragments_per_datagram=2)
    frames = fragments4(udp(BIG), 512)
    for frame in frames:
        assert decode_eth(frame, dec) == ()
    assert dec.stats.frag_dropped >= 1
    # A piece reaching past 64 KiB can only be an attack or garbage.
    dec = Decapsulator()
    huge = eth(ipv4(b"x" * 1000, ident=9, frag=0x2000 | (65000 >> 3)))
    assert decode_eth(huge, dec) == ()
    assert dec.stats.frag_dropped == 1


def fragments6(payload: bytes, size: int, nh: int = 17, ident: int = 0xABCD) -> list[bytes]:
    pieces = []
    for offset in range(0, len(payload), size):
        more = 1 if offset + size < len(payload) else 0
        header = struct.pack("!BBHI", nh, 0, offset | more, ident)
        pieces.append(header + payload[offset : offset + size])
    return pieces


def test_ipv6_fragments_with_extension_headers() -> None:
    hop_by_hop = struct.pack("!BB", 44, 0) + b"\x01\x04\x00\x00\x00\x00"  # PadN
    dest_opts = struct.pack("!BB", 17, 0) + b"\x01\x04\x00\x00\x00\x00"
    # Destination options after the fragment header travel in the fragmentable part.
    fragmentable = dest_opts + udp(BIG)
    dec = Decapsulator()
    frames = [
        eth(ipv6(hop_by_hop + piece, nh=0), etype=0x86DD)
        for piece in fragments6(fragmentable, 1232, nh=60)
    ]
    assert len(frames) == 3
    out = [s for f in reversed(frames) for s in decode_eth(f, dec)]
    seg = one(tuple(out))
    assert (seg.src_ip, seg.dst_ip, seg.payload) == (SRC6, DST6, BIG)
    assert dec.stats.reassembled == 1


def test_ipv6_atomic_fragment() -> None:
    frame = eth(ipv6(struct.pack("!BBHI", 17, 0, 0, 1) + udp(SIP), nh=44), etype=0x86DD)
    assert one(decode_eth(frame)).payload == SIP


def test_ipv6_truncated_extension_header() -> None:
    dec = Decapsulator()
    assert decode_eth(eth(ipv6(b"\x11\x00\x00", nh=0), etype=0x86DD), dec) == ()
    assert dec.stats.truncated == 1


# -- tunnels ----------------------------------------------------------------------------


def test_ip_in_ip() -> None:
    inner = ipv4(udp(SIP), src="10.1.1.1", dst="10.2.2.2")
    seg = one(decode_eth(eth(ipv4(inner, proto=4))))
    assert (seg.src_ip, seg.dst_ip, seg.payload) == ("10.1.1.1", "10.2.2.2", SIP)


def test_ipv6_in_ipv4_and_ipv4_in_ipv6() -> None:
    seg = one(decode_eth(eth(ipv4(ipv6(udp(SIP)), proto=41))))
    assert seg.src_ip == SRC6
    seg = one(decode_eth(eth(ipv6(ipv4(udp(SIP)), nh=4), etype=0x86DD)))
    assert seg.src_ip == SRC4


def test_tunnel_depth_is_bounded() -> None:
    packet = ipv4(udp(SIP))
    for _ in range(20):
        packet = ipv4(packet, proto=4)
    dec = Decapsulator()
    assert decode_eth(eth(packet), dec) == ()
    assert dec.stats.too_deep == 1


@pytest.mark.parametrize(
    ("checksum", "key", "seq"),
    [(False, None, None), (True, None, None), (False, 42, None), (False, None, 9), (True, 42, 9)],
)
def test_gre_carrying_ipv4_ipv6_ethernet(checksum: bool, key: int | None, seq: int | None) -> None:
    inner4 = ipv4(udp(SIP), src="10.9.9.9")
    inner6 = ipv6(udp(SIP))
    inner_eth = eth(ipv4(udp(SIP), src="10.8.8.8"))
    for body, ptype, src in (
        (inner4, 0x0800, "10.9.9.9"),
        (inner6, 0x86DD, SRC6),
        (inner_eth, 0x6558, "10.8.8.8"),
    ):
        tunnelled = gre(body, ptype, checksum=checksum, key=key, seq=seq)
        frame = eth(ipv4(tunnelled, proto=47))
        seg = one(decode_eth(frame))
        assert (seg.src_ip, seg.payload) == (src, SIP)


def test_gre_unsupported_versions_and_types() -> None:
    dec = Decapsulator()
    pptp = struct.pack("!HH", 0x3001, 0x880B) + bytes(8)
    assert decode_eth(eth(ipv4(pptp, proto=47)), dec) == ()
    assert decode_eth(eth(ipv4(gre(b"xx", 0x1234), proto=47)), dec) == ()
    assert dec.stats.unsupported_tunnel == 2


def test_erspan_type_1() -> None:
    mirrored = eth(ipv4(udp(SIP), src="172.16.0.1"))
    seg = one(decode_eth(eth(ipv4(gre(mirrored, 0x88BE), proto=47))))
    assert seg.src_ip == "172.16.0.1"


def test_erspan_type_2() -> None:
    mirrored = eth(ipv4(udp(SIP), src="172.16.0.1"), tags=[(0x8100, 7)])
    header = struct.pack("!HHI", (1 << 12) | 7, 0x0123, 0)
    seg = one(decode_eth(eth(ipv4(gre(header + mirrored, 0x88BE, seq=1), proto=47))))
    assert (seg.src_ip, seg.payload) == ("172.16.0.1", SIP)


@pytest.mark.parametrize("platform_subheader", [False, True])
def test_erspan_type_3(platform_subheader: bool) -> None:
    mirrored = eth(ipv6(udp(SIP)), etype=0x86DD)
    flags = 0x0001 if platform_subheader else 0
    header = struct.pack("!HHIHH", 2 << 12, 0x0456, 123456, 0, flags)
    if platform_subheader:
        header += struct.pack("!II", 0x0A000000, 0)
    frame = eth(ipv4(gre(header + mirrored, 0x22EB, seq=5), proto=47))
    seg = one(decode_eth(frame))
    assert (seg.src_ip, seg.payload) == (SRC6, SIP)


def test_erspan_type_3_ip_frame() -> None:
    header = struct.pack("!HHIHH", 2 << 12, 1, 0, 0, 2 << 10)  # FT = 2: an IP packet
    frame = eth(ipv4(gre(header + ipv4(udp(SIP)), 0x22EB, seq=5), proto=47))
    assert one(decode_eth(frame)).payload == SIP


# -- encapsulations: PPPoE, MPLS, and tunnels in UDP -----------------------------------

INNER4 = ("10.20.30.40", "10.20.30.50")
INNER6 = ("fd00:5::40", "fd00:5::50")


def inner_packet(version: int, payload: bytes = SIP) -> bytes:
    if version == 4:
        return encaps.ipv4(encaps.udp(payload, 5062, 5060), *INNER4)
    return encaps.ipv6(encaps.udp(payload, 5062, 5060), *INNER6)


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("kind", encaps.ENCAPSULATIONS)
def test_sip_inside_each_encapsulation(kind: str, version: int) -> None:
    dec = Decapsulator()
    seg = one(decode_eth(encaps.tunnelled(kind, inner_packet(version)), dec))
    assert (seg.src_ip, seg.dst_ip) == (INNER4 if version == 4 else INNER6)
    assert (seg.src_port, seg.dst_port, seg.transport, seg.payload) == (5062, 5060, "udp", SIP)
    counted = {name: n for name, n in dec.stats.as_dict().items() if n}
    # The encapsulation is counted once; the outer UDP datagram is not a second one.
    assert counted == {"frames": 1, kind: 1, "udp": 1}


def test_pppoe_variants() -> None:
    dec = Decapsulator()
    packet = inner_packet(4)
    # Compressed protocol field, and Ethernet padding past the PPPoE length.
    frame = encaps.eth(encaps.pppoe(packet, compressed=True), 0x8864) + bytes(20)
    assert one(decode_eth(frame, dec)).payload == SIP
    tagged = eth(encaps.pppoe(packet), etype=0x8864, tags=[(0x8100, 300)])
    assert one(decode_eth(tagged, dec)).src_ip == INNER4[0]
    lcp = encaps.pppoe(b"\x01\x01\x00\x04", protocol=0xC021)
    assert decode_eth(encaps.eth(lcp, 0x8864), dec) == ()
    assert (dec.stats.pppoe, dec.stats.non_ip) == (3, 1)


def test_mpls_label_stacks_and_pseudowires() -> None:
    dec = Decapsulator()
    packet = inner_packet(4)
    deep = encaps.eth(encaps.mpls(packet, labels=range(100, 110)), 0x8848)
    assert one(decode_eth(deep, dec)).payload == SIP
    # Ethernet pseudowires (RFC 4448), with the RFC 4385 control word and without.
    inner_frame = eth(packet)
    with_cw = encaps.eth(encaps.mpls(bytes(4) + inner_frame, labels=(30, 31)), 0x8847)
    assert one(decode_eth(with_cw, dec)).src_ip == INNER4[0]
    without_cw = encaps.eth(encaps.mpls(inner_frame), 0x8847)
    assert one(decode_eth(without_cw, dec)).src_ip == INNER4[0]
    # MPLS over GRE (RFC 4023).
    over_gre = eth(ipv4(gre(encaps.mpls(packet), 0x8847), proto=47))
    assert one(decode_eth(over_gre, dec)).src_ip == INNER4[0]
    # The associated channel carries OAM, not user packets.
    g_ach = encaps.eth(encaps.mpls(b"\x10\x00\x00\x21" + bytes(20)), 0x8847)
    assert decode_eth(g_ach, dec) == ()
    assert (dec.stats.mpls, dec.stats.unsupported_tunnel) == (5, 1)


# SIP over an Ethernet pseudowire without a control word, to a MAC address that starts
# with nibble 1, the associated channel's (tshark reads the SIP).
MPLS_MAC_NIBBLE_1 = bytes.fromhex(
    "02000000000a02000000000b88470001014018659000000102000000000208004500005600010000401100"
    "000a0000010a00000213c613c4004200004f5054494f4e53207369703a624078205349502f322e300d0a"
    "43616c6c2d49443a207240780d0a435365713a2031204f5054494f4e530d0a0d0a"
)


def ipv4_checksummed(packet: bytes) -> bytes:
    header = bytearray(packet[: (packet[0] & 0x0F) * 4])
    header[10:12] = b"\x00\x00"
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    header[10:12] = struct.pack("!H", ~total & 0xFFFF)
    return bytes(header) + packet[len(header) :]


def test_mpls_pseudowire_guess_is_checked() -> None:
    """The first nibble of an MPLS payload only hints at its type: a pseudowire's frame
    starts with a MAC address, which may start with any nibble."""
    seg = one(decode_eth(MPLS_MAC_NIBBLE_1))
    assert (seg.src_ip, seg.dst_ip, seg.payload[:8]) == ("10.0.0.1", "10.0.0.2", b"OPTIONS ")
    packet4, packet6 = inner_packet(4), inner_packet(6)
    frames = {
        # MAC addresses that start like IPv4 (total length too short; total length
        # fits, checksum wrong) and like IPv6, or like the associated channel.
        "45:00:00:10": bytes.fromhex("450000100001") + MAC[6:] + b"\x08\x00" + packet4,
        "45:00:00:3c": bytes.fromhex("4500003c0001") + MAC[6:] + b"\x08\x00" + packet4,
        "60:38:e0": bytes.fromhex("6038e0000001") + MAC[6:] + b"\x86\xdd" + packet6,
        "10:00:5a": bytes.fromhex("10005a000001") + MAC[6:] + b"\x81\x00\x00\x07\x08\x00" + packet4,
        # Its first 20 bytes make an IPv4 header with a valid checksum (the source MAC
        # address's last two bytes), but a total length longer than the frame.
        "45:00:ff:ff checksummed": ipv4_checksummed(
            bytes.fromhex("4500ffff0001") + MAC[6:] + b"\x08\x00" + packet4
        ),
        # No control word, and where the frame's type would be behind one, IPv6's flow
        # label holds 0x86DD, a type, but what follows it is no IPv6 header.
        "no control word": eth(b"\x60\x00" + b"\x86\xdd" + packet6[4:], etype=0x86DD),
    }
    for name, frame in frames.items():
        dec = Decapsulator()
        seg = one(decode_eth(encaps.eth(encaps.mpls(frame), 0x8847), dec))
        assert seg.payload == SIP, name
        assert (dec.stats.mpls, dec.stats.malformed, dec.stats.unsupported_tunnel) == (1, 0, 0)


def test_mpls_ip_that_also_reads_as_a_frame_is_ip() -> None:
    """IP whose source address holds an Ethernet type where a frame has it, and a valid
    header behind it: IPv4 with a valid checksum, IPv6 with a payload length that ends
    where the packet does, is IP."""
    v4 = ipv4_checksummed(encaps.ipv4(encaps.udp(SIP, 5062, 5060), "8.0.69.1", "192.0.2.9"))
    v6 = encaps.ipv6(encaps.udp(SIP, 5062, 5060), "2001:db8:86dd:6000::1", "2001:db8::9")
    for packet, src in ((v4, "8.0.69.1"), (v6, "2001:db8:86dd:6000::1")):
        dec = Decapsulator()
        seg = one(decode_eth(encaps.eth(encaps.mpls(packet), 0x8847), dec))
        assert (seg.src_ip, seg.payload) == (src, SIP)
    # Without a checksum, a source address that holds a type is not enough: what would
    # follow it in a frame must agree (an IPv4 header length, PPPoE's version, a VLAN
    # tag's inner type).
    for src in ("8.0.64.1", "136.100.0.1", "129.0.0.1"):
        packet = encaps.ipv4(encaps.udp(SIP, 5062, 5060), src, "192.0.2.9")
        seg = one(decode_eth(encaps.eth(encaps.mpls(packet), 0x8847)))
        assert (seg.src_ip, seg.payload) == (src, SIP)
    # The same IPv4 packet with a wrong checksum is taken for the frame it reads as,
    # whose IPv4 header (from 69.1 on) claims 49,152 bytes (192.0).
    broken = v4[:10] + b"\x00\x00" + v4[12:]
    dec = Decapsulator()
    assert decode_eth(encaps.eth(encaps.mpls(broken), 0x8847), dec) == ()
    assert (dec.stats.truncated, dec.stats.udp) == (1, 0)


def test_gtpu_headers() -> None:
    dec = Decapsulator()
    packet = inner_packet(4)

    def over_udp(body: bytes) -> bytes:
        return eth(ipv4(udp(body, 2152, 2152), src="172.31.0.1", dst="172.31.0.2"))

    plain = over_udp(encaps.gtpu(packet))
    two_extensions = over_udp(
        encaps.gtpu(packet, extensions=[(0x85, b"\x10\x01"), (0x40, b"\x00\x00\x00\x00")])
    )
    padded = over_udp(encaps.gtpu(packet, sequence=99) + bytes(6))  # past the GTP length
    for frame in (plain, two_extensions, padded):
        seg = one(decode_eth(frame, dec))
        assert (seg.src_ip, seg.payload) == (INNER4[0], SIP)
    echo = over_udp(encaps.gtpu(b"", sequence=1, message_type=1))
    assert decode_eth(echo, dec) == ()
    assert (dec.stats.gtpu, dec.stats.other_protocol) == (3, 1)
    # GTP-U over IPv6 transport.
    outer6 = eth(ipv6(udp(encaps.gtpu(inner_packet(6)), 2152, 2152)), etype=0x86DD)
    assert one(decode_eth(outer6, dec)).src_ip == INNER6[0]


# An OPTIONS inside GTP-U with S set and E clear, and 0x85 left in the next extension
# header type: tshark reads the SIP, and so must the decoder.
GTPU_S_ONLY = bytes.fromhex(
    "02000000000a02000000000b08004500007e0001000040110000644000016440000208680868006a0000"
    "32ff005a00000001000700854500005600010000401100000a0000010a00000213c613c4004200004f50"
    "54494f4e53207369703a624078205349502f322e300d0a43616c6c2d49443a207240780d0a435365713a"
    "2031204f5054494f4e530d0a0d0a"
)


@pytest.mark.parametrize("flags", [0x32, 0x31, 0x33], ids=["S", "PN", "S and PN"])
def test_gtpu_next_type_is_ignored_without_e_flag(flags: int) -> None:
    """TS 29.281 section 5.1: the sequence number (S) or N-PDU number (PN) brings in the
    4 optional bytes, but the next extension header type in them means something only
    with E set."""
    dec = Decapsulator()
    if flags == 0x32:
        frame = GTPU_S_ONLY
        inner = ("10.0.0.1", "10.0.0.2")
    else:
        rest = struct.pack("!HBB", 7, 3, 0x85) + inner_packet(4)
        gtp = struct.pack("!BBHI", flags, 255, len(rest), 0x5A) + rest
        frame = eth(ipv4(udp(gtp, 2152, 2152)))
        inner = INNER4
    seg = one(decode_eth(frame, dec))
    assert (seg.src_ip, seg.dst_ip, seg.dst_port) == (*inner, 5060)
    assert seg.payload.startswith(b"OPTIONS sip:")
    assert (dec.stats.gtpu, dec.stats.truncated, dec.stats.malformed) == (1, 0, 0)


def test_gtpu_extension_chain_is_capped() -> None:
    def chain(count: int) -> bytes:
        return _gtpu_over_udp(
            encaps.gtpu(inner_packet(4), extensions=[(0x85, b"\x00\x01")] * count)
        )

    dec = Decapsulator()
    assert one(decode_eth(chain(32), dec)).payload == SIP
    assert decode_eth(chain(33), dec) == ()
    assert (dec.stats.gtpu, dec.stats.malformed) == (1, 1)


def test_vxlan_geneve_and_tzsp_variants() -> None:
    dec = Decapsulator()
    packet = inner_packet(4)
    inner_frame = eth(packet, tags=[(0x8100, 12)])
    frames = [
        # VXLAN with group policy (VXLAN-GBP): G and I flags.
        encaps.eth(ipv4(udp(encaps.vxlan(inner_frame, flags=0x88), 1, 4789)), 0x0800),
        # GENEVE carrying an IP packet, no Ethernet, as cloud load balancers send it.
        eth(ipv4(udp(encaps.geneve(packet, ptype=0x0800), 1, 6081))),
        eth(ipv4(udp(encaps.geneve(inner_packet(6), ptype=0x86DD), 1, 6081))),
        # TZSP with no tags but END, as MikroTik's sniffer sends it.
        eth(ipv4(udp(encaps.tzsp(inner_frame), 1, 37008))),
    ]
    for frame in frames:
        assert one(decode_eth(frame, dec)).payload == SIP
    keepalive = eth(ipv4(udp(encaps.tzsp(b"", tags=b"", kind=4), 1, 37008)))
    radio = eth(ipv4(udp(encaps.tzsp(bytes(40), encapsulation=18), 1, 37008)))
    assert decode_eth(keepalive, dec) == decode_eth(radio, dec) == ()
    assert (dec.stats.vxlan, dec.stats.geneve, dec.stats.tzsp) == (1, 2, 1)
    assert (dec.stats.other_protocol, dec.stats.unsupported_tunnel) == (1, 1)


@pytest.mark.parametrize(("port", "kind"), [(2152, "gtpu"), (37008, "tzsp"), (8472, "vxlan")])
def test_each_tunnel_port_reads_its_own_tunnel(port: int, kind: str) -> None:
    """Each port is read as its own tunnel, never as another one's (8472 is the VXLAN
    port Linux picks when none is given)."""
    body = encaps.tunnelled(kind, inner_packet(4))[42:]  # the outer UDP payload
    dec = Decapsulator()
    assert one(decode_eth(eth(ipv4(udp(body, 1, port))), dec)).payload == SIP
    assert dec.stats.as_dict()[kind] == 1
    for other in sorted(set(UDP_TUNNEL_PORTS) - {port}):
        if UDP_TUNNEL_PORTS[other] != kind:
            dec = Decapsulator()
            decode_eth(eth(ipv4(udp(body, 1, other))), dec)
            assert dec.stats.as_dict()[kind] == 0, other


def test_vxlan_needs_the_i_flag_and_ignores_reserved_bits() -> None:
    inner_frame = eth(inner_packet(4))
    for flags in (0x08, 0x88, 0x0C, 0x18, 0x3F, 0xB9):
        dec = Decapsulator()
        frame = eth(ipv4(udp(encaps.vxlan(inner_frame, flags=flags), 1, 4789)))
        assert one(decode_eth(frame, dec)).payload == SIP, hex(flags)
        assert dec.stats.vxlan == 1
    # Without the I flag the datagram is not VXLAN (RTP's 0x80, say), whatever follows.
    for flags in (0x00, 0x80, 0x04, 0xB7):
        dec = Decapsulator()
        body = encaps.vxlan(inner_frame, flags=flags)
        seg = one(decode_eth(eth(ipv4(udp(body, 1, 4789))), dec))
        assert (seg.dst_port, seg.payload, dec.stats.vxlan) == (4789, body, 0), hex(flags)


def tzsp_frame(body: bytes) -> bytes:
    return eth(ipv4(udp(body, 1, 37008)))


@pytest.mark.parametrize("version", [4, 6])
def test_tzsp_raw_ip_and_transmitted_packets(version: int) -> None:
    dec = Decapsulator()
    packet = inner_packet(version)
    # Encapsulation 7 is an IP packet with no link layer; type 1 a packet the sensor
    # was asked to send.
    raw = tzsp_frame(encaps.tzsp(packet, encapsulation=7))
    sent = tzsp_frame(encaps.tzsp(eth(packet, etype=0x0800 if version == 4 else 0x86DD), kind=1))
    for frame in (raw, sent):
        seg = one(decode_eth(frame, dec))
        assert (seg.src_ip, seg.payload) == ((INNER4 if version == 4 else INNER6)[0], SIP)
    assert dec.stats.tzsp == 2


def test_tzsp_padding_runs_and_tag_cap() -> None:
    dec = Decapsulator()
    inner_frame = eth(inner_packet(4))
    padded = tzsp_frame(encaps.tzsp(inner_frame, tags=b"\x00" * 1400 + b"\x0a\x01\x7f\x01"))
    assert one(decode_eth(padded, dec)).payload == SIP
    # 32 tags before END are read, a 33rd is a sender making work; a run of padding
    # counts as one.
    tags = (b"\x0a\x00" + b"\x00" * 5) * 16
    assert one(decode_eth(tzsp_frame(encaps.tzsp(inner_frame, tags=tags + b"\x01")), dec))
    too_many = tzsp_frame(encaps.tzsp(inner_frame, tags=tags + b"\x0b\x00\x01"))
    assert decode_eth(too_many, dec) == ()
    only_padding = tzsp_frame(encaps.tzsp(b"", tags=bytes(300)))
    assert decode_eth(only_padding, dec) == ()
    assert (dec.stats.tzsp, dec.stats.malformed, dec.stats.truncated) == (2, 1, 1)


STUN_BINDING_SUCCESS = struct.pack(
    "!HHI12s", 0x0101, 12, 0x2112A442, bytes(range(12))
) + struct.pack("!HHBBH4s", 0x0020, 8, 0, 1, 0x1234, a4("203.0.113.5"))


@pytest.mark.parametrize(
    "payload",
    [
        STUN_BINDING_SUCCESS,
        b"\x01\x02\x00\x01\x01" + bytes(20),  # reserved type 2
        b"\x01\x00\x00\x06\x01" + bytes(20),  # no such encapsulation
        b"\x01\x00\x00",  # too short to tell
        b"\x02\x00\x00\x01\x01" + bytes(20),  # version 2
    ],
    ids=["stun", "type 2", "encapsulation 6", "3 bytes", "version 2"],
)
def test_what_is_not_tzsp_on_its_port_stays_a_datagram(payload: bytes) -> None:
    dec = Decapsulator()
    seg = one(decode_eth(tzsp_frame(payload), dec))
    assert (seg.dst_port, seg.payload) == (37008, payload)
    counted = {name: n for name, n in dec.stats.as_dict().items() if n}
    assert counted == {"frames": 1, "udp": 1}


def test_hepv1_to_the_tzsp_port_is_hep() -> None:
    """HEPv1 starts with version 1 like TZSP, then a header length where TZSP has its
    message type."""
    hep1 = struct.pack("!BBBBHH4s4s", 1, 16, 2, 17, 5062, 5060, a4(SRC4), a4(DST4)) + SIP
    extractor = SipExtractor(1, "test")
    (packet,) = extractor.feed(1.0, tzsp_frame(hep1))
    assert (packet.src_ip, packet.dst_ip, packet.src_port, packet.payload) == (
        SRC4,
        DST4,
        5062,
        SIP,
    )
    assert extractor.stats.hep_packets == 1


def _gtpu_over_udp(body: bytes) -> bytes:
    return eth(ipv4(udp(body, 2152, 2152)))


BAD_HEADERS: list[tuple[str, bytes, str]] = [
    ("pppoe cut", encaps.eth(encaps.pppoe(inner_packet(4))[:7], 0x8864), "truncated"),
    ("pppoe version", encaps.eth(b"\x21" + encaps.pppoe(inner_packet(4))[1:], 0x8864), "malformed"),
    # A discovery-stage code (PADI) under the session stage's Ethernet type.
    (
        "pppoe code",
        encaps.eth(
            encaps.pppoe(inner_packet(4))[:1] + b"\x09" + encaps.pppoe(inner_packet(4))[2:], 0x8864
        ),
        "malformed",
    ),
    (
        "pppoe length",
        encaps.eth(encaps.pppoe(inner_packet(4))[:4] + b"\x05\xdc" + bytes(30), 0x8864),
        "truncated",
    ),
    (
        "pppoe empty",
        encaps.eth(struct.pack("!BBHH", 0x11, 0, 1, 1) + bytes(20), 0x8864),
        "malformed",
    ),
    ("mpls cut", encaps.eth(encaps.mpls(b"", labels=(5, 6))[:6], 0x8847), "truncated"),
    (
        "mpls endless",
        encaps.eth(encaps.mpls(bytes(8), range(20), bottom=False), 0x8847),
        "too_deep",
    ),
    ("mpls nothing after", encaps.eth(encaps.mpls(b""), 0x8847), "truncated"),
    ("gtpu cut", _gtpu_over_udp(encaps.gtpu(inner_packet(4))[:6]), "truncated"),
    (
        "gtpu length",
        _gtpu_over_udp(encaps.gtpu(inner_packet(4))[:2] + b"\xff\xff" + bytes(40)),
        "truncated",
    ),
    (
        "gtpu extension length 0",
        _gtpu_over_udp(struct.pack("!BBHI", 0x34, 255, 8, 1) + b"\x00\x00\x00\x85\x00\x00\x00\x00"),
        "malformed",
    ),
    (
        "gtpu extension cut",
        _gtpu_over_udp(struct.pack("!BBHI", 0x34, 255, 8, 1) + b"\x00\x00\x00\x85\x03\x00\x00\x00"),
        "truncated",
    ),
    ("vxlan cut", eth(ipv4(udp(b"\x08\x00\x00", 1, 4789))), "truncated"),
    (
        "geneve options cut",
        eth(ipv4(udp(encaps.geneve(b"", options=bytes(8))[:12], 1, 6081))),
        "truncated",
    ),
    (
        "tzsp no end tag",
        eth(ipv4(udp(encaps.tzsp(b"", tags=b"\x00\x00\x28\x02"), 1, 37008))),
        "truncated",
    ),
    ("tzsp tag cut", eth(ipv4(udp(encaps.tzsp(b"", tags=b"\x28\x10\x00"), 1, 37008))), "truncated"),
]


@pytest.mark.parametrize(
    ("frame", "counter"),
    [case[1:] for case in BAD_HEADERS],
    ids=[case[0] for case in BAD_HEADERS],
)
def test_bad_encapsulation_headers_are_counted(frame: bytes, counter: str) -> None:
    dec = Decapsulator()
    assert decode_eth(frame, dec) == ()
    assert dec.stats.as_dict()[counter] == 1


@pytest.mark.parametrize("port", sorted(UDP_TUNNEL_PORTS))
def test_sip_to_a_tunnel_port_is_sip(port: int) -> None:
    """SIP from or to a port that is also a tunnel's (37008 is in Linux's ephemeral
    range) does not start like the tunnel's header and stays a datagram."""
    for payload in (SIP, b"HEP3\x00\x10", b"\r\n\r\n" + SIP, b"\n" + SIP):
        dec = Decapsulator()
        seg = one(decode_eth(eth(ipv4(udp(payload, 5060, port))), dec))
        assert (seg.dst_port, seg.payload) == (port, payload)
        assert dec.stats.malformed == dec.stats.truncated == 0


def test_pppoe_counts_against_the_depth() -> None:
    def nested(levels: int) -> bytes:
        frame = encaps.eth(encaps.pppoe(inner_packet(4)), 0x8864)
        for _ in range(levels):
            frame = eth(ipv4(udp(encaps.vxlan(frame), 1, 4789)))
        return frame

    dec = Decapsulator()
    assert one(decode_eth(nested(MAX_DEPTH - 1), dec)).payload == SIP
    assert decode_eth(nested(MAX_DEPTH), dec) == ()
    assert (dec.stats.pppoe, dec.stats.too_deep) == (1, 1)


def test_encapsulation_depth_is_bounded() -> None:
    packet = eth(inner_packet(4))
    for _ in range(12):
        packet = eth(ipv4(udp(encaps.vxlan(packet), 1, 4789)))
    dec = Decapsulator()
    assert decode_eth(packet, dec) == ()
    assert (dec.stats.too_deep, dec.stats.vxlan) == (1, 8)
    # Ethernet pseudowires nest MPLS inside MPLS without any IP in between.
    frame = encaps.eth(encaps.mpls(inner_packet(4)), 0x8847)
    for _ in range(12):
        frame = encaps.eth(encaps.mpls(bytes(4) + frame), 0x8847)
    dec = Decapsulator()
    assert decode_eth(frame, dec) == ()
    assert dec.stats.too_deep == 1


# -- transports -------------------------------------------------------------------------


def test_tcp_segment_fields() -> None:
    seg = one(decode_eth(eth(ipv4(tcp(SIP, seq=0xFFFFFFF0, flags=TCP_ACK | TCP_FIN), proto=6))))
    assert (seg.transport, seg.seq, seg.flags, seg.payload) == (
        "tcp",
        0xFFFFFFF0,
        TCP_ACK | TCP_FIN,
        SIP,
    )
    assert (seg.src_port, seg.dst_port) == (40000, 5060)


def test_tcp_bad_data_offset() -> None:
    dec = Decapsulator()
    segment = bytearray(tcp(SIP))
    segment[12] = 15 << 4  # 60-byte header in a shorter segment
    assert decode_eth(eth(ipv4(bytes(segment)[:40], proto=6)), dec) == ()
    assert dec.stats.malformed == 1


def test_sctp_data_chunks_bundled() -> None:
    init_ack = struct.pack("!BBH", 2, 0, 8) + bytes(4)
    body = sctp(init_ack, data_chunk(SIP, tsn=1, ppid=0), data_chunk(b"odd", tsn=2, ppid=46))
    segments = decode_eth(eth(ipv4(body, proto=132)))
    assert [s.payload for s in segments] == [SIP, b"odd"]
    assert {s.transport for s in segments} == {"sctp"}


def test_sctp_fragmented_user_message() -> None:
    dec = Decapsulator()
    first = eth(ipv4(sctp(data_chunk(BIG[:1000], tsn=10, flags=0x06)), proto=132))
    middle = eth(ipv4(sctp(data_chunk(BIG[1000:2000], tsn=11, flags=0x04)), proto=132))
    last = eth(ipv4(sctp(data_chunk(BIG[2000:], tsn=12, flags=0x05)), proto=132))
    assert decode_eth(last, dec) == ()
    assert decode_eth(first, dec) == ()
    assert one(decode_eth(middle, dec)).payload == BIG
    assert (dec.stats.sctp_pieces, dec.stats.sctp_reassembled) == (3, 1)


def test_ip_text() -> None:
    assert ip_text(a4("10.0.0.255")) == "10.0.0.255"
    assert ip_text(a6("::1")) == "::1"


def test_stats_as_dict() -> None:
    stats = DecapStats()
    Decapsulator(stats).decode(1, 0.0, eth(ipv4(udp(SIP))))
    assert stats.as_dict()["udp"] == 1


# -- SIP recognition --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (SIP, 0),
        (b"\r\n\r\n" + SIP, 4),
        (b"SIP/2.0 200 OK\r\n\r\n", 0),
        (b"sip/2.0 180 Ringing\r\n", 0),
        (b"FOO-BAR tel:+15551234 SIP/2.0\r\n", 0),
        (b"\r\n\r\n", KEEPALIVE),
        (b"\r\n", KEEPALIVE),
        (b"", NOT_SIP),
        (b"\x80\x08\x00\x01", NOT_SIP),
        (b"GET / HTTP/1.1\r\n", NOT_SIP),
        (b"INVITE <sip:bob@example.com> SIP/2.0\r\n", NOT_SIP),
        (b"INVITE sip:bob@example.com SIP/2.0", NOT_SIP),  # no line end: not a message
        (b"SIP/2.0 2000 OK\r\n", NOT_SIP),
        (b"HEP3\x00\x10", NOT_SIP),
    ],
)
def test_sip_offset(data: bytes, expected: int) -> None:
    assert sip_offset(data) == expected


def _by_expression(data: bytes) -> int:
    """``sip_offset`` as the regular expression alone decides it: the reference its
    shortcut for the usual status line must agree with."""
    stripped = data.lstrip(b"\r\n")
    if data and not stripped:
        return KEEPALIVE
    pos = len(data) - len(stripped)
    return pos if match_start(data, pos) is not None else NOT_SIP


# Status lines near the shortcut's edges: each byte it reads, one step either side.
_STATUS_LINES = [
    b"SIP/2.0 " + code + after
    for code in (b"100", b"199", b"600", b"699", b"099", b"700", b"1a0", b"10:", b"/00", b"10")
    for after in (b" OK\r\n", b"\r\n", b"\n", b"\t", b"0 OK\r\n", b"", b"x")
] + [b"SIP/2.1 200 OK\r\n", b"SIP/2.0  200 OK\r\n", b"Sip/2.0 200 OK\r\n", b"SIP/2.0 20"]
# Request lines near the edges of the shortcut for them, and of the expression.
_REQUEST_LINES = [
    b"INVITE sip:bob@example.com SIP/2.0\r\n",
    b"INVITE sip:bob@example.com SIP/2.0\n",
    b"INVITE sip:bob@example.com SIP/2.0\r",
    b"INVITE sip:bob@example.com SIP/2.0",
    b"INVITE sip:bob@example.com SIP/2.0\r\r\n",
    b"INVITE sip:bob@example.com sip/2.0\r\n",
    b"INVITE sip:bob@example.com SIP/2.1\r\n",
    b"INVITE sip:bob@example.com  SIP/2.0\r\n",
    b"INVITE sip:bob@exa\rmple.com SIP/2.0\r\n",
    b"INVITE sip:bob@exa\nmple.com SIP/2.0\r\n",
    b"INVITE sip: SIP/2.0\r\n",
    b"INVITE :bob SIP/2.0\r\n",
    b"INVITE 1sip:bob SIP/2.0\r\n",
    b"INVITE s+.-9:bob SIP/2.0\r\n",
    b"INVITE s_p:bob SIP/2.0\r\n",
    b"INVITE  sip:bob SIP/2.0\r\n",
    b"INVITE\tsip:bob SIP/2.0\r\n",
    b"X.!%*_+`'~-9 tel:+1555 SIP/2.0\r\n",
    b"IN(VITE sip:bob SIP/2.0\r\n",
    b"SUBSCRIBE sip:bob SIP/2.0\r\n",
    b"S sip:bob SIP/2.0\r\n",
    b"INVITE",
    b"INVITE ",
    b"INVITE s",
    b"INVITE sip",
    b"INVITE sip:",
    b"INVITE sip:bob",
    b"INVITE sip:bob ",
    b"INVITE sip:bob SIP/2.0 \r\n",
]


@pytest.mark.parametrize("line", _STATUS_LINES + _REQUEST_LINES)
@pytest.mark.parametrize("before", [b"", b"\r\n", b"\n\n\r"])
def test_sip_offset_shortcuts_agree_with_expression(before: bytes, line: bytes) -> None:
    data = before + line
    assert sip_offset(data) == _by_expression(data)


@given(
    st.one_of(
        st.binary(max_size=24),
        st.builds(
            lambda pre, tail: pre + b"SIP/2.0 " + tail,
            st.sampled_from([b"", b"\r\n"]),
            st.binary(max_size=6),
        ),
        st.builds(
            lambda pre, tail: pre + b"SIP/2.0 " + tail,
            st.sampled_from([b"", b"\r\n"]),
            st.text(alphabet="0123456789 \r\nOK", max_size=6).map(str.encode),
        ),
        # Request lines from the bytes that decide them, in any order.
        st.text(alphabet="INVsip:SIP/2.0 \r\n+_-(", max_size=40).map(str.encode),
        st.builds(
            lambda method, uri, tail: method + b" " + uri + b" SIP/2.0" + tail,
            st.binary(max_size=8),
            st.binary(max_size=12),
            st.sampled_from([b"\r\n", b"\n", b"\r", b"", b"\r\r\n", b" "]),
        ),
    )
)
def test_sip_offset_agrees_with_expression(data: bytes) -> None:
    assert sip_offset(data) == _by_expression(data)


def _joined(*parts: bytes) -> bytes:
    return b"".join(parts)


_LEADING = st.sampled_from([b"", b"\r\n", b"\n", b"\r", b"\n\r\n"])
_GAP = st.sampled_from([b" ", b"  ", b"\t", b"", b" \r"])
_VERSION = st.sampled_from(
    [b"SIP/2.0", b"sip/2.0", b"Sip/2.0", b"SIP/2.00", b"SIP/20", b"SIP/2.", b"", b"SIPS/2.0"]
)
# Lines shaped like start lines, each part from the near misses the shortcuts must leave
# to the expression: lowercase and odd method tokens, UTF-8 and binary bytes, schemes
# other than sip, spaces and line ends inside the URI, codes out of range, UTF-8 reasons.
_LIKE_REQUEST = st.builds(
    _joined,
    _LEADING,
    st.one_of(
        st.sampled_from([b"INVITE", b"invite", b"X.!%*_+`'~-9", b"IN(VITE", b"INV\xc3\xa9", b"S"]),
        st.binary(max_size=5),
    ),
    _GAP,
    st.one_of(
        st.sampled_from([b"sip", b"sips", b"tel", b"urn", b"1x", b"s_p", b"", b"s\xc3\xa9"]),
        st.binary(max_size=3),
    ),
    st.sampled_from([b":", b"", b"::"]),
    st.one_of(
        st.sampled_from([b"bob@x", b"", b"+1555", b"b\xc3\xa9b", b"bo b", b"b\rb", b"b\nb"]),
        st.binary(max_size=6),
    ),
    _GAP,
    _VERSION,
    st.sampled_from([b"\r\n", b"\n", b"\r", b"", b"\r\r\n", b" ", b"\n\r", b"x\r\n"]),
)
_LIKE_STATUS = st.builds(
    _joined,
    _LEADING,
    _VERSION,
    _GAP,
    st.one_of(
        st.sampled_from([b"100", b"699", b"700", b"099", b"20", b"2000", b"\xd9\xa2\xd9\xa0"]),
        st.binary(max_size=3),
    ),
    st.sampled_from([b" OK\r\n", b"\r\n", b"\n", b"\r", b"", b"\t", b" Sch\xc3\xb6n\r\n", b"0"]),
)


@settings(max_examples=500)
@given(st.one_of(_LIKE_REQUEST, _LIKE_STATUS))
def test_sip_offset_agrees_with_expression_on_near_misses(data: bytes) -> None:
    assert sip_offset(data) == _by_expression(data)


# -- TCP reassembly ---------------------------------------------------------------------

CLIENT = a4("10.0.0.1")
SERVER = a4("10.0.0.2")
BODY = b"v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\n"
INVITE = (
    b"INVITE sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 10.0.0.1:40000;branch=z9hG4bK1\r\n"
    b"Call-ID: tcp-1@10.0.0.1\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
)
RINGING = (
    b"SIP/2.0 180 Ringing\r\n"
    b"Via: SIP/2.0/TCP 10.0.0.1:40000;branch=z9hG4bK1\r\n"
    b"Call-ID: tcp-1@10.0.0.1\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"l: 0\r\n\r\n"
)


def seg(
    payload: bytes,
    seq: int,
    flags: int = TCP_ACK | TCP_PSH,
    ts: float = 1.0,
    reverse: bool = False,
) -> Segment:
    src, dst, sport, dport = (
        (SERVER, CLIENT, 5060, 40000) if reverse else (CLIENT, SERVER, 40000, 5060)
    )
    return Segment(ts, src, dst, sport, dport, 6, payload, seq & 0xFFFFFFFF, flags)


def feed_all(tcp_re: TcpReassembler, *segments: Segment) -> list[bytes]:
    return [message for s in segments for message, _transport in tcp_re.feed(s)]


def test_tcp_one_message_per_segment_after_handshake() -> None:
    r = TcpReassembler()
    got = feed_all(
        r,
        seg(b"", 99, TCP_SYN),
        seg(b"", 499, TCP_SYN | TCP_ACK, reverse=True),
        seg(INVITE, 100),
        seg(RINGING, 500, reverse=True),
    )
    assert got == [INVITE, RINGING]
    assert r.stats.messages == 2
    assert r.stats.resyncs == 0


def test_tcp_two_messages_in_one_segment() -> None:
    r = TcpReassembler()
    got = feed_all(r, seg(b"", 99, TCP_SYN), seg(INVITE + RINGING, 100))
    assert got == [INVITE, RINGING]


def test_tcp_one_message_over_three_segments() -> None:
    r = TcpReassembler()
    parts = [INVITE[:30], INVITE[30:200], INVITE[200:]]
    assert feed_all(r, seg(b"", 99, TCP_SYN), seg(parts[0], 100)) == []
    assert feed_all(r, seg(parts[1], 130)) == []
    assert feed_all(r, seg(parts[2], 300)) == [INVITE]


def test_tcp_headers_and_body_split_at_blank_line() -> None:
    r = TcpReassembler()
    cut = INVITE.index(b"\r\n\r\n") + 2
    got = feed_all(r, seg(b"", 99, TCP_SYN), seg(INVITE[:cut], 100), seg(INVITE[cut:], 100 + cut))
    assert got == [INVITE]


def test_tcp_retransmission_is_ignored() -> None:
    r = TcpReassembler()
    got = feed_all(
        r,
        seg(b"", 99, TCP_SYN),
        seg(INVITE, 100),
        seg(INVITE, 100),  # retransmitted whole
        seg(RINGING, 100 + len(INVITE)),
    )
    assert got == [INVITE, RINGING]
    assert r.stats.duplicates == 1


def test_tcp_partial_overlap_keeps_new_tail() -> None:
    r = TcpReassembler()
    data = INVITE + RINGING
    got = feed_all(
        r,
        seg(b"", 99, TCP_SYN),
        seg(data[:100], 100),
        seg(data[50:400], 150),  # resegmented retransmission: 50 old bytes, 300 new
        seg(data[400:], 500),
    )
    assert got == [INVITE, RINGING]
    assert r.stats.overlaps == 1


def test_tcp_out_of_order_segments() -> None:
    r = TcpReassembler()
    data = INVITE + RINGING
    a, b, c = data[:120], data[120:260], data[260:]
    got = feed_all(
        r,
        seg(b"", 99, TCP_SYN),
        seg(c, 360),
        seg(b, 220),
        seg(a, 100),
    )
    assert got == [INVITE, RINGING]
    assert r.stats.out_of_order == 2


def test_tcp_out_of_order_with_overlapping_held_segments() -> None:
    r = TcpReassembler()
    data = INVITE + RINGING
    got = feed_all(
        r,
        seg(b"", 99, TCP_SYN),
        seg(data[200:300], 300),
        seg(data[250:], 350),
        seg(data[:250], 100),
    )
    assert got == [INVITE, RINGING]


def test_tcp_gap_that_never_fills_is_skipped() -> None:
    r = TcpReassembler(max_pending_segments=2)
    lost = INVITE
    after = [RINGING, RINGING.replace(b"180 Ringing", b"183 Session Progress"), RINGING]
    seq = 100 + len(lost)
    segments = [seg(b"", 99, TCP_SYN)]
    for message in after:
        segments.append(seg(message, seq))
        seq += len(message)
    got = feed_all(r, *segments)
    assert got == after
    assert (r.stats.gaps, r.stats.gap_bytes) == (1, len(lost))


def test_tcp_sequence_wraparound() -> None:
    r = TcpReassembler()
    isn = 0xFFFFFFFF - 50
    data = INVITE + RINGING
    got = feed_all(
        r,
        seg(b"", isn, TCP_SYN),
        seg(data[:100], isn + 1),
        seg(data[200:], isn + 201),
        seg(data[100:200], isn + 101),
    )
    assert got == [INVITE, RINGING]


def test_tcp_mid_stream_start_resyncs() -> None:
    r = TcpReassembler()
    tail = INVITE[57:]  # the capture started inside the INVITE
    got = feed_all(r, seg(tail + RINGING[:40], 5000), seg(RINGING[40:], 5000 + len(tail) + 40))
    assert got == [RINGING]
    assert r.stats.resyncs == 1
    assert r.stats.skipped_bytes == len(tail)


def test_tcp_mid_stream_start_line_split_across_segments() -> None:
    r = TcpReassembler()
    junk = b"a=sendrecv\r\n"
    data = junk + RINGING
    got = feed_all(r, seg(data[:20], 7), seg(data[20:], 27))
    assert got == [RINGING]
    assert r.stats.skipped_bytes == len(junk)


def test_tcp_mid_stream_at_message_boundary() -> None:
    r = TcpReassembler()
    assert feed_all(r, seg(RINGING, 42)) == [RINGING]
    assert r.stats.skipped_bytes == 0


def test_tcp_crlf_keepalives_between_messages() -> None:
    r = TcpReassembler()
    got = feed_all(
        r,
        seg(b"", 99, TCP_SYN),
        seg(b"\r\n\r\n", 100),
        seg(INVITE + b"\r\n", 104),
        seg(RINGING, 106 + len(INVITE)),
    )
    assert got == [INVITE, RINGING]
    assert r.stats.keepalives == 2


@pytest.mark.parametrize(
    "header",
    [b"Content-Length: 5", b"content-length:5", b"CONTENT-LENGTH :  5", b"l: 5", b"L:5"],
)
def test_tcp_content_length_spellings(header: bytes) -> None:
    message = b"MESSAGE sip:a@b SIP/2.0\r\nCall-ID: x\r\n" + header + b"\r\n\r\nhello"
    r = TcpReassembler()
    assert feed_all(r, seg(b"", 0, TCP_SYN), seg(message + RINGING, 1)) == [message, RINGING]


def test_tcp_bare_lf_message() -> None:
    message = b"MESSAGE sip:a@b SIP/2.0\nCall-ID: x\nContent-Length: 2\n\nhi"
    r = TcpReassembler()
    assert feed_all(r, seg(message + RINGING, 1)) == [message, RINGING]


def test_tcp_missing_or_bad_content_length_means_no_body() -> None:
    no_length = b"ACK sip:a@b SIP/2.0\r\nCall-ID: x\r\n\r\n"
    bad_length = b"ACK sip:a@b SIP/2.0\r\nCall-ID: x\r\nContent-Length: many\r\n\r\n"
    r = TcpReassembler()
    assert feed_all(r, seg(no_length + bad_length + RINGING, 1)) == [
        no_length,
        bad_length,
        RINGING,
    ]
    assert (r.stats.missing_content_length, r.stats.bad_content_length) == (1, 1)


def test_tcp_non_sip_stream_is_skipped() -> None:
    r = TcpReassembler()
    got = feed_all(
        r,
        seg(b"", 0, TCP_SYN),
        seg(b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n", 1),
        seg(b"\x16\x03\x01\x02\x00" + bytes(200), 38),
    )
    assert got == []
    assert r.stats.skipped_bytes > 200


def test_tcp_buffer_bound_drops_and_counts() -> None:
    r = TcpReassembler(max_buffer=4096)
    head = b"MESSAGE sip:a@b SIP/2.0\r\nContent-Length: 100000\r\n\r\n"
    assert feed_all(r, seg(b"", 0, TCP_SYN), seg(head, 1)) == []
    assert r.stats.overflows == 1
    # The Content-Length itself was past the bound; the next message still frames.
    assert feed_all(r, seg(RINGING, 1 + len(head))) == [RINGING]
    r = TcpReassembler(max_buffer=4096)
    endless = b"MESSAGE sip:a@b SIP/2.0\r\nX: " + b"y" * 5000
    assert feed_all(r, seg(b"", 0, TCP_SYN), seg(endless, 1)) == []
    assert r.stats.overflows == 1


def test_tcp_fin_and_rst_release_state() -> None:
    r = TcpReassembler()
    feed_all(r, seg(b"", 99, TCP_SYN), seg(INVITE[:50], 100))
    assert r.open_streams == 1
    assert feed_all(r, seg(b"", 150, TCP_FIN | TCP_ACK)) == []
    assert r.open_streams == 0
    assert (r.stats.released, r.stats.incomplete) == (1, 1)
    feed_all(r, seg(b"", 499, TCP_SYN, reverse=True), seg(RINGING[:10], 500, reverse=True))
    feed_all(r, seg(b"", 510, TCP_RST, reverse=True))
    assert r.open_streams == 0
    # Data with the FIN still counts.
    r = TcpReassembler()
    assert feed_all(r, seg(b"", 99, TCP_SYN), seg(INVITE, 100, TCP_FIN | TCP_ACK)) == [INVITE]
    assert r.open_streams == 0


def test_tcp_idle_streams_expire() -> None:
    r = TcpReassembler(idle_timeout=10.0)
    feed_all(r, seg(INVITE[:50], 100, ts=1.0))
    feed_all(r, seg(RINGING, 7, ts=20.0, reverse=True))
    assert r.open_streams == 1
    assert r.stats.expired == 1
    assert r.stats.incomplete == 1


def test_tcp_stream_table_is_bounded() -> None:
    r = TcpReassembler(max_streams=3)
    for port in range(10):
        r.feed(Segment(1.0, CLIENT, SERVER, 30000 + port, 5060, 6, INVITE[:20], 1, TCP_ACK))
    assert r.open_streams == 3
    assert r.stats.evicted == 7


def test_tcp_syn_reuses_ports_for_new_connection() -> None:
    r = TcpReassembler()
    feed_all(r, seg(b"", 99, TCP_SYN), seg(INVITE[:50], 100))
    assert feed_all(r, seg(b"", 9999, TCP_SYN), seg(RINGING, 10000)) == [RINGING]


def test_tcp_pure_acks_cost_nothing() -> None:
    r = TcpReassembler()
    assert r.feed(seg(b"", 100, TCP_ACK)) == ()
    assert r.open_streams == 0


# -- WebSocket --------------------------------------------------------------------------

UPGRADE_REQUEST = (
    b"GET / HTTP/1.1\r\nHost: ws.example.com\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Protocol: sip\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
UPGRADE_RESPONSE = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: sip\r\n\r\n"
)


def ws_frame(
    payload: bytes,
    opcode: int = 1,
    fin: bool = True,
    mask: bytes | None = None,
    rsv1: bool = False,
) -> bytes:
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", b0, size)
    elif size < 65536:
        header = struct.pack("!BBH", b0, 126, size)
    else:
        header = struct.pack("!BBQ", b0, 127, size)
    if mask is None:
        return header + payload
    header = bytes([header[0], header[1] | 0x80]) + header[2:] + mask
    return header + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_websocket_after_upgrade() -> None:
    r = TcpReassembler()
    key = b"\x37\xfa\x21\x3d"
    big = INVITE + b"a=" + b"z" * 300  # 16-bit length form
    client = UPGRADE_REQUEST + ws_frame(INVITE, mask=key) + ws_frame(big[: len(INVITE)], mask=key)
    server = UPGRADE_RESPONSE + ws_frame(RINGING, opcode=2) + ws_frame(b"", opcode=9)
    out = list(r.feed(seg(b"", 99, TCP_SYN)))
    out += r.feed(seg(b"", 499, TCP_SYN, reverse=True))
    out += r.feed(seg(client[:300], 100))
    out += r.feed(seg(client[300:], 400))
    out += r.feed(seg(server, 500, reverse=True))
    assert out == [(INVITE, "ws"), (INVITE, "ws"), (RINGING, "ws")]
    assert (r.stats.ws_upgrades, r.stats.ws_messages, r.stats.ws_control) == (2, 3, 1)


def test_websocket_fragmented_message_and_non_sip() -> None:
    r = TcpReassembler()
    data = (
        UPGRADE_RESPONSE
        + ws_frame(RINGING[:10], fin=False)
        + ws_frame(b"", opcode=10)  # control frames may come between the pieces
        + ws_frame(RINGING[10:30], opcode=0, fin=False)
        + ws_frame(RINGING[30:], opcode=0)
        + ws_frame(b'{"json": "not sip"}')
        + ws_frame(b"\r\n\r\n")
    )
    got = feed_all(r, seg(b"", 0, TCP_SYN, reverse=True), seg(data, 1, reverse=True))
    assert got == [RINGING]
    assert (r.stats.ws_non_sip, r.stats.keepalives) == (1, 1)


def test_websocket_permessage_deflate() -> None:
    compressor = zlib.compressobj(wbits=-15)
    frames = b""
    for message in (INVITE, RINGING):
        packed = compressor.compress(message) + compressor.flush(zlib.Z_SYNC_FLUSH)
        assert packed.endswith(b"\x00\x00\xff\xff")
        frames += ws_frame(packed[:-4], rsv1=True, mask=b"abcd")
    r = TcpReassembler()
    got = feed_all(r, seg(b"", 0, TCP_SYN), seg(UPGRADE_REQUEST + frames, 1))
    assert got == [INVITE, RINGING]


def test_websocket_large_frame_over_limit() -> None:
    r = TcpReassembler(max_buffer=1000)
    data = UPGRADE_RESPONSE + ws_frame(b"x" * 2000, opcode=2) + RINGING
    got = feed_all(r, seg(b"", 0, TCP_SYN, reverse=True), seg(data, 1, reverse=True))
    assert r.stats.overflows == 1
    assert got == []


# -- hostile input ----------------------------------------------------------------------

VALID_FRAMES = [
    eth(ipv4(udp(SIP))),
    eth(ipv6(udp(SIP)), etype=0x86DD, tags=[(0x88A8, 1), (0x8100, 2)]),
    eth(
        ipv4(
            gre(
                struct.pack("!HHIHH", 2 << 12, 0, 0, 0, 1) + bytes(8) + eth(ipv4(udp(SIP))),
                0x22EB,
                seq=1,
            ),
            proto=47,
        )
    ),
    eth(ipv4(sctp(data_chunk(SIP, flags=0x02), data_chunk(SIP, tsn=2, flags=0x01)), proto=132)),
    eth(ipv6(struct.pack("!BBHI", 17, 0, 1, 5) + udp(SIP), nh=44), etype=0x86DD),
    eth(ipv4(tcp(SIP), proto=6)),
    *(encaps.tunnelled(kind, ipv4(udp(SIP))) for kind in encaps.ENCAPSULATIONS),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([0, 1, 101, 108, 113, 276]),
    st.integers(0, len(VALID_FRAMES) - 1),
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=8),
    st.integers(0, 2000),
)
def test_decap_never_raises(
    linktype: int, which: int, edits: list[tuple[int, int]], cut: int
) -> None:
    frame = bytearray(VALID_FRAMES[which])
    for at, value in edits:
        if at < len(frame):
            frame[at] = value
    dec = Decapsulator()
    for segment in dec.decode(linktype, 1.0, bytes(frame[: max(cut, 1)])):
        assert segment.transport in ("udp", "tcp", "sctp")
    dec.close()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 4000),
            st.sampled_from([TCP_ACK, TCP_SYN, TCP_FIN | TCP_ACK, TCP_RST, TCP_PSH | TCP_ACK]),
            st.integers(0, len(INVITE + RINGING)),
            st.integers(1, 300),
            st.booleans(),
        ),
        max_size=25,
    )
)
def test_tcp_reassembly_never_raises(steps: list[tuple[int, int, int, int, bool]]) -> None:
    stream = (
        UPGRADE_RESPONSE + ws_frame(RINGING) + INVITE + RINGING + ws_frame(INVITE, mask=b"wxyz")
    )
    r = TcpReassembler(max_buffer=2048, max_pending_segments=4)
    for seq, flags, start, size, reverse in steps:
        for message, transport in r.feed(
            seg(stream[start : start + size], seq, flags, reverse=reverse)
        ):
            assert transport in ("tcp", "ws")
            assert sip_offset(message) == 0
    r.close()
    assert r.open_streams == 0


def test_sctp_pieces_expire_in_capture_time() -> None:
    dec = Decapsulator(frag_timeout=30.0)
    first = eth(ipv4(sctp(data_chunk(BIG[:1000], tsn=10, flags=0x02)), proto=132))
    other = eth(ipv4(sctp(data_chunk(BIG[:1000], tsn=50, flags=0x02)), proto=132))
    assert decode_eth(first, dec, ts=0.0) == ()
    assert decode_eth(other, dec, ts=100.0) == ()
    assert dec.stats.sctp_dropped == 1
    dec.close()
    assert dec.stats.sctp_dropped == 2
