"""Delivery in a process of its own: what the capture process knows of it.

The capture process appends to the spools; the delivery process reads them and
writes to the sinks (`sipcdr.deliverer`). What the capture process must know of the
sinks without building them (which sink reads which stream, for the spool to keep
their segments), and what the delivery process tells it once a second for its metrics
and its readiness, are here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from sipcdr.delivery import LoopState
from sipcdr.privacy.stats import PrivacyStats
from sipcdr.sinks.base import STREAM_RECORDS, STREAM_SIGNALING
from sipcdr.sinks.settings import OutputSettings

if TYPE_CHECKING:
    from sipcdr.sinks.outputs import Outputs


class SinkPlan(NamedTuple):
    """A sink as configured: its name and the streams it reads."""

    name: str
    streams: tuple[str, ...]


def sink_plans(settings: OutputSettings) -> list[SinkPlan]:
    """The sinks `Outputs.open` builds, in its order, without building them."""
    plans: list[SinkPlan] = []
    if settings.jsonl is not None:
        plans.append(SinkPlan("jsonl", (STREAM_RECORDS,)))
    if settings.postgres is not None:
        signaling = settings.postgres.store_signaling
        plans.append(
            SinkPlan(
                "postgres", (STREAM_RECORDS, STREAM_SIGNALING) if signaling else (STREAM_RECORDS,)
            )
        )
    if settings.kafka is not None:
        sip = bool(settings.kafka.topic_sip)
        plans.append(
            SinkPlan("kafka", (STREAM_RECORDS, STREAM_SIGNALING) if sip else (STREAM_RECORDS,))
        )
    return plans


@dataclass(slots=True)
class LoopSnapshot:
    state: LoopState
    confirmed_seq: int  # the reader's: the lag is the writer's next_seq less this
    cursor_write_failures: int
    corrupt_records: int


@dataclass(slots=True)
class DeliverySnapshot:
    """The delivery process's counts, as it last sent them (about once a second)."""

    loops: list[LoopSnapshot] = field(default_factory=list)
    jsonl_rotation_failures: int | None = None
    # outcome ("inserted", "duplicate") -> table -> rows
    postgres_rows: dict[str, dict[str, int]] = field(default_factory=dict)
    privacy: PrivacyStats = field(default_factory=PrivacyStats)
    withheld: dict[str, int] = field(default_factory=dict)  # Kafka records, by kind
    held_for_restrictions: bool = False


def take_snapshot(outputs: Outputs, privacy: PrivacyStats) -> DeliverySnapshot:
    """What the delivery process's `outputs` count now."""
    snapshot = DeliverySnapshot(
        privacy=privacy, held_for_restrictions=outputs.held_for_restrictions
    )
    if outputs.delivery is not None:
        for state, reader in outputs.delivery.readers():
            state_copy = LoopState(
                state.sink,
                state.stream,
                delivered=state.delivered,
                failures=state.failures,
                rejected=state.rejected,
                up=state.up,
                tried=state.tried,
                down_since=state.down_since,
                last_error=state.last_error,
            )
            snapshot.loops.append(
                LoopSnapshot(
                    state_copy,
                    reader.confirmed_seq,
                    reader.cursor_write_failures,
                    reader.corrupt_records,
                )
            )
    for sink in outputs.sinks:
        failures = getattr(sink, "rotation_failures", None)
        if failures is not None:
            snapshot.jsonl_rotation_failures = failures
        for outcome, attribute in (
            ("inserted", "rows_inserted"),
            ("duplicate", "duplicates_skipped"),
        ):
            rows = dict(getattr(sink, attribute, None) or {})
            if rows:
                snapshot.postgres_rows[outcome] = rows
    if outputs.outbound is not None:
        snapshot.withheld = dict(outputs.outbound.withheld)
    return snapshot
