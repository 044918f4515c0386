"""Live capture from a network interface (a SPAN/mirror port, or loopback in tests).

``LiveCapture`` reads frames from one interface, runs each through the same
``SipExtractor`` that reads capture files (decapsulation, IP fragment and TCP stream
reassembly, SIP recognition by content, HEP unwrapping) and hands every SIP message
to a callback, normally ``Pipeline.process``, on the event loop's thread.

Two engines, chosen per capture, each in its module: ``af_packet`` (Linux, needs
CAP_NET_RAW; a raw socket read on the event loop behind a kernel filter: use it on Linux
collectors) and ``pyshark_engine`` (dumpcap and tshark, decoded in a worker thread: for
hosts without AF_PACKET or root). ``bpf`` holds the kernel filters, ``base`` what the
engines share: errors, counters and the ``EngineContext`` this facade hands them.

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

Loopback delivers every packet twice to a capture socket (outgoing and incoming);
both engines keep only the incoming copy. On other interfaces outgoing frames are kept:
a collector that runs on the SIP host itself sees the host's own replies only that way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final, Literal

import structlog

from sipcdr.capture.live.af_packet import DEFAULT_BATCH, AfPacketEngine
from sipcdr.capture.live.base import (
    DEFAULT_RCVBUF_BYTES,
    CaptureEngine,
    EngineContext,
    LiveCaptureError,
    LiveStats,
)
from sipcdr.capture.live.bpf import DEFAULT_BPF_FILTER
from sipcdr.capture.live.pyshark_engine import PysharkEngine
from sipcdr.clock import SYSTEM_CLOCK, Clock
from sipcdr.model import Packet

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_BPF_FILTER",
    "DEFAULT_RCVBUF_BYTES",
    "ENGINES",
    "Engine",
    "LiveCapture",
    "LiveCaptureError",
    "LiveStats",
]

Engine = Literal["af_packet", "pyshark"]
ENGINES: Final[tuple[Engine, ...]] = ("af_packet", "pyshark")

_log = structlog.get_logger("sipcdr")


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
        clock: Clock = SYSTEM_CLOCK,
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
        self._ctx = EngineContext(
            interface,
            on_packet,
            self._fail,
            bpf_filter=self.bpf_filter,
            rcvbuf_bytes=rcvbuf_bytes,
            capture_node=self.capture_node,
            promiscuous=promiscuous,
            batch=batch,
            clock=clock,
        )
        self._engine: CaptureEngine = (
            AfPacketEngine(self._ctx) if engine == "af_packet" else PysharkEngine(self._ctx)
        )
        self._done: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._started = False
        self._stopped = False

    # -- public API -----------------------------------------------------------------------

    @property
    def stats(self) -> LiveStats:
        """Live counters; reading them also collects the kernel's (af_packet)."""
        self._engine.poll_stats()
        return self._ctx.stats

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
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        # wait() may never be called; the failure has been logged by then.
        self._done.add_done_callback(_retrieve)
        try:
            await self._engine.start(loop)
        except BaseException:
            self._stopped = True
            self._engine.abort()
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
        await self._engine.stop()
        if self._ctx.extractor is not None:
            self._ctx.extractor.close()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        stats = self._ctx.stats
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
        self._engine.flush()

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
        self._engine.halt()
        _log.error(
            "live_capture_failed",
            interface=self.interface,
            engine=self.engine,
            error=str(exc) or repr(exc),
        )
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
