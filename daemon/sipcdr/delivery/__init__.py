"""Delivery: from the spool to each sink, one loop per (sink, stream), read, deliver,
commit, with backoff and a drain at stop (`loop`)."""

from sipcdr.delivery.loop import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_RECORDS,
    DEFAULT_DELIVER_TIMEOUT_S,
    DEFAULT_DRAIN_TIMEOUT_S,
    MAX_BACKOFF_S,
    MIN_BACKOFF_S,
    PROBE_INTERVAL_S,
    PROBE_TIMEOUT_S,
    SLOW_BATCH_S,
    Delivery,
    LoopState,
)

__all__ = [
    "DEFAULT_BATCH_BYTES",
    "DEFAULT_BATCH_RECORDS",
    "DEFAULT_DELIVER_TIMEOUT_S",
    "DEFAULT_DRAIN_TIMEOUT_S",
    "MAX_BACKOFF_S",
    "MIN_BACKOFF_S",
    "PROBE_INTERVAL_S",
    "PROBE_TIMEOUT_S",
    "SLOW_BATCH_S",
    "Delivery",
    "LoopState",
]
