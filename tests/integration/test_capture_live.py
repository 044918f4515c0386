"""Live capture: the kernel filter against libpcap's, and both engines on real interfaces.

The filter tests run the assembled program and libpcap's compilation of the same
expression through a small classic-BPF interpreter, frame by frame. The capture tests
need root (AF_PACKET, dumpcap): on loopback they watch SIPp calls and the test's own
datagrams, with a port filter that keeps other traffic there (a parallel benchmark
flooding it, say) out of the capture's buffer; on a veth pair created for the test,
a link nothing else uses, they inject crafted frames (tags, fragments, media) under
the default filter, and watch the interface disappear under a running capture.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes.util
import importlib.util
import os
import re
import shutil
import socket
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import encaps
import pytest
from peers import Sipp
from sipcdr.capture.live import Engine, LiveCapture, LiveCaptureError, af_packet
from sipcdr.capture.live.bpf import (
    DEFAULT_BPF_FILTER,
    BpfInstruction,
    compile_filter,
    signalling_program,
)
from sipcdr.decode.extract import SipExtractor
from sipcdr.decode.link import LINKTYPE_ETHERNET, LINKTYPE_RAW
from sipcdr.model import Packet
from sipcdr.sip import parse

pytestmark = pytest.mark.timeout(60)

LOOPBACK = "127.0.0.1"
CALLS = 5
# What SIPp's built-in uac and uas scenarios exchange per call: the uas answers the
# INVITE with 180 and 200 (no 100), the uac ACKs, hangs up at once (-d 0) with a BYE.
SIPP_CALL = Counter(
    {"INVITE": 1, "180 INVITE": 1, "200 INVITE": 1, "ACK": 1, "BYE": 1, "200 BYE": 1}
)
SETTLE_S = 0.5  # after the expected messages arrived: time for a duplicate to show up


def _unavailable(message: str) -> None:
    """A CI run must not pass by skipping what it exists to test."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_engine(engine: Engine) -> None:
    if not hasattr(socket, "AF_PACKET"):
        _unavailable("AF_PACKET sockets need Linux")
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close()
    except PermissionError:
        _unavailable("capturing needs root (CAP_NET_RAW)")
    if engine == "pyshark":
        if importlib.util.find_spec("pyshark") is None:
            _unavailable("pyshark is not installed (pip install 'pyshark>=0.6,<1')")
        for program in ("dumpcap", "tshark"):
            if shutil.which(program) is None:
                _unavailable(f"{program} not found on PATH (make sysdeps installs it)")


def require_libpcap() -> None:
    if ctypes.util.find_library("pcap") is None:
        _unavailable("libpcap is not installed (it comes with dumpcap)")


# -- a classic BPF interpreter, enough for libpcap's output and ours ----------------------

_WIDTH = {0x00: 4, 0x08: 2, 0x10: 1}


def run_bpf(program: Sequence[BpfInstruction], frame: bytes) -> int:
    """What the kernel's interpreter returns for ``frame``: bytes to keep, 0 to drop."""
    a = x = 0
    memory = [0] * 16
    pc = 0
    size = len(frame)
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        kind = code & 0x07
        if kind in (0x00, 0x01):  # LD, LDX
            mode = code & 0xE0
            if mode == 0x00:
                value = k
            elif mode in (0x20, 0x40):  # ABS, IND
                offset = k + (x if mode == 0x40 else 0)
                width = _WIDTH[code & 0x18]
                if offset + width > size:
                    return 0  # an out-of-bounds load ends the program with "drop"
                value = int.from_bytes(frame[offset : offset + width], "big")
            elif mode == 0x60:
                value = memory[k]
            elif mode == 0x80:
                value = size
            elif mode == 0xA0:  # MSH: 4 * (frame[k] & 0xf)
                if k >= size:
                    return 0
                value = (frame[k] & 0x0F) * 4
            else:
                raise AssertionError(f"load mode {mode:#x}")
            if kind == 0x00:
                a = value
            else:
                x = value
        elif kind == 0x02:
            memory[k] = a
        elif kind == 0x03:
            memory[k] = x
        elif kind == 0x04:  # ALU
            operand = x if code & 0x08 else k
            op = code & 0xF0
            if op == 0x00:
                a += operand
            elif op == 0x10:
                a -= operand
            elif op == 0x20:
                a *= operand
            elif op == 0x30:
                a //= operand
            elif op == 0x40:
                a |= operand
            elif op == 0x50:
                a &= operand
            elif op == 0x60:
                a <<= operand
            elif op == 0x70:
                a >>= operand
            elif op == 0x80:
                a = -a
            elif op == 0x90:
                a %= operand
            elif op == 0xA0:
                a ^= operand
            a &= 0xFFFFFFFF
        elif kind == 0x05:  # JMP
            op = code & 0xF0
            if op == 0x00:
                pc += k
                continue
            operand = x if code & 0x08 else k
            taken = {
                0x10: a == operand,
                0x20: a > operand,
                0x30: a >= operand,
                0x40: bool(a & operand),
            }[op]
            pc += jt if taken else jf
        elif kind == 0x06:  # RET
            return a if code & 0x18 == 0x10 else k
        elif code & 0xF8 == 0x00:  # MISC: TAX
            x = a
        else:  # MISC: TXA
            a = x


