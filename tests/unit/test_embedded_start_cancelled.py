"""A start of the embedded PostgreSQL cancelled midway (the process asked to stop as
it opens its sinks) still lets go of the server its thread went on to start."""

from __future__ import annotations

import asyncio
import atexit
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sipcdr.storage import embedded
from sipcdr.storage.embedded import EmbeddedPostgres


@pytest.fixture
def released(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The data folders let go of; each start takes 0.3 s (initdb, the server's)."""
    let_go: list[Path] = []

    def slow_acquire(data_dir: Path) -> tuple[Path, str]:
        time.sleep(0.3)
        return data_dir, "postgresql://held"

    monkeypatch.setattr(embedded, "_acquire", slow_acquire)
    monkeypatch.setattr(embedded, "_release", let_go.append)
    return let_go


@pytest.mark.parametrize("cancels", [1, 2], ids=["once", "twice"])
async def test_a_cancelled_start_is_released_by_stop(
    tmp_path: Path, released: list[Path], cancels: int
) -> None:
    """Twice: a second Ctrl-C or SIGTERM while the first one waits for the start."""
    server = EmbeddedPostgres(tmp_path / "pg")
    starting = asyncio.create_task(server.start())
    for _ in range(cancels):
        await asyncio.sleep(0.05)
        starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    await server.stop()
    assert released == [tmp_path / "pg"]


def test_a_start_abandoned_with_its_loop_is_released_at_exit(
    tmp_path: Path, released: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A third signal closes the event loop while the thread still starts the server:
    the release the process's exit runs was set up before the thread began."""
    at_exit: list[Callable[[], None]] = []
    monkeypatch.setattr(atexit, "register", at_exit.append)
    server = EmbeddedPostgres(tmp_path / "pg")
    loop = asyncio.new_event_loop()
    starting = loop.create_task(server.start())
    loop.run_until_complete(asyncio.sleep(0.05))
    starting.cancel()
    loop.run_until_complete(asyncio.sleep(0.05))  # the start waits for its thread now
    loop.close()  # with the start still waiting: nothing of it runs again
    time.sleep(0.5)  # the thread has started the server meanwhile
    for release in at_exit:  # what the exit runs
        release()
    assert released == [tmp_path / "pg"]
    starting._log_destroy_pending = False  # type: ignore[attr-defined]  # abandoned on purpose
