"""The ``af_packet`` engine (Linux, needs CAP_NET_RAW: root, or the capability on the
interpreter): a raw AF_PACKET socket read from the event loop (``loop.add_reader``), up
to ``batch`` frames per wake-up, each with one ``recv_into`` into a preallocated buffer
(``MSG_TRUNC`` reports frames longer than it). A classic BPF program (``bpf``) runs in
the kernel first, so frames that cannot carry signalling never reach Python. Use it on
Linux collectors.

Timestamps: each batch is stamped with one ``Clock.time()`` read at wake-up (kernel
timestamps through ``recvmsg`` ancillary data halved the read rate); a frame's time is
therefore late by however long it waited in the socket buffer, which is microseconds
unless the collector is overloaded.

Loopback delivers every packet twice to a capture socket (outgoing and incoming); only
the incoming copy is kept, by the kernel (``PACKET_IGNORE_OUTGOING``) or, before Linux
4.20, by the address ``recvfrom`` reports. On other interfaces outgoing frames are kept:
a collector that runs on the SIP host itself sees the host's own replies only that way.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Final

import structlog

from sipcdr.capture.live.base import SNAPLEN, CaptureEngine, EngineContext, LiveCaptureError
from sipcdr.capture.live.bpf import (
    DEFAULT_BPF_FILTER,
    BpfInstruction,
    compile_filter,
    signalling_program,
)
from sipcdr.decode.link import LINKTYPE_ETHERNET, LINKTYPE_RAW

__all__ = ["DEFAULT_BATCH", "STATS_POLL_S", "AfPacketEngine"]

# Frames read per loop wake-up. Other callbacks wait while a batch runs: ~3 ms for 256
# media or counted frames, ~13 ms when all are SIP through the parser. Smaller batches
# cost throughput (measured: 64 -8 %, 16 -25 %); larger ones gain nothing.
DEFAULT_BATCH: Final = 256
# Kernel counters are 32-bit and reset on each read; polling keeps them from wrapping.
STATS_POLL_S: Final = 5.0

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


def _attach_filter(sock: socket.socket, program: Sequence[BpfInstruction]) -> None:
    code = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog: unsigned short len, (padding), struct sock_filter *filter.
    # The kernel copies the program during the call, so the buffer may go afterwards.
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


class AfPacketEngine(CaptureEngine):
    """Frames from an AF_PACKET socket, read on the event loop's thread."""

    __slots__ = ("_buffer", "_housekeeping", "_loop", "_skip_outgoing", "_sock", "_view")

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._buffer = bytearray(SNAPLEN)
        self._view = memoryview(self._buffer)
        self._skip_outgoing = False
        self._housekeeping: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        self._close()

    def abort(self) -> None:
        self._close()

    def halt(self) -> None:
        self._close()

    def flush(self) -> None:
        """Nothing is held: each frame's SIP goes to the callback as it is read."""

    def poll_stats(self) -> None:
        self._poll_kernel_stats()

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
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
            self._housekeep(), name=f"sipcdr-live-{self.ctx.interface}"
        )
        self._housekeeping.add_done_callback(self._housekeeping_done)

    def _setup_socket(self, sock: socket.socket) -> None:
        try:
            sock.bind((self.ctx.interface, 0))
        except OSError as exc:
            raise LiveCaptureError(f"interface {self.ctx.interface!r}: {exc.strerror}") from None
        hatype = sock.getsockname()[3]
        if hatype in (_ARPHRD_ETHER, _ARPHRD_LOOPBACK):
            linktype = LINKTYPE_ETHERNET
        elif hatype in (_ARPHRD_NONE, _ARPHRD_RAWIP):
            linktype = LINKTYPE_RAW
        else:
            raise LiveCaptureError(
                f"interface {self.ctx.interface!r} has hardware type {hatype}, which engine "
                "af_packet does not read; use engine pyshark"
            )
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, self.ctx.rcvbuf_bytes)
        except PermissionError:
            # Unprivileged: capped at net.core.rmem_max, which is what the kernel allows.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.ctx.rcvbuf_bytes)
        if self.ctx.bpf_filter is not None:
            program = (
                signalling_program(linktype)
                if self.ctx.bpf_filter == DEFAULT_BPF_FILTER
                else compile_filter(self.ctx.bpf_filter, linktype)
            )
            _attach_filter(sock, program)
        if hatype == _ARPHRD_LOOPBACK:
            try:
                sock.setsockopt(_SOL_PACKET, _PACKET_IGNORE_OUTGOING, 1)
            except OSError:
                # Kernels before 4.20: recvfrom tells the copies apart instead.
                self._skip_outgoing = True
        if self.ctx.promiscuous and hatype == _ARPHRD_ETHER:
            ifindex = socket.if_nametoindex(self.ctx.interface)
            mreq = struct.pack("iHH8s", ifindex, _PACKET_MR_PROMISC, 0, b"")
            # A membership, not the interface flag: it ends with the socket, even on a
            # crash, and does not disturb other capture tools.
            sock.setsockopt(_SOL_PACKET, _PACKET_ADD_MEMBERSHIP, mreq)
        sock.setblocking(False)
        try:
            sock.bind((self.ctx.interface, _ETH_P_ALL))
        except OSError as exc:
            raise LiveCaptureError(f"interface {self.ctx.interface!r}: {exc.strerror}") from None
        self.ctx.new_extractor(linktype)

    def _on_readable(self) -> None:
        sock = self._sock
        extractor = self.ctx.extractor
        if sock is None or extractor is None:
            return
        buffer = self._buffer
        view = self._view
        feed = extractor.feed
        on_packet = self.ctx.on_packet
        skip_outgoing = self._skip_outgoing
        recv_into = sock.recv_into
        recvfrom_into = sock.recvfrom_into
        trunc = socket.MSG_TRUNC
        stats = self.ctx.stats
        batch = self.ctx.batch
        # One clock read per wake-up; see the module docstring on timestamps.
        ts = self.ctx.clock.time()
        frames = sip = 0
        try:
            while frames < batch:
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
                    self.ctx.count_frame_error(exc)
                    continue
                if found:
                    for packet in found:
                        try:
                            on_packet(packet)
                        except Exception as exc:  # counted and logged
                            self.ctx.count_callback_error(exc)
                    sip += len(found)
        finally:
            stats.frames_read += frames
            stats.sip_packets += sip

    def _socket_error(self, exc: OSError) -> None:
        if exc.errno == errno.ENETDOWN:
            # The kernel reports a link going down once; the socket resumes when it
            # comes back up, unless the interface itself is gone.
            try:
                socket.if_nametoindex(self.ctx.interface)
            except OSError:
                self.ctx.fail(LiveCaptureError(f"interface {self.ctx.interface!r} was removed"))
                return
            _log.warning("live_capture_interface_down", interface=self.ctx.interface)
            return
        self.ctx.fail(LiveCaptureError(f"reading {self.ctx.interface!r}: {exc}"))

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
        self.ctx.stats.kernel_packets += packets
        self.ctx.stats.kernel_drops += drops

    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(STATS_POLL_S)  # the kernel's counters: real time
            self._poll_kernel_stats()
            # Reassembly state otherwise ages only when new frames arrive.
            now = self.ctx.clock.time()
            self.ctx.decap.expire(now)
            self.ctx.tcp.expire(now)

    def _housekeeping_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.ctx.fail(exc)

    def _close(self) -> None:
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
