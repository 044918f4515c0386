"""The daemon: builds the components from a Config, starts them in order, and on
SIGTERM/SIGINT stops intake, checkpoints open dialogs, flushes every sink and exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from sipcdr.antifraud import DaemonFraud
from sipcdr.capture import live, tls
from sipcdr.capture.hepstream import HepStreamServer, StreamLimits
from sipcdr.capture.listeners import (
    AllowList,
    HepGate,
    HepUdpProtocol,
    SipUdpProtocol,
    udp_drops,
    udp_socket,
)
from sipcdr.capture.live import LiveCapture
from sipcdr.config import CaptureConfig, Config, output_settings
from sipcdr.dialog import Correlator
from sipcdr.dialogstore import DialogStore
from sipcdr.enrich.trunks import trunk_resolver
from sipcdr.hotpath import hot_path
from sipcdr.pipeline import Pipeline
from sipcdr.private import prepare_state_dir
from sipcdr.sinks.base import STREAM_RECORDS
from sipcdr.sinks.outputs import Outputs
from sipcdr.spare import SPARE_NAME, SpareSpace, same_filesystem
from sipcdr.storage.embedded import EMBEDDED_DATA_SUBDIR
from sipcdr.telemetry.http import MetricsServer
from sipcdr.telemetry.metrics import Metrics

TICK_S = 1.0  # timers, metric batches and sink flushes: once a second
# Intake resumes only once what paused it has been gone this long: a disk that took the
# reserve back must go on taking writes before new calls come in again.
RESUME_AFTER_S = 5.0
# A pause that follows a resume within this long doubles the wait before the next
# resume, up to this long: a disk at the edge does not make intake flap.
RESUME_AFTER_MAX_S = 300.0
# Descriptors kept free of HEP/TCP and HEP/TLS connections: spool segments, JSONL files,
# sink and database connections, listeners, the metrics endpoint and the event loop's
# own, with room to spare (a running daemon holds well under 100 of them).
FD_HEADROOM = 256


def raise_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (an unprivileged process may);
    returns (soft, hard) as they are afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft, hard
        soft = hard
    return soft, hard


def stream_limits(capture: CaptureConfig, file_limit: int) -> StreamLimits:
    """The configured connection limits, with the total lowered to what `file_limit`
    holds next to everything else the daemon opens (a quarter of a limit too small for
    the headroom): running out of descriptors would stall the spool and the sinks, not
    only the listeners."""
    capacity = max(file_limit - FD_HEADROOM, file_limit // 4)
    return StreamLimits(
        max_connections=min(capture.hep_tcp_max_connections, capacity),
        max_per_source=capture.hep_tcp_max_per_source,
        idle_timeout_s=capture.hep_tcp_idle_timeout_s,
        frame_timeout_s=capture.hep_tcp_frame_timeout_s,
        max_buffer_bytes=capture.hep_tcp_max_buffer_bytes,
    )


class IntakeGate:
    """Pauses intake while a reason to refuse new calls holds, and resumes it only once
    the reason has been gone for `RESUME_AFTER_S`, doubled for each pause that comes
    within `RESUME_AFTER_MAX_S` of the last resume (up to that): at the edge of a full
    disk, intake stays paused for longer stretches instead of flapping."""

    def __init__(self, pipeline: Pipeline, clock: Callable[[], float] = time.monotonic) -> None:
        self.pipeline = pipeline
        self.log = structlog.get_logger("sipcdr")
        self.resume_after_s = RESUME_AFTER_S
        self._clock = clock
        self._paused_at = 0.0
        self._reason_seen_at = 0.0  # the last check that found a reason to pause
        self._resumed_at = float("-inf")
        self._refused_at_pause = 0

    def update(self, reason: str | None) -> None:
        pipeline = self.pipeline
        now = self._clock()
        if reason is not None:
            self._reason_seen_at = now
            if not pipeline.paused:
                if now - self._resumed_at < RESUME_AFTER_MAX_S:
                    self.resume_after_s = min(RESUME_AFTER_MAX_S, self.resume_after_s * 2)
                else:
                    self.resume_after_s = RESUME_AFTER_S
                pipeline.pause_reason = reason
                pipeline.paused = True
                self._paused_at = now
                self._refused_at_pause = self._refused()
                # New calls are refused from now on: calls lost, hence ERROR.
                self.log.error("intake_paused", reason=reason, resume_after_s=self.resume_after_s)
            elif reason != pipeline.pause_reason:
                pipeline.pause_reason = reason
                self.log.warning("intake_pause_reason_changed", reason=reason)
            return
        if not pipeline.paused or now - self._reason_seen_at < self.resume_after_s:
            return
        pipeline.paused = False
        self._resumed_at = now
        self.log.info(
            "intake_resumed",
            paused_s=round(now - self._paused_at, 1),
            calls_refused=self._refused() - self._refused_at_pause,
        )

    def _refused(self) -> int:
        drops = self.pipeline.drops
        return sum(count for (source, _reason), count in drops.items() if source == "intake")


class App:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.log = structlog.get_logger("sipcdr")
        self.metrics = Metrics()
        self._build()
        self._allow = AllowList(config.capture.allow)
        self._gate = HepGate(config.capture.hep_keys)
        self._metrics_server = MetricsServer(
            self.metrics.registry,
            config.metrics.listen.host,
            config.metrics.listen.port,
            ready=lambda: self._ready,
            refused=self.metrics.metrics_connections_refused,
        )
        self._ticker: asyncio.Task[None] | None = None
        self._ready = False
        self._started = False
        self._stopped = False
        self._failed_start = False
        self._file_limit = (0, 0)  # (soft, hard) RLIMIT_NOFILE once started
        self._reset_inputs()

    def _build(self) -> None:
        """The components that hold calls and CDRs. Built anew for a start tried again
        after one failed, which then recovers from disk what the failed one saved."""
        config = self.config
        self.correlator = Correlator(config.dialog, trunk_resolver(config.trunks))
        self.outputs = Outputs(output_settings(config))
        # The CDR writer and the signaling recorder exist once the spools are open.
        self.pipeline = Pipeline(self.correlator, (), self.metrics)
        self.spare = SpareSpace(self.state_dir / SPARE_NAME, config.state.spare_bytes)
        self.dialogs = DialogStore(
            self.state_dir,
            self.correlator,
            checkpoint_interval_s=config.state.checkpoint_interval_s,
            # One power-loss bound for CDRs and for the call changes behind them.
            fsync_interval_s=config.spool.fsync_interval_ms / 1000,
            on_no_space=self._make_room,
        )
        self.intake = IntakeGate(self.pipeline)
        self._spare_releases_exported = 0
        self.fraud: DaemonFraud | None = None  # built once the spool for its alerts is open

    def _reset_inputs(self) -> None:
        self._hep_stream: HepStreamServer | None = None
        self._transports: list[asyncio.DatagramTransport] = []
        self._udp: list[tuple[str, socket.socket]] = []
        self._udp_drops: dict[int, int] = {}
        self._live: list[LiveCapture] = []
        self._live_seen: dict[tuple[str, str], int] = {}
        self._live_tasks: list[asyncio.Task[None]] = []
        self.bound: dict[str, list[tuple[str, int]]] = {
            "sip_udp": [],
            "hep_udp": [],
            "hep_tcp": [],
            "hep_tls": [],
        }

    @property
    def state_dir(self) -> Path:
        return Path(self.config.state.dir)

    @property
    def metrics_port(self) -> int:
        return self._metrics_server.port

    async def start(self) -> None:
        if self._started:
            return
        if self._failed_start:
            # What the failed start saved is read back from disk, like after a stop.
            self._build()
            self._reset_inputs()
        self._started = True
        prepare_state_dir(self.state_dir, leave=(EMBEDDED_DATA_SUBDIR,))
        # Before anything is opened: the spool, the sinks and the listeners all share it.
        self._file_limit = raise_file_limit()
        # Reads only: until the store starts, a failed start leaves every file as it was.
        self.dialogs.recover()
        try:
            # Room for a full disk, set aside while there is some.
            self.spare.ensure()
            # Sinks before inputs: a CDR must have its spool before the first packet.
            await self.outputs.open()
            self._connect_outputs()
            # The store opens its journal, then writes the CDRs a crash or a stop left
            # unwritten (their closes journaled as the spool takes them), then a
            # checkpoint that holds what the spool could not take.
            await self.dialogs.start(self.pipeline.emit)
            self.pipeline.journal = self.dialogs.message
            self.pipeline.decided = self.dialogs.decided
            self.intake.update(self._intake_block_reason())  # a full disk: before any call
            await self._open_inputs()
            await self._metrics_server.start()
        except BaseException:
            # The calls stay on disk for the next start (the store's checkpoint, or the
            # files it would have replaced); nothing was captured yet.
            for capturer in self._live:
                with contextlib.suppress(Exception):
                    await capturer.stop()
            self._close_inputs()
            if self._hep_stream is not None:
                with contextlib.suppress(Exception):
                    await self._hep_stream.stop()
            await self._metrics_server.stop()
            await self._save_and_close(drain_timeout_s=0)
            self._started = False
            self._failed_start = True
            raise
        self._ticker = asyncio.create_task(self._tick(), name="sipcdr-tick")
        self._ticker.add_done_callback(self._background_failed)
        self._ready = True
        self.log.info(
            "started",
            listeners={kind: [f"{h}:{p}" for h, p in eps] for kind, eps in self.bound.items()},
            metrics_port=self.metrics_port,
            open_dialogs=self.correlator.open_dialogs,
            # What the file limit holds: HEP/TCP+TLS connections beyond this are refused.
            file_limit=self._file_limit[0],
            hep_connections_max=(
                None if self._hep_stream is None else self._hep_stream.limits.max_connections
            ),
            pid=os.getpid(),
            # "compiled", or "interpreted" and why: forced, stale (edited since), not_built
            hot_path=hot_path()[0],
            hot_path_reason=hot_path()[1] or None,
        )

    def _connect_outputs(self) -> None:
        """Wire the spools to the pipeline, the dialog store and the spare file."""
        outputs = self.outputs
        self.pipeline.sinks = tuple(outputs.cdr_sinks())
        self.pipeline.signaling = outputs.signaling
        writer = outputs.cdr_writer
        if writer is not None:
            # A CDR's close is journaled once its bytes are in the spool file; the ones
            # the spool holds in memory go into every checkpoint instead.
            writer.on_written = self.dialogs.closed
            self.dialogs.held = writer.held
        self._connect_fraud()
        records = outputs.spools.get(STREAM_RECORDS)
        if records is not None and same_filesystem(records.directory, self.state_dir):
            records.on_no_space = self._make_room

    def _connect_fraud(self) -> None:
        """The fraud stage in the chain, before the correlator (messages) and after it
        (CDRs), its alerts into the records spool with the CDRs."""
        self.fraud = DaemonFraud.build(self.config, self.outputs.alert_writer)
        if self.fraud is not None:
            stage = self.fraud.stage
            self.pipeline.message_stages = (*self.pipeline.message_stages, stage)
            self.pipeline.cdr_stages = (*self.pipeline.cdr_stages, stage)

    def _fraud_step(self, step: Callable[[DaemonFraud], object]) -> Callable[[], object]:
        return lambda: None if self.fraud is None else step(self.fraud)

    def _make_room(self) -> bool:
        """A write was refused for want of space: give up the spare and, from this very
        message on, refuse new calls, so that its room goes to the calls already open."""
        if not self.spare.release():
            return False
        if self.outputs.blocks_intake:
            self.intake.update("write_error")
        return True

    async def _save_and_close(self, drain_timeout_s: float | None = None) -> None:
        """A last checkpoint, then the outputs closed. CDRs the spool still holds in
        memory stay out of it when the dialog state on disk keeps them (the checkpoint
        just written, or the journal): the next start writes them. Otherwise the spool
        tries once more and counts what it cannot write as lost."""
        try:
            kept = await self.dialogs.stop()
        except Exception as exc:
            kept = False
            self.log.error("stop_step_failed", step="save_dialogs", error=repr(exc))
        writer = self.outputs.cdr_writer
        if kept and writer is not None:
            held = writer.take_held()
            if held:
                # Nothing lost: written at the next start, under the same cdr_id.
                self.log.warning("cdrs_kept_for_next_start", cdrs=len(held))
        try:
            # Every CDR is in the spool or the dialog state by now; this delivers what
            # the sinks can take.
            if drain_timeout_s is None:
                await self.outputs.close()
            else:
                await self.outputs.close(drain_timeout_s=drain_timeout_s)
        except Exception as exc:
            self.log.error("stop_step_failed", step="close_outputs", error=repr(exc))

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
        if capture.hep_tcp or capture.hep_tls:
            context = None
            if capture.hep_tls:
                # Checked when the config was loaded; loaded again here, so a file
                # replaced since is read as it is now.
                assert capture.tls_cert is not None and capture.tls_key is not None
                context = tls.server_context(
                    capture.tls_cert, capture.tls_key, capture.tls_client_ca
                )
                if tls.key_exposed(capture.tls_key):
                    # Whoever reads the key can pose as this daemon to every agent.
                    self.log.warning(
                        "tls_key_readable",
                        tls_key=str(capture.tls_key),
                        hint="chmod 600 the key file (owned by the daemon's user)",
                    )
            self._hep_stream = HepStreamServer(
                self.pipeline,
                self._allow,
                self._gate,
                self._stream_limits(),
                tcp=capture.hep_tcp,
                tls=capture.hep_tls,
                tls_context=context,
            )
            await self._hep_stream.start()
            if self._hep_stream.sweeper is not None:
                self._hep_stream.sweeper.add_done_callback(self._background_failed)
            for kind, endpoints in self._hep_stream.bound.items():
                self.bound[kind].extend(endpoints)
        for interface in capture.interfaces:
            await self._start_live(interface)

    def _stream_limits(self) -> StreamLimits:
        capture = self.config.capture
        soft, hard = self._file_limit
        limits = stream_limits(capture, soft)
        if limits.max_connections < capture.hep_tcp_max_connections:
            self.log.warning(
                "file_limit_low",
                file_limit=soft,
                hard_limit=hard,
                hep_tcp_max_connections=capture.hep_tcp_max_connections,
                capped_at=limits.max_connections,
                hint="raise LimitNOFILE (systemd) or ulimit -n",
            )
        return limits

    def _close_inputs(self) -> None:
        for transport in self._transports:
            transport.close()
        if self._hep_stream is not None:
            self._hep_stream.close()

    async def _start_live(self, interface: str) -> None:
        capture = self.config.capture
        if capture.bpf_filter is None:
            bpf_filter: str | None = live.DEFAULT_BPF_FILTER
        else:
            bpf_filter = capture.bpf_filter or None  # "": every frame
        # No allow-list here: on a mirror port the sources are the carriers themselves.
        capturer = live.LiveCapture(
            interface,
            self.pipeline.process,
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

    def _count_live(self) -> None:
        pipeline = self.pipeline
        for capturer in self._live:
            stats = capturer.stats
            for name, total in (
                ("sip", stats.sip_packets),
                ("kernel_drop", stats.kernel_drops),
                ("backlog_full", stats.pending_dropped),
                ("callback_error", stats.callback_errors),
                ("hep_clock_skew", stats.capture.hep_clock_skew),
            ):
                key = (capturer.interface, name)
                delta = total - self._live_seen.get(key, 0)
                if delta > 0:
                    self._live_seen[key] = total
                    if name == "sip":
                        pipeline.count_received("live", delta)
                    elif name == "hep_clock_skew":
                        pipeline.hep_clock_skew += delta
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
            ("fraud", self._fraud_step(lambda fraud: fraud.tick(now))),
            ("flush_sinks", self.pipeline.flush),
            ("spare", self._keep_spare),
            ("intake_gate", lambda: self.intake.update(self._intake_block_reason())),
            ("export_delivery_metrics", lambda: self.outputs.export_metrics(self.metrics)),
            ("export_dialog_state_metrics", lambda: self.dialogs.export_metrics(self.metrics)),
            ("export_metrics", self._export_metrics),
            ("export_fraud_metrics", self._fraud_step(lambda f: f.export_metrics(self.metrics))),
        ]
        for name, step in steps:
            try:
                step()
            except Exception as exc:
                self.log.error("tick_step_failed", step=name, error=repr(exc))

    def _keep_spare(self) -> None:
        """Allocate the spare again once the disk has room, and the reserve is empty."""
        writer = self.outputs.cdr_writer
        if writer is None or not writer.spool.reserved:
            self.spare.ensure()

    def _intake_block_reason(self) -> str | None:
        reason = self.outputs.intake_block_reason
        if reason is None and self.spare.released and self.outputs.blocks_intake:
            # The disk refused a write and only the spare's room is left: it is for the
            # calls already open.
            reason = "write_error"
        return reason

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
        self.metrics.spare_bytes.set(self.spare.bytes_held)
        delta = self.spare.releases - self._spare_releases_exported
        if delta > 0:
            self._spare_releases_exported = self.spare.releases
            self.metrics.spare_released.inc(delta)
        self.metrics.intake_paused.set(1 if self.pipeline.paused else 0)
        for capture_id, count in self._gate.rejected.items():
            self.metrics.hep_rejected.labels(capture_id).inc(count)
        self._gate.rejected.clear()
        if self._hep_stream is not None:
            self._export_stream_metrics(self._hep_stream)
        self.pipeline.flush_metrics()

    def _export_stream_metrics(self, stream: HepStreamServer) -> None:
        metrics = self.metrics
        for (source, reason), count in stream.refused.items():
            metrics.hep_connections_refused.labels(source, reason).inc(count)
        stream.refused.clear()
        for (source, reason), count in stream.closed.items():
            metrics.hep_connections_closed.labels(source, reason).inc(count)
        stream.closed.clear()
        for reason, count in stream.handshake_failures.items():
            metrics.hep_tls_handshake_failures.labels(reason).inc(count)
        stream.handshake_failures.clear()
        for source, count in stream.open.items():
            metrics.hep_connections.labels(source).set(count)

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
        if self._hep_stream is not None:
            await self._hep_stream.stop()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._ticker
        # Each step on its own: a failure in one must not skip the others. CDRs first,
        # since they are what a stop must never lose.
        steps: list[tuple[str, Callable[[], object]]] = [
            ("expire", lambda: self.pipeline.expire(time.time())),
            ("flush_sinks", self.pipeline.flush),
            ("save_fraud_baselines", self._fraud_step(DaemonFraud.save)),
        ]
        for name, step in steps:
            try:
                step()
            except Exception as exc:
                self.log.error("stop_step_failed", step=name, error=repr(exc))
        # A last checkpoint (on a full disk the older one and the journal stay), then
        # the sinks get what they can take.
        await self._save_and_close()
        for name, step in (
            ("export_metrics", lambda: self.outputs.export_metrics(self.metrics)),
            ("export_dialog_state_metrics", lambda: self.dialogs.export_metrics(self.metrics)),
            ("flush_metrics", self.pipeline.flush_metrics),
            ("export_fraud_metrics", self._fraud_step(lambda f: f.export_metrics(self.metrics))),
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
    except (OSError, live.LiveCaptureError, tls.TlsSetupError) as exc:
        # Typically a listener address already in use or not local, or a TLS file
        # replaced since the config was checked: say which, plainly.
        structlog.get_logger("sipcdr").error("start_failed", error=str(exc))
        return 1
