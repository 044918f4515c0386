"""Tests for sipcdr.capture.pcapfile: every shared capture against tshark's SIP counts,
the malformed captures, HEP unwrapping and file handling."""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import dpkt
import encaps
import pytest
from pcapdata import require_shared_data
from sipcdr import hepencode
from sipcdr.capture.pcapfile import (
    PCAP_CHUNK_BYTES,
    CaptureFileError,
    iter_packet_batches,
    iter_packets,
)
from sipcdr.decode.extract import CaptureStats, SipExtractor
from sipcdr.model import Packet
from sipcdr.sip import SipParseError, parse


@dataclass(frozen=True)
class Expected:
    """What tshark counted in a capture (pcaps/SIPSTAT.txt), as parsed SIP messages.

    ``counts`` maps request methods and response status codes to tshark's numbers
    (resent messages included, as tshark includes them in its totals). ``rejected``
    lists messages that sipcdr finds and yields but ``sipcdr.sip.parse`` refuses, with
    the parser's reason; they are part of ``counts`` and are subtracted from the parsed
    tally. ``transports`` is the transport of every yielded Packet.
    """

    counts: dict[str | int, int]
    transports: dict[str, int]
    rejected: dict[str | int, tuple[str, int]] = field(default_factory=dict)
    non_sip_hep: int = 0


EXPECTED: dict[str, Expected] = {
    "heplify-erspan_sip_ipv4_udp.pcapng": Expected(
        {
            "INVITE": 16, "ACK": 18, "SUBSCRIBE": 12, "BYE": 6, "NOTIFY": 11, "REFER": 4,
            407: 4, 488: 2, 200: 30, 202: 8, 180: 6, 100: 14, 401: 1, 481: 8,
        },
        {"udp": 140},
    ),
    "heplify-rtp_rtcp_sip_ipv4_udp.pcap": Expected(
        {"INVITE": 2, "ACK": 1, "REGISTER": 3, 200: 4, 180: 2, 100: 2},
        {"udp": 14},
    ),
    "heplify-sip_ipv4_tcp.pcap": Expected(
        {"INVITE": 1, "ACK": 1, "BYE": 1, 200: 2, 180: 1, 100: 1},
        {"tcp": 7},
    ),
    # tshark needed "-d tcp.port==6060,sip" here; sipcdr finds SIP by content.
    "heplify-sip_ipv4_tcp_fragmented.pcap": Expected(
        {
            "INVITE": 37, "ACK": 37, "OPTIONS": 5, "PRACK": 5, "UPDATE": 63, "BYE": 34,
            "CANCEL": 2,
            486: 1, 487: 2, 200: 142, 180: 33, 100: 36, 182: 2, 183: 6, 403: 1,
        },
        {"tcp": 406},
    ),
    "heplify-sip_ipv4_tcp_retrans.pcap": Expected(
        {"REGISTER": 4, 200: 2, 401: 2},
        {"tcp": 4, "udp": 4},
    ),
    "heplify-sip_ipv6_udp.pcap": Expected(
        {"INVITE": 1, "ACK": 1, "BYE": 1, 200: 2, 100: 1},
        {"udp": 6},
    ),
    # The INVITE spans two SCTP DATA chunks (B and E pieces).
    "heplify-sip_sctp.pcap": Expected(
        {"INVITE": 1, "ACK": 1, 100: 1, 403: 1},
        {"sctp": 4},
    ),
    "heplify-sip_tcp_websocket.pcap": Expected(
        {"INVITE": 5, "ACK": 5, "OPTIONS": 1, "BYE": 4, 407: 1, 200: 9, 180: 2, 100: 4, 183: 8},
        {"udp": 28, "ws": 11},
    ),
    # tshark has no HEP dissector; these are SIPSTAT.txt's HEP3-decoded counts.
    "hepwireshark-hep.pcap": Expected(
        {"INVITE": 1, "OPTIONS": 1, "PUBLISH": 1, 100: 1, 200: 1, 407: 1},
        {"udp": 6},
        # HEPGEN's synthetic INVITE and PUBLISH use bare-LF line ends and declare
        # Content-Length 287 and 450 over bodies of 276 and 429 bytes (the lengths of
        # the CRLF versions). Both are found and yielded; the parser refuses a body
        # shorter than its Content-Length, so they cannot be counted as parsed.
        rejected={"INVITE": ("body_truncated", 1), "PUBLISH": ("body_truncated", 1)},
        non_sip_hep=2,  # one RTCP report (type 5), one log (type 100)
    ),
    # The agent recorded SIP over TCP, so that is the transport HEP reports.
    "hepwireshark-hep3_compressed.pcapng": Expected(
        {"REGISTER": 12, 200: 3, 401: 6},
        {"tcp": 21},
    ),
    "ndpi-FAX-Call-t38-CA-TDM-SIP-FB-1.pcap": Expected(
        {"INVITE": 16, "ACK": 16, "OPTIONS": 8, "BYE": 4, 488: 4, 200: 24, 180: 4, 100: 16},
        {"udp": 92},
    ),
    "ndpi-sip_hello.pcapng": Expected(
        {"REGISTER": 4, 200: 2, 401: 2},
        {"udp": 8},
    ),
    # Two of the four TCP segments are IP-in-IP.
    "sngrep-ipip.pcap": Expected(
        {"INVITE": 1, "BYE": 1, 200: 1, 183: 1},
        {"tcp": 4},
    ),
    "sngrep-ipv6frag.pcap": Expected(
        {"INVITE": 2, "PRACK": 4, "ACK": 2, "UPDATE": 4, "BYE": 2, 200: 13, 100: 1, 183: 4},
        {"udp": 32},
    ),
    "zeek-sip-wireshark.pcap": Expected(
        {
            "INVITE": 11, "ACK": 7, "REGISTER": 18, "CANCEL": 11,
            407: 3, 200: 3, 408: 2, 480: 1, 100: 7, 401: 14, 183: 1, 403: 3,
        },
        {"udp": 81},
    ),
}  # fmt: skip


