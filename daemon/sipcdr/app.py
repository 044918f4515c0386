"""The daemon: builds the components from a Config, starts them in order, and on
SIGTERM/SIGINT stops intake, persists open dialogs, flushes every sink and exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from sipcdr.capture import live
from sipcdr.capture.listeners import (
    MAX_CLOCK_SKEW_S,
    AllowList,
    HepGate,
    HepTcpServer,
    HepUdpProtocol,
    SipUdpProtocol,
    udp_drops,
    udp_socket,
)
from sipcdr.capture.live import LiveCapture
from sipcdr.config import Config, trunk_resolver
from sipcdr.dialog import Correlator
from sipcdr.model import Packet
from sipcdr.pipeline import Pipeline
from sipcdr.sinks.outputs import Outputs
from sipcdr.telemetry.http import MetricsServer
from sipcdr.telemetry.metrics import Metrics

DIALOG_SNAPSHOT = "dialogs.json"  # open calls at shutdown, read back at start
TICK_S = 1.0  # timers, metric batches and sink flushes: once a second


class App:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.log = structlog.get_logger("sipcdr")
        self.metrics = Metrics()
        self.correlator = Correlator(config.dialog, trunk_resolver(config))
        self.outputs = Outputs(config)
        # The CDR writer and the signaling recorder exist once the spools are open.
        self.pipeline = Pipeline(self.correlator, (), self.metrics)
        self._allow = AllowList(config.capture.allow)
        self._gate = HepGate(config.capture.hep_keys)
        self._hep_tcp = HepTcpServer(self.pipeline, self._allow, self._gate)
        self._transports: list[asyncio.DatagramTransport] = []
        self._udp: list[tuple[str, socket.socket]] = []
        self._udp_drops: dict[int, int] = {}
        self._servers: list[asyncio.Server] = []
        self._metrics_server = MetricsServer(
            self.metrics.registry,
            config.metrics.listen.host,
            config.metrics.listen.port,
            ready=lambda: self._ready,
        )
        self._live: list[LiveCapture] = []
        self._live_seen: dict[tuple[str, str], int] = {}
        self._live_tasks: list[asyncio.Task[None]] = []
        self._ticker: asyncio.Task[None] | None = None
        self._ready = False
        self._started = False
        self._stopped = False
        self.bound: dict[str, list[tuple[str, int]]] = {"sip_udp": [], "hep_udp": [], "hep_tcp": []}

    @property
    def state_dir(self) -> Path:
        return Path(self.config.state.dir)

    @property
    def metrics_port(self) -> int:
        return self._metrics_server.port

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.state_dir.mkdir(parents=True, exist_ok=True)
        snapshot = self._restore_dialogs()
        try:
            # Sinks before inputs: a CDR must have its spool before the first packet.
            await self.outputs.open()
            self.pipeline.sinks = tuple(self.outputs.cdr_sinks())
            self.pipeline.signaling = self.outputs.signaling
            await self._open_inputs()
            await self._metrics_server.start()
        except BaseException:
            # The snapshot stays on disk for the next start; nothing was captured yet.
            self._close_inputs()
            await self._metrics_server.stop()
            await self.outputs.close(drain_timeout_s=0)
            self._started = False
            raise
        if snapshot is not None:
            # Consumed only now: a start that failed must not lose the calls in it.
            snapshot.unlink(missing_ok=True)
        self._ticker = asyncio.create_task(self._tick(), name="sipcdr-tick")
        self._ticker.add_done_callback(self._background_failed)
        self._ready = True
        self.log.info(
            "started",
            listeners={kind: [f"{h}:{p}" for h, p in eps] for kind, eps in self.bound.items()},
            metrics_port=self.metrics_port,
            open_dialogs=self.correlator.open_dialogs,
            pid=os.getpid(),
        )

    async def _open_inputs(self) -> None:
        loop = asyncio.get_running_loop()
        capture = self.config.capture
        for endpoint in capture.sip_udp:
            sock = udp_socket(endpoint.host, endpoint.port, capture.rcvbuf_bytes)
            local = sock.getsockname()[:2]
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(SipUdpProtocol, self.pipeline, self._allow, local), sock=sock
            )
            self._register_udp("sip_udp", sock, transport)
        for endpoint in capture.hep_udp:
            sock = udp_socket(endpoint.host, endpoint.port, capture.rcvbuf_bytes)
            transport, _ = await loop.create_datagram_endpoint(
                lambda: HepUdpProtocol(self.pipeline, self._allow, self._gate), sock=sock
            )
            self._register_udp("hep_udp", sock, transport)
        for endpoint in capture.hep_tcp:
            server = await asyncio.start_server(self._hep_tcp.handle, endpoint.host, endpoint.port)
            self._servers.append(server)
            for sock in server.sockets:
                self.bound["hep_tcp"].append(tuple(sock.getsockname()[:2]))
        for interface in capture.interfaces:
            await self._start_live(interface)

    def _close_inputs(self) -> None:
        for transport in self._transports:
            transport.close()
        for server in self._servers:
            server.close()
        self._hep_tcp.close_connections()

    async def _start_live(self, interface: str) -> None:
        capture = self.config.capture
        if capture.bpf_filter is None:
            bpf_filter: str | None = live.DEFAULT_BPF_FILTER
        else:
            bpf_filter = capture.bpf_filter or None  # "": every frame
        # No allow-list here: on a mirror port the sources are the carriers themselves.
        capturer = live.LiveCapture(
            interface,
            self._live_packet,
            engine="pyshark" if capture.live_engine == "pyshark" else "af_packet",
            bpf_filter=bpf_filter,
            rcvbuf_bytes=capture.rcvbuf_bytes,
            promiscuous=capture.promiscuous,
        )
        await capturer.start()
        self._live.append(capturer)
        task = asyncio.create_task(capturer.wait(), name=f"sipcdr-live-{interface}")
        task.add_done_callback(self._background_failed)
        self._live_tasks.append(task)
        self.bound.setdefault("live", []).append((interface, 0))

    def _live_packet(self, packet: Packet) -> None:
        # HEP sniffed on a mirror port carries its agent's clock: the same check as the
        # HEP listeners, so a skewed agent cannot close live calls this way either.
        now = time.time()
        if abs(packet.timestamp - now) > MAX_CLOCK_SKEW_S:
            packet = packet._replace(timestamp=now)
            self.pipeline.hep_clock_skew += 1
        self.pipeline.process(packet)

    def _count_live(self) -> None:
        pipeline = self.pipeline
        for capturer in self._live:
            stats = capturer.stats
            for name, total in (
                ("sip", stats.sip_packets),
                ("kernel_drop", stats.kernel_drops),
                ("backlog_full", stats.pending_dropped),
                ("callback_error", stats.callback_errors),
            ):
                key = (capturer.interface, name)
                delta = total - self._live_seen.get(key, 0)
                if delta > 0:
                    self._live_seen[key] = total
                    if name == "sip":
                        pipeline.count_received("live", delta)
                    else:
                        pipeline.drops[("live", name)] = (
                            pipeline.drops.get(("live", name), 0) + delta
                        )

    def _register_udp(
        self, kind: str, sock: socket.socket, transport: asyncio.DatagramTransport
    ) -> None:
        self._transports.append(transport)
        self._udp.append((kind, sock))
        self.bound[kind].append(tuple(sock.getsockname()[:2]))

    def _background_failed(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.log.error("background_task_failed", task=task.get_name(), error=repr(exc))

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.tick(time.time())
            except Exception as exc:  # a full disk must not stop the timers for good
                self.log.error("tick_failed", error=repr(exc))

    def tick(self, now: float) -> None:
        """Timers, sink flushes and metric batches; called once a second. Each step on
        its own: a full disk must not freeze the metrics that would show it."""
        steps: list[tuple[str, Callable[[], object]]] = [
            ("expire", lambda: self.pipeline.expire(now)),
            ("flush_sinks", self.pipeline.flush),
            ("intake_gate", self._gate_intake),
            ("export_delivery_metrics", lambda: self.outputs.export_metrics(self.metrics)),
            ("export_metrics", self._export_metrics),
        ]
        for name, step in steps:
            try:
                step()
            except Exception as exc:
                self.log.error("tick_step_failed", step=name, error=repr(exc))

    def _gate_intake(self) -> None:
        reason = self.outputs.intake_block_reason
        pipeline = self.pipeline
        if reason is not None and (not pipeline.paused or reason != pipeline.pause_reason):
            pipeline.pause_reason = reason
            pipeline.paused = True
            self.log.error("intake_paused", reason=reason)
        elif reason is None and pipeline.paused:
            pipeline.paused = False
            self.log.info("intake_resumed")

    def _export_metrics(self) -> None:
        self._count_live()
        for kind, sock in self._udp:
            total = udp_drops(sock)
            if total is not None:
                delta = total - self._udp_drops.get(sock.fileno(), 0)
                self._udp_drops[sock.fileno()] = total
                if delta > 0:
                    self.pipeline.drops[(kind, "rcvbuf_overflow")] = (
                        self.pipeline.drops.get((kind, "rcvbuf_overflow"), 0) + delta
                    )
        for capture_id, count in self._gate.rejected.items():
            self.metrics.hep_rejected.labels(capture_id).inc(count)
        self._gate.rejected.clear()
        self.pipeline.flush_metrics()

    async def stop(self) -> None:
        """Idempotent. Intake first, so nothing arrives while state is written."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        self._ready = False
        for capturer in self._live:
            await capturer.stop()
        self._count_live()
        self._close_inputs()
        for server in self._servers:
            await server.wait_closed()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._ticker
        # Each step on its own: a failure in one must not skip the others. CDRs first,
        # since they are what a stop must never lose.
        steps: list[tuple[str, Callable[[], object]]] = [
            ("expire", lambda: self.pipeline.expire(time.time())),
            ("flush_sinks", self.pipeline.flush),
            ("persist_dialogs", self._persist_dialogs),
        ]
        for name, step in steps:
            try:
                step()
            except Exception as exc:
                self.log.error("stop_step_failed", step=name, error=repr(exc))
        try:
            # Every CDR is in the spool by now; this delivers what the sinks can take.
            await self.outputs.close()
        except Exception as exc:
            self.log.error("stop_step_failed", step="close_outputs", error=repr(exc))
        for name, step in (
            ("export_metrics", lambda: self.outputs.export_metrics(self.metrics)),
            ("flush_metrics", self.pipeline.flush_metrics),
        ):
            try:
                step()
            except Exception as exc:
                self.log.error("stop_step_failed", step=name, error=repr(exc))
        await self._metrics_server.stop()
        self.log.info(
            "stopped",
            cdrs=self.pipeline.cdrs_written,
            open_dialogs_saved=self.correlator.open_dialogs,
        )

    def _persist_dialogs(self) -> None:
        path = self.state_dir / DIALOG_SNAPSHOT
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as handle:
            handle.write(self.correlator.snapshot())
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)

    def _restore_dialogs(self) -> Path | None:
        """Read the open calls saved at the last stop; returns the file to delete once
        the start has succeeded (a crash after that must not restore them twice)."""
        path = self.state_dir / DIALOG_SNAPSHOT
        if not path.exists():
            return None
        try:
            count = self.correlator.restore(path.read_bytes())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Unreadable state must not stop capture; the calls in it get no CDR.
            self.log.error("dialog_snapshot_unreadable", path=str(path), error=str(exc))
            path.rename(path.with_suffix(".unreadable"))
            return None
        self.log.info("dialogs_restored", count=count)
        return path

    async def __aenter__(self) -> App:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


async def serve(config: Config) -> int:
    """`sipcdr run`: start, wait for SIGTERM/SIGINT, stop cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with App(config):
        await stop.wait()
    return 0


def run(config: Config) -> int:
    try:
        import uvloop  # noqa: PLC0415 - optional: the daemon runs on plain asyncio too
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        return runner(serve(config))
    except (OSError, live.LiveCaptureError) as exc:
        # Typically a listener address already in use or not local: say which, plainly.
        structlog.get_logger("sipcdr").error("start_failed", error=str(exc))
        return 1
