"""Live capture from a network interface (a SPAN/mirror port, or loopback in tests).

``LiveCapture`` reads frames from one interface, runs each through the same
``SipExtractor`` that reads capture files (decapsulation, IP fragment and TCP stream
reassembly, SIP recognition by content, HEP unwrapping) and hands every SIP message
to a callback, normally ``Pipeline.process``, on the event loop's thread.

Two engines, chosen per capture:

``af_packet`` (Linux, needs CAP_NET_RAW: root, or the capability on the interpreter)
    A raw AF_PACKET socket read from the event loop (``loop.add_reader``), up to
    ``batch`` frames per wake-up, each with one ``recv_into`` into a preallocated
    buffer (``MSG_TRUNC`` reports frames longer than it). A classic BPF program runs in
    the kernel first, so frames that cannot carry signalling never reach Python. Use
    it on Linux collectors.

``pyshark`` (wherever Wireshark's dumpcap can capture, also without root when dumpcap
has its capabilities or group)
    dumpcap captures (same filter, ``-B`` buffer) and writes pcapng to a pipe that
    tshark decodes through pyshark's ``PipeCapture`` in a worker thread; the raw frame
    bytes go to the same extractor there, and SIP messages are handed to the loop in
    batches (``call_soon_threadsafe``, one wake-up per batch). tshark prints EK (one
    line per packet, so a quiet link's last message is not held back as pyshark's
    JSON parser holds it until the next packet) with only the frame layer and no IP
    dissection, which is what makes it 6x faster than pyshark's defaults. The worker
    holds the GIL for most of its time, slowing the rest of the daemon with it. Use it
    only where AF_PACKET is not available, on links that carry little else.

Measured throughput (harness: a private veth pair; a second process injects 100,000
Ethernet frames as fast as it can; af_packet: the loop is blocked while they queue in
a 1 GiB socket buffer, then timed until all are delivered; pyshark: first to last
delivery while a backlog lasts. 2 vCPU VM shared with another benchmark, Python 3.11,
median of three runs):

=========================================  ============  ==========
frames (UDP, 230-byte SIP or 172-byte RTP)  af_packet     pyshark
=========================================  ============  ==========
SIP, callback only counts                   ~83,000 /s    ~5,600 /s
SIP, callback is ``Pipeline.process``       ~19,000 /s    <= 5,600 /s
RTP, no filter: read and discarded          ~155,000 /s   ~6,400 /s
RTP, default filter                         never read    never read
pyshark's defaults (JSON, full dissection)                ~870 /s
=========================================  ============  ==========

So with ``af_packet`` the parser and correlator, not capture, set the daemon's rate.

Filters. ``bpf_filter`` is a pcap-filter expression; ``DEFAULT_BPF_FILTER`` selects
TCP, SCTP, and UDP whose payload does not start with a byte >= 0x80 (RTP, RTCP and SRTP
always do, SIP and HEP never do), keeping IP fragments, since only the first fragment
holds the UDP header. dumpcap compiles it for the ``pyshark`` engine. For ``af_packet``
the default is a program assembled here (``signalling_program``): it selects the same
frames, and also reads through VLAN/QinQ tags still in the frame, which a libpcap
program without ``vlan`` primitives rejects (so the ``pyshark`` engine misses SIP under
an inner QinQ tag unless its expression says ``vlan``). Any other expression is
compiled by libpcap (``compile_filter``, through ctypes; libpcap comes with dumpcap or
tcpdump), and without libpcap ``start`` fails with a ``LiveCaptureError`` saying so.
``None`` keeps every frame. On Linux the kernel strips the outer VLAN tag of received
frames before any capture socket sees them, so ``vlan`` primitives in a custom
expression match only tags left in the frame (inner QinQ tags).

Timestamps. ``af_packet`` stamps each batch with one ``time.time()`` taken at wake-up
(kernel timestamps through ``recvmsg`` ancillary data halved the read rate); a frame's
time is therefore late by however long it waited in the socket buffer, which is
microseconds unless the collector is overloaded. ``pyshark`` uses dumpcap's per-frame
timestamps.

Loopback delivers every packet twice to a capture socket (outgoing and incoming);
both engines keep only the incoming copy. On other interfaces outgoing frames are kept:
a collector that runs on the SIP host itself sees the host's own replies only that way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import importlib
import math
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal

import structlog

from sipcdr.capture.decap import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
    Decapsulator,
)
from sipcdr.capture.pcapfile import CaptureStats, SipExtractor
from sipcdr.capture.tcp import TcpReassembler
from sipcdr.model import Packet

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_BPF_FILTER",
    "DEFAULT_RCVBUF_BYTES",
    "ENGINES",
    "BpfInstruction",
    "Engine",
    "LiveCapture",
    "LiveCaptureError",
    "LiveStats",
    "compile_filter",
    "signalling_program",
]

Engine = Literal["af_packet", "pyshark"]
ENGINES: Final[tuple[Engine, ...]] = ("af_packet", "pyshark")

# Everything that can carry SIP or HEP. RTP, RTCP and SRTP (version 2: first payload byte
# 0x80-0xBF) never reach Python, and they are most frames on a SPAN port.
DEFAULT_BPF_FILTER: Final = (
    "tcp or sctp"
    " or (ip and udp and (ip[6:2] & 0x1fff != 0 or udp[8] < 0x80))"
    " or (ip6 and udp and (ip6[6] != 17 or ip6[48] < 0x80))"
)
# Same as the UDP listeners' default: the socket buffer is the only queue in front of
# the parser, and 32 MiB holds about a second of a busy mirror port's signalling.
DEFAULT_RCVBUF_BYTES: Final = 32 * 1024 * 1024
# Frames read per loop wake-up. Other callbacks wait while a batch runs: ~3 ms for 256
# media or counted frames, ~13 ms when all are SIP through the parser. Smaller batches
# cost throughput (measured: 64 -8 %, 16 -25 %); larger ones gain nothing.
DEFAULT_BATCH: Final = 256
# libpcap's MAXIMUM_SNAPLEN: GRO/LRO hands capture sockets merged TCP frames of up to
# 64 KiB (more with BIG TCP); anything longer is counted as truncated.
SNAPLEN: Final = 262144
# Kernel counters are 32-bit and reset on each read; polling keeps them from wrapping.
STATS_POLL_S: Final = 5.0
# dumpcap usually reports that it captures within a second; tshark's start is not on
# this path.
START_TIMEOUT_S: Final = 15.0
# On stop, tshark drains what dumpcap flushed; it has this long before it is killed.
STOP_TIMEOUT_S: Final = 10.0
# SIP messages decoded by the pyshark worker but not yet taken by the loop: about ten
# seconds of that engine's throughput. Beyond this they are dropped and counted.
MAX_PENDING: Final = 65536

# Linux ABI constants that the socket module does not export.
_ETH_P_ALL: Final = 0x0003
_SOL_PACKET: Final = 263
_PACKET_ADD_MEMBERSHIP: Final = 1
_PACKET_MR_PROMISC: Final = 1
_PACKET_STATISTICS: Final = 6
_PACKET_IGNORE_OUTGOING: Final = 23  # Linux 4.20
_PACKET_OUTGOING: Final = 4
_SO_ATTACH_FILTER: Final = 26  # asm-generic; every architecture Python supports here
_SO_RCVBUFFORCE: Final = 33
_ARPHRD_ETHER: Final = 1
_ARPHRD_LOOPBACK: Final = 772  # loopback frames carry a 14-byte Ethernet header
_ARPHRD_RAWIP: Final = 519
_ARPHRD_NONE: Final = 0xFFFE  # tun, WireGuard: frames start at the IP header
_tpacket_stats: Final = struct.Struct("II")

_log = structlog.get_logger("sipcdr")

BpfInstruction = tuple[int, int, int, int]  # code, jt, jf, k: struct sock_filter


class LiveCaptureError(RuntimeError):
    """The capture cannot start or had to stop; the message says what to change."""


class LiveStats:
    """Counters of one live capture. They only grow; ``capture`` holds the extractor's
    per-layer detail (non-SIP payloads, fragments, TCP streams)."""

    __slots__ = (
        "callback_errors",
        "capture",
        "frame_errors",
        "frames_read",
        "kernel_drops",
        "kernel_packets",
        "outgoing_skipped",
        "pending_dropped",
        "sip_packets",
        "truncated",
    )

    def __init__(self, capture: CaptureStats) -> None:
        self.capture = capture
        self.frames_read = 0  # frames handed to the extractor
        # Frames that passed the filter, and those of them the kernel dropped because the
        # buffer was full. af_packet: updated live. pyshark: dumpcap reports both on exit.
        self.kernel_packets = 0
        self.kernel_drops = 0
        self.sip_packets = 0  # handed to the callback
        self.truncated = 0  # frames longer than SNAPLEN, cut there
        self.outgoing_skipped = 0  # loopback copies, when the kernel cannot skip them
        self.callback_errors = 0  # the callback raised: that SIP message is lost
        self.frame_errors = 0  # the extractor raised on a frame (a bug): frame lost
        self.pending_dropped = 0  # pyshark: SIP messages dropped, the loop fell behind

    def as_dict(self) -> dict[str, int]:
        flat = {name: getattr(self, name) for name in LiveStats.__slots__ if name != "capture"}
        flat.update(self.capture.as_dict())
        return flat


# -- classic BPF ---------------------------------------------------------------------------

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
    raw-IP links, reading through up to two VLAN tags (802.1Q, 802.1ad, 0x9100).

    X holds the offset of the IP header; the IPv4 UDP branch moves it to the UDP
    header, whose length depends on the IP options.
    """
    a = _Assembler()
    ok, no = _RET_ACCEPT, _RET_REJECT
    if linktype == LINKTYPE_ETHERNET:
        for depth, offset in enumerate((12, 16, 20)):
            a.label(f"type{depth}")
            a.op(a.LDH_ABS, offset)
            a.jump(a.JEQ_K, 0x0800, f"v4at{offset + 2}", 0)
            a.jump(a.JEQ_K, 0x86DD, f"v6at{offset + 2}", 0)
            if depth < 2:
                following = f"type{depth + 1}"
                for tag in (0x8100, 0x88A8, 0x9100):
                    a.jump(a.JEQ_K, tag, following, 0)
            a.op(a.RET_K, 0)
        for offset in (14, 18, 22):
            a.label(f"v4at{offset}")
            a.op(a.LDX_IMM, offset)
            a.goto("v4")
        for offset in (14, 18, 22):
            a.label(f"v6at{offset}")
            a.op(a.LDX_IMM, offset)
            a.goto("v6")
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
    a.jump(a.JEQ_K, 17, 0, no)
    a.op(a.LDH_IND, 6)  # flags and fragment offset
    a.jump(a.JSET_K, 0x1FFF, ok, 0)  # a later fragment: no UDP header to look into
    a.op(a.LDB_IND, 0)
    a.op(a.AND_K, 0x0F)
    a.op(a.LSH_K, 2)
    a.op(a.ADD_X)
    a.op(a.TAX)  # X: UDP header
    a.op(a.LDB_IND, 8)
    a.jump(a.JGE_K, 0x80, no, ok)
    a.label("v6")
    a.op(a.LDB_IND, 6)  # next header
    a.jump(a.JEQ_K, 6, ok, 0)
    a.jump(a.JEQ_K, 132, ok, 0)
    a.jump(a.JEQ_K, 44, "v6frag", 0)
    a.jump(a.JEQ_K, 17, 0, no)
    a.op(a.LDB_IND, 48)
    a.jump(a.JGE_K, 0x80, no, ok)
    a.label("v6frag")
    a.op(a.LDB_IND, 40)  # the fragment header's next header
    a.jump(a.JEQ_K, 6, ok, 0)
    a.jump(a.JEQ_K, 17, ok, 0)
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