def start_line_key(payload: bytes) -> str | int:
    """Method or status code from the start line, for messages the parser refuses."""
    first = payload.split(b"\n", 1)[0].split(b" ")
    return int(first[1]) if first[0].upper() == b"SIP/2.0" else first[0].decode()


def tally(packets: list[Packet]) -> tuple[Counter[str | int], Counter[tuple[str | int, str]]]:
    parsed: Counter[str | int] = Counter()
    rejected: Counter[tuple[str | int, str]] = Counter()
    for packet in packets:
        try:
            message = parse(packet.payload)
        except SipParseError as exc:
            rejected[start_line_key(packet.payload), exc.reason] += 1
            continue
        parsed[message.method if message.is_request else message.status_code] += 1
    return parsed, rejected


def pcaps() -> Path:
    return require_shared_data() / "pcaps"


def test_table_covers_every_capture() -> None:
    on_disk = {p.name for p in pcaps().iterdir() if p.suffix in (".pcap", ".pcapng")}
    assert on_disk == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_capture_matches_tshark_counts(name: str) -> None:
    expected = EXPECTED[name]
    stats = CaptureStats()
    packets = list(iter_packets(pcaps() / name, stats=stats))
    parsed, rejected = tally(packets)

    want_parsed = Counter(expected.counts)
    for key, (_reason, count) in expected.rejected.items():
        want_parsed[key] -= count
    assert dict(parsed) == {k: v for k, v in want_parsed.items() if v}
    assert dict(rejected) == {(k, r): n for k, (r, n) in expected.rejected.items()}
    assert len(packets) == sum(expected.counts.values()) == stats.sip_messages
    assert dict(Counter(p.transport for p in packets)) == expected.transports
    assert stats.hep_non_sip == expected.non_sip_hep
    assert not stats.hep_errors
    assert not stats.truncated_file


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_batches_hold_the_packets_in_order(name: str) -> None:
    """What the import loops over: the same packets and counters as ``iter_packets``,
    in the same order, in batches that are never empty."""
    one_by_one = CaptureStats()
    packets = list(iter_packets(pcaps() / name, stats=one_by_one))
    batched = CaptureStats()
    batches = [list(batch) for batch in iter_packet_batches(pcaps() / name, stats=batched)]
    assert all(batches)
    assert [p for batch in batches for p in batch] == packets
    assert batched.as_dict() == one_by_one.as_dict()


