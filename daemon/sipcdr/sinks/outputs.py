"""Everything between a closed CDR and its destinations, built from `OutputSettings`.

`Outputs` owns the spools, the enabled sinks, an embedded PostgreSQL when
`dsn = "embedded"`, and the delivery loops. The daemon and `sipcdr import` both use
it, so an imported capture reaches the same sinks by the same path as live traffic.
Its `cdr_writer` is what the pipeline writes CDRs to, `signaling` (None when no sink
keeps signaling) what it hands each parsed message to.

With delivery in a process of its own (`sipcdr.deliverer`, and for an import
`sipcdr.import_delivery`) each process has one:
`role="capture"` writes the spools and builds no sink (the delivery process's counts
arrive as `remote`), `role="deliver"` reads the spools another process writes
(`SpoolTail`) and owns the sinks, the embedded PostgreSQL and the delivery loops.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from sipcdr.clock import SYSTEM_CLOCK, Clock
from sipcdr.delivery import Delivery
from sipcdr.model import Cdr, FraudAlert
from sipcdr.privacy.outbound import OutboundFilter
from sipcdr.privacy.pseudonym import load_key
from sipcdr.privacy.restriction_file import saved_restrictions
from sipcdr.private import private_dir
from sipcdr.sinks.base import KIND_ALERT, KIND_CDR, STREAM_RECORDS, STREAM_SIGNALING, Sink
from sipcdr.sinks.jsonl import JsonlSink
from sipcdr.sinks.remote import DeliverySnapshot, SinkPlan, sink_plans
from sipcdr.sinks.settings import KafkaSettings, OutputSettings, PostgresSettings
from sipcdr.sinks.signaling import SignalingRecorder
from sipcdr.spool import DEFAULT_CDR_RESERVE_RECORDS, Appended, Spool
from sipcdr.spool.tail import SpoolTail

if TYPE_CHECKING:
    from sipcdr.sinks.embedded_later import EmbeddedStartLater


class SpoolCdrWriter:
    """The pipeline's CDR sink: one spool append per CDR. `on_written` hears of each CDR
    once its bytes are in the spool file, which is when the dialog journal may record
    its call as closed: at once, or, for one the disk refused, when the spool writes
    its reserve. A refused append is counted by the spool, with its reason."""

    name = "spool"

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.on_written: Callable[[Cdr], None] | None = None
        spool.on_reserve_written = self._reserve_written

    def write(self, cdr: Cdr) -> None:
        value = orjson.dumps(cdr.to_record())
        outcome = self.spool.append(KIND_CDR, cdr.call_id.encode(), value, cdr)
        if outcome is Appended.WRITTEN and self.on_written is not None:
            self.on_written(cdr)

    def _reserve_written(self, tags: list[object]) -> None:
        if self.on_written is not None:
            for tag in tags:
                if isinstance(tag, Cdr):
                    self.on_written(tag)

    def held(self) -> list[Cdr]:
        """The CDRs the spool holds in memory, oldest first."""
        return [tag for tag in self.spool.reserved_tags() if isinstance(tag, Cdr)]

    def take_held(self) -> list[Cdr]:
        """Take the held CDRs out of the spool unwritten and not counted as lost: at a
        stop, once the dialog state on disk keeps them for the next start."""
        return [tag for tag in self.spool.take_reserve() if isinstance(tag, Cdr)]

    def flush(self) -> None:
        self.spool.flush()


class SpoolAlertWriter:
    """The fraud stage's alert writer: one spool append per alert record (a new alert or
    an update of one), in the records stream with the CDRs, keyed by its subject (the
    Kafka key, so one subject's alerts stay in order on one partition). A refused
    append is counted by the spool, with its reason."""

    name = "spool_alerts"

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def write_alert(self, alert: FraudAlert) -> bool:
        value = orjson.dumps(alert.to_record())
        outcome = self.spool.append(KIND_ALERT, alert.subject.encode(), value)
        return outcome is not Appended.REFUSED


class Outputs:
    def __init__(
        self,
        settings: OutputSettings,
        spool_dir: Path | None = None,
        full_policy: str | None = None,
        *,
        wait_below_floor: bool = False,
        restrictions: bool = False,
        role: str = "all",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.settings = settings
        self.role = role  # "all", "capture" or "deliver" (see above)
        # The daemon: restrictions fail closed (`_restrictions_in_force`).
        self.restrictions = restrictions
        # Kafka and PostgreSQL delivery waits for a first restriction list.
        self.held_for_restrictions = False
        self.clock = clock
        # None: the configured policy for CDRs, drop_newest for signaling (the daemon).
        self.full_policy = full_policy
        # An import waits for its sinks below the signaling floor rather than refuse
        # signaling (`wait_reason`).
        self.wait_below_floor = wait_below_floor
        self.spool_dir = spool_dir or settings.state_dir / "spool"
        self.log = structlog.get_logger("sipcdr.outputs")
        self.sinks: list[Sink] = []
        self.spools: dict[str, Spool] = {}
        self.tails: dict[str, SpoolTail] = {}  # role "deliver": the spools it reads
        # Role "capture": the sinks as configured, the delivery process's last counts
        # (None until it sent some), and how it is stopped once the spools have every
        # record: (drain timeout, each stream's next sequence number).
        self.plans: list[SinkPlan] = []
        self.remote: DeliverySnapshot | None = None
        self.on_close: Callable[[float | None, Mapping[str, int]], Awaitable[None]] | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self.signaling: SignalingRecorder | None = None
        self.cdr_writer: SpoolCdrWriter | None = None
        self.alert_writer: SpoolAlertWriter | None = None
        self.delivery: Delivery | None = None
        self._embedded: object | None = None  # storage.embedded.EmbeddedPostgres
        # Its start tried again when the first one found the disk full.
        self._embedded_later: EmbeddedStartLater | None = None
        # What may leave towards Kafka (sipcdr.privacy.outbound); set by `open`.
        self.outbound: OutboundFilter | None = None
        self.postgres_dsn: str | None = None
        self._opened = False
        self._logged: dict[tuple[str, ...], int] = {}  # counts as of the last log line

    async def open(self) -> None:
        """Open the spools and start the sinks. A sink whose server is down does not
        fail this: its records wait in the spool."""
        if self._opened:
            return
        self._opened = True
        settings = self.settings
        spool_config = settings.spool
        jsonl = settings.jsonl
        kafka = settings.kafka
        pseudonymize = kafka is not None and kafka.pseudonymize_numbers
        self.outbound = OutboundFilter(
            load_key(kafka.pseudonym_key_file) if kafka is not None and pseudonymize else None,
            pseudonymize=pseudonymize,
        )
        self.plans = sink_plans(settings)
        if self.role == "capture":
            self._open_writing_spools(self.plans)
            self._sync_task = asyncio.create_task(self._sync_loop(), name="sipcdr-spool-sync")
            return
        if jsonl is not None:
            # Alerts go to the JSONL file only when nothing else would keep them.
            only = settings.postgres is None and settings.kafka is None
            self.sinks.append(JsonlSink(jsonl.path, rotate_bytes=jsonl.rotate_bytes, alerts=only))
        if settings.postgres is not None:
            self.sinks.append(await self._postgres_sink(settings.postgres))
        if kafka is not None:
            self.sinks.append(self._kafka_sink(kafka))
        built = [SinkPlan(sink.name, sink.streams) for sink in self.sinks]
        if self.role == "deliver":
            for plan in built:
                for stream in plan.streams:
                    consumers = tuple(p.name for p in built if stream in p.streams)
                    if stream not in self.tails:
                        self.tails[stream] = SpoolTail(self.spool_dir / stream, consumers)
                        self.tails[stream].open()
        else:
            self._open_writing_spools(built)
        self.delivery = Delivery(
            self.tails if self.role == "deliver" else self.spools,
            self.sinks,
            fsync_interval_s=spool_config.fsync_interval_s,
            clock=self.clock,
        )
        if self.restrictions:
            self._restrictions_in_force(self.delivery)
        await self.delivery.start()

    def _open_writing_spools(self, plans: Sequence[SinkPlan]) -> None:
        settings = self.settings
        spool_config = settings.spool
        consumers: dict[str, list[str]] = {}
        for plan in plans:
            for stream in plan.streams:
                consumers.setdefault(stream, []).append(plan.name)
        if STREAM_RECORDS in consumers:
            spool = self._open_spool(
                STREAM_RECORDS,
                consumers,
                spool_config.max_bytes,
                self.full_policy or spool_config.full_policy,
                reserve_records=spool_config.cdr_reserve_records,
            )
            self.cdr_writer = SpoolCdrWriter(spool)
            self.alert_writer = SpoolAlertWriter(spool)
        if STREAM_SIGNALING in consumers:
            spool = self._open_spool(
                STREAM_SIGNALING,
                consumers,
                spool_config.signaling_max_bytes,
                self.full_policy or "drop_newest",
                buffered=True,
                min_free_bytes=spool_config.signaling_min_free_bytes,
                refuse_below_floor=not self.wait_below_floor,
            )
            self.signaling = SignalingRecorder(spool, store_body=settings.store_sdp)

    async def _sync_loop(self) -> None:
        """Role "capture": what the delivery loop does for the spools in one process,
        fsync them (and write the buffered signaling, delete delivered segments)."""
        while True:
            await self.clock.sleep(self.settings.spool.fsync_interval_s)
            for spool in self.spools.values():
                try:
                    spool.sync()
                except OSError as exc:
                    self.log.error("spool_sync_failed", dir=str(spool.directory), error=str(exc))

    def _restrictions_in_force(self, delivery: Delivery) -> None:
        """A restart must lift no restriction, the database answering or not. The list
        the last run read (saved in the state folder) is in force from the first record;
        with none (a first start, a lost state folder) nothing leaves for Kafka, and no
        row is written to PostgreSQL unflagged, until the privacy task has read one: the
        records wait in the spool. The PostgreSQL sink still connects and migrates."""
        outbound = self.outbound
        if outbound is None:
            return
        if self.settings.postgres is None:
            # Restrictions are kept in PostgreSQL: without it there are none.
            outbound.set_restricted(frozenset())
            return
        saved = saved_restrictions(self.settings.state_dir)
        if saved is not None:
            outbound.set_restricted(saved)
            return
        loops = {
            (sink.name, stream)
            for sink in self.sinks
            if sink.name in ("kafka", "postgres")
            for stream in sink.streams
        }
        if not loops:
            return
        delivery.held_until_restrictions |= loops
        self.held_for_restrictions = True
        self.log.warning("delivery_waits_for_restrictions", sinks=sorted({s for s, _ in loops}))

        def release() -> None:
            delivery.release_restrictions_hold()
            self.held_for_restrictions = False
            self.log.info("restrictions_read_delivery_resumed")

        outbound.on_known.append(release)

    def sinks_ready(self) -> bool:
        """Every enabled sink has had its first connection, and each that is not
        connected now has its records spooling within the spool's limits (the spool is
        not full and its disk takes writes): what a CDR taken in now meets is then a
        sink or room to wait in. False until the outputs are open."""
        delivery = self.delivery
        if self.role == "capture":
            if self.remote is None:
                return not self.plans
            states = [loop.state for loop in self.remote.loops]
        elif delivery is None:
            return not self.sinks
        else:
            states = [state for state, _reader in delivery.readers()]
        for state in states:
            if not state.tried:
                return False
            if not state.up:
                spool = self.spools[state.stream]
                if spool.full or spool.reserved:
                    return False
        return True

    def destination_dirs(self) -> dict[SinkPlan, Path | None]:
        """Where each sink writes on this host's disks: the JSONL file, an embedded
        PostgreSQL; None for a server elsewhere."""
        from sipcdr.storage.embedded import EMBEDDED_DATA_SUBDIR  # noqa: PLC0415

        jsonl, postgres = self.settings.jsonl, self.settings.postgres
        found: dict[SinkPlan, Path | None] = {}
        for plan in self.plans:
            found[plan] = None
            if plan.name == "jsonl" and jsonl is not None:
                found[plan] = jsonl.path.parent
            elif plan.name == "postgres" and postgres is not None and postgres.embedded:
                found[plan] = self.settings.state_dir / EMBEDDED_DATA_SUBDIR
        return found

    def _open_spool(
        self,
        stream: str,
        consumers: dict[str, list[str]],
        max_bytes: int,
        full_policy: str,
        *,
        buffered: bool = False,
        reserve_records: int = DEFAULT_CDR_RESERVE_RECORDS,
        min_free_bytes: int = 0,
        refuse_below_floor: bool = True,
    ) -> Spool:
        private_dir(self.spool_dir)
        spool = Spool(
            self.spool_dir / stream,
            tuple(consumers[stream]),
            max_bytes=max_bytes,
            segment_bytes=self.settings.spool.segment_bytes,
            full_policy=full_policy,
            buffered=buffered,
            reserve_records=reserve_records,
            min_free_bytes=min_free_bytes,
            refuse_below_floor=refuse_below_floor,
            readers_elsewhere=self.role == "capture",
            clock=self.clock,
        )
        spool.open()
        self.spools[stream] = spool
        return spool

    async def _postgres_sink(self, pg: PostgresSettings) -> Sink:
        # asyncpg only when used
        from sipcdr.sinks.embedded_later import (  # noqa: PLC0415
            EmbeddedStartLater,
            PostgresSinkWaitingForServer,
        )
        from sipcdr.sinks.postgres import PostgresSink  # noqa: PLC0415
        from sipcdr.storage.embedded import (  # noqa: PLC0415
            EmbeddedPostgres,
            EmbeddedPostgresError,
            embedded_data_dir,
        )

        options: dict[str, Any] = {
            "store_signaling": pg.store_signaling,
            "partitions_ahead_days": pg.partitions_ahead_days,
            "retention_classes": pg.retention_classes,
            "restricted": self.outbound.is_restricted if self.outbound is not None else None,
            "restricted_calls": self.outbound.calls if self.outbound is not None else None,
        }
        dsn = pg.dsn
        if pg.embedded:
            embedded = EmbeddedPostgres(embedded_data_dir(self.settings.state_dir))
            self._embedded = embedded
            try:
                dsn = await embedded.start()
            except EmbeddedPostgresError as exc:
                if not exc.no_space:
                    # A local start problem (permissions, binaries): stop the start, plainly.
                    raise OSError(f"embedded PostgreSQL did not start: {exc}") from exc
                # A full disk: capture goes on, the records wait in the spool as for a
                # server that is down, and the server starts once the disk has room.
                self.log.error(
                    "embedded_postgres_not_started",
                    error=str(exc),
                    note="CDRs wait in the spool; started again once the disk has room",
                )
                self._embedded_later = EmbeddedStartLater(
                    embedded, self._embedded_started, self.clock
                )
                return PostgresSinkWaitingForServer(self._embedded_later, **options)
            self._embedded_started(dsn)
        self.postgres_dsn = dsn
        return PostgresSink(dsn, **options)

    def _embedded_started(self, dsn: str) -> None:
        self.postgres_dsn = dsn
        # Its start takes seconds on a first run (initdb): say when it is over.
        where = getattr(self._embedded, "data_dir", None)
        self.log.info("embedded_postgres_ready", data_dir=str(where))

    def _kafka_sink(self, kafka: KafkaSettings) -> Sink:
        from sipcdr.sinks.kafka import KafkaSink  # noqa: PLC0415 - aiokafka only when used

        sink = KafkaSink(
            bootstrap=kafka.bootstrap,
            topic_cdrs=kafka.topic_cdrs,
            topic_fraud=kafka.topic_fraud,
            topic_sip=kafka.topic_sip,
            idempotence=kafka.idempotence,
            compression=kafka.compression,
            linger_ms=kafka.linger_ms,
            max_batch_bytes=kafka.max_batch_bytes,
            request_timeout_ms=kafka.request_timeout_ms,
            security_protocol=kafka.security_protocol,
            sasl_mechanism=kafka.sasl_mechanism,
            sasl_username=kafka.sasl_username,
            sasl_password=kafka.sasl_password,
            ssl_cafile=kafka.ssl_cafile,
            create_topics=kafka.create_topics,
            topic_partitions=kafka.topic_partitions,
            topic_replication_factor=kafka.topic_replication_factor,
            topic_retention_ms=kafka.topic_retention_ms,
        )
        if self.outbound is not None:
            sink.outbound = self.outbound.apply
            if self.outbound.pseudonymize:
                sink.outbound_key = self.outbound.key
        return sink

    @property
    def wait_reason(self) -> str | None:
        """Why an import should let the sinks and the disk catch up before it reads on:
        `spool_full` (a spool at its limit), `write_error` (the disk refuses CDRs; they
        wait in the reserve), `disk_floor` (below the signaling floor, with records the
        sinks do not have yet: once they have them all, delivered segments are deleted
        and waiting longer frees nothing, so the import reads on a slice at a time);
        None to read on."""
        spools = self.spools.values()
        if any(spool.full for spool in spools):
            return "spool_full"
        if any(spool.reserved for spool in spools):
            return "write_error"
        if any(spool.below_floor for spool in spools) and self._behind():
            return "disk_floor"
        return None

    def _behind(self) -> bool:
        """Whether a sink lacks records the spools hold; with delivery in another
        process, by its last counts."""
        if self.delivery is not None:
            return not self.delivery.caught_up()
        if self.remote is None:
            return False
        return any(
            loop.confirmed_seq < self.spools[loop.state.stream].next_seq
            for loop in self.remote.loops
            if loop.state.stream in self.spools and not loop.held
        )

    @property
    def must_wait(self) -> bool:
        return self.wait_reason is not None

    @property
    def blocks_intake(self) -> bool:
        """Whether the CDR spool's policy is `block`: intake waits rather than CDRs."""
        spool = self.spools.get(STREAM_RECORDS)
        return spool is not None and spool.full_policy == "block"

    @property
    def intake_block_reason(self) -> str | None:
        """Why the daemon must refuse new calls under the CDR spool's `block` policy:
        `write_error` while the disk refuses CDRs (they wait in the reserve),
        `spool_full` while the spool is at its limit; None to take them in."""
        spool = self.spools.get(STREAM_RECORDS)
        if spool is None or spool.full_policy != "block":
            return None
        if spool.reserved:
            return "write_error"
        return "spool_full" if spool.full else None

    def log_losses(self) -> None:
        """Log what the spools refused (lost, hence ERROR), spool damage, and failed
        rotations and cursor saves, each time its count grew. The counts themselves
        reach Prometheus through the telemetry exporter, which reads them."""
        for stream, spool in self.spools.items():
            stats = spool.stats
            for reason, total in stats.dropped.items():
                delta = self._grew(("drop", stream, reason), total)
                if delta:
                    self.log.error(
                        "spool_refused_records",
                        stream=stream,
                        reason=reason,
                        records=delta,
                        spool_bytes=spool.size_bytes,
                        max_bytes=spool.max_bytes,
                    )
            if self._grew(("rotate", stream), stats.rotation_failures):
                # Nothing lost: the active segment grows past segment_bytes.
                self.log.warning(
                    "spool_rotation_failed", stream=stream, total=stats.rotation_failures
                )
            if self._grew(("sync", stream), stats.sync_failures):
                # Records written before a failed fsync may not be on disk. The sync
                # loop logs the error of each it made; this also reports the fsync of a
                # segment closed at rotation, which raises nowhere.
                self.log.error("spool_sync_failures", stream=stream, total=stats.sync_failures)
            if self._grew(("dmg", stream, "torn_tail"), stats.torn_tails):
                # A write cut short by a crash: lost.
                self.log.error(
                    "spool_damaged",
                    stream=stream,
                    what="torn_tail",
                    total=stats.torn_tails,
                    torn_bytes=stats.torn_tail_bytes,
                )
        if self.delivery is not None:
            for state, reader in self.delivery.readers():
                corrupt = reader.corrupt_records
                if self._grew(("dmg", state.sink, state.stream), corrupt):
                    # Bytes damaged on disk: those records are lost to this sink.
                    self.log.error(
                        "spool_damaged",
                        sink=state.sink,
                        stream=state.stream,
                        what="corrupt_record",
                        total=corrupt,
                    )
                failed_saves = self._grew(
                    ("cur", state.sink, state.stream), reader.cursor_write_failures
                )
                if failed_saves:
                    # Nothing lost: the position is kept in memory; a crash before the
                    # next save delivers again what the sink already has.
                    self.log.warning(
                        "cursor_save_failed",
                        sink=state.sink,
                        stream=state.stream,
                        attempts=failed_saves,
                    )
        for sink in self.sinks:
            if isinstance(sink, JsonlSink) and self._grew(("jsonl",), sink.rotation_failures):
                # Nothing lost: the file grows past rotate_bytes until one succeeds.
                self.log.warning("jsonl_rotation_failed", total=sink.rotation_failures)

    def _grew(self, key: tuple[str, ...], total: int) -> int:
        """How much a count grew since the last log line about it."""
        delta = total - self._logged.get(key, 0)
        if delta > 0:
            self._logged[key] = total
        return max(delta, 0)

    def cdr_sinks(self) -> Sequence[SpoolCdrWriter]:
        return [] if self.cdr_writer is None else [self.cdr_writer]

    def flush(self) -> None:
        for spool in self.spools.values():
            spool.flush()

    async def close(self, drain_timeout_s: float | None = None) -> None:
        """Idempotent: drain what the sinks can take, stop them, close the spools and
        stop an embedded PostgreSQL. Records not delivered stay in the spool."""
        if not self._opened:
            return
        self._opened = False
        if self._sync_task is not None:
            self._sync_task.cancel()
            # Waited for without taking its end for ours: a cancel of this close (a
            # second Ctrl-C) goes on to the caller.
            await asyncio.wait([self._sync_task])
            if not self._sync_task.cancelled():
                self._sync_task.exception()  # taken: a disk's errors are logged by it
            self._sync_task = None
        if self.on_close is not None:
            for spool in self.spools.values():
                with contextlib.suppress(OSError):
                    spool.sync()  # every record on disk before the reader drains them
            await self.on_close(
                drain_timeout_s, {s: spool.next_seq for s, spool in self.spools.items()}
            )
        if self.delivery is not None:
            if drain_timeout_s is None:
                await self.delivery.stop()
            else:
                await self.delivery.stop(drain_timeout_s)
        every: list[Spool | SpoolTail] = [*self.spools.values(), *self.tails.values()]
        for closing in every:
            try:
                closing.close()
            except OSError as exc:
                self.log.error("spool_close_failed", dir=str(closing.directory), error=str(exc))
        if self._embedded_later is not None:
            await self._embedded_later.settle()  # a start under way is let finish, then stopped
        if self._embedded is not None:
            from sipcdr.storage.embedded import EmbeddedPostgres  # noqa: PLC0415

            assert isinstance(self._embedded, EmbeddedPostgres)
            await self._embedded.stop()
            self._embedded = None
