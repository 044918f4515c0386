"""What the live capture engines share: the errors and counters they report, the
socket-buffer and frame-size limits, and ``EngineContext``, the options, decoders and
callbacks ``LiveCapture`` hands its engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from asyncio import AbstractEventLoop
from collections.abc import Callable
from typing import Final

import structlog

from sipcdr import hep
from sipcdr.clock import SYSTEM_CLOCK, Clock
from sipcdr.decode.extract import CaptureStats, SipExtractor
from sipcdr.decode.link import Decapsulator
from sipcdr.decode.tcp import TcpReassembler
from sipcdr.model import Packet

__all__ = [
    "DEFAULT_RCVBUF_BYTES",
    "SNAPLEN",
    "CaptureEngine",
    "EngineContext",
    "LiveCaptureError",
    "LiveStats",
]

# Same as the UDP listeners' default: the socket buffer is the only queue in front of
# the parser, and 32 MiB holds about a second of a busy mirror port's signalling.
DEFAULT_RCVBUF_BYTES: Final = 32 * 1024 * 1024
# libpcap's MAXIMUM_SNAPLEN: GRO/LRO hands capture sockets merged TCP frames of up to
# 64 KiB (more with BIG TCP); anything longer is counted as truncated.
SNAPLEN: Final = 262144

_log = structlog.get_logger("sipcdr")


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


class EngineContext:
    """One capture's options, its decoders and counters (kept across the engine's
    life), the callback SIP messages go to, and ``fail``, which ends the capture with
    an error."""

    __slots__ = (
        "batch",
        "bpf_filter",
        "capture_node",
        "capture_stats",
        "clock",
        "decap",
        "extractor",
        "fail",
        "interface",
        "on_packet",
        "promiscuous",
        "rcvbuf_bytes",
        "stats",
        "tcp",
    )

    def __init__(
        self,
        interface: str,
        on_packet: Callable[[Packet], None],
        fail: Callable[[BaseException], None],
        *,
        bpf_filter: str | None,
        rcvbuf_bytes: int,
        capture_node: str,
        promiscuous: bool,
        batch: int,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.clock = clock
        self.interface = interface
        self.on_packet = on_packet
        self.fail = fail
        self.bpf_filter = bpf_filter
        self.rcvbuf_bytes = rcvbuf_bytes
        self.capture_node = capture_node
        self.promiscuous = promiscuous
        self.batch = batch
        self.capture_stats = CaptureStats()
        self.stats = LiveStats(self.capture_stats)
        self.decap = Decapsulator(self.capture_stats.decap)
        self.tcp = TcpReassembler(self.capture_stats.tcp)
        self.extractor: SipExtractor | None = None

    def new_extractor(self, linktype: int) -> SipExtractor:
        """The extractor for frames of ``linktype``, over the shared decoders."""
        self.extractor = SipExtractor(
            linktype,
            self.capture_node,
            self.capture_stats,
            decapsulator=self.decap,
            reassembler=self.tcp,
            # The frame's time is this host's: HEP sniffed on a mirror port is held to
            # the same clock rule as the HEP listeners, other SIP needs none.
            max_hep_skew_s=hep.MAX_CLOCK_SKEW_S,
        )
        return self.extractor

    def count_callback_error(self, exc: Exception) -> None:
        self.stats.callback_errors += 1
        if self.stats.callback_errors == 1:
            # Logged once with the traceback; the counter carries the rest.
            _log.error("live_capture_callback_failed", interface=self.interface, exc_info=exc)

    def count_frame_error(self, exc: Exception) -> None:
        self.stats.frame_errors += 1
        if self.stats.frame_errors == 1:
            _log.error("live_capture_frame_failed", interface=self.interface, exc_info=exc)


class CaptureEngine(ABC):
    """How one engine captures; ``LiveCapture`` drives it and keeps the public state."""

    __slots__ = ("ctx",)

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx

    @abstractmethod
    async def start(self, loop: AbstractEventLoop) -> None:
        """Return once frames are being captured; raise ``LiveCaptureError`` if not."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop capturing and hand over what was already captured."""

    @abstractmethod
    def abort(self) -> None:
        """After a failed start: release whatever the start got as far as opening."""

    @abstractmethod
    def halt(self) -> None:
        """After a failure: stop reading at once (what can still stop)."""

    @abstractmethod
    def flush(self) -> None:
        """Hand over SIP messages decoded but not yet given to the callback."""

    @abstractmethod
    def poll_stats(self) -> None:
        """Bring counters kept outside the process (the kernel's) up to date."""