def test_batches_of_a_large_capture_follow_its_chunks(tmp_path: Path) -> None:
    # More than one chunk of records: more than one batch, none lost at the seams.
    frame = eth_udp(REGISTER, dport=5060)
    count = (PCAP_CHUNK_BYTES // (16 + len(frame))) * 3 + 7
    path = write_pcap(tmp_path / "large.pcap", [(float(i), frame) for i in range(count)])
    batches = list(iter_packet_batches(path))
    assert len(batches) >= 3
    assert [p.timestamp for batch in batches for p in batch] == [float(i) for i in range(count)]


def test_packets_carry_capture_time_and_node() -> None:
    path = pcaps() / "heplify-sip_ipv6_udp.pcap"
    packets = list(iter_packets(path))
    assert {p.capture_node for p in packets} == {path.name}
    first = packets[0]
    assert first.payload.startswith(b"INVITE ")
    assert ":" in first.src_ip and ":" in first.dst_ip
    # The pcap's own times, bogus as they are (this capture's clock ends in 2092).
    assert first.timestamp == 1328589362.251758
    assert packets[-1].timestamp == 3867576602.251758
    named = next(iter_packets(path, capture_node="edge-1"))
    assert named.capture_node == "edge-1"


def test_websocket_packets_keep_tcp_endpoints() -> None:
    packets = list(iter_packets(pcaps() / "heplify-sip_tcp_websocket.pcap"))
    ws = [p for p in packets if p.transport == "ws"]
    assert {(p.src_port, p.dst_port) for p in ws} == {(43380, 8080), (8080, 43380)}
    assert ws[0].payload.startswith(b"INVITE sip:")


def test_hep_packets_use_inner_addresses_and_capture_id() -> None:
    stats = CaptureStats()
    packets = list(iter_packets(pcaps() / "hepwireshark-hep.pcap", stats=stats))
    assert {p.capture_node for p in packets} == {"2001"}
    assert {(p.src_ip, p.dst_ip) for p in packets} == {
        ("192.168.1.1", "192.168.1.2"),
        ("192.168.1.2", "192.168.1.1"),
    }
    assert packets[0].timestamp == pytest.approx(1481455196.0001)
    assert (stats.hep_packets, stats.hep_non_sip) == (8, 2)


def test_tcp_reassembly_on_real_capture() -> None:
    stats = CaptureStats()
    list(iter_packets(pcaps() / "heplify-sip_ipv4_tcp_retrans.pcap", stats=stats))
    assert stats.tcp.duplicates >= 1  # the retransmitted REGISTER is not counted twice
    assert stats.frames_read == 196
    assert stats.tcp_segments == 181


def test_reassembly_counters_on_real_captures() -> None:
    stats = CaptureStats()
    list(iter_packets(pcaps() / "sngrep-ipv6frag.pcap", stats=stats))
    assert stats.fragments_reassembled == 2
    stats = CaptureStats()
    list(iter_packets(pcaps() / "heplify-erspan_sip_ipv4_udp.pcapng", stats=stats))
    assert stats.decap.tunnelled == 140
    stats = CaptureStats()
    list(iter_packets(pcaps() / "heplify-rtp_rtcp_sip_ipv4_udp.pcap", stats=stats))
    assert stats.non_sip_payloads > 3000  # RTP, RTCP, MGCP, SNMP
    assert stats.non_ip > 0
    assert stats.as_dict()["sip_messages"] == 14


# -- malformed captures -----------------------------------------------------------------


def malformed() -> Path:
    return require_shared_data() / "malformed" / "pcaps"


def test_invalid_content_length_found_then_rejected() -> None:
    # INDEX: INVITE and 200 OK with non-numeric Content-Length. Both are SIP by their
    # start lines, so both are yielded; the parser rejects both.
    packets = list(iter_packets(malformed() / "zeek-invalid-content-length.pcap"))
    assert [start_line_key(p.payload) for p in packets] == ["INVITE", 200]
    _parsed, rejected = tally(packets)
    assert rejected == {("INVITE", "bad_content_length"): 1, (200, "bad_content_length"): 1}


def test_junk_before_request() -> None:
    # INDEX: an all-zero 4-byte datagram, then a REGISTER "prefixed with junk bytes
    # 'DB'". On the wire the "DB" is the UDP checksum (0x4442), not payload: the
    # datagram is a clean REGISTER. The zero datagram is not SIP.
    stats = CaptureStats()
    packets = list(iter_packets(malformed() / "zeek-sip-junk-before-request.pcap", stats=stats))
    assert len(packets) == 1
    assert packets[0].payload.startswith(b"REGISTER sip:1.1.1.1:5060 SIP/2.0\r\n")
    assert stats.non_sip_payloads == 1
    message = parse(packets[0].payload)
    assert message.method == "REGISTER"


# -- synthetic files --------------------------------------------------------------------

REGISTER = (
    b"REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1\r\n"
    b"Call-ID: r1@10.0.0.1\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n"
)


def eth_udp(payload: bytes, src: bytes = b"\x0a\x00\x00\x01", dport: int = 9060) -> bytes:
    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src, b"\x0a\x00\x00\x02"
    )
    return b"\x00" * 12 + b"\x08\x00" + ip + udp


