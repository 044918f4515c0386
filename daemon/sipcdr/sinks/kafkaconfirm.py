"""Waiting for a batch's Kafka confirmations: what `KafkaSink.deliver` awaits once
every record of the batch is handed to the producer, and what it counts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any


class Confirmations:
    """One batch's records as the broker confirms them.

    Each record's future is given one callback, `counter(topic)`, which counts the
    record for its topic when it is confirmed and counts the batch down; `wait`
    returns once every future is done. One callback per record, where a counting
    callback and a waiting one (or `asyncio.gather`'s own) cost the event loop two
    scheduled calls per record, each of them as much as the rest of its confirmation.
    A record confirmed after its batch stopped waiting (a deliver cancelled while it
    was handing records over) is counted all the same: the broker holds it.
    """

    __slots__ = ("_finished", "_left", "_sent")

    def __init__(self, sent: dict[str, int]) -> None:
        self._sent = sent  # confirmed records per topic, the sink's
        # Futures given to `wait` whose callback has not run; below zero until then.
        self._left = 0
        self._finished: asyncio.Future[None] | None = None

    def counter(self, topic: str) -> Callable[[asyncio.Future[Any]], None]:
        """The callback for the futures of this topic's records: one per topic and
        batch, not one per record."""
        return partial(self._done, topic)

    def _done(self, topic: str, future: asyncio.Future[Any]) -> None:
        # Reading the exception also marks it retrieved: a batch abandoned by a timeout
        # fails later without "exception was never retrieved" noise.
        if not future.cancelled() and future.exception() is None:
            self._sent[topic] += 1
        self._left -= 1
        finished = self._finished
        if not self._left and finished is not None and not finished.done():
            finished.set_result(None)

    async def wait(self, futures: list[asyncio.Future[Any]]) -> None:
        """Return once every one of `futures` is done, each given a `counter` callback
        (so its confirmation is counted before this returns), as `asyncio.gather(*futures,
        return_exceptions=True)` does; cancelled, cancel those not done, as it does."""
        self._left += len(futures)
        if not self._left:
            return
        self._finished = asyncio.get_running_loop().create_future()
        try:
            await self._finished
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise


def failure_of(future: asyncio.Future[Any]) -> BaseException | None:
    """What gather would have returned for a done future that failed, else None."""
    if future.cancelled():
        return asyncio.CancelledError()
    return future.exception()
