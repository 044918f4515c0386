"""A connection to the configured database for the privacy commands: the DSN, or the
embedded server under `state.dir` (started for the command, or shared with a running
daemon)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

from sipcdr.config import Config
from sipcdr.storage.embedded import EmbeddedPostgres, embedded_data_dir
from sipcdr.storage.migrations import connect, migrate


class NoDatabase(RuntimeError):
    """PostgreSQL is disabled in the configuration."""


@contextlib.asynccontextmanager
async def connected(config: Config) -> AsyncIterator[asyncpg.Connection]:
    """A connection. The embedded server's schema is brought up to date first; a
    server of the operator's is migrated by `sipcdr db migrate`, by a role allowed to
    (the privacy role is not)."""
    postgres = config.sinks.postgres
    if not postgres.enabled:
        raise NoDatabase("PostgreSQL is disabled (sinks.postgres.dsn is empty)")
    async with contextlib.AsyncExitStack() as stack:
        dsn = postgres.dsn
        if postgres.embedded:
            dsn = await stack.enter_async_context(
                EmbeddedPostgres(embedded_data_dir(config.state.dir))
            )
        conn = await connect(dsn)
        stack.push_async_callback(conn.close)
        if postgres.embedded:
            await migrate(conn)
        yield conn