def write_pcap(path: Path, frames: list[tuple[float, bytes]], linktype: int = 1) -> Path:
    with path.open("wb") as handle:
        writer = dpkt.pcap.Writer(handle, linktype=linktype)
        for ts, frame in frames:
            writer.writepkt(frame, ts=ts)
    return path


def test_hep_variants_and_errors(tmp_path: Path) -> None:
    hep3 = hepencode.encode(
        src_ip="203.0.113.5",
        dst_ip="203.0.113.6",
        src_port=5070,
        dst_port=5080,
        timestamp=1700000000.25,
        payload=b"\r\n" + REGISTER,
        capture_id=77,
        ip_protocol=132,
    )
    rtcp = hepencode.encode(
        src_ip="203.0.113.5",
        dst_ip="203.0.113.6",
        src_port=1,
        dst_port=2,
        timestamp=1.0,
        payload=b"{}",
        proto_type=5,
    )
    # HEPv2: header, IPv4 addresses, little-endian time header, then the SIP.
    hep2 = (
        struct.pack("!BBBBHH", 2, 28, 2, 17, 5060, 5061)
        + bytes([10, 1, 1, 1, 10, 2, 2, 2])
        + struct.pack("<IIH2x", 1600000000, 500000, 9)
        + REGISTER
    )
    broken = hep3[:4] + struct.pack("!H", 5000) + hep3[6:]
    path = write_pcap(
        tmp_path / "hep.pcap",
        [(10.0, eth_udp(p)) for p in (hep3, rtcp, hep2, broken, b"\x02" + bytes(40))],
    )
    stats = CaptureStats()
    packets = list(iter_packets(path, capture_node="file", stats=stats))
    assert packets == [
        Packet(1700000000.25, "203.0.113.5", 5070, "203.0.113.6", 5080, "sctp", REGISTER, "77"),
        Packet(1600000000.5, "10.1.1.1", 5060, "10.2.2.2", 5061, "udp", REGISTER, "9"),
    ]
    assert (stats.hep_packets, stats.hep_non_sip) == (3, 1)
    assert stats.hep_errors == {"truncated": 1}
    assert stats.non_sip_payloads == 1  # the last datagram only looked like HEPv2


