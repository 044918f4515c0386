"""pcapng files captured on several interfaces at once: every packet block is read with
its own interface's link type, time resolution and offset, compiled and interpreted,
and an interface never described is a counted rejection."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path
from types import ModuleType

import encaps
import pytest
from peers import require_program
from sipcalls import Call, CdrCollector, answered_call_messages
from sipcdr.capture import pcapfile
from sipcdr.capture.pcapfile import iter_packets
from sipcdr.config import Config
from sipcdr.decode import extract as extract_module
from sipcdr.hotpath import load_interpreted
from sipcdr.importer import file_warning, import_files

ETHERNET, RAW, LINUX_SLL, LINUX_SLL2, USER0 = 1, 101, 113, 276, 147
SECONDS = 1_700_000_000


def sip(n: int) -> bytes:
    return (
        f"OPTIONS sip:x@example.com SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK{n}\r\n"
        f"Call-ID: c{n}@h\r\nCSeq: {n} OPTIONS\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def ip_udp(payload: bytes, last: int) -> bytes:
    udp = struct.pack("!HHHH", 5060, 5060, 8 + len(payload), 0) + payload
    src = bytes((10, 0, 0, last))
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src, b"\x0a\x00\x00\x63"
    )
    return header + udp


def framed(linktype: int, packet: bytes) -> bytes:
    """An IPv4 packet in the link layer of ``linktype``."""
    if linktype == ETHERNET:
        return b"\x02" * 12 + b"\x08\x00" + packet
    if linktype == LINUX_SLL:
        # packet type, ARPHRD_ETHER, address length, address, protocol
        return struct.pack("!HHH8sH", 0, 1, 6, b"\x02" * 6, 0x0800) + packet
    if linktype == LINUX_SLL2:
        # protocol, reserved, interface index, ARPHRD_ETHER, packet type, address
        return struct.pack("!HHIHBB8s", 0x0800, 0, 2, 1, 0, 6, b"\x02" * 6) + packet
    return packet


class Writer:
    """pcapng blocks in either byte order."""

    def __init__(self, order: str) -> None:
        self.order = order
        self.data = self.block(0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1))

    def block(self, kind: int, body: bytes) -> bytes:
        body += bytes(-len(body) % 4)
        length = 12 + len(body)
        return (
            struct.pack(self.order + "II", kind, length)
            + body
            + struct.pack(self.order + "I", length)
        )

    def interface(self, linktype: int, resol: int | None = None, offset: int = 0) -> None:
        options = b""
        if resol is not None:
            options += struct.pack(self.order + "HHB3x", 9, 1, resol)
        if offset:
            options += struct.pack(self.order + "HHq", 14, 8, offset)
        if options:
            options += bytes(4)  # end of options
        self.data += self.block(1, struct.pack(self.order + "HHI", linktype, 0, 65535) + options)

    def enhanced(self, iface: int, ticks: int, frame: bytes, comment: bool = False) -> None:
        body = struct.pack(
            self.order + "5I", iface, ticks >> 32, ticks & 0xFFFFFFFF, len(frame), len(frame)
        )
        body += frame + bytes(-len(frame) % 4)
        if comment:
            body += struct.pack(self.order + "HH", 1, 4) + b"note" + bytes(4)
        self.data += self.block(6, body)

    def obsolete(self, iface: int, ticks: int, frame: bytes) -> None:
        body = struct.pack(
            self.order + "HH4I", iface, 0, ticks >> 32, ticks & 0xFFFFFFFF, len(frame), len(frame)
        )
        self.data += self.block(2, body + frame)

    def simple(self, frame: bytes) -> None:
        self.data += self.block(3, struct.pack(self.order + "I", len(frame)) + frame)


def several_interfaces(order: str) -> tuple[bytes, list[tuple[int, float]]]:
    """A capture on four interfaces of different link types and resolutions, plus a
    packet block of an undescribed interface and one of an unreadable link type. Returns
    the file and, per SIP message (by CSeq), its expected time."""
    w = Writer(order)
    w.interface(ETHERNET)  # microseconds, the default
    w.interface(RAW, resol=9)  # nanoseconds
    w.interface(LINUX_SLL, resol=0x80 | 10)  # 1/1024 s
    w.interface(LINUX_SLL2, resol=6, offset=SECONDS)  # microseconds after an offset
    expected: list[tuple[int, float]] = []
    w.enhanced(0, SECONDS * 10**6 + 123_456, framed(ETHERNET, ip_udp(sip(1), 1)))
    expected.append((1, (SECONDS * 10**6 + 123_456) / 1e6))
    w.enhanced(1, SECONDS * 10**9 + 123_456_789, framed(RAW, ip_udp(sip(2), 2)))
    expected.append((2, (SECONDS * 10**9 + 123_456_789) / 1e9))
    w.enhanced(2, SECONDS * 1024 + 512, framed(LINUX_SLL, ip_udp(sip(3), 3)), comment=True)
    expected.append((3, SECONDS + 0.5))
    w.enhanced(3, 250_000, framed(LINUX_SLL2, ip_udp(sip(4), 4)))
    expected.append((4, SECONDS + 0.25))
    # Interface 4 is not described yet: counted, not read as interface 0.
    w.enhanced(4, 1, framed(ETHERNET, ip_udp(sip(99), 99)))
    w.interface(USER0)  # interface 4: a link type not read
    w.enhanced(4, 1, framed(ETHERNET, ip_udp(sip(98), 98)))
    w.obsolete(1, SECONDS * 10**9 + 700_000_000, framed(RAW, ip_udp(sip(5), 5)))
    expected.append((5, SECONDS + 0.7))
    # No time of its own: the packet before it gives one.
    w.simple(framed(ETHERNET, ip_udp(sip(6), 6)))
    expected.append((6, SECONDS + 0.7))
    w.enhanced(1, SECONDS * 10**9 + 900_000_001, framed(RAW, ip_udp(sip(7), 7)))
    expected.append((7, (SECONDS * 10**9 + 900_000_001) / 1e9))
    return w.data, expected


@pytest.fixture(params=["compiled", "interpreted"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The file reader over the compiled hot-path modules, or over their source: the
    extraction module it then uses."""
    if request.param == "compiled":
        return extract_module
    modules: dict[str, ModuleType] = load_interpreted()
    monkeypatch.setattr(pcapfile, "PcapngBlocks", modules["sipcdr.decode.capfile"].PcapngBlocks)
    extract = modules["sipcdr.decode.extract"]
    monkeypatch.setattr(pcapfile, "SipExtractor", extract.SipExtractor)
    monkeypatch.setattr(pcapfile, "CaptureStats", extract.CaptureStats)
    return extract


