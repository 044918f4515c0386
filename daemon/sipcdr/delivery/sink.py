"""What the delivery loop hands records to: the `Sink` protocol every sink
implements, and the error by which a sink says the content, not the destination, is at
fault. Here, below `sipcdr.sinks`, so the spool and its delivery need no sink module
(`sipcdr.sinks.base` describes what a sink must do with them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sipcdr.spool.records import SpoolRecord


class RecordsRejected(ValueError):
    """The destination refuses what is in the batch (a value out of its range, a record
    too large): sending it again unchanged cannot succeed. The delivery loop then
    splits the batch to find the records at fault and sets each aside, counted and
    logged at ERROR, so one bad record cannot hold up every record after it."""


class Sink(Protocol):
    """A destination. `start` and `stop` may be called more than once; `deliver` is
    called by one delivery loop per stream the sink reads, never concurrently for the
    same stream."""

    name: str
    streams: tuple[str, ...]  # STREAM_* the sink reads

    async def start(self) -> None:
        """Quick and never failing for a destination that is down: the daemon must
        start and keep records in its spool."""

    async def prepare(self) -> None:
        """Connect and set the destination up (schema, partitions) ahead of the first
        record. Called by the delivery loop in the background; may raise, and is then
        retried implicitly by the first `deliver`."""

    async def deliver(self, stream: str, records: Sequence[SpoolRecord]) -> None:
        """Write every record or raise; on return the records are durable there.
        Raise `RecordsRejected` only when the content, not the destination, is at fault."""

    async def probe(self) -> None:
        """Return when the destination answers a cheap request now (a connect, a
        metadata request), raise otherwise; touches no records and no state `deliver`
        uses. The delivery loop asks while a batch waits unconfirmed, and between
        retries after a failure, so it can tell a destination that is gone from one
        that answers slowly or refuses."""

    async def stop(self) -> None: ...
