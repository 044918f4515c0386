"""Retention inside the daemon: a run at start and every `[retention] run_interval_s`
(a day), the restrictions read from PostgreSQL every minute for the Kafka filter, and
their metrics.

A failed run is logged at ERROR, counted (`sipcdr_retention_runs_total{outcome=
"failed"}`, which deploy/prometheus/alerts.yml alerts on) and tried again at the next
interval; it never stops the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

import structlog

from sipcdr.privacy.files import expire_files
from sipcdr.privacy.outbound import OutboundFilter
from sipcdr.privacy.plan import spool_retention_days
from sipcdr.privacy.stats import PrivacyStats

if TYPE_CHECKING:
    from sipcdr.config import Config
    from sipcdr.privacy.retention import RetentionReport
    from sipcdr.spool import Spool

# Restrictions reach the Kafka filter within this long of `sipcdr subject restrict`.
RESTRICTIONS_REFRESH_S: Final = 60.0
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

    def start(self) -> None:
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
                await self.run_once()
                next_run = now + self.config.retention.run_interval_s
            await asyncio.sleep(min(RESTRICTIONS_REFRESH_S, max(1.0, next_run - now)))

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
                self.outbound.restricted = await restricted_numbers(conn)
            finally:
                await conn.close()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The last list read stays in force: a database outage lifts no restriction.
            self.log.warning("restrictions_not_read", error=f"{type(exc).__name__}: {exc}")
            return
        self.stats.restricted_subjects = len(self.outbound.restricted)