def cseq(payload: bytes) -> int:
    return int(payload.split(b"CSeq: ")[1].split(b" ")[0])


@pytest.mark.parametrize("order", ["<", ">"])
def test_each_packet_block_reads_with_its_own_interface(
    reader: ModuleType, order: str, tmp_path: Path
) -> None:
    data, expected = several_interfaces(order)
    path = tmp_path / "several.pcapng"
    path.write_bytes(data)
    stats = reader.CaptureStats()
    packets = list(iter_packets(path, stats=stats))
    assert [(cseq(p.payload), p.timestamp) for p in packets] == expected
    assert [p.src_ip for p in packets] == [f"10.0.0.{n}" for n, _ in expected]
    assert stats.unknown_interface == 1
    assert stats.unsupported_link == 1
    assert stats.decap.non_ip == 0
    assert not stats.truncated_file


def test_chunks_of_any_size_read_alike(
    reader: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, expected = several_interfaces("<")
    path = tmp_path / "several.pcapng"
    path.write_bytes(data)
    for size in (1, 7, 64, 333):
        monkeypatch.setattr(pcapfile, "PCAP_CHUNK_BYTES", size)
        packets = list(iter_packets(path))
        assert [(cseq(p.payload), p.timestamp) for p in packets] == expected, size


def test_a_new_section_forgets_the_interfaces_before_it(reader: ModuleType, tmp_path: Path) -> None:
    first = Writer("<")
    first.interface(RAW, resol=9)
    first.enhanced(0, SECONDS * 10**9, framed(RAW, ip_udp(sip(1), 1)))
    second = Writer("<")
    second.interface(ETHERNET)
    second.enhanced(0, SECONDS * 10**6 + 1, framed(ETHERNET, ip_udp(sip(2), 2)))
    second.enhanced(1, SECONDS * 10**6 + 2, framed(RAW, ip_udp(sip(3), 3)))
    path = tmp_path / "joined.pcapng"
    path.write_bytes(first.data + second.data)
    stats = reader.CaptureStats()
    packets = list(iter_packets(path, stats=stats))
    assert [(cseq(p.payload), p.timestamp) for p in packets] == [
        (1, float(SECONDS)),
        (2, (SECONDS * 10**6 + 1) / 1e6),
    ]
    assert stats.unknown_interface == 1


def test_a_block_cut_short_ends_the_file_as_truncated(reader: ModuleType, tmp_path: Path) -> None:
    data, expected = several_interfaces("<")
    path = tmp_path / "cut.pcapng"
    path.write_bytes(data[:-10])
    stats = reader.CaptureStats()
    packets = list(iter_packets(path, stats=stats))
    assert [(cseq(p.payload), p.timestamp) for p in packets] == expected[:-1]
    assert stats.truncated_file
    assert stats.truncated_at == len(data) - (32 + len(framed(RAW, ip_udp(sip(7), 7))) + 3) // 4 * 4


def test_times_agree_with_tshark(tmp_path: Path) -> None:
    tshark = require_program("tshark")  # fails under CI, skips elsewhere, when missing
    # Only the readable interfaces, so that tshark's frames are sipcdr's messages; the
    # Simple Packet Block has no time of its own in tshark either.
    w = Writer("<")
    w.interface(ETHERNET)
    w.interface(RAW, resol=9)
    w.interface(LINUX_SLL, resol=0x80 | 10)
    w.interface(LINUX_SLL2, resol=6, offset=SECONDS)
    w.enhanced(0, SECONDS * 10**6 + 123_456, framed(ETHERNET, ip_udp(sip(1), 1)))
    w.enhanced(1, SECONDS * 10**9 + 123_456_789, framed(RAW, ip_udp(sip(2), 2)))
    w.enhanced(2, SECONDS * 1024 + 512, framed(LINUX_SLL, ip_udp(sip(3), 3)))
    w.enhanced(3, 250_000, framed(LINUX_SLL2, ip_udp(sip(4), 4)))
    w.enhanced(1, SECONDS * 10**9 + 900_000_001, framed(RAW, ip_udp(sip(5), 5)))
    path = tmp_path / "several.pcapng"
    path.write_bytes(w.data)
    out = subprocess.run(
        [tshark, "-r", str(path), "-T", "fields", "-e", "frame.time_epoch", "-e", "ip.src"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split("\n")
    shark = [line.split("\t") for line in out if line]
    packets = list(iter_packets(path))
    assert len(packets) == len(shark) == 5
    for packet, (epoch, src) in zip(packets, shark, strict=True):
        assert packet.src_ip == src
        # tshark prints nanoseconds; a float of 1.7e9 s keeps them to ~0.2 µs.
        assert abs(packet.timestamp - float(epoch)) < 1e-6, (packet, epoch)


def test_unread_packet_blocks_are_named_in_the_file_warning(tmp_path: Path) -> None:
    data, expected = several_interfaces("<")
    path = tmp_path / "several.pcapng"
    path.write_bytes(data)
    stats = extract_module.CaptureStats()
    assert len(list(iter_packets(path, stats=stats))) == len(expected)
    warning = file_warning(path, stats)
    assert warning is not None
    assert "1 packet blocks name an interface the file never described" in warning
    assert "1 packet blocks of interfaces whose link type is not read" in warning
    assert "truncated" not in warning


@pytest.mark.parametrize("orders", [("<", ">"), (">", "<")])
def test_a_new_section_in_the_other_byte_order_reads_whole(
    reader: ModuleType, orders: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Captures of machines of either endianness joined end to end (mergecap, cat):
    # the second section's lengths are in its own byte order, which its header gives.
    first = Writer(orders[0])
    first.interface(ETHERNET)
    first.enhanced(0, SECONDS * 10**6, framed(ETHERNET, ip_udp(sip(1), 1)))
    second = Writer(orders[1])
    second.interface(RAW, resol=9)
    second.enhanced(0, SECONDS * 10**9 + 5, framed(RAW, ip_udp(sip(2), 2)))
    path = tmp_path / "joined.pcapng"
    path.write_bytes(first.data + second.data)
    expected = [(1, float(SECONDS)), (2, (SECONDS * 10**9 + 5) / 1e9)]
    for size in (1, 5, 9, 11, 1 << 20):
        monkeypatch.setattr(pcapfile, "PCAP_CHUNK_BYTES", size)
        stats = reader.CaptureStats()
        packets = list(iter_packets(path, stats=stats))
        assert [(cseq(p.payload), p.timestamp) for p in packets] == expected, size
        assert not stats.truncated_file, size


def test_a_block_length_past_any_packet_stops_without_buffering_the_file(
    reader: ModuleType, tmp_path: Path
) -> None:
    # A damaged length of nearly 4 GB: the reader must not ask for (or hold) the rest
    # of the file to complete it, it ends the file there as truncated.
    w = Writer("<")
    w.interface(ETHERNET)
    w.enhanced(0, SECONDS * 10**6, framed(ETHERNET, ip_udp(sip(1), 1)))
    good = len(w.data)
    bad = struct.pack("<II", 6, 0xFFFFFFF0) + bytes(4096)
    path = tmp_path / "damaged.pcapng"
    path.write_bytes(w.data + bad)
    stats = reader.CaptureStats()
    packets = list(iter_packets(path, stats=stats))
    assert [cseq(p.payload) for p in packets] == [1]
    assert stats.truncated_file
    assert stats.truncated_at == good
    blocks = vars(pcapfile)["PcapngBlocks"](True, 1e6, 0, 0)  # as the fixture set it
    blocks.feed(bad[:64], reader.SipExtractor(ETHERNET, "n"))
    assert blocks.stopped
    assert blocks.wanted() <= 1 << 26


def test_many_interface_descriptions_share_one_extractor_per_link_type(
    reader: ModuleType,
) -> None:
    # A file of nothing but interface descriptions (20 bytes each) made an extractor,
    # with its own decoder, for each: hundreds of bytes of memory per 20 of file.
    w = Writer("<")
    for n in range(2000):
        w.interface(RAW if n % 2 else ETHERNET)
    data = w.data[28:]  # the blocks after the section header
    blocks = vars(pcapfile)["PcapngBlocks"](True, 1e6, 0, 0)  # as the fixture set it
    first = reader.SipExtractor(ETHERNET, "n")
    blocks.feed(data, first)
    assert len({id(e) for e in blocks._extractors}) <= 3
    assert len(blocks._extractors) == 2001


@pytest.mark.parametrize("offset", [2**62, -(2**62), 2**40])
def test_a_time_no_calendar_holds_is_counted_not_imported(
    reader: ModuleType, offset: int, tmp_path: Path
) -> None:
    # An if_tsoffset (or tick count) this large dated a call in a year gmtime cannot
    # give, and the import failed on it; before 1970 the call was lost unsaid.
    w = Writer("<")
    w.interface(ETHERNET)
    w.interface(RAW, resol=6, offset=offset)
    w.enhanced(0, SECONDS * 10**6, framed(ETHERNET, ip_udp(sip(1), 1)))
    w.enhanced(1, SECONDS * 10**6, framed(RAW, ip_udp(sip(2), 2)))
    w.simple(framed(ETHERNET, ip_udp(sip(3), 3)))
    w.obsolete(1, 2**64 - 1, framed(RAW, ip_udp(sip(4), 4)))
    path = tmp_path / "far.pcapng"
    path.write_bytes(w.data)
    stats = reader.CaptureStats()
    packets = list(iter_packets(path, stats=stats))
    assert [(cseq(p.payload), p.timestamp) for p in packets] == [
        (1, float(SECONDS)),
        (3, float(SECONDS)),
    ]
    assert stats.bad_time == 2
    warning = file_warning(path, stats)
    assert warning is not None
    assert "2 packet blocks timed before 1970 or after 9999" in warning


def test_an_import_of_a_far_future_interface_does_not_fail(tmp_path: Path) -> None:
    # A whole call on an interface offset by 2**62 s, then the same call on one without.
    w = Writer("<")
    w.interface(ETHERNET)
    w.interface(RAW, resol=6, offset=2**62)
    caller, callee = ("10.77.0.1", 5062), ("10.77.0.2", 5060)
    messages = answered_call_messages(Call())
    for iface, base in ((1, 0), (0, SECONDS)):
        for index, message in enumerate(messages):
            src, dst = (
                (caller, callee)
                if message.startswith((b"INVITE", b"ACK", b"BYE"))
                else (callee, caller)
            )
            packet = encaps.ipv4(encaps.udp(message, src[1], dst[1]), src[0], dst[0])
            w.enhanced(
                iface, (base + index) * 10**6, framed(ETHERNET, packet) if iface == 0 else packet
            )
    path = tmp_path / "far.pcapng"
    path.write_bytes(w.data)
    sink = CdrCollector()
    summary = import_files(Config(), [path], sinks=[sink], progress=False)
    capture = summary["capture"]
    assert isinstance(capture, dict)
    assert capture["bad_time"] == len(messages)
    assert len(sink.cdrs) == 1