def _attach_filter(sock: socket.socket, program: Sequence[BpfInstruction]) -> None:
    code = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog: unsigned short len, (padding), struct sock_filter *filter.
    # The kernel copies the program during the call, so the buffer may go afterwards.
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


# -- the capture ---------------------------------------------------------------------------


class LiveCapture:
    """SIP messages from one interface, delivered to ``on_packet`` on the loop's thread.

    ``start`` returns once frames are being captured (the socket is bound, or dumpcap
    reported that it captures), so traffic sent afterwards is seen. ``stop`` is
    idempotent; ``wait`` returns when the capture ended after ``stop`` and raises the
    error that ended it otherwise (interface removed, dumpcap or tshark died). A
    failure is also logged (``live_capture_failed``) and kept in ``error``.

    ``capture_node`` names the source in CDRs; default ``live:<interface>``.
    ``promiscuous`` is needed on a mirror port, whose frames are not addressed to the
    collector's NIC. ``rcvbuf_bytes`` sizes the socket buffer (af_packet, forced past
    ``net.core.rmem_max`` when privileged) or dumpcap's ``-B`` buffer (pyshark).
    """

    def __init__(
        self,
        interface: str,
        on_packet: Callable[[Packet], None],
        engine: Engine = "af_packet",
        bpf_filter: str | None = DEFAULT_BPF_FILTER,
        rcvbuf_bytes: int = DEFAULT_RCVBUF_BYTES,
        capture_node: str | None = None,
        *,
        promiscuous: bool = True,
        batch: int = DEFAULT_BATCH,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
        if not interface or interface == "any":
            # "any" mixes link types (and Linux cooked headers) in one socket; a SPAN
            # port is one named interface, and several are several captures.
            raise ValueError(f"interface must name one network interface, not {interface!r}")
        if rcvbuf_bytes < 1 or batch < 1:
            raise ValueError("rcvbuf_bytes and batch must be positive")
        self.interface = interface
        self.engine: Engine = engine
        self.bpf_filter = bpf_filter or None
        self.rcvbuf_bytes = rcvbuf_bytes
        self.capture_node = capture_node or f"live:{interface}"
        self.promiscuous = promiscuous
        self.batch = batch
        self._on_packet = on_packet
        self._capture_stats = CaptureStats()
        self._stats = LiveStats(self._capture_stats)
        self._decap = Decapsulator(self._capture_stats.decap)
        self._tcp = TcpReassembler(self._capture_stats.tcp)
        self._extractor: SipExtractor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._started = False
        self._stopped = False
        # af_packet
        self._sock: socket.socket | None = None
        self._buffer = bytearray(SNAPLEN)
        self._view = memoryview(self._buffer)
        self._skip_outgoing = False
        self._housekeeping: asyncio.Task[None] | None = None
        # pyshark
        self._dumpcap: subprocess.Popen[bytes] | None = None
        self._dumpcap_stderr: deque[str] = deque(maxlen=20)
        self._worker: threading.Thread | None = None
        self._worker_loop: asyncio.AbstractEventLoop | None = None
        self._worker_capture: Any = None
        self._stopping = threading.Event()
        self._pending: list[Packet] = []
        self._pending_lock = threading.Lock()
        self._delivery_scheduled = False
        self._exit_lock = threading.Lock()
        self._exit_collected = False

    # -- public API -----------------------------------------------------------------------

    @property
    def stats(self) -> LiveStats:
        """Live counters; reading them also collects the kernel's (af_packet)."""
        if self._sock is not None:
            self._poll_kernel_stats()
        return self._stats

    @property
    def error(self) -> BaseException | None:
        """What ended the capture, if it did not end by ``stop``."""
        return self._error

    @property
    def running(self) -> bool:
        return self._started and not self._stopped and self._error is None

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._loop = loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        # wait() may never be called; the failure has been logged by then.
        self._done.add_done_callback(_retrieve)
        try:
            if self.engine == "af_packet":
                self._start_af_packet(loop)
            else:
                await self._start_pyshark(loop)
        except BaseException:
            self._stopped = True
            self._close_af_packet()
            self._kill_dumpcap()
            self._close_dumpcap_pipes()
            if not self._done.done():
                self._done.set_result(None)
            raise
        _log.info(
            "live_capture_started",
            interface=self.interface,
            engine=self.engine,
            bpf_filter="default" if self.bpf_filter == DEFAULT_BPF_FILTER else self.bpf_filter,
        )

    async def stop(self) -> None:
        """Stop capturing and deliver what was already captured. Idempotent."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        if self.engine == "af_packet":
            self._close_af_packet()
        else:
            await self._stop_pyshark()
        if self._extractor is not None:
            self._extractor.close()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        stats = self._stats
        _log.info(
            "live_capture_stopped",
            interface=self.interface,
            engine=self.engine,
            frames_read=stats.frames_read,
            sip_packets=stats.sip_packets,
            kernel_drops=stats.kernel_drops,
            callback_errors=stats.callback_errors,
        )

    def flush(self) -> None:
        """Hand over SIP messages the pyshark worker has decoded but the loop has not yet
        taken; af_packet holds none."""
        self._deliver()

    async def wait(self) -> None:
        """Return when the capture has ended by ``stop``; raise what ended it otherwise."""
        if self._done is None:
            raise RuntimeError("LiveCapture.wait() before start()")
        await asyncio.shield(self._done)

    async def __aenter__(self) -> LiveCapture:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- failure ---------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        """The capture cannot go on: stop reading, keep the error, log it once."""
        if self._error is not None or self._stopped:
            return
        self._error = exc
        self._close_af_packet()
        _log.error(
            "live_capture_failed",
            interface=self.interface,
            engine=self.engine,
            error=str(exc) or repr(exc),
        )
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)

    def _count_callback_error(self, exc: Exception) -> None:
        self._stats.callback_errors += 1
        if self._stats.callback_errors == 1:
            # Logged once with the traceback; the counter carries the rest.
            _log.error("live_capture_callback_failed", interface=self.interface, exc_info=exc)

    def _count_frame_error(self, exc: Exception) -> None:
        self._stats.frame_errors += 1
        if self._stats.frame_errors == 1:
            _log.error("live_capture_frame_failed", interface=self.interface, exc_info=exc)

    # -- af_packet -------------------------------------------------------------------------

    def _start_af_packet(self, loop: asyncio.AbstractEventLoop) -> None:
        family = getattr(socket, "AF_PACKET", None)
        if family is None:
            raise LiveCaptureError(
                f"engine af_packet needs Linux (this is {sys.platform}); use engine pyshark"
            )
        try:
            # Protocol 0: nothing is queued until the second bind, after the filter.
            sock = socket.socket(family, socket.SOCK_RAW, 0)
        except PermissionError:
            raise LiveCaptureError(
                "engine af_packet needs CAP_NET_RAW (run as root, or "
                "setcap cap_net_raw+ep on the interpreter); or use engine pyshark"
            ) from None
        try:
            self._setup_socket(sock)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        loop.add_reader(sock.fileno(), self._on_readable)
        self._housekeeping = loop.create_task(
            self._housekeep(), name=f"sipcdr-live-{self.interface}"
        )
        self._housekeeping.add_done_callback(self._housekeeping_done)

    def _setup_socket(self, sock: socket.socket) -> None:
        try:
            sock.bind((self.interface, 0))
        except OSError as exc:
            raise LiveCaptureError(f"interface {self.interface!r}: {exc.strerror}") from None
        hatype = sock.getsockname()[3]
        if hatype in (_ARPHRD_ETHER, _ARPHRD_LOOPBACK):
            linktype = LINKTYPE_ETHERNET
        elif hatype in (_ARPHRD_NONE, _ARPHRD_RAWIP):
            linktype = LINKTYPE_RAW
        else:
            raise LiveCaptureError(
                f"interface {self.interface!r} has hardware type {hatype}, which engine "
                "af_packet does not read; use engine pyshark"
            )
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, self.rcvbuf_bytes)
        except PermissionError:
            # Unprivileged: capped at net.core.rmem_max, which is what the kernel allows.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf_bytes)
        if self.bpf_filter is not None:
            program = (
                signalling_program(linktype)
                if self.bpf_filter == DEFAULT_BPF_FILTER
                else compile_filter(self.bpf_filter, linktype)
            )
            _attach_filter(sock, program)
        if hatype == _ARPHRD_LOOPBACK:
            try:
                sock.setsockopt(_SOL_PACKET, _PACKET_IGNORE_OUTGOING, 1)
            except OSError:
                # Kernels before 4.20: recvfrom tells the copies apart instead.
                self._skip_outgoing = True
        if self.promiscuous and hatype == _ARPHRD_ETHER:
            ifindex = socket.if_nametoindex(self.interface)
            mreq = struct.pack("iHH8s", ifindex, _PACKET_MR_PROMISC, 0, b"")
            # A membership, not the interface flag: it ends with the socket, even on a
            # crash, and does not disturb other capture tools.
            sock.setsockopt(_SOL_PACKET, _PACKET_ADD_MEMBERSHIP, mreq)
        sock.setblocking(False)
        try:
            sock.bind((self.interface, _ETH_P_ALL))
        except OSError as exc:
            raise LiveCaptureError(f"interface {self.interface!r}: {exc.strerror}") from None
        self._extractor = SipExtractor(
            linktype,
            self.capture_node,
            self._capture_stats,
            decapsulator=self._decap,
            reassembler=self._tcp,
        )

    def _on_readable(self) -> None:
        sock = self._sock
        extractor = self._extractor
        if sock is None or extractor is None:
            return
        buffer = self._buffer
        view = self._view
        feed = extractor.feed
        on_packet = self._on_packet
        skip_outgoing = self._skip_outgoing
        recv_into = sock.recv_into
        recvfrom_into = sock.recvfrom_into
        trunc = socket.MSG_TRUNC
        stats = self._stats
        # One clock read per wake-up; see the module docstring on timestamps.
        ts = time.time()
        frames = sip = 0
        try:
            while frames < self.batch:
                try:
                    if skip_outgoing:
                        size, address = recvfrom_into(buffer, SNAPLEN, trunc)
                        if address[2] == _PACKET_OUTGOING:
                            stats.outgoing_skipped += 1
                            continue
                    else:
                        # MSG_TRUNC makes a packet socket return the frame's full length.
                        size = recv_into(buffer, SNAPLEN, trunc)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self._socket_error(exc)
                    break
                frames += 1
                if size > SNAPLEN:
                    stats.truncated += 1
                    size = SNAPLEN
                try:
                    found = feed(ts, view[:size].tobytes())
                except Exception as exc:  # one bad frame must not end capture
                    self._count_frame_error(exc)
                    continue
                if found:
                    for packet in found:
                        try:
                            on_packet(packet)
                        except Exception as exc:  # counted and logged
                            self._count_callback_error(exc)
                    sip += len(found)
        finally:
            stats.frames_read += frames
            stats.sip_packets += sip

    def _socket_error(self, exc: OSError) -> None:
        if exc.errno == errno.ENETDOWN:
            # The kernel reports a link going down once; the socket resumes when it
            # comes back up, unless the interface itself is gone.
            try:
                socket.if_nametoindex(self.interface)
            except OSError:
                self._fail(LiveCaptureError(f"interface {self.interface!r} was removed"))
                return
            _log.warning("live_capture_interface_down", interface=self.interface)
            return
        self._fail(LiveCaptureError(f"reading {self.interface!r}: {exc}"))

    def _poll_kernel_stats(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            raw = sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, _tpacket_stats.size)
        except OSError:
            return
        packets, drops = _tpacket_stats.unpack(raw)
        # Read-and-reset in the kernel: accumulate here.
        self._stats.kernel_packets += packets
        self._stats.kernel_drops += drops

    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(STATS_POLL_S)
            self._poll_kernel_stats()
            # Reassembly state otherwise ages only when new frames arrive.
            now = time.time()
            self._decap.expire(now)
            self._tcp.expire(now)

    def _housekeeping_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._fail(exc)

    def _close_af_packet(self) -> None:
        task, self._housekeeping = self._housekeeping, None
        if task is not None and not task.done():
            task.cancel()
        sock = self._sock
        if sock is None:
            return
        self._poll_kernel_stats()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock.fileno())
        self._sock = None
        sock.close()

    # -- pyshark ---------------------------------------------------------------------------

    async def _start_pyshark(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            importlib.import_module("pyshark")
        except ImportError:
            raise LiveCaptureError(
                "engine pyshark needs the pyshark package: pip install 'pyshark>=0.6,<1'"
            ) from None
        dumpcap = shutil.which("dumpcap")
        if dumpcap is None or shutil.which("tshark") is None:
            raise LiveCaptureError("engine pyshark needs dumpcap and tshark (Wireshark) on PATH")
        argv = [
            dumpcap,
            "-q",
            "-i", self.interface,
            "-B", str(max(1, math.ceil(self.rcvbuf_bytes / (1 << 20)))),
            "-s", str(SNAPLEN),
            "-w", "-",
        ]  # fmt: skip
        if self.bpf_filter is not None:
            argv += ["-f", self.bpf_filter]
        if not self.promiscuous:
            argv.append("-p")
        # Own session: a Ctrl-C meant for the daemon must not kill the capture before
        # the daemon's own orderly stop.
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._dumpcap = process
        ready = loop.run_in_executor(None, self._wait_dumpcap_ready, process)
        try:
            capturing = await asyncio.wait_for(ready, START_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            raise LiveCaptureError(
                f"dumpcap did not start capturing on {self.interface!r} within "
                f"{START_TIMEOUT_S:g} s: {self._dumpcap_tail()}"
            ) from None
        if not capturing:
            process.wait()
            raise LiveCaptureError(
                f"dumpcap cannot capture on {self.interface!r} (exit code "
                f"{process.returncode}): {self._dumpcap_tail()}"
            )
        assert process.stdout is not None
        self._worker = threading.Thread(
            target=self._pyshark_worker,
            args=(process.stdout.fileno(),),
            name=f"sipcdr-pyshark-{self.interface}",
            daemon=True,
        )
        self._worker.start()

    def _wait_dumpcap_ready(self, process: subprocess.Popen[bytes]) -> bool:
        """Blocking: read dumpcap's stderr until it captures (True) or exits (False)."""
        assert process.stderr is not None
        for raw in process.stderr:
            line = raw.decode(errors="replace").strip()
            if line:
                self._dumpcap_stderr.append(line)
            # "Capturing on" comes before the device is opened; "File:" after the
            # filter is attached, when frames are being kept.
            if line.startswith("File:"):
                return True
        return False

    def _dumpcap_tail(self) -> str:
        lines = [
            line
            for line in self._dumpcap_stderr
            if not line.startswith(("Capturing on", "File:", "Packets"))
        ]
        return " / ".join(lines[-3:]) or "no message"

    def _pyshark_worker(self, pipe_fd: int) -> None:
        """Thread: tshark decodes dumpcap's stream; raw frames go to the extractor."""
        error: BaseException | None = None
        loop = asyncio.new_event_loop()
        self._worker_loop = loop
        try:
            module = importlib.import_module("pyshark.capture.pipe_capture")
            capture = module.PipeCapture(
                pipe=pipe_fd,
                use_json=True,
                include_raw=True,
                eventloop=loop,
                # Only the frame layer is printed and IP is not dissected: tshark's
                # dissection and pyshark's parsing of it are what limit this engine.
                custom_parameters=[
                    "-J", "frame",
                    "--disable-protocol", "ip",
                    "--disable-protocol", "ipv6",
                ],
            )  # fmt: skip
            # EK output is one line per packet, so each is parsed as soon as tshark
            # prints it; pyshark's JSON parser waits for the next packet's separator,
            # which holds the last SIP message of a quiet link back indefinitely.
            # PipeCapture does not take use_ek, hence the attribute.
            capture.use_json = False
            capture._use_ek = True
            self._worker_capture = capture
            capture.apply_on_packets(self._on_pyshark_packet)
        except BaseException as exc:  # handed to the loop below
            error = exc
        finally:
            self._worker_capture = None
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
        if error is None and not self._stopping.is_set():
            error = LiveCaptureError(self._pyshark_ended_message())
        elif error is not None and not isinstance(error, LiveCaptureError):
            error = LiveCaptureError(f"tshark/pyshark failed: {error!r}")
        main = self._loop
        if main is not None and not main.is_closed():
            # RuntimeError: the loop closed meanwhile, nobody is left to tell.
            with contextlib.suppress(RuntimeError):
                main.call_soon_threadsafe(self._worker_finished, error)

    def _pyshark_ended_message(self) -> str:
        process = self._dumpcap
        if process is not None:
            # tshark sees the end of the stream as dumpcap exits; give the exit a moment.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=2)
            if process.returncode is not None:
                self._collect_dumpcap_exit()
                return (
                    f"dumpcap on {self.interface!r} exited with code {process.returncode}: "
                    f"{self._dumpcap_tail()}"
                )
        return f"tshark ended while capturing on {self.interface!r}"

    def _on_pyshark_packet(self, packet: Any) -> None:
        """Worker thread: one frame decoded by tshark."""
        stats = self._stats
        stats.frames_read += 1
        try:
            frame = bytes.fromhex(_ek_raw_frame(packet))
            if len(frame) > SNAPLEN:
                stats.truncated += 1
            extractor = self._extractor
            if extractor is None:
                # One dumpcap interface has one link type; the first frame tells it.
                extractor = self._extractor = SipExtractor(
                    _linktype_of(packet),
                    self.capture_node,
                    self._capture_stats,
                    decapsulator=self._decap,
                    reassembler=self._tcp,
                )
            found = extractor.feed(float(packet.sniff_timestamp), frame)
        except LiveCaptureError:
            raise
        except Exception as exc:  # one bad frame must not end capture
            self._count_frame_error(exc)
            return
        if found:
            self._hand_over(found)

    def _hand_over(self, packets: Sequence[Packet]) -> None:
        """Worker thread: queue for the loop; one wake-up per batch, not per message."""
        with self._pending_lock:
            room = MAX_PENDING - len(self._pending)
            if room < len(packets):
                self._stats.pending_dropped += len(packets) - max(room, 0)
                packets = packets[: max(room, 0)]
            self._pending.extend(packets)
            if self._delivery_scheduled or not self._pending:
                return
            self._delivery_scheduled = True
        loop = self._loop
        if loop is not None:
            # RuntimeError: the loop closed, stop() is no longer coming.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._pending_lock:
            batch, self._pending = self._pending, []
            self._delivery_scheduled = False
        on_packet = self._on_packet
        for packet in batch:
            try:
                on_packet(packet)
            except Exception as exc:  # counted and logged
                self._count_callback_error(exc)
        self._stats.sip_packets += len(batch)

    def _worker_finished(self, error: BaseException | None) -> None:
        self._deliver()
        if error is not None:
            self._kill_dumpcap()
            self._fail(error)

    async def _stop_pyshark(self) -> None:
        self._stopping.set()
        process = self._dumpcap
        if process is not None and process.poll() is None:
            # SIGTERM: dumpcap flushes what it has, reports its counts and exits; tshark
            # then reads to the end of the stream and exits too.
            process.terminate()
        worker = self._worker
        if worker is not None:
            loop = asyncio.get_running_loop()
            try:
                await asyncio.wait_for(loop.run_in_executor(None, worker.join), STOP_TIMEOUT_S)
            except TimeoutError:
                self._kill_tshark()
                _log.error(
                    "live_capture_stop_timeout", interface=self.interface, engine=self.engine
                )
        self._kill_dumpcap()
        self._deliver()
        self._collect_dumpcap_exit()

    def _kill_tshark(self) -> None:
        capture, loop = self._worker_capture, self._worker_loop
        if capture is not None and loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(capture.close_async(), loop)

    def _kill_dumpcap(self) -> None:
        process = self._dumpcap
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _log.error("live_capture_dumpcap_unkillable", pid=process.pid)

    def _close_dumpcap_pipes(self) -> None:
        process = self._dumpcap
        if process is not None:
            for pipe in (process.stdout, process.stderr):
                if pipe is not None:
                    pipe.close()

    def _collect_dumpcap_exit(self) -> None:
        """Once dumpcap has exited: its last messages, and the counts of frames the
        kernel passed and dropped that it reports on exit. Worker or loop, once."""
        process = self._dumpcap
        with self._exit_lock:
            if process is None or process.poll() is None or self._exit_collected:
                return
            self._exit_collected = True
            rest = process.stderr.read().decode(errors="replace") if process.stderr else ""
            self._close_dumpcap_pipes()
        for line in rest.splitlines():
            if line.strip():
                self._dumpcap_stderr.append(line.strip())
        match = _DUMPCAP_COUNTS.search(rest)
        if match:
            self._stats.kernel_packets += int(match.group(1))
            self._stats.kernel_drops += int(match.group(2))


_DUMPCAP_COUNTS: Final = re.compile(r"received/dropped on interface '[^']*': (\d+)/(\d+)")

# tshark's frame.encap_type (wiretap's WTAP_ENCAP_*) -> pcap link type.
_WTAP_LINKTYPES: Final = {
    1: LINKTYPE_ETHERNET,
    7: LINKTYPE_RAW,
    15: LINKTYPE_NULL,
    25: LINKTYPE_LINUX_SLL,
    129: LINKTYPE_IPV4,
    130: LINKTYPE_IPV6,
    174: LINKTYPE_LOOP,
    210: LINKTYPE_LINUX_SLL2,
}


def _ek_raw_frame(packet: Any) -> str:
    # pyshark keeps an EK "*_raw" layer's hex string as the layer's whole field dict
    # and offers no accessor for it (get_raw_packet() reads JSON-mode layers only).
    raw = getattr(getattr(packet, "frame_raw", None), "_fields_dict", None)
    if not isinstance(raw, str):
        raise LiveCaptureError(
            "pyshark returned no raw frame bytes (its EK layout changed?); "
            "pyshark>=0.6,<1 is supported"
        )
    return raw


def _linktype_of(packet: Any) -> int:
    encap = packet.frame_info.get_field("encap_type")
    linktype = _WTAP_LINKTYPES.get(int(encap)) if encap is not None else None
    if linktype is None:
        raise LiveCaptureError(f"tshark reports link encapsulation {encap!r}, not supported")
    return linktype


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
