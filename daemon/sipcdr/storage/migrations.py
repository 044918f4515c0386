"""Schema migrations: the numbered SQL files shipped in `sipcdr/storage/sql`, applied in
order.

A file `NNNN_name.sql` is applied once, in its own transaction, and recorded in
`schema_migrations` with the SHA-256 of its bytes. An applied file must never change:
a database built from the old text would differ from one built from the new, so a
changed checksum is refused (`MigrationError`) instead of silently ignored.

Every step holds a transaction-scoped advisory lock, so two daemons (or a daemon and
`sipcdr db migrate`) starting together never apply the same file twice: the second
waits, then finds the file recorded and skips it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Final

import asyncpg

from sipcdr.storage.dsn import dsn_problem, redact_dsn
from sipcdr.storage.embedded import EmbeddedPostgres, embedded_data_dir

# Package data, read through importlib.resources: the installed package migrates
# whether it runs from a wheel, an editable install or the source tree.
MIGRATIONS_PACKAGE: Final = "sipcdr.storage"
MIGRATIONS_FOLDER: Final = "sql"


def migrations_dir() -> Traversable:
    """The migrations shipped with this package."""
    return resources.files(MIGRATIONS_PACKAGE).joinpath(MIGRATIONS_FOLDER)


# Key of the advisory lock every migration step holds; any fixed 64-bit number that no
# other application on the same database uses ("sipcdr" in ASCII, then 1).
MIGRATION_LOCK_KEY: Final = 0x7369_7063_6472_0001

# A reachable server answers a connect in milliseconds; longer means it is not there.
DEFAULT_CONNECT_TIMEOUT_S: Final = 5.0

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer      PRIMARY KEY,
    name        text         NOT NULL,
    checksum    text         NOT NULL,
    applied_at  timestamptz  NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The migrations cannot be applied as they are; the message says which file."""


class DatabaseUnavailable(ConnectionError):
    """No connection to the database; the message names it with its password masked."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str  # file name without ".sql", e.g. "0001_initial"
    path: Traversable  # a Path when the package is on the file system
    sql: str
    checksum: str  # SHA-256 of the file's bytes, hex


def load_migrations(directory: Traversable | None = None) -> list[Migration]:
    """The migration files of `directory` (the package's by default), by version.

    A `.sql` file whose name does not follow `NNNN_name.sql`, or two files with one
    number, are errors rather than skipped: either would leave a migration unapplied.
    """
    directory = migrations_dir() if directory is None else directory
    if not directory.is_dir():
        raise MigrationError(
            f"migrations directory {directory} not found: the sipcdr package was installed "
            "without its package data (sipcdr/storage/sql)"
        )
    found: dict[int, Migration] = {}
    paths = (path for path in directory.iterdir() if path.name.endswith(".sql"))
    for path in sorted(paths, key=lambda path: path.name):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path}: migration file names are NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"{path}: version {version} is also {found[version].path.name}")
        data = path.read_bytes()
        try:
            sql = data.decode()
        except UnicodeDecodeError as exc:
            raise MigrationError(f"{path}: not UTF-8 ({exc})") from None
        name = path.name.removesuffix(".sql")
        found[version] = Migration(version, name, path, sql, hashlib.sha256(data).hexdigest())
    return [found[version] for version in sorted(found)]


async def migrate(conn: asyncpg.Connection, directory: Traversable | None = None) -> list[str]:
    """Apply every pending migration of `directory` (the package's by default).

    Returns the names of the files applied now, in order; empty when the schema was
    already current. Raises MigrationError when an applied file was changed since, or
    when a file fails (its transaction is rolled back; earlier files stay applied).
    """
    migrations = load_migrations(directory)
    applied: list[str] = []
    for migration in migrations:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            await conn.execute(_CREATE_TABLE)
            recorded = await conn.fetchrow(
                "SELECT name, checksum FROM schema_migrations WHERE version = $1",
                migration.version,
            )
            if recorded is not None:
                _check_unchanged(migration, recorded["checksum"])
                continue
            try:
                await conn.execute(migration.sql)
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"{migration.path}: {type(exc).__name__}: {exc}") from exc
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
        applied.append(migration.name)
    return applied


def _check_unchanged(migration: Migration, recorded_checksum: str) -> None:
    if recorded_checksum != migration.checksum:
        raise MigrationError(
            f"{migration.path} was changed after it was applied (checksum "
            f"{migration.checksum[:12]}, applied as {recorded_checksum[:12]}); restore it "
            "and put the change in a new migration file"
        )


async def connect(
    dsn: str,
    timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    command_timeout_s: float | None = None,
) -> asyncpg.Connection:
    """A connection to `dsn`, or DatabaseUnavailable with a one-line reason."""
    try:
        return await asyncpg.connect(dsn, timeout=timeout_s, command_timeout=command_timeout_s)
    except asyncpg.ClientConfigurationError as exc:
        raise DatabaseUnavailable(f"cannot use {redact_dsn(dsn)}: {_unusable(dsn, exc)}") from exc
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(f"cannot connect to {redact_dsn(dsn)}: {_reason(exc)}") from exc
    except (ValueError, AttributeError, IndexError) as exc:
        raise DatabaseUnavailable(f"cannot use {redact_dsn(dsn)}: {_unusable(dsn, exc)}") from exc


def _unusable(dsn: str, exc: Exception) -> str:
    # The driver's URL parsing; the config refuses such a DSN before it gets here. Its
    # message may quote the password, so only the config's reading is shown.
    return dsn_problem(dsn) or f"the driver cannot read it ({type(exc).__name__})"


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


async def migrate_dsn(dsn: str, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> list[str]:
    """Connect to `dsn`, apply what is pending, disconnect; the names applied."""
    conn = await connect(dsn, timeout_s)
    try:
        return await migrate(conn)
    except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(f"lost {redact_dsn(dsn)}: {_reason(exc)}") from exc
    except asyncpg.PostgresError as exc:  # before any file ran: rights, a read-only server
        raise MigrationError(f"{redact_dsn(dsn)}: {type(exc).__name__}: {_reason(exc)}") from exc
    finally:
        await _close_quietly(conn)


async def _close_quietly(conn: asyncpg.Connection) -> None:
    try:
        await conn.close(timeout=DEFAULT_CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        conn.terminate()


async def migrate_configured(dsn: str, state_dir: Path) -> list[str]:
    """`sipcdr db migrate`: the database `dsn` names, or with "embedded" the embedded
    server under `state_dir` (started for the purpose, or shared when the daemon runs it)."""
    if not dsn:
        raise ValueError("PostgreSQL is disabled (sinks.postgres.dsn is empty)")
    if dsn != "embedded":
        return await migrate_dsn(dsn)
    async with EmbeddedPostgres(embedded_data_dir(state_dir)) as embedded_dsn:
        return await migrate_dsn(embedded_dsn)