# -- frames --------------------------------------------------------------------------------

MAC_DST = bytes.fromhex("020000000002")
MAC_SRC = bytes.fromhex("020000000001")
SIP = b"OPTIONS sip:probe@example.com SIP/2.0\r\nCall-ID: %s\r\nCSeq: 1 OPTIONS\r\n\r\n"
RTP = b"\x80\x00\x12\x34" + bytes(168)


def _checksum(header: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(
    proto: int,
    payload: bytes,
    *,
    ident: int = 1,
    offset: int = 0,
    more: bool = False,
    options: bytes = b"",
    total: int | None = None,
) -> bytes:
    ihl = 5 + len(options) // 4
    length = total if total is not None else ihl * 4 + len(payload)
    frag = (0x2000 if more else 0) | (offset // 8)
    head = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        length,
        ident,
        frag,
        64,
        proto,
        0,
        socket.inet_aton("127.0.0.1"),
        socket.inet_aton("127.0.0.2"),
    )
    head += options
    head = head[:10] + struct.pack("!H", _checksum(head)) + head[12:]
    return head + payload


def ipv6(next_header: int, payload: bytes) -> bytes:
    src = socket.inet_pton(socket.AF_INET6, "fd00::1")
    dst = socket.inet_pton(socket.AF_INET6, "fd00::2")
    return struct.pack("!IHBB", 0x60000000, len(payload), next_header, 64) + src + dst + payload


def ipv6_fragment(next_header: int, payload: bytes, offset: int = 0, more: bool = True) -> bytes:
    header = struct.pack("!BBHI", next_header, 0, (offset // 8) << 3 | int(more), 7)
    return ipv6(44, header + payload)


def udp(payload: bytes, sport: int = 5060, dport: int = 5060) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(payload: bytes, sport: int = 5060, dport: int = 5060, seq: int = 1000) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 0x50, 0x18, 65535, 0, 0) + payload


def ether(ethertype: int, payload: bytes, tags: Sequence[int] = ()) -> bytes:
    head = MAC_DST + MAC_SRC
    for index, tpid in enumerate(tags):
        head += struct.pack("!HH", tpid, 100 + index)
    return head + struct.pack("!H", ethertype) + payload


V4, V6, ARP = 0x0800, 0x86DD, 0x0806

# (name, IP packet or None for a non-IP frame, whether DEFAULT_BPF_FILTER keeps it)
FILTER_CASES: list[tuple[str, int, bytes, bool]] = [
    ("v4 udp sip", V4, ipv4(17, udp(SIP % b"1")), True),
    ("v4 udp hep3", V4, ipv4(17, udp(b"HEP3\x00\x20" + bytes(26))), True),
    ("v4 udp crlf keepalive", V4, ipv4(17, udp(b"\r\n\r\n")), True),
    ("v4 udp rtp", V4, ipv4(17, udp(RTP)), False),
    ("v4 udp 0xff", V4, ipv4(17, udp(b"\xff" * 20)), False),
    ("v4 udp empty", V4, ipv4(17, udp(b"")), False),
    ("v4 options udp sip", V4, ipv4(17, udp(SIP % b"2"), options=bytes(8)), True),
    ("v4 options udp rtp", V4, ipv4(17, udp(RTP), options=bytes(8)), False),
    ("v4 first fragment sip", V4, ipv4(17, udp(SIP % b"3")[:40], more=True), True),
    ("v4 first fragment rtp", V4, ipv4(17, udp(RTP)[:40], more=True), False),
    ("v4 later fragment", V4, ipv4(17, b"\x80" * 40, offset=40), True),
    ("v4 last fragment", V4, ipv4(17, b"\xff" * 40, offset=80, more=False), True),
    ("v4 tcp", V4, ipv4(6, tcp(SIP % b"4")), True),
    ("v4 tcp rtp-looking", V4, ipv4(6, tcp(RTP)), True),
    ("v4 sctp", V4, ipv4(132, bytes(28)), True),
    ("v4 icmp", V4, ipv4(1, bytes(16)), False),
    ("v4 gre", V4, ipv4(47, bytes(24)), True),
    ("v4 ipip", V4, ipv4(4, ipv4(17, udp(RTP))), True),
    ("v4 ipv6 in ipv4", V4, ipv4(41, ipv6(17, udp(SIP % b"8"))), True),
    ("v6 gre", V6, ipv6(47, bytes(24)), True),
    ("v6 fragment gre", V6, ipv6_fragment(47, bytes(48)), True),
    ("v6 udp sip", V6, ipv6(17, udp(SIP % b"5")), True),
    ("v6 udp rtp", V6, ipv6(17, udp(RTP)), False),
    ("v6 tcp", V6, ipv6(6, tcp(SIP % b"6")), True),
    ("v6 sctp", V6, ipv6(132, bytes(28)), True),
    ("v6 fragment udp", V6, ipv6_fragment(17, udp(RTP)[:48]), True),
    ("v6 fragment tcp", V6, ipv6_fragment(6, bytes(48)), True),
    ("v6 fragment icmp6", V6, ipv6_fragment(58, bytes(48)), False),
    ("v6 icmp6", V6, ipv6(58, bytes(24)), False),
    # Extension headers before the transport header pass whole: the decoder reads them.
    ("v6 hop-by-hop udp", V6, ipv6(0, bytes([17, 0]) + bytes(6) + udp(SIP % b"7")), True),
    ("v6 destination options rtp", V6, ipv6(60, bytes([17, 0]) + bytes(6) + udp(RTP)), True),
    ("v6 routing tcp", V6, ipv6(43, bytes([6, 0]) + bytes(6) + tcp(SIP % b"9")), True),
    ("v6 ah udp", V6, ipv6(51, bytes([17, 1]) + bytes(10) + udp(SIP % b"a")), True),
    (
        "v6 fragment destination options",
        V6,
        ipv6_fragment(60, bytes([17, 0]) + bytes(6) + udp(SIP % b"b")),
        True,
    ),
    ("v6 esp", V6, ipv6(50, bytes(40)), False),
    ("arp", ARP, bytes(28), False),
]


@pytest.mark.parametrize(
    ("ethertype", "packet", "kept"),
    [case[1:] for case in FILTER_CASES],
    ids=[case[0] for case in FILTER_CASES],
)
def test_signalling_program_agrees_with_libpcap(ethertype: int, packet: bytes, kept: bool) -> None:
    require_libpcap()
    ours = signalling_program(LINKTYPE_ETHERNET)
    libpcap = compile_filter(DEFAULT_BPF_FILTER, LINKTYPE_ETHERNET)
    frame = ether(ethertype, packet)
    assert bool(run_bpf(libpcap, frame)) is kept
    assert bool(run_bpf(ours, frame)) is kept
    # Tags the kernel left in the frame (QinQ inner tags, or no VLAN offload on
    # transmit) are read through; libpcap's program would need "vlan" for that.
    for tags in ((0x8100,), (0x88A8, 0x8100), (0x9100, 0x8100)):
        assert bool(run_bpf(ours, ether(ethertype, packet, tags))) is kept, tags
    if ethertype != ARP:
        raw_libpcap = compile_filter(DEFAULT_BPF_FILTER, LINKTYPE_RAW)
        assert bool(run_bpf(raw_libpcap, packet)) is kept
        assert bool(run_bpf(signalling_program(LINKTYPE_RAW), packet)) is kept


# An OPTIONS over IPv6 behind a hop-by-hop options header.
IPV6_HOP_BY_HOP_SIP = bytes.fromhex(
    "02000000000a02000000000b86dd60000000004a0040fd00000000000000000000000000000"
    "1fd000000000000000000000000000002110000000000000013c613c4004200004f5054494f4e5320"
    "7369703a624078205349502f322e300d0a43616c6c2d49443a207240780d0a435365713a2031204f"
    "5054494f4e530d0a0d0a"
)


def test_sip_behind_ipv6_extension_headers_reaches_the_decoder() -> None:
    require_libpcap()
    for program in (signalling_program(), compile_filter(DEFAULT_BPF_FILTER)):
        assert run_bpf(program, IPV6_HOP_BY_HOP_SIP)
    (packet,) = SipExtractor(LINKTYPE_ETHERNET, "test").feed(1.0, IPV6_HOP_BY_HOP_SIP)
    assert (packet.src_ip, packet.dst_ip, packet.dst_port) == ("fd00::1", "fd00::2", 5060)
    assert packet.payload.startswith(b"OPTIONS sip:b@x SIP/2.0\r\n")


def tag(frame: bytes, tpid: int = 0x8100) -> bytes:
    """The frame with a VLAN tag after its MAC addresses."""
    return frame[:12] + struct.pack("!HH", tpid, 42) + frame[12:]


@pytest.mark.parametrize("kind", encaps.ENCAPSULATIONS)
def test_default_filters_keep_sip_inside_encapsulations(kind: str) -> None:
    require_libpcap()
    ours = signalling_program(LINKTYPE_ETHERNET)
    libpcap = compile_filter(DEFAULT_BPF_FILTER, LINKTYPE_ETHERNET)
    for packet in (ipv4(17, udp(SIP % b"t4")), ipv6(17, udp(SIP % b"t6")), ipv4(6, tcp(SIP))):
        frame = encaps.tunnelled(kind, packet)
        assert run_bpf(ours, frame)
        assert run_bpf(libpcap, frame)
        assert run_bpf(ours, tag(frame))
    # The kernel program reads PPPoE and MPLS through to the media inside and drops
    # it; tunnels in UDP pass whole (their headers start below 0x80) and the decoder
    # drops their media after unwrapping it.
    media = encaps.tunnelled(kind, ipv4(17, udp(RTP)))
    assert bool(run_bpf(ours, media)) is (kind not in ("pppoe", "mpls"))
    assert bool(run_bpf(ours, tag(media))) is (kind not in ("pppoe", "mpls"))


def test_signalling_program_reads_pppoe_and_mpls_variants() -> None:
    ours = signalling_program(LINKTYPE_ETHERNET)
    sip, rtp = ipv4(17, udp(SIP % b"v")), ipv6(17, udp(RTP))
    kept = [
        ether(0x8864, encaps.pppoe(sip, compressed=True)),
        ether(0x8864, encaps.pppoe(ipv6(17, udp(SIP % b"c6")), compressed=True)),
        ether(0x8848, encaps.mpls(ipv6(17, udp(SIP % b"v6")), labels=range(8))),
        # An Ethernet pseudowire, and a stack deeper than the program reads: the decoder
        # judges those.
        ether(0x8847, encaps.mpls(bytes(4) + ether(V4, rtp))),
        ether(0x8847, encaps.mpls(ipv4(17, udp(RTP)), labels=range(9))),
        # Pseudowires without a control word to MAC addresses that start like IP: the
        # type where a frame has it says Ethernet.
        ether(0x8847, encaps.mpls(bytes.fromhex("4500003c0001") + MAC_SRC + b"\x08\x00" + sip)),
        ether(0x8847, encaps.mpls(bytes.fromhex("6038e0000001") + MAC_SRC + b"\x81\x00" + rtp)),
        # VXLAN with group policy: its flags byte is 0x88.
        ether(V4, ipv4(17, udp(encaps.vxlan(ether(V4, sip), flags=0x88), 1, 4789))),
    ]
    dropped = [
        ether(0x8864, encaps.pppoe(rtp, compressed=True)),
        ether(0x8864, encaps.pppoe(b"\x01\x01\x00\x04", protocol=0xC021)),  # LCP
        ether(0x8848, encaps.mpls(rtp, labels=range(8))),
        ether(0x8847, encaps.mpls(ipv4(17, udp(RTP)))),
        ether(0x8847, b"\x00\x01"),  # cut inside the first label
    ]
    assert [bool(run_bpf(ours, frame)) for frame in kept] == [True] * len(kept)
    assert [bool(run_bpf(ours, frame)) for frame in dropped] == [False] * len(dropped)


@pytest.mark.parametrize("outer", [4, 6])
def test_vxlan_passes_both_filters_by_port(outer: int) -> None:
    """A VXLAN header may start with 0x88 (group policy) like media does, so VXLAN's
    ports, IANA's and the Linux default 8472, pass whatever the first byte."""
    require_libpcap()
    ours = signalling_program(LINKTYPE_ETHERNET)
    libpcap = compile_filter(DEFAULT_BPF_FILTER, LINKTYPE_ETHERNET)
    inner = encaps.vxlan(ether(V4, ipv4(17, udp(SIP % b"gbp"))), flags=0x88)

    def frame(port: int) -> bytes:
        if outer == 4:
            return ether(V4, ipv4(17, udp(inner, 1, port)))
        return ether(V6, ipv6(17, udp(inner, 1, port)))

    for port in (4789, 8472):
        assert run_bpf(ours, frame(port)), port
        assert run_bpf(libpcap, frame(port)), port
    # Any other port is media by its first byte.
    assert not run_bpf(ours, frame(4790))
    assert not run_bpf(libpcap, frame(4790))


def test_signalling_program_keeps_whole_frames() -> None:
    frame = ether(V4, ipv4(17, udp(SIP % b"x")))
    assert run_bpf(signalling_program(), frame) == 262144


def test_custom_filter_errors_name_the_expression() -> None:
    require_libpcap()
    assert compile_filter("udp port 5060")
    with pytest.raises(LiveCaptureError, match=r"bad bpf_filter 'udp and \(\(': .*syntax"):
        compile_filter("udp and ((")


def test_arguments_are_checked() -> None:
    def ignore(packet: Packet) -> None:
        del packet

    with pytest.raises(ValueError, match="engine"):
        LiveCapture("lo", ignore, engine="pcap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one network interface"):
        LiveCapture("any", ignore)
    with pytest.raises(ValueError, match="positive"):
        LiveCapture("lo", ignore, rcvbuf_bytes=0)


# -- helpers for the capture tests ----------------------------------------------------------


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


_CALL_ID = re.compile(r"^(?:Call-ID|i)[ \t]*:[ \t]*(\S+)", re.M | re.I)
_CSEQ_METHOD = re.compile(r"^CSeq[ \t]*:[ \t]*\d+[ \t]+(\S+)", re.M | re.I)


def label(message: bytes | str) -> tuple[str, str]:
    """(Call-ID, what it is): ("1-2@host", "INVITE") or ("1-2@host", "180 INVITE")."""
    text = message.decode(errors="replace") if isinstance(message, bytes) else message
    start = text.split("\n", 1)[0].split()
    call_id, cseq_method = _CALL_ID.search(text), _CSEQ_METHOD.search(text)
    assert start and call_id and cseq_method, text
    what = f"{start[1]} {cseq_method.group(1)}" if start[0] == "SIP/2.0" else start[0]
    return call_id.group(1), what


_SIPP_LOG_ENTRY = re.compile(r"^-{47} [^\n]*\n", re.M)


def sent_by_sipp(sipp: Sipp) -> Counter[tuple[str, str]]:
    """Every message the SIPp runs sent, retransmissions included, from their -trace_msg
    logs: each is one datagram on loopback, so the capture must see exactly these."""
    sent: Counter[tuple[str, str]] = Counter()
    for process in sipp.processes:
        text = (sipp.workdir / f"{process.name}.msg.log").read_text(errors="replace")
        for entry in _SIPP_LOG_ENTRY.split(text):
            head, _, message = entry.partition("\n\n")
            if head.startswith("UDP message sent"):
                sent[label(message)] += 1
    return sent


# -- loopback ------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("engine", ["af_packet", "pyshark"])
async def test_sipp_calls_are_seen_exactly_once(engine: Engine, sipp: Sipp) -> None:
    require_engine(engine)
    require_libpcap()
    uas = sipp.run_uas("uas", calls=CALLS, timeout=20)
    seen: list[Packet] = []

    # Loopback is shared (a parallel benchmark may flood it); the kernel keeps only this
    # test's calls, each message of which has the uas at one end.
    only_these = f"udp port {uas.address[1]}"
    async with LiveCapture("lo", seen.append, engine=engine, bpf_filter=only_these) as capture:
        uac = await asyncio.to_thread(
            sipp.run_uac, "uac", uas.address, calls=CALLS, rate=10, timeout=20
        )
        uac.check()
        uas.wait().check()
        sent = sent_by_sipp(sipp)
        await wait_until(lambda: len(seen) >= sent.total(), 10, f"{sent.total()} messages")
        await asyncio.sleep(SETTLE_S)
        capture.flush()
        stats = capture.stats
    await capture.wait()
    captured = Counter(label(p.payload) for p in seen)
    assert captured == sent, "each datagram SIPp sent must be captured exactly once"
    assert len({call_id for call_id, _ in captured}) == CALLS
    # Without retransmissions (a loaded machine can cause them), one of each per call.
    if max(sent.values()) == 1:
        assert Counter(what for _, what in captured) == {
            what: n * CALLS for what, n in SIPP_CALL.items()
        }
    assert {(p.src_ip, p.dst_ip, p.transport, p.capture_node) for p in seen} == {
        (LOOPBACK, LOOPBACK, "udp", "live:lo")
    }
    assert {uac.port, uas.address[1]} == {p.src_port for p in seen}
    assert all(0 < time.time() - p.timestamp < 60 for p in seen)
    assert stats.sip_packets >= len(seen)
    assert stats.callback_errors == stats.frame_errors == stats.truncated == 0


@pytest.mark.integration
@pytest.mark.parametrize("kernel_skips_outgoing", [True, False], ids=["kernel", "fallback"])
async def test_af_packet_delivers_each_datagram_once(
    kernel_skips_outgoing: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_engine("af_packet")
    if not kernel_skips_outgoing:
        # An option number no kernel knows: the path taken before Linux 4.20.
        monkeypatch.setattr(af_packet, "_PACKET_IGNORE_OUTGOING", 0x7FFF)
    require_libpcap()
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
    ):
        receiver.bind((LOOPBACK, 0))
        sender.bind((LOOPBACK, 0))
        port = receiver.getsockname()[1]
        source = sender.getsockname()[1]
        seen: list[Packet] = []
        failures = 0

        def keep(packet: Packet) -> None:
            nonlocal failures
            if b"Call-ID: boom" in packet.payload:
                failures += 1
                raise RuntimeError("a callback bug must not end the capture")
            seen.append(packet)

        # The port keeps a flood from a parallel run out; RTP is left for the extractor.
        only_these = f"udp dst port {port}"
        async with LiveCapture("lo", keep, bpf_filter=only_these, batch=8) as capture:
            sent = [SIP % f"dgram-{i}".encode() for i in range(200)]
            for i, payload in enumerate(sent):
                sender.sendto(payload, (LOOPBACK, port))
                sender.sendto(RTP, (LOOPBACK, port))
                if i == 100:
                    sender.sendto(SIP % b"boom", (LOOPBACK, port))
            await wait_until(lambda: len(seen) >= len(sent), 5, f"{len(sent)} datagrams")
            await asyncio.sleep(SETTLE_S)
            stats = capture.stats
    assert [p.payload for p in seen] == sent
    assert {(p.src_ip, p.src_port, p.dst_ip, p.transport) for p in seen} == {
        (LOOPBACK, source, LOOPBACK, "udp")
    }
    assert all(0 < time.time() - p.timestamp < 30 for p in seen)
    assert failures == stats.callback_errors == 1
    assert (stats.outgoing_skipped > 0) is not kernel_skips_outgoing
    assert stats.kernel_drops == 0
    assert stats.frames_read == 2 * len(sent) + 1
    assert stats.kernel_packets == stats.frames_read + stats.outgoing_skipped
    assert stats.capture.non_sip_payloads == len(sent)


@pytest.mark.integration
@pytest.mark.parametrize("engine", ["af_packet", "pyshark"])
async def test_start_fails_with_a_clear_message(engine: Engine) -> None:
    require_engine(engine)

    def ignore(packet: Packet) -> None:
        del packet

    capture = LiveCapture("sipcdr-nosuch0", ignore, engine=engine)
    with pytest.raises(LiveCaptureError, match="sipcdr-nosuch0"):
        await capture.start()
    await capture.stop()
    if engine == "af_packet":
        require_libpcap()
    bad = LiveCapture("lo", ignore, engine=engine, bpf_filter="udp and ((")
    with pytest.raises(LiveCaptureError, match="syntax error"):
        await bad.start()


# -- veth: a private link ---------------------------------------------------------------------


@pytest.fixture
def veth() -> Iterator[tuple[str, str]]:
    """A veth pair (capture side, injection side) with nothing of the host's own on it."""
    require_engine("af_packet")
    ip = shutil.which("ip")
    if ip is None:
        pytest.skip("iproute2 (ip) not installed")
    capture_side, peer = f"sipcdr{os.getpid() % 10**6}a", f"sipcdr{os.getpid() % 10**6}b"
    created = subprocess.run(
        [ip, "link", "add", capture_side, "type", "veth", "peer", "name", peer],
        capture_output=True,
        text=True,
        check=False,
    )
    if created.returncode:
        pytest.skip(f"cannot create a veth pair: {created.stderr.strip()}")
    try:
        for name in (capture_side, peer):
            # No addresses and no IPv6: the host itself sends nothing on this link.
            with contextlib.suppress(OSError):
                Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
            subprocess.run([ip, "link", "set", name, "up"], check=True)
        yield capture_side, peer
    finally:
        subprocess.run([ip, "link", "del", capture_side], capture_output=True, check=False)


def inject(interface: str, frames: Sequence[bytes]) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((interface, 0))
        for frame in frames:
            sock.send(frame)


@pytest.mark.integration
async def test_af_packet_kernel_filter_on_a_mirror_link(veth: tuple[str, str]) -> None:
    capture_side, peer = veth
    big = SIP % b"fragmented" + b"X" * 1400 + b"\r\n"
    datagram = udp(big, 5070, 5060)
    frames = {
        "plain": ether(V4, ipv4(17, udp(SIP % b"plain", 5070, 5060))),
        # The kernel strips the outer tag on receive; the inner one stays in the frame.
        "qinq": ether(V4, ipv4(17, udp(SIP % b"qinq", 5070, 5060)), tags=(0x88A8, 0x8100)),
        "v6": ether(V6, ipv6(17, udp(SIP % b"v6", 5070, 5060))),
        "v6hbh": ether(V6, ipv6(0, bytes([17, 0]) + bytes(6) + udp(SIP % b"v6hbh", 5070, 5060))),
        "tcp": ether(V4, ipv4(6, tcp(SIP % b"tcp", 5070, 5060))),
        "frag1": ether(V4, ipv4(17, datagram[:1000], ident=77, more=True)),
        "frag2": ether(V4, ipv4(17, datagram[1000:], ident=77, offset=1000)),
    }
    rejected = [
        ether(V4, ipv4(17, udp(RTP, 40000, 40002))),
        ether(V6, ipv6(17, udp(RTP, 40000, 40002))),
        ether(V4, ipv4(17, udp(RTP, 40000, 40002)), tags=(0x88A8, 0x8100)),
        ether(V4, ipv4(1, bytes(16))),
        ether(ARP, bytes(28)),
    ]
    seen: list[Packet] = []
    async with LiveCapture(capture_side, seen.append) as capture:
        inject(peer, [*rejected, *frames.values(), *rejected])
        await wait_until(lambda: len(seen) >= 6, 5, "6 SIP messages")
        await asyncio.sleep(SETTLE_S)
        stats = capture.stats
    calls = sorted(parse(p.payload).call_id for p in seen)
    assert calls == sorted(["plain", "qinq", "v6", "v6hbh", "tcp", "fragmented"])
    assert next(p for p in seen if b"fragmented" in p.payload).payload == big
    assert next(p for p in seen if p.transport == "tcp").payload == SIP % b"tcp"
    # Media, ICMP and ARP never reached Python.
    assert stats.frames_read == len(frames)
    assert stats.capture.non_sip_payloads == 0
    assert stats.capture.decap.reassembled == 1


@pytest.mark.integration
@pytest.mark.parametrize("engine", ["af_packet", "pyshark"])
async def test_sip_inside_encapsulations_on_a_mirror_link(
    engine: Engine, veth: tuple[str, str]
) -> None:
    require_engine(engine)
    capture_side, peer = veth
    sip = {
        kind: encaps.tunnelled(
            kind, encaps.ipv4(encaps.udp(SIP % kind.encode(), 5070, 5060), "10.5.0.1", "10.5.0.2")
        )
        for kind in encaps.ENCAPSULATIONS
    }
    # ERSPAN type II (GRE with a sequence number), how switches mirror to a collector.
    mirrored = encaps.ipv4(encaps.udp(SIP % b"erspan", 5070, 5060), "10.5.0.1", "10.5.0.2")
    erspan = struct.pack("!HHIHHI", 0x1000, 0x88BE, 1, 1 << 12, 0, 0) + ether(V4, mirrored)
    sip["erspan"] = ether(V4, ipv4(47, erspan))
    media = [encaps.tunnelled(kind, ipv4(17, udp(RTP))) for kind in encaps.ENCAPSULATIONS]
    seen: list[Packet] = []
    async with LiveCapture(capture_side, seen.append, engine=engine) as capture:
        inject(peer, [*media, *sip.values()])
        await wait_until(lambda: len(seen) >= len(sip), 10, f"{len(sip)} SIP messages")
        await asyncio.sleep(SETTLE_S)
        capture.flush()
        stats = capture.stats
    assert sorted(parse(p.payload).call_id for p in seen) == sorted(sip)
    assert {(p.src_ip, p.src_port, p.dst_ip, p.dst_port) for p in seen} == {
        ("10.5.0.1", 5070, "10.5.0.2", 5060)
    }
    # af_packet's kernel program drops the media in PPPoE and MPLS; the pyshark engine's
    # expression keeps those frames whole. Media in UDP tunnels is dropped in Python.
    in_python = encaps.UDP_PORTS if engine == "af_packet" else encaps.ENCAPSULATIONS
    assert stats.frames_read == len(sip) + len(in_python)
    assert stats.capture.non_sip_payloads == len(in_python)
    decap = stats.capture.decap
    assert {kind: getattr(decap, kind) for kind in encaps.ENCAPSULATIONS} == {
        kind: 2 if kind in in_python else 1 for kind in encaps.ENCAPSULATIONS
    }
    assert decap.tunnelled == 1


@pytest.mark.integration
@pytest.mark.parametrize("engine", ["af_packet", "pyshark"])
async def test_interface_removal_ends_the_capture_with_an_error(
    engine: Engine, veth: tuple[str, str]
) -> None:
    require_engine(engine)
    capture_side, _peer = veth
    seen: list[Packet] = []
    async with LiveCapture(capture_side, seen.append, engine=engine) as capture:
        subprocess.run(["ip", "link", "del", capture_side], check=True)
        with pytest.raises(LiveCaptureError, match=capture_side):
            await asyncio.wait_for(capture.wait(), 10)
        assert isinstance(capture.error, LiveCaptureError)
        assert not capture.running
