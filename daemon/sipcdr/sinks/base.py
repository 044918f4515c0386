"""What every sink is: a consumer of spool records that confirms a batch or raises.

The spool (`sipcdr.spool`) owns durability. A sink owns nothing but the write to its
destination: `deliver` either gets a whole batch there (then the delivery loop moves
the sink's cursor past it) or raises, and the same batch comes again after a backoff.
Re-delivery is therefore normal, and each sink must make it harmless: PostgreSQL by
`ON CONFLICT DO NOTHING` on the record's id, Kafka consumers by deduplicating on
`cdr_id`, JSONL by leaving out records already at the end of its file after a crash
(and readers by `cdr_id` beyond that).

The record kinds, the streams and `SpoolRecord` belong to the spool
(`sipcdr.spool.records`), the `Sink` protocol to its delivery (`sipcdr.delivery.sink`),
both a layer below the sinks; they are named here too for the sinks that implement them.
"""

from __future__ import annotations

from typing import Self

from sipcdr.delivery.sink import RecordsRejected, Sink
from sipcdr.spool.records import (
    KIND_ALERT,
    KIND_CDR,
    KIND_SIP,
    STREAM_RECORDS,
    STREAM_SIGNALING,
    SpoolRecord,
)

__all__ = [
    "KIND_ALERT",
    "KIND_CDR",
    "KIND_SIP",
    "STREAM_RECORDS",
    "STREAM_SIGNALING",
    "AsyncLifecycle",
    "RecordsRejected",
    "Sink",
    "SpoolRecord",
]


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