def test_udp_keepalive_and_leading_crlf(tmp_path: Path) -> None:
    path = write_pcap(
        tmp_path / "ka.pcap",
        [(1.0, eth_udp(b"\r\n\r\n", dport=5060)), (2.0, eth_udp(b"\r\n" + REGISTER, dport=5060))],
    )
    stats = CaptureStats()
    packets = list(iter_packets(path, stats=stats))
    assert [p.payload for p in packets] == [REGISTER]
    assert packets[0].timestamp == 2.0
    assert stats.keepalives == 1


def test_pcapng_and_other_link_types(tmp_path: Path) -> None:
    raw_ip = eth_udp(REGISTER, dport=5060)[14:]
    path = tmp_path / "raw.pcapng"
    with path.open("wb") as handle:
        writer = dpkt.pcapng.Writer(handle, linktype=101)
        writer.writepkt(raw_ip, ts=5.5)
    packets = list(iter_packets(path))
    assert [(p.timestamp, p.src_ip, p.payload) for p in packets] == [(5.5, "10.0.0.1", REGISTER)]


def test_truncated_file_stops_cleanly(tmp_path: Path) -> None:
    whole = write_pcap(
        tmp_path / "whole.pcap",
        [(1.0, eth_udp(REGISTER, dport=5060)), (2.0, eth_udp(REGISTER, dport=5060))],
    )
    record = 16 + len(eth_udp(REGISTER))
    cut = tmp_path / "cut.pcap"
    # Cut inside the second record header: the reader stops and says so.
    cut.write_bytes(whole.read_bytes()[: -(record - 8)])
    stats = CaptureStats()
    assert len(list(iter_packets(cut, stats=stats))) == 1
    assert stats.truncated_file
    # Cut inside the second frame: the frame is short of its IP length and dropped.
    cut.write_bytes(whole.read_bytes()[:-10])
    stats = CaptureStats()
    assert len(list(iter_packets(cut, stats=stats))) == 1
    assert stats.decap.truncated == 1


def test_not_a_capture(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello world, not a capture")
    with pytest.raises(CaptureFileError, match="not a pcap"):
        list(iter_packets(path))
    unsupported = write_pcap(tmp_path / "usb.pcap", [(1.0, b"\x00" * 64)], linktype=189)
    with pytest.raises(CaptureFileError, match="unsupported link type 189"):
        list(iter_packets(unsupported))


def test_extractor_feeds_frames_directly() -> None:
    extractor = SipExtractor(1, "live0")
    assert extractor.feed(3.0, eth_udp(b"\x80\x00" + bytes(170))) == ()
    (packet,) = extractor.feed(4.0, eth_udp(REGISTER, dport=5060))
    assert packet == Packet(4.0, "10.0.0.1", 40000, "10.0.0.2", 5060, "udp", REGISTER, "live0")
    extractor.close()
    assert extractor.stats.frames_read == 2


@pytest.mark.parametrize("kind", encaps.ENCAPSULATIONS)
def test_extractor_unwraps_each_encapsulation(kind: str) -> None:
    extractor = SipExtractor(1, "live0")
    sip = encaps.ipv4(encaps.udp(REGISTER, 5062, 5060), "192.168.7.1", "192.168.7.2")
    (packet,) = extractor.feed(1.0, encaps.tunnelled(kind, sip))
    assert packet == Packet(1.0, "192.168.7.1", 5062, "192.168.7.2", 5060, "udp", REGISTER, "live0")
    # Media inside the tunnel is unwrapped, then dropped by its first byte.
    rtp = encaps.ipv4(encaps.udp(b"\x80\x08" + bytes(170), 40000, 40002), "10.0.0.1", "10.0.0.2")
    assert extractor.feed(2.0, encaps.tunnelled(kind, rtp)) == ()
    assert extractor.stats.non_sip_payloads == 1
    assert extractor.stats.decap.as_dict()[kind] == 2
