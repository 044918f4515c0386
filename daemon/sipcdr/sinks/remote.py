"""Delivery in a process of its own: what the capture process knows of it.

The capture process appends to the spools; the delivery process reads them and
writes to the sinks (`sipcdr.deliverer`). What the capture process must know of the
sinks without building them (which sink reads which stream, for the spool to keep
their segments), and what the delivery process tells it once a second (an import's,
fifty times) for its metrics and its readiness, are here.
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
    # Held back on purpose (the restriction list not read yet, the spare file): not
    # behind, as `Delivery.caught_up` counts it.
    held: bool = False


@dataclass(slots=True)
class DeliverySnapshot:
    """The delivery process's counts, as it last sent them (about once a second; an
    import's fifty times a second)."""

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
    delivery = outputs.delivery
    if delivery is not None:
        for state, reader in delivery.readers():
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
                    delivery.is_held((state.sink, state.stream)),
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


def carry_counts(earlier: DeliverySnapshot | None, snapshot: DeliverySnapshot) -> None:
    """Add to `snapshot` the counts of the delivery processes before it (`earlier`: the
    last snapshot of the one that died, itself carried). A process started again
    counts from zero; the capture process's counters must not go back with it."""
    if earlier is None:
        return
    before = {(loop.state.sink, loop.state.stream): loop for loop in earlier.loops}
    for loop in snapshot.loops:
        old = before.get((loop.state.sink, loop.state.stream))
        if old is None:
            continue
        loop.state.delivered += old.state.delivered
        loop.state.failures += old.state.failures
        loop.state.rejected += old.state.rejected
        loop.cursor_write_failures += old.cursor_write_failures
        loop.corrupt_records += old.corrupt_records
    if earlier.jsonl_rotation_failures is not None:
        snapshot.jsonl_rotation_failures = (
            snapshot.jsonl_rotation_failures or 0
        ) + earlier.jsonl_rotation_failures
    for outcome, rows in earlier.postgres_rows.items():
        _add(snapshot.postgres_rows.setdefault(outcome, {}), rows)
    _add(snapshot.withheld, earlier.withheld)
    for name in ("bytes_dropped", "partitions_dropped", "rows_held", "runs"):
        _add(getattr(snapshot.privacy, name), getattr(earlier.privacy, name))


def _add(counts: dict[str, int], earlier: dict[str, int]) -> None:
    for key, count in earlier.items():
        counts[key] = counts.get(key, 0) + count
