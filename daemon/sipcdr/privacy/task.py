"""Retention inside the daemon: a run at start and every `[retention] run_interval_s`
(a day), the restrictions read from PostgreSQL every minute for the Kafka filter, and
their metrics.

A failed run is logged at ERROR, counted (`sipcdr_retention_runs_total{outcome=
"failed"}`, which deploy/prometheus/alerts.yml alerts on) and tried again ten minutes
later; it never stops the daemon. The task applies the schema's migrations itself
before its first read, so on a fresh database it does not depend on the PostgreSQL
sink having connected first.

Each restriction list read is saved in the state folder (`restriction_file`), so a
restart while PostgreSQL does not answer keeps the last one in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final

import structlog

from sipcdr.privacy.files import expire_files
from sipcdr.privacy.outbound import OutboundFilter
from sipcdr.privacy.plan import spool_retention_days
from sipcdr.privacy.restriction_file import TooManyToSave, save_restrictions
from sipcdr.privacy.stats import PrivacyStats

if TYPE_CHECKING:
    import asyncpg

    from sipcdr.config import Config
    from sipcdr.privacy.retention import RetentionReport
    from sipcdr.spool import Spool

# Restrictions reach the Kafka filter within this long of `sipcdr subject restrict`.
RESTRICTIONS_REFRESH_S: Final = 60.0
# Until a first list is read (delivery may wait for it), it is asked for this often.
FIRST_READ_RETRY_S: Final = 2.0
# A failed run is tried again this soon rather than a whole interval later.
RETRY_AFTER_FAILURE_S: Final = 600.0
OPERATOR: Final = "sipcdr daemon"


class PrivacyTask:
    def __init__(
        self,
        config: Config,
        stats: PrivacyStats,
        dsn: Callable[[], str | None],
        outbound: OutboundFilter | None,
        clock: Callable[[], float] = time.time,
        spools: Callable[[], Mapping[str, Spool]] | None = None,
    ) -> None:
        self.config = config
        self.stats = stats
        self._dsn = dsn
        self.outbound = outbound
        self._clock = clock
        self._spools = spools
        self.log = structlog.get_logger("sipcdr.privacy")
        self._task: asyncio.Task[None] | None = None
        self.last_report: RetentionReport | None = None
        self.runs = 0
        self.failures = 0
        self._migrated = False
        self._saved = False  # the list read this run is in the state folder
        self._read_failing = False

    def start(self) -> None:
        if self.outbound is not None and self.outbound.known:
            # The list saved by the last run, in force until the database answers.
            self.stats.restricted_subjects = len(self.outbound.restricted)
        self._task = asyncio.create_task(self._loop(), name="sipcdr-retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        next_run = 0.0  # at start
        while True:
            now = self._clock()
            await self.refresh_restrictions()
            if now >= next_run:
                failures = self.failures
                await self.run_once()
                interval = self.config.retention.run_interval_s
                if self.failures > failures:
                    interval = min(interval, RETRY_AFTER_FAILURE_S)
                next_run = now + interval
            refresh = RESTRICTIONS_REFRESH_S
            if self.outbound is not None and not self.outbound.known:
                refresh = FIRST_READ_RETRY_S
            await asyncio.sleep(min(refresh, max(1.0, next_run - now)))

    async def run_once(self) -> RetentionReport | None:
        """One retention run; never raises (but for a cancel)."""
        # asyncpg only when a database is used, as the sinks do.
        from sipcdr.privacy.retention import run_retention  # noqa: PLC0415
        from sipcdr.storage.migrations import connect  # noqa: PLC0415

        try:
            expire_files(self.config, dry_run=False)
            self._expire_spools()
            report = None
            dsn = self._dsn()
            if dsn is not None:
                conn = await connect(dsn)
                try:
                    await self._migrate(conn)
                    report = await run_retention(
                        conn, self.config.retention, dry_run=False, operator=OPERATOR
                    )
                finally:
                    await conn.close()
                self._count(report)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failures += 1
            self.stats.runs["failed"] += 1
            self.log.error("retention_failed", error=f"{type(exc).__name__}: {exc}")
            return None
        self.runs += 1
        self.last_report = report
        self.stats.runs["ok"] += 1
        self.stats.last_success = self._clock()
        if report is not None:
            self.log.info(
                "retention_run",
                partitions=len(report.dropped),
                bytes_freed=report.bytes,
                held_rows_removed=sum(report.held_rows_removed.values()),
            )
        return report

    def _expire_spools(self) -> None:
        """Segments that waited for a sink longer than their records may be kept."""
        if self._spools is None:
            return
        now = self._clock()
        for stream, spool in self._spools().items():
            days = spool_retention_days(self.config.retention, stream)
            dropped = spool.expire_segments(now - days * 86400)
            if dropped:
                # Undelivered records are lost: the spool counts them (reason
                # "retention"), and the loss alert fires as for any other drop.
                self.log.warning("spool_records_expired", stream=stream, records=dropped)

    def _count(self, report: RetentionReport) -> None:
        stats = self.stats
        stats.oldest_partition_age_days.update(report.oldest_age_days)
        for table, size in report.bytes_by_table().items():
            stats.bytes_dropped[table] = stats.bytes_dropped.get(table, 0) + size
        for item in report.dropped:
            table = item.table
            stats.partitions_dropped[table] = stats.partitions_dropped.get(table, 0) + 1
            stats.rows_held[table] = stats.rows_held.get(table, 0) + item.held_rows

    async def refresh_restrictions(self) -> None:
        if self.outbound is None:
            return
        dsn = self._dsn()
        if dsn is None:
            return
        from sipcdr.privacy.subjects import restricted_numbers  # noqa: PLC0415
        from sipcdr.storage.migrations import connect  # noqa: PLC0415

        try:
            conn = await connect(dsn)
            try:
                await self._migrate(conn)
                numbers = await restricted_numbers(conn)
            finally:
                await conn.close()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The last list read (or saved by an earlier run) stays in force: a
            # database outage lifts no restriction. Said once an outage, not each try.
            if not self._read_failing:
                self._read_failing = True
                self.log.warning("restrictions_not_read", error=f"{type(exc).__name__}: {exc}")
            return
        if self._read_failing:
            self._read_failing = False
            self.log.info("restrictions_read_again")
        if numbers != self.outbound.restricted or not self._saved:
            # Off the event loop: a long list takes up to a second to write (1,000,000
            # numbers), and the loop is the capture's.
            await asyncio.to_thread(self._save, numbers)
        self.outbound.set_restricted(numbers)
        self.stats.restricted_subjects = len(numbers)

    def _save(self, numbers: frozenset[str]) -> None:
        try:
            save_restrictions(Path(self.config.state.dir), numbers)
        except TooManyToSave as exc:
            # In force all the same; a restart during an outage waits for PostgreSQL.
            if self.stats.restrictions_unsaved != 1:
                self.log.error("restrictions_not_saved", reason="too_many", error=str(exc))
            self.stats.restrictions_unsaved = 1
            self._saved = True  # the file says so: written again when the list changes
            return
        except OSError as exc:
            # In force all the same; the older copy is withdrawn, so a restart during an
            # outage waits for PostgreSQL. Tried again at the next read, the list
            # unchanged or not.
            if self.stats.restrictions_unsaved != 1:
                self.log.warning("restrictions_not_saved", error=f"{type(exc).__name__}: {exc}")
            self.stats.restrictions_unsaved = 1
            self._saved = False
            return
        if self.stats.restrictions_unsaved:
            self.log.info("restrictions_saved_again", subjects=len(numbers))
        self.stats.restrictions_unsaved = 0
        self._saved = True

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        """The schema in place before the first read or run: on a fresh database the
        PostgreSQL sink's own migration may not have run yet (both hold the migration
        lock, so whichever comes second finds the work done)."""
        if self._migrated:
            return
        from sipcdr.storage.migrations import migrate  # noqa: PLC0415

        await migrate(conn)
        self._migrated = True
