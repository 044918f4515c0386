"""Kernel filters for live capture: which frames reach Python at all.

``bpf_filter`` is a pcap-filter expression; ``DEFAULT_BPF_FILTER`` selects TCP, SCTP,
and UDP whose payload does not start with a byte >= 0x80 (RTP, RTCP and SRTP always
do, SIP and HEP never do), keeping IP fragments, since only the first fragment holds
the UDP header. dumpcap compiles it for the ``pyshark`` engine. For ``af_packet`` the
default is a program assembled here (``signalling_program``): it selects the same
frames, and also reads through VLAN/QinQ tags still in the frame, which a libpcap
program without ``vlan`` primitives rejects (so the ``pyshark`` engine misses SIP under
an inner QinQ tag unless its expression says ``vlan``), and into PPPoE sessions and
MPLS label stacks, whose media it drops where the expression keeps every such frame.
Tunnels carried in UDP (GTP-U, VXLAN, GENEVE, TZSP) and in IP (IP-in-IP, GRE and
ERSPAN), and IPv6 packets with extension headers before the transport header, pass
whole under both, media inside included: the decoder drops that after unwrapping it.
Any other expression is compiled by libpcap (``compile_filter``, through ctypes;
libpcap comes with dumpcap or tcpdump), and without libpcap starting the capture
fails with a ``LiveCaptureError`` saying so. ``None`` keeps every frame. On Linux the
kernel strips the outer VLAN tag of received frames before any capture socket sees
them, so ``vlan`` primitives in a custom expression match only tags left in the frame
(inner QinQ tags).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Final

from sipcdr.capture.live.base import SNAPLEN, LiveCaptureError
from sipcdr.decode.ip import IPV6_EXTENSION_HEADERS
from sipcdr.decode.link import ETHERTYPES_READ, LINKTYPE_ETHERNET, LINKTYPE_RAW
from sipcdr.decode.tunnels import HIGH_START_TUNNEL_PORTS

__all__ = ["DEFAULT_BPF_FILTER", "BpfInstruction", "compile_filter", "signalling_program"]

# Everything that can carry SIP or HEP. RTP, RTCP and SRTP (version 2: first payload byte
# 0x80-0xBF) never reach Python, and they are most frames on a SPAN port. The tunnels
# carried in UDP start below 0x80 (VXLAN's excepted, hence its ports) and pass whole, as
# do IP-in-IP and GRE (ERSPAN) packets, and IPv6 packets with extension headers
# (hop-by-hop, routing, destination options, ...) before the transport header: neither
# filter walks that chain, the decoder does. PPPoE sessions and MPLS pass whole here
# (each primitive that reads into them would shift libpcap's offsets for the rest of
# the expression).
_HIGH_START_PORTS: Final = " or ".join(
    f"udp dst port {port}" for port in sorted(HIGH_START_TUNNEL_PORTS)
)
_IPV6_EXTENSIONS: Final = " or ".join(
    f"ip6 proto {extension}" for extension in sorted(IPV6_EXTENSION_HEADERS)
)
DEFAULT_BPF_FILTER: Final = (
    "tcp or sctp"
    f" or (ip and udp and (ip[6:2] & 0x1fff != 0 or udp[8] < 0x80 or {_HIGH_START_PORTS}))"
    f" or (ip6 and udp and (ip6[6] != 17 or ip6[48] < 0x80 or {_HIGH_START_PORTS}))"
    " or ether proto 0x8864 or ether proto 0x8847 or ether proto 0x8848"
    " or ip proto 4 or ip proto 41 or ip proto 47 or ip6 proto 4 or ip6 proto 41"
    f" or ip6 proto 47 or {_IPV6_EXTENSIONS}"
)
# Labels looked through before the payload: more than transport and VPN stacks use.
_MPLS_LABELS: Final = 8
_IP_TUNNELS: Final = (4, 41, 47)  # IP-in-IP, IPv6-in-IP, GRE

BpfInstruction = tuple[int, int, int, int]  # code, jt, jf, k: struct sock_filter

_RET_ACCEPT: Final = "accept"
_RET_REJECT: Final = "reject"


class _Assembler:
    """Just enough of a classic BPF assembler for ``signalling_program``: forward jumps
    to labels, resolved to the 8-bit relative offsets the kernel wants."""

    # BPF_LD|BPF_H|BPF_ABS and friends (linux/filter.h, bpf_common.h).
    LDH_ABS = 0x28
    LDB_ABS = 0x30
    LDH_IND = 0x48
    LDB_IND = 0x50
    LDX_IMM = 0x01
    AND_K = 0x54
    LSH_K = 0x64
    RSH_K = 0x74
    ADD_X = 0x0C
    TAX = 0x07
    JA = 0x05
    JEQ_K = 0x15
    JGE_K = 0x35
    JSET_K = 0x45
    RET_K = 0x06

    def __init__(self) -> None:
        self._code: list[tuple[int, str | int, str | int, int]] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self._labels[name] = len(self._code)

    def op(self, code: int, k: int = 0) -> None:
        self._code.append((code, 0, 0, k))

    def jump(self, code: int, k: int, jt: str | int, jf: str | int) -> None:
        """Conditional jump; an int target means "fall through" (0)."""
        self._code.append((code, jt, jf, k))

    def goto(self, target: str) -> None:
        self._code.append((self.JA, target, 0, 0))

    def assemble(self) -> list[BpfInstruction]:
        out: list[BpfInstruction] = []
        for index, (code, jt, jf, k) in enumerate(self._code):
            if code == self.JA:
                assert isinstance(jt, str)
                out.append((code, 0, 0, self._offset(index, jt)))
                continue
            out.append((code, self._target(index, jt), self._target(index, jf), k))
        return out

    def _offset(self, index: int, label: str) -> int:
        offset = self._labels[label] - index - 1
        if offset < 0:
            raise ValueError(f"backward jump to {label}")
        return offset

    def _target(self, index: int, target: str | int) -> int:
        if isinstance(target, int):
            return target
        offset = self._offset(index, target)
        if offset > 255:
            raise ValueError(f"jump to {target} too far")
        return offset


def signalling_program(linktype: int = LINKTYPE_ETHERNET) -> list[BpfInstruction]:
    """The kernel filter for ``DEFAULT_BPF_FILTER`` on Ethernet (and Linux loopback) or
    raw-IP links, reading through up to two VLAN tags (802.1Q, 802.1ad, 0x9100), a
    PPPoE session header and up to ``_MPLS_LABELS`` MPLS labels to the IP header, so
    media inside those is dropped too. An MPLS payload that is not IP (an Ethernet
    pseudowire), one that starts like IP but also reads as an Ethernet frame (a
    pseudowire to a MAC address that starts with 4 or 6), and a deeper label stack are
    kept whole for the decoder to judge.

    X holds the offset of the IP header; the IPv4 UDP branch moves it to the UDP
    header, whose length depends on the IP options.
    """
    a = _Assembler()
    ok, no = _RET_ACCEPT, _RET_REJECT
    # IP header offsets jumped to, by version: each gets a block that loads X.
    ip_at: dict[str, set[int]] = {"v4": set(), "v6": set()}

    def at(version: str, offset: int) -> str:
        ip_at[version].add(offset)
        return f"{version}at{offset}"

    if linktype == LINKTYPE_ETHERNET:
        payloads = (14, 18, 22)
        for depth, payload in enumerate(payloads):
            a.label(f"type{depth}")
            a.op(a.LDH_ABS, payload - 2)
            a.jump(a.JEQ_K, 0x0800, at("v4", payload), 0)
            a.jump(a.JEQ_K, 0x86DD, at("v6", payload), 0)
            if depth < 2:
                following = f"type{depth + 1}"
                for tag in (0x8100, 0x88A8, 0x9100):
                    a.jump(a.JEQ_K, tag, following, 0)
            a.jump(a.JEQ_K, 0x8864, f"pppoe{payload}", 0)
            a.jump(a.JEQ_K, 0x8847, f"mpls{payload}", 0)
            a.jump(a.JEQ_K, 0x8848, f"mpls{payload}", no)
        for payload in payloads:
            # The 6-byte PPPoE session header, then PPP's protocol field, 2 bytes or
            # compressed to 1.
            a.label(f"pppoe{payload}")
            a.op(a.LDH_ABS, payload + 6)
            a.jump(a.JEQ_K, 0x0021, at("v4", payload + 8), 0)
            a.jump(a.JEQ_K, 0x0057, at("v6", payload + 8), 0)
            a.op(a.RSH_K, 8)
            a.jump(a.JEQ_K, 0x21, at("v4", payload + 7), 0)
            a.jump(a.JEQ_K, 0x57, at("v6", payload + 7), no)
        stack_ends: set[int] = set()
        for payload in payloads:
            # Label stack entries down to the one with the bottom-of-stack bit.
            a.label(f"mpls{payload}")
            for index in range(_MPLS_LABELS):
                entry = payload + 4 * index
                stack_ends.add(entry + 4)
                a.op(a.LDB_ABS, entry + 2)
                a.jump(a.JSET_K, 1, f"mplsend{entry + 4}", 0)
            a.goto(ok)
        for stack_end in sorted(stack_ends):
            a.label(f"mplsend{stack_end}")
            a.op(a.LDX_IMM, stack_end)
            a.goto("mplspayload")
        # X: the payload. A first nibble of 4 or 6 says IP, unless the payload also
        # reads as an Ethernet frame (a pseudowire to a MAC address starting so): such
        # frames pass whole, for the decoder to judge, as do other pseudowires.
        a.label("mplspayload")
        a.op(a.LDB_IND, 0)
        a.op(a.RSH_K, 4)
        a.jump(a.JEQ_K, 4, "mplsip", 0)
        a.jump(a.JEQ_K, 6, "mplsip", ok)
        a.label("mplsip")
        a.op(a.LDH_IND, 12)  # where a frame has its type
        for etype in sorted(ETHERTYPES_READ):
            a.jump(a.JEQ_K, etype, ok, 0)
        a.op(a.LDB_IND, 0)
        a.op(a.RSH_K, 4)
        a.jump(a.JEQ_K, 4, "v4", "v6")
        for version in ("v4", "v6"):
            for offset in sorted(ip_at[version]):
                a.label(f"{version}at{offset}")
                a.op(a.LDX_IMM, offset)
                a.goto(version)
    elif linktype == LINKTYPE_RAW:
        a.op(a.LDX_IMM, 0)
        a.op(a.LDB_ABS, 0)
        a.op(a.RSH_K, 4)
        a.jump(a.JEQ_K, 4, "v4", 0)
        a.jump(a.JEQ_K, 6, "v6", no)
    else:
        raise ValueError(f"no built-in filter for link type {linktype}")
    a.label("v4")
    a.op(a.LDB_IND, 9)  # protocol
    a.jump(a.JEQ_K, 6, ok, 0)
    a.jump(a.JEQ_K, 132, ok, 0)
    for tunnel in _IP_TUNNELS:
        a.jump(a.JEQ_K, tunnel, ok, 0)
    a.jump(a.JEQ_K, 17, 0, no)
    a.op(a.LDH_IND, 6)  # flags and fragment offset
    a.jump(a.JSET_K, 0x1FFF, ok, 0)  # a later fragment: no UDP header to look into
    a.op(a.LDB_IND, 0)
    a.op(a.AND_K, 0x0F)
    a.op(a.LSH_K, 2)
    a.op(a.ADD_X)
    a.op(a.TAX)  # X: UDP header
    a.op(a.LDB_IND, 8)
    a.jump(a.JGE_K, 0x80, 0, ok)
    a.op(a.LDH_IND, 2)  # destination port
    for port in sorted(HIGH_START_TUNNEL_PORTS):
        a.jump(a.JEQ_K, port, ok, 0)
    a.goto(no)
    a.label("v6")
    a.op(a.LDB_IND, 6)  # next header
    a.jump(a.JEQ_K, 6, ok, 0)
    a.jump(a.JEQ_K, 132, ok, 0)
    for tunnel in _IP_TUNNELS:
        a.jump(a.JEQ_K, tunnel, ok, 0)
    a.jump(a.JEQ_K, 44, "v6frag", 0)
    for extension in sorted(IPV6_EXTENSION_HEADERS):
        a.jump(a.JEQ_K, extension, ok, 0)
    a.jump(a.JEQ_K, 17, 0, no)
    a.op(a.LDB_IND, 48)
    a.jump(a.JGE_K, 0x80, 0, ok)
    a.op(a.LDH_IND, 42)  # destination port
    for port in sorted(HIGH_START_TUNNEL_PORTS):
        a.jump(a.JEQ_K, port, ok, 0)
    a.goto(no)
    a.label("v6frag")
    a.op(a.LDB_IND, 40)  # the fragment header's next header
    a.jump(a.JEQ_K, 6, ok, 0)
    a.jump(a.JEQ_K, 17, ok, 0)
    for tunnel in _IP_TUNNELS:
        a.jump(a.JEQ_K, tunnel, ok, 0)
    for extension in sorted(IPV6_EXTENSION_HEADERS):
        a.jump(a.JEQ_K, extension, ok, 0)
    a.jump(a.JEQ_K, 132, ok, no)
    a.label(ok)
    a.op(a.RET_K, SNAPLEN)
    a.label(no)
    a.op(a.RET_K, 0)
    return a.assemble()


class _BpfInsn(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint32),
    )


class _BpfProgram(ctypes.Structure):
    _fields_ = (("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_BpfInsn)))


_PCAP_NETMASK_UNKNOWN: Final = 0xFFFFFFFF
_libpcap: ctypes.CDLL | None = None


def _load_libpcap() -> ctypes.CDLL:
    global _libpcap  # noqa: PLW0603 - loaded once, on first use, only when needed
    if _libpcap is None:
        name = ctypes.util.find_library("pcap")
        if name is None:
            raise LiveCaptureError(
                "compiling a custom bpf_filter needs libpcap (installed with dumpcap or "
                "tcpdump); install it, or use the default filter"
            )
        lib = ctypes.CDLL(name)
        lib.pcap_open_dead.restype = ctypes.c_void_p
        lib.pcap_open_dead.argtypes = (ctypes.c_int, ctypes.c_int)
        lib.pcap_compile.restype = ctypes.c_int
        lib.pcap_compile.argtypes = (
            ctypes.c_void_p,
            ctypes.POINTER(_BpfProgram),
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_uint32,
        )
        lib.pcap_geterr.restype = ctypes.c_char_p
        lib.pcap_geterr.argtypes = (ctypes.c_void_p,)
        lib.pcap_freecode.argtypes = (ctypes.POINTER(_BpfProgram),)
        lib.pcap_close.argtypes = (ctypes.c_void_p,)
        lib.pcap_datalink_name_to_val.restype = ctypes.c_int
        lib.pcap_datalink_name_to_val.argtypes = (ctypes.c_char_p,)
        _libpcap = lib
    return _libpcap


def compile_filter(expression: str, linktype: int = LINKTYPE_ETHERNET) -> list[BpfInstruction]:
    """Compile a pcap-filter expression with libpcap for frames of ``linktype``.

    Raises ``LiveCaptureError`` when libpcap is missing or rejects the expression.
    """
    lib = _load_libpcap()
    # pcap_open_dead takes a DLT_ value; only raw IP differs from its LINKTYPE_ (and
    # by platform: 12 on Linux, 14 on OpenBSD), so libpcap is asked for it by name.
    dlt = lib.pcap_datalink_name_to_val(b"RAW") if linktype == LINKTYPE_RAW else linktype
    handle = lib.pcap_open_dead(dlt, SNAPLEN)
    if not handle:
        raise LiveCaptureError(f"libpcap cannot compile filters for link type {linktype}")
    program = _BpfProgram()
    try:
        if lib.pcap_compile(handle, ctypes.byref(program), expression.encode(), 1,
                            _PCAP_NETMASK_UNKNOWN) != 0:  # fmt: skip
            message = (lib.pcap_geterr(handle) or b"").decode(errors="replace")
            raise LiveCaptureError(f"bad bpf_filter {expression!r}: {message}")
        try:
            return [
                (insn.code, insn.jt, insn.jf, insn.k) for insn in program.bf_insns[: program.bf_len]
            ]
        finally:
            lib.pcap_freecode(ctypes.byref(program))
    finally:
        lib.pcap_close(handle)
