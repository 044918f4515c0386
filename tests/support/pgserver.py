"""Real PostgreSQL servers for the tests (fixtures).

- `pg_server_dsn` (session): the server every test shares: `SIPCDR_TEST_PG_DSN` when
  set (a postgresql:// URL of a role that may create databases, such as
  postgresql://postgres@127.0.0.1:5432/test), otherwise an embedded server under the
  session's temporary directory, stopped at the end.
- `pg_dsn`: a fresh, uniquely named database on that server for one test, dropped after
  it, so tests neither see each other's rows nor depend on their order.
- `private_pg`: a factory of `EmbeddedPostgres` servers the test owns and may stop and
  start again (outages); each is stopped in teardown.
- `open_tmp_path`: a temporary folder other users may traverse, for embedded servers.
  Under root the server runs as a system user of its own, which must reach its data
  directory; pytest's temporary folders are closed to other users, and sipcdr opens no
  folder it does not own.

A test that asks for a server and cannot get one fails, with the reason; it never skips.
Async work runs in a thread of its own (`run_sync`), so these synchronous fixtures serve
sync and async tests alike without touching the event loop of the test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from sipcdr.storage.embedded import EmbeddedPostgres

PG_DSN_ENV: Final = "SIPCDR_TEST_PG_DSN"
# Others may enter it but not list it: the server's own user reaches its data by name.
OPEN_TMP_MODE: Final = 0o711
# Connecting to a local server takes milliseconds; this only bounds a hung one.
CONNECT_TIMEOUT_S: Final = 10.0

T = TypeVar("T")

PrivatePg = Callable[[], EmbeddedPostgres]


def run_sync(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the coroutine `make()` to completion on a fresh event loop in another thread."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def with_database(dsn: str, database: str) -> str:
    """`dsn` (a postgresql:// URL) naming `database` instead of its own."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def _admin(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@contextlib.contextmanager
def open_tmp_dir() -> Iterator[Path]:
    """A fresh folder under the system's temporary folder that other users may
    traverse (see the module docstring), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="sipcdr-test-"))
    try:
        path.chmod(OPEN_TMP_MODE)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def open_tmp_path() -> Iterator[Path]:
    with open_tmp_dir() as path:
        yield path


@pytest.fixture(scope="session")
def session_open_tmp_path() -> Iterator[Path]:
    with open_tmp_dir() as path:
        yield path


@pytest.fixture(scope="session")
def pg_server_dsn(session_open_tmp_path: Path) -> Iterator[str]:
    dsn = os.environ.get(PG_DSN_ENV, "")
    if dsn:
        try:
            run_sync(lambda: _admin(dsn, "SELECT 1"))
        except Exception as exc:
            pytest.fail(f"{PG_DSN_ENV}={dsn} is not usable: {type(exc).__name__}: {exc}")
        yield dsn
        return
    server = EmbeddedPostgres(session_open_tmp_path / "pg")
    try:
        dsn = run_sync(server.start)
    except Exception as exc:
        pytest.fail(
            f"no PostgreSQL for the tests: {PG_DSN_ENV} is unset and the embedded server "
            f"did not start: {type(exc).__name__}: {exc}"
        )
    yield dsn
    run_sync(server.stop)


@pytest.fixture
def pg_dsn(pg_server_dsn: str) -> Iterator[str]:
    name = f"sipcdr_test_{uuid.uuid4().hex[:16]}"
    run_sync(lambda: _admin(pg_server_dsn, f'CREATE DATABASE "{name}"'))
    yield with_database(pg_server_dsn, name)
    # FORCE: a test that failed may have left a connection open.
    run_sync(lambda: _admin(pg_server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def private_pg(open_tmp_path: Path) -> Iterator[PrivatePg]:
    servers: list[EmbeddedPostgres] = []

    def make() -> EmbeddedPostgres:
        server = EmbeddedPostgres(open_tmp_path / f"private-pg{len(servers)}")
        servers.append(server)
        return server

    yield make
    for server in servers:
        run_sync(server.stop)
