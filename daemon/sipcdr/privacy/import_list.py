"""The restriction list an import applies: `sipcdr import` publishes and stores like the
daemon, so it withholds restricted subjects' records from Kafka and flags them in
PostgreSQL by the same filter (`sipcdr.privacy.outbound`).

The list is read before the first packet: from PostgreSQL when it is configured, else
(or when it does not answer) the list the daemon last saved in the state folder; then
read again every minute while the import runs, as the daemon does.
With Kafka configured and no list to be had, the import refuses to run rather than
publish restricted subjects' records. With PostgreSQL alone its delivery waits for the
list, as the daemon's does: the database that keeps the list is the one written to, so
the records wait for it either way. Without PostgreSQL the saved list applies when
there is one, and none otherwise (restrictions are kept in PostgreSQL). A saved list
that cannot be read names someone all the same: an import with Kafka then refuses.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Final

from sipcdr.privacy.restriction_file import FILE_NAME, MAX_SAVED_SUBJECTS, saved_restrictions

if TYPE_CHECKING:
    from sipcdr.sinks.outputs import Outputs


# Until a first list is read (PostgreSQL delivery waits for it), it is asked for this often.
RETRY_S: Final = 2.0
# Then read again this often, as the daemon does: a restriction added while a long
# import runs applies from then on (what went before needs `restrict` again).
REFRESH_S: Final = 60.0


class RestrictionsUnavailable(Exception):
    """No restriction list could be read; the message is one line for the operator."""


async def apply_restrictions(outputs: Outputs) -> asyncio.Task[None] | None:
    """Put the restriction list in force on `outputs` (opened with `restrictions`, so
    the list saved in the state folder is in force, or Kafka and PostgreSQL delivery
    waits for one), or raise RestrictionsUnavailable when Kafka would have to go
    without. With PostgreSQL, the task returned (the caller cancels it at the end)
    reads the list again every `REFRESH_S`, and with PostgreSQL alone and no list yet,
    every `RETRY_S` until the database answers: its delivery waits until then, as its
    records would have anyway."""
    outbound = outputs.outbound
    settings = outputs.settings
    if outbound is None:
        return None
    if settings.postgres is None:
        # No database to ask: a list saved when there was one still holds (the daemon
        # then has none at all, since it could never lift one).
        saved = saved_restrictions(settings.state_dir)
        if saved is not None:
            outbound.set_restricted(saved)
        elif settings.kafka is not None and (settings.state_dir / FILE_NAME).exists():
            # A list was saved but cannot be read (damaged, one longer than a copy is
            # kept for, or emptied when a newer one could not be saved): it names
            # someone, so publishing without it is no better than without PostgreSQL.
            raise RestrictionsUnavailable(
                f"the restriction list saved in {settings.state_dir / FILE_NAME} cannot "
                f"be read (damaged, or more than {MAX_SAVED_SUBJECTS:,} subjects, which "
                "no copy is kept of, or emptied when a newer list could not be saved), "
                "so nothing was imported: restricted subjects' records would reach "
                "Kafka; import with PostgreSQL configured, which keeps the list"
            )
        return None
    problem = ""
    try:
        outbound.set_restricted(await _read(outputs.postgres_dsn))
    except Exception as exc:  # any failure: the saved list, or none
        problem = f"PostgreSQL: {exc}; "
    if not outbound.known and settings.kafka is not None:
        raise RestrictionsUnavailable(
            f"the restriction list cannot be read ({problem}no list saved in "
            f"{settings.state_dir / FILE_NAME}), so nothing was imported: restricted "
            "subjects' records would reach Kafka; run the import again once PostgreSQL "
            "answers"
        )
    return asyncio.create_task(_keep_reading(outputs), name="sipcdr-import-restrictions")


async def drain(outputs: Outputs, timeout_s: float) -> bool:
    """`Delivery.drain` for an import: a loop waiting for the list (which the daemon's
    drain at a stop may leave waiting) counts as not done, so the import waits for it
    as for a sink that is down, at most `timeout_s` in all; True once every sink has
    every record."""
    delivery = outputs.delivery
    if delivery is None:
        return True
    deadline = time.monotonic() + timeout_s
    while outputs.held_for_restrictions:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return await delivery.drain(max(0.0, deadline - time.monotonic()))


def undelivered(outputs: Outputs) -> dict[str, int]:
    """What each sink lacks of what the spools hold, by "sink/stream"."""
    missing: dict[str, int] = {}
    if outputs.delivery is not None:
        for state, reader in outputs.delivery.readers():
            if reader.lag_records:
                missing[f"{state.sink}/{state.stream}"] = reader.lag_records
    return missing


async def _keep_reading(outputs: Outputs) -> None:
    outbound = outputs.outbound
    assert outbound is not None
    while True:
        await asyncio.sleep(REFRESH_S if outbound.known else RETRY_S)
        try:
            numbers = await _read(outputs.postgres_dsn)
        except Exception:  # not now: the list in force stays (delivery waits without one)
            continue
        outbound.set_restricted(numbers)


async def _read(dsn: str | None) -> frozenset[str]:
    # asyncpg only when a database is used, as the sinks do.
    from sipcdr.privacy.subjects import restricted_numbers  # noqa: PLC0415
    from sipcdr.storage.migrations import connect, migrate  # noqa: PLC0415

    if dsn is None:
        raise RuntimeError("the embedded server did not start")
    conn = await connect(dsn)
    try:
        await migrate(conn)  # a fresh database: the table exists, and is empty
        return await restricted_numbers(conn)
    finally:
        await conn.close()
