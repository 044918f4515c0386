"""The daemon: builds the components from a Config, starts them in order, and on
SIGTERM/SIGINT stops intake, checkpoints open dialogs, flushes every sink and exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from sipcdr import engine as chain
from sipcdr.antifraud import DaemonFraud
from sipcdr.capture import live, tls
from sipcdr.capture.addresses import ListenerError, named_udp_socket, unbound_stream
from sipcdr.capture.hepstream import HepStreamServer, StreamLimits
from sipcdr.capture.hints import HintedHepUdpProtocol, HintedSipUdpProtocol, ListenerHints
from sipcdr.capture.listeners import AllowList, HepGate, ListenerStats, udp_drops
from sipcdr.capture.live import LiveCapture
from sipcdr.capture.mirror import VxlanUdpProtocol
from sipcdr.clock import SYSTEM_CLOCK, Clock
from sipcdr.config import Config, Endpoint, cdr_destinations, output_settings
from sipcdr.deliverer import DeliveryApart
from sipcdr.dialogstore import DialogStore
from sipcdr.hotpath import hot_path
from sipcdr.intake import IntakeGate
from sipcdr.limits import raise_file_limit, return_large_blocks, stream_limits
from sipcdr.pipeline import Intake, Pipeline
from sipcdr.privacy.stats import PrivacyStats
from sipcdr.privacy.task import PrivacyTask
from sipcdr.private import prepare_state_dir
from sipcdr.rates import RateDecks
from sipcdr.sinks.outputs import Outputs
from sipcdr.spare import SPARE_NAME, SpareRoom, SpareSpace
from sipcdr.storage.embedded import EMBEDDED_DATA_SUBDIR
from sipcdr.telemetry.http import MetricsServer
from sipcdr.telemetry.metrics import Metrics, Sources

TICK_S = 1.0  # timers, sink flushes and loss logging: once a second


class App:
    def __init__(self, config: Config, clock: Clock = SYSTEM_CLOCK, *, apart: bool = False) -> None:
        self.config = config
        self.delivery_apart = apart  # `sipcdr run`: as `[spool] delivery_processes` says
        self.clock = clock
        self.log = structlog.get_logger("sipcdr")
        # The listeners' counts, kept across a start tried again.
        self.listener_stats = ListenerStats()
        self.privacy_stats = PrivacyStats()
        self.metrics = Metrics(self._metric_sources)
        self._build()
        self._allow = AllowList(config.capture.allow)
        self._gate = HepGate(config.capture.hep_keys)
        self._metrics_server = MetricsServer(
            self.metrics.registry,
            config.metrics.listen.host,
            config.metrics.listen.port,
            ready=self.ready,
            clock=clock,
        )
        self._ticker: asyncio.Task[None] | None = None
        self._privacy: PrivacyTask | DeliveryApart | None = None
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
        self.correlator = chain.build_correlator(config)
        # Delivery in a process of its own (sipcdr.deliverer), or in this one.
        role = "capture" if self.delivery_apart else "all"
        self.outputs = Outputs(
            output_settings(config), restrictions=True, role=role, clock=self.clock
        )
        self.apart: DeliveryApart | None = None
        # Built once the outputs are open: its writers are their spools.
        self.engine: chain.Engine | None = None
        self.spare = SpareSpace(self.state_dir / SPARE_NAME, config.state.spare_bytes, self.clock)
        self.dialogs = DialogStore(
            self.state_dir,
            self.correlator,
            checkpoint_interval_s=config.state.checkpoint_interval_s,
            # One power-loss bound for CDRs and for the call changes behind them.
            fsync_interval_s=config.spool.fsync_interval_ms / 1000,
            on_no_space=self._make_room,
            clock=self.clock.monotonic,
            wall_clock=self.clock.time,
            batch_writes=config.state.journal_batch,
        )
        self.intake = IntakeGate(Intake(), self.clock.monotonic)
        self.spare_room = SpareRoom(self.spare)

    def _reset_inputs(self) -> None:
        self._hep_stream: HepStreamServer | None = None
        self._transports: list[asyncio.DatagramTransport] = []
        self._udp: list[tuple[str, socket.socket]] = []
        self._live: list[LiveCapture] = []
        self._live_tasks: list[asyncio.Task[None]] = []
        self.bound: dict[str, list[tuple[str, int]]] = {
            "sip_udp": [],
            "hep_udp": [],
            "hep_tcp": [],
            "hep_tls": [],
            "vxlan_udp": [],
        }
        self._hints = ListenerHints()
        self._vxlan: list[VxlanUdpProtocol] = []

    def _metric_sources(self) -> Sources:
        """What the metrics endpoint reads at each scrape: the components as they are
        now (a start tried again builds new ones)."""
        engine = self.engine
        return Sources(
            pipeline=None if engine is None else engine.pipeline,
            correlator=self.correlator,
            enrich=None if engine is None else engine.enrich.stats,
            trunks=[trunk.name for trunk in self.config.trunks],
            listeners=self.listener_stats,
            gate=self._gate,
            hep_stream=self._hep_stream,
            live=self._live,
            udp=self._udp,
            udp_drops=udp_drops,
            vxlan=self._vxlan,
            rating=None if engine is None else engine.rates.stage.stats,
            fraud=None if engine is None else engine.fraud,
            privacy=self.privacy_stats,
            outbound=self.outputs.outbound,
            outputs=self.outputs,
            dialogs=self.dialogs,
            spare=self.spare,
            metrics_server=self._metrics_server,
            delivery_process=None if self.apart is None else self.apart.process,
        )

    def _built(self) -> chain.Engine:
        assert self.engine is not None, "the engine is built by start()"
        return self.engine

    @property
    def pipeline(self) -> Pipeline:
        """What the capture adapters feed; exists once started."""
        return self._built().pipeline

    @property
    def rates(self) -> RateDecks:
        return self._built().rates

    @property
    def fraud(self) -> DaemonFraud | None:
        return None if self.engine is None else chain.daemon_fraud_of(self.engine)

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
        return_large_blocks()
        # Reads only: until the store starts, a failed start leaves every file as it was.
        self.dialogs.recover()
        try:
            # Room for a full disk, set aside while there is some.
            self.spare.ensure()
            # Sinks before inputs: a CDR must have its spool before the first packet.
            await self.outputs.open()
            if self.outputs.role == "capture":
                self.apart = DeliveryApart(self.config, self.outputs, self.privacy_stats)
                self.apart.launch()
            # The whole chain, writing into the spools just opened, journaling into the
            # dialog store, refusing new calls while the intake gate says so.
            self.engine = chain.build_engine(
                self.config,
                self.dialogs.ahead(chain.Destinations.of(self.outputs)),
                correlator=self.correlator,
                journal=chain.JournalHooks(self.dialogs.message, self.dialogs.decided),
                intake=self.intake.intake,
                daemon_fraud=True,
                clock=self.clock,
            )
            self._connect_outputs()
            # The store opens its journal, then writes the CDRs a crash or a stop left
            # unwritten (their closes journaled as the spool takes them), then a
            # checkpoint that holds what the spool could not take.
            await self.dialogs.start(self.engine.emit)
            self.intake.update(self._intake_block_reason())  # a full disk: before any call
            await (self.apart.ready() if self.apart is not None else asyncio.sleep(0))
            await self._open_inputs()
            try:
                await self._metrics_server.start()
            except OSError as exc:
                raise ListenerError(
                    "metrics.listen", str(self.config.metrics.listen), exc
                ) from None
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
        # Retention, restrictions for the Kafka filter; apart: the spool's expiry only.
        self._privacy = self.apart or PrivacyTask(
            self.config,
            self.privacy_stats,
            lambda: self.outputs.postgres_dsn,
            self.outputs.outbound,
            spools=lambda: self.outputs.spools,
            clock=self.clock.time,
        )
        self._privacy.start()
        self._ready = True
        self.log.info(
            "started",
            listeners={kind: [f"{h}:{p}" for h, p in eps] for kind, eps in self.bound.items()},
            metrics_port=self.metrics_port,
            cdrs_to=cdr_destinations(self.config),
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

    def ready(self) -> bool:
        """/readyz: started, and every enabled sink has connected once or spools its
        records within the spool's limits (`Outputs.sinks_ready`)."""
        return self._ready and self.outputs.sinks_ready()

    def _connect_outputs(self) -> None:
        """Wire the spools to the dialog store and the spare file."""
        outputs = self.outputs
        writer = outputs.cdr_writer
        if writer is not None:
            # A CDR's close is journaled once its bytes are in the spool file; the ones
            # the spool holds in memory go into every checkpoint instead.
            writer.on_written = self.dialogs.closed
            self.dialogs.held = writer.held
        self.spare_room.connect(outputs, outputs.destination_dirs())
        if self.apart is not None:
            self.spare_room.delivery = self.apart  # its `held` goes to the delivery process
        if self.spare_room.cdrs is not None:
            self.spare_room.cdrs.on_no_space = self._make_room

    def _fraud_step(self, step: Callable[[DaemonFraud], object]) -> Callable[[], object]:
        return lambda: None if self.fraud is None else step(self.fraud)

    def _make_room(self) -> bool:
        """A write was refused for want of space: give up the spare and, from this very
        message on, refuse new calls (and signaling, see `SpareRoom`), so that its room
        goes to the calls already open."""
        if not self.spare_room.make_room():
            return False
        if self.spare_room.holds_intake(self.outputs.blocks_intake):
            self.intake.update("write_error")
        return True

    async def _save_and_close(self, drain_timeout_s: float) -> None:
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
            await self.outputs.close(drain_timeout_s=drain_timeout_s)
        except Exception as exc:
            self.log.error("stop_step_failed", step="close_outputs", error=repr(exc))

    async def _open_inputs(self) -> None:
        loop = asyncio.get_running_loop()
        capture = self.config.capture
        for endpoint in capture.sip_udp:
            sock = self._udp_socket("capture.sip_udp", endpoint)
            local = sock.getsockname()[:2]
            hint = self._hints.add(
                "SIP/UDP", str(Endpoint(*local)), "HEP packets", "capture.hep_udp"
            )
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(
                    HintedSipUdpProtocol,
                    self.pipeline,
                    self._allow,
                    local,
                    hint,
                    self.listener_stats,
                    self.clock,
                ),
                sock=sock,
            )
            self._register_udp("sip_udp", sock, transport)
        for endpoint in capture.hep_udp:
            sock = self._udp_socket("capture.hep_udp", endpoint)
            local = sock.getsockname()[:2]
            hint = self._hints.add(
                "HEP/UDP", str(Endpoint(*local)), "plain SIP packets", "capture.sip_udp"
            )
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(
                    HintedHepUdpProtocol,
                    self.pipeline,
                    self._allow,
                    self._gate,
                    hint,
                    self.listener_stats,
                    self.clock,
                ),
                sock=sock,
            )
            self._register_udp("hep_udp", sock, transport)
        for endpoint in capture.vxlan_udp:
            sock = self._udp_socket("capture.vxlan_udp", endpoint)
            transport, protocol = await loop.create_datagram_endpoint(
                functools.partial(
                    VxlanUdpProtocol,
                    self.pipeline,
                    self._allow,
                    self.listener_stats,
                    self.clock,
                ),
                sock=sock,
            )
            self._vxlan.append(protocol)
            self._register_udp("vxlan_udp", sock, transport)
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
                stats=self.listener_stats,
                clock=self.clock,
            )
            try:
                await self._hep_stream.start()
            except OSError as exc:
                # Opened in this order, TCP first: the first address not bound failed.
                order = (("hep_tcp", capture.hep_tcp), ("hep_tls", capture.hep_tls))
                key, address = unbound_stream(self._hep_stream.bound, order)
                raise ListenerError(key, address, exc) from None
            if self._hep_stream.sweeper is not None:
                self._hep_stream.sweeper.add_done_callback(self._background_failed)
            for kind, endpoints in self._hep_stream.bound.items():
                self.bound[kind].extend(endpoints)
        for interface in capture.interfaces:
            await self._start_live(interface)

    def _udp_socket(self, key: str, endpoint: Endpoint) -> socket.socket:
        rcvbuf = self.config.capture.rcvbuf_bytes
        return named_udp_socket(key, endpoint, endpoint.host, endpoint.port, rcvbuf)

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
            clock=self.clock,
        )
        await capturer.start()
        self._live.append(capturer)
        task = asyncio.create_task(capturer.wait(), name=f"sipcdr-live-{interface}")
        task.add_done_callback(self._background_failed)
        self._live_tasks.append(task)
        self.bound.setdefault("live", []).append((interface, 0))

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
            await self.clock.sleep(TICK_S)
            try:
                self.tick(self.clock.time())
            except Exception as exc:  # a full disk must not stop the timers for good
                self.log.error("tick_failed", error=repr(exc))

    def tick(self, now: float) -> None:
        """Timers, sink flushes and the log lines of losses; called once a second. Each
        step on its own: a full disk must not stop the timers."""
        steps: list[tuple[str, Callable[[], object]]] = [
            # The timers, then the timed stages (fraud incidents, its baselines' save).
            ("engine", lambda: self._built().tick(now)),
            ("flush_sinks", self.pipeline.flush),
            ("spare", self.spare_room.keep),
            ("intake_gate", lambda: self.intake.update(self._intake_block_reason())),
            ("log_output_losses", self.outputs.log_losses),
            ("log_dialog_state_losses", self.dialogs.log_losses),
            ("listener_hints", lambda: self._hints.log_due(now, self.log.warning)),
            ("log_fraud_failures", self._fraud_step(DaemonFraud.log_failures)),
            ("delivery_process", lambda: None if self.apart is None else self.apart.tick()),
        ]
        for name, step in steps:
            try:
                step()
            except Exception as exc:
                self.log.error("tick_step_failed", step=name, error=repr(exc))

    def _intake_block_reason(self) -> str | None:
        reason = self.outputs.intake_block_reason
        if reason is None and self.spare_room.holds_intake(self.outputs.blocks_intake):
            # The disk refused a write and only the spare's room is left: it is for the
            # calls already open.
            reason = "write_error"
        return reason

    async def stop(self) -> None:
        """Idempotent. Intake first, so nothing arrives while state is written."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        self._ready = False
        for capturer in self._live:
            await capturer.stop()
        self._close_inputs()
        if self._hep_stream is not None:
            await self._hep_stream.stop()
        if self._privacy is not None:
            await self._privacy.stop()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._ticker
        # Each step on its own: a failure in one must not skip the others. CDRs first,
        # since they are what a stop must never lose.
        steps: list[tuple[str, Callable[[], object]]] = [
            ("expire", lambda: self.pipeline.expire(self.clock.time())),
            ("flush_sinks", self.pipeline.flush),
            ("save_fraud_baselines", self._fraud_step(DaemonFraud.save)),
        ]
        for name, step in steps:
            try:
                step()
            except Exception as exc:
                self.log.error("stop_step_failed", step=name, error=repr(exc))
        # A last checkpoint (on a full disk the older one and the journal stay), then
        # the sinks get what they can take within `[spool] stop_drain_ms`.
        await self._save_and_close(drain_timeout_s=self.config.spool.stop_drain_ms / 1000)
        for name, step in (
            ("log_output_losses", self.outputs.log_losses),
            ("log_dialog_state_losses", self.dialogs.log_losses),
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
    """`sipcdr run`: start, wait for SIGTERM/SIGINT, stop cleanly; SIGHUP reloads the
    rate decks."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with App(config, apart=config.spool.delivery_apart) as app:
        loop.add_signal_handler(signal.SIGHUP, app.rates.on_sighup)
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
