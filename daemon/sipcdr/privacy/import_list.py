"""The restriction list an import applies: `sipcdr import` publishes and stores like the
daemon, so it withholds restricted subjects' records from Kafka and flags them in
PostgreSQL by the same filter (`sipcdr.privacy.outbound`).

The list is read once, before the first packet: from PostgreSQL when it is configured,
else (or when it does not answer) the list the daemon last saved in the state folder.
An import does not wait for a list as the daemon does: with Kafka or PostgreSQL
configured and no list to be had, it refuses to run, since its records would otherwise
leave unfiltered or be stored unflagged. Without PostgreSQL there are no restrictions
(they are kept there), as in the daemon.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sipcdr.privacy.restriction_file import FILE_NAME, saved_restrictions

if TYPE_CHECKING:
    from sipcdr.sinks.outputs import Outputs


class RestrictionsUnavailable(Exception):
    """No restriction list could be read; the message is one line for the operator."""


async def apply_restrictions(outputs: Outputs) -> None:
    """Put the restriction list in force on `outputs` (opened), or raise
    RestrictionsUnavailable."""
    outbound = outputs.outbound
    settings = outputs.settings
    if outbound is None or (settings.kafka is None and settings.postgres is None):
        return
    numbers: frozenset[str] | None = None
    problem = ""
    if settings.postgres is not None:
        try:
            numbers = await _read(outputs.postgres_dsn)
        except Exception as exc:  # any failure: the saved list, or a refusal
            problem = f"PostgreSQL: {exc}; "
    if numbers is None:
        numbers = saved_restrictions(settings.state_dir)
    if numbers is None:
        if settings.postgres is None:
            numbers = frozenset()
        else:
            sinks = " and ".join(
                name
                for name, on in (("Kafka", settings.kafka), ("PostgreSQL", settings.postgres))
                if on is not None
            )
            raise RestrictionsUnavailable(
                f"the restriction list cannot be read ({problem}no list saved in "
                f"{settings.state_dir / FILE_NAME}), so nothing was imported: restricted "
                f"subjects' records would reach {sinks} unfiltered; run the import again "
                "once PostgreSQL answers"
            )
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
