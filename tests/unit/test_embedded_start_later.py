"""The embedded PostgreSQL's start tried again after one that found the disk full: the
sink is down meanwhile (its records wait in the spool), an attempt starts only when due
and is never cut short, and a start that fails for another reason is not taken for a
full disk."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest
from sipcdr.clock import FakeClock
from sipcdr.sinks.base import STREAM_RECORDS
from sipcdr.sinks.embedded_later import (
    RETRY_MIN_S,
    EmbeddedStartLater,
    PostgresSinkWaitingForServer,
)
from sipcdr.storage.embedded import EmbeddedPostgres, EmbeddedPostgresError, _for_want_of_space
from sipcdr.storage.migrations import DatabaseUnavailable


class FakeServer(EmbeddedPostgres):
    """Fails `failures` starts for want of room, then runs; a start takes a moment."""

    def __init__(self, failures: int) -> None:
        super().__init__(Path("/nonexistent"))
        self.failures = failures
        self.starts = 0
        self.gate = asyncio.Event()

    async def start(self) -> str:
        self.starts += 1
        await self.gate.wait()
        if self.starts <= self.failures:
            raise EmbeddedPostgresError("no room", no_space=True)
        self.dsn = "postgresql://postgres@/postgres?host=/nonexistent"
        return self.dsn


async def test_the_sink_is_down_until_the_server_starts_and_attempts_wait_their_turn() -> None:
    clock = FakeClock()
    server = FakeServer(failures=1)
    started: list[str] = []
    later = EmbeddedStartLater(server, started.append, clock)
    sink = PostgresSinkWaitingForServer(later)
    with pytest.raises(DatabaseUnavailable, match="not started"):
        await sink.deliver(STREAM_RECORDS, [])
    assert server.starts == 0  # the start that just failed is not tried again at once
    clock.advance(RETRY_MIN_S)
    with pytest.raises(DatabaseUnavailable):
        await sink.probe()
    with pytest.raises(DatabaseUnavailable):
        await sink.probe()
    await asyncio.sleep(0)
    assert server.starts == 1  # one attempt at a time
    server.gate.set()
    await asyncio.sleep(0)
    with pytest.raises(DatabaseUnavailable, match="no room"):
        later.ask()  # failed again: the next one waits longer
    clock.advance(RETRY_MIN_S)
    with pytest.raises(DatabaseUnavailable):
        later.ask()
    await asyncio.sleep(0)
    assert server.starts == 1
    clock.advance(RETRY_MIN_S)
    with pytest.raises(DatabaseUnavailable):
        later.ask()
    await later.settle()  # waits for the attempt under way rather than cutting it short
    assert server.starts == 2 and started == [server.dsn]
    assert later.ask() == server.dsn


async def test_no_attempt_begins_once_the_outputs_close() -> None:
    clock = FakeClock()
    server = FakeServer(failures=0)
    later = EmbeddedStartLater(server, lambda dsn: None, clock)
    await later.settle()
    clock.advance(RETRY_MIN_S)
    with pytest.raises(DatabaseUnavailable):
        later.ask()
    await asyncio.sleep(0)
    assert server.starts == 0


def test_a_full_disk_is_told_from_other_start_failures(tmp_path: Path) -> None:
    log = tmp_path / "log"
    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        raise EmbeddedPostgresError("wrapped") from full
    except EmbeddedPostgresError as exc:
        assert _for_want_of_space(exc, log)
    denied = PermissionError(errno.EACCES, "Permission denied")
    assert not _for_want_of_space(denied, log)
    # pg_ctl says only that the server did not start; its log says why.
    failed = EmbeddedPostgresError("pg_ctl exited with 1: could not start server")
    assert not _for_want_of_space(failed, log)
    log.write_text('FATAL:  could not write lock file "postmaster.pid": No space left on device\n')
    assert _for_want_of_space(failed, log)
