"""What every sink is: a consumer of spool records that confirms a batch or raises.

The spool (`sipcdr.spool`) owns durability. A sink owns nothing but the write to its
destination: `deliver` either gets a whole batch there (then the delivery loop moves
the sink's cursor past it) or raises, and the same batch comes again after a backoff.
Re-delivery is therefore normal, and each sink must make it harmless: PostgreSQL by
`ON CONFLICT DO NOTHING` on the record's id, Kafka consumers by deduplicating on
`cdr_id`, JSONL by accepting a repeated line after a crash.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, NamedTuple, Protocol, Self

# Record kinds, one byte each in the spool. The JSON value of each kind has a schema
# in schemas/.
KIND_CDR: Final = "cdr"  # CDR v1 (schemas/cdr.v1.schema.json); key: call_id
KIND_ALERT: Final = "alert"  # fraud alert v1; key: the detector's subject
KIND_SIP: Final = "sip"  # one captured SIP message; key: call_id

# Spool streams. CDRs and alerts share one, so a sink sees them in the order they
# closed; captured signaling has its own, with its own size limit, because it is a
# hundred times the volume and a troubleshooting copy rather than a billing record.
STREAM_RECORDS: Final = "records"
STREAM_SIGNALING: Final = "signaling"


class SpoolRecord(NamedTuple):
    seq: int  # position in its stream, from 1, increasing by one per record
    kind: str  # KIND_*
    key: bytes  # partitioning key (the Kafka message key)
    value: bytes  # the record as UTF-8 JSON, exactly what Kafka and JSONL carry


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


class AsyncLifecycle:
    """`async with` for I/O components: `start` on entry, `stop` on exit."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
