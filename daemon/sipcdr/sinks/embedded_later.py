"""The embedded PostgreSQL's start, tried again after one that found the disk full.

A daemon must capture on a full disk, and its CDRs come first: the room there is (the
spare file's, see `sipcdr.spare`) is for the CDRs of the calls already open, not for a
database server's start. So when the embedded server does not start for want of room,
the daemon starts without it: the PostgreSQL sink is down (`sipcdr_sink_up` 0), its
records wait in the spool as for a server that stopped answering, and the server's
start is tried again, in the background, when the delivery loop asks for the server
(it has records to deliver, or probes after a failure) and at most every
`RETRY_MIN_S`, doubling to `RETRY_MAX_S` while it keeps failing. A loop the daemon holds
while the spare's room is kept asks nothing, so no start is tried until the disk has
room again. The first failure is logged at ERROR by `Outputs`; later ones only show in
the sink's last error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Final

import structlog

from sipcdr.clock import SYSTEM_CLOCK, Clock
from sipcdr.sinks.base import SpoolRecord
from sipcdr.sinks.postgres import PostgresSink
from sipcdr.storage.embedded import EmbeddedPostgres, EmbeddedPostgresError
from sipcdr.storage.migrations import DatabaseUnavailable

RETRY_MIN_S: Final = 5.0
RETRY_MAX_S: Final = 60.0


class EmbeddedStartLater:
    """`dsn` once the server runs; `ask()` starts an attempt when one is due. An attempt
    is never cancelled midway (the server it starts would be left without a holder to
    stop it): `settle()` waits for one under way, and the owner stops the server."""

    def __init__(
        self,
        server: EmbeddedPostgres,
        on_started: Callable[[str], None],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.server = server
        self.dsn: str | None = None
        self.attempts = 0
        self.last_error = "the disk was full at the daemon's start"
        self._on_started = on_started
        self._clock = clock
        self._delay = RETRY_MIN_S
        self._next_at = clock.monotonic() + RETRY_MIN_S
        self._attempt: asyncio.Task[None] | None = None
        self._closed = False
        self._log = structlog.get_logger("sipcdr.outputs")

    def ask(self) -> str:
        """The server's DSN, or DatabaseUnavailable (an attempt begun when due)."""
        if self.dsn is not None:
            return self.dsn
        due = self._clock.monotonic() >= self._next_at
        if due and self._attempt is None and not self._closed:
            self._attempt = asyncio.create_task(self._start(), name="sipcdr-embedded-start")
        raise DatabaseUnavailable(f"embedded PostgreSQL not started: {self.last_error}")

    async def _start(self) -> None:
        self.attempts += 1
        try:
            dsn = await self.server.start()
        except EmbeddedPostgresError as exc:
            self.last_error = str(exc)
            self._later()
        except Exception as exc:  # a background task must not end with it unsaid
            self.last_error = repr(exc)
            self._later()
            self._log.error("embedded_postgres_start_failed", error=self.last_error)
        else:
            self.dsn = dsn
            self._on_started(dsn)
        finally:
            self._attempt = None

    def _later(self) -> None:
        self._delay = min(self._delay * 2, RETRY_MAX_S)
        self._next_at = self._clock.monotonic() + self._delay

    async def settle(self) -> None:
        """No more attempts; returns once the one under way, if any, is over."""
        self._closed = True
        attempt = self._attempt
        if attempt is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(attempt)


class PostgresSinkWaitingForServer(PostgresSink):
    """The PostgreSQL sink of an embedded server not started yet: down (its records
    wait in the spool) until `EmbeddedStartLater` has started it."""

    def __init__(self, later: EmbeddedStartLater, **options: Any) -> None:
        super().__init__("", **options)
        self._later = later

    def _server(self) -> None:
        self.dsn = self._later.ask()

    async def prepare(self) -> None:
        self._server()
        await super().prepare()

    async def probe(self) -> None:
        self._server()
        await super().probe()

    async def deliver(self, stream: str, records: Sequence[SpoolRecord]) -> None:
        self._server()
        await super().deliver(stream, records)
