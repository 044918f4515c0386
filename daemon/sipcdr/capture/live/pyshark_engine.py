"""The ``pyshark`` engine, wherever Wireshark's dumpcap can capture (also without root
when dumpcap has its capabilities or group).

dumpcap captures (same filter, ``-B`` buffer) and writes pcapng to a pipe that tshark
decodes through pyshark's ``PipeCapture`` in a worker thread; the raw frame bytes go to
the same extractor there, and SIP messages are handed to the loop in batches
(``call_soon_threadsafe``, one wake-up per batch). tshark prints EK (one line per
packet, so a quiet link's last message is not held back as pyshark's JSON parser holds
it until the next packet) with only the frame layer and no IP dissection, which is what
makes it 6x faster than pyshark's defaults. The worker holds the GIL for most of its
time, slowing the rest of the daemon with it. Use it only where AF_PACKET is not
available, on links that carry little else.

Timestamps are dumpcap's, one per frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import math
import re
import shutil
import subprocess
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any, Final

import structlog

from sipcdr.capture.live.base import SNAPLEN, CaptureEngine, EngineContext, LiveCaptureError
from sipcdr.decode.link import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
)
from sipcdr.model import Packet

__all__ = ["MAX_PENDING", "START_TIMEOUT_S", "STOP_TIMEOUT_S", "PysharkEngine"]

# dumpcap usually reports that it captures within a second; tshark's start is not on
# this path.
START_TIMEOUT_S: Final = 15.0
# On stop, tshark drains what dumpcap flushed; it has this long before it is killed.
STOP_TIMEOUT_S: Final = 10.0
# SIP messages decoded by the pyshark worker but not yet taken by the loop: about ten
# seconds of that engine's throughput. Beyond this they are dropped and counted.
MAX_PENDING: Final = 65536

_log = structlog.get_logger("sipcdr")


class PysharkEngine(CaptureEngine):
    """Frames from dumpcap through tshark and pyshark, decoded in a worker thread."""

    __slots__ = (
        "_delivery_scheduled",
        "_dumpcap",
        "_dumpcap_stderr",
        "_exit_collected",
        "_exit_lock",
        "_loop",
        "_pending",
        "_pending_lock",
        "_stopping",
        "_worker",
        "_worker_capture",
        "_worker_loop",
    )

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx)
        self._loop: asyncio.AbstractEventLoop | None = None
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

    def abort(self) -> None:
        self._kill_dumpcap()
        self._close_dumpcap_pipes()

    def halt(self) -> None:
        """Nothing to do: the worker kills dumpcap itself before it reports a failure."""

    def flush(self) -> None:
        self._deliver()

    def poll_stats(self) -> None:
        """dumpcap reports the kernel's counts only when it exits."""

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
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
            "-i", self.ctx.interface,
            "-B", str(max(1, math.ceil(self.ctx.rcvbuf_bytes / (1 << 20)))),
            "-s", str(SNAPLEN),
            "-w", "-",
        ]  # fmt: skip
        if self.ctx.bpf_filter is not None:
            argv += ["-f", self.ctx.bpf_filter]
        if not self.ctx.promiscuous:
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
                f"dumpcap did not start capturing on {self.ctx.interface!r} within "
                f"{START_TIMEOUT_S:g} s: {self._dumpcap_tail()}"
            ) from None
        if not capturing:
            process.wait()
            raise LiveCaptureError(
                f"dumpcap cannot capture on {self.ctx.interface!r} (exit code "
                f"{process.returncode}): {self._dumpcap_tail()}"
            )
        assert process.stdout is not None
        self._worker = threading.Thread(
            target=self._pyshark_worker,
            args=(process.stdout.fileno(),),
            name=f"sipcdr-pyshark-{self.ctx.interface}",
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
                    f"dumpcap on {self.ctx.interface!r} exited with code {process.returncode}: "
                    f"{self._dumpcap_tail()}"
                )
        return f"tshark ended while capturing on {self.ctx.interface!r}"

    def _on_pyshark_packet(self, packet: Any) -> None:
        """Worker thread: one frame decoded by tshark."""
        stats = self.ctx.stats
        stats.frames_read += 1
        try:
            frame = bytes.fromhex(_ek_raw_frame(packet))
            if len(frame) > SNAPLEN:
                stats.truncated += 1
            extractor = self.ctx.extractor
            if extractor is None:
                # One dumpcap interface has one link type; the first frame tells it.
                extractor = self.ctx.new_extractor(_linktype_of(packet))
            found = extractor.feed(float(packet.sniff_timestamp), frame)
        except LiveCaptureError:
            raise
        except Exception as exc:  # one bad frame must not end capture
            self.ctx.count_frame_error(exc)
            return
        if found:
            self._hand_over(found)

    def _hand_over(self, packets: Sequence[Packet]) -> None:
        """Worker thread: queue for the loop; one wake-up per batch, not per message."""
        with self._pending_lock:
            room = MAX_PENDING - len(self._pending)
            if room < len(packets):
                self.ctx.stats.pending_dropped += len(packets) - max(room, 0)
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
        on_packet = self.ctx.on_packet
        for packet in batch:
            try:
                on_packet(packet)
            except Exception as exc:  # counted and logged
                self.ctx.count_callback_error(exc)
        self.ctx.stats.sip_packets += len(batch)

    def _worker_finished(self, error: BaseException | None) -> None:
        self._deliver()
        if error is not None:
            self._kill_dumpcap()
            self.ctx.fail(error)

    async def stop(self) -> None:
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
                    "live_capture_stop_timeout", interface=self.ctx.interface, engine="pyshark"
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
            self.ctx.stats.kernel_packets += int(match.group(1))
            self.ctx.stats.kernel_drops += int(match.group(2))


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
