"""A start of the embedded PostgreSQL cancelled midway (the process asked to stop as
it opens its sinks) still lets go of the server its thread went on to start."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from sipcdr.storage import embedded
from sipcdr.storage.embedded import EmbeddedPostgres


async def test_a_cancelled_start_is_released_by_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    released: list[Path] = []

    def slow_acquire(data_dir: Path) -> tuple[Path, str]:
        time.sleep(0.3)  # initdb, the server's start
        return data_dir, "postgresql://held"

    monkeypatch.setattr(embedded, "_acquire", slow_acquire)
    monkeypatch.setattr(embedded, "_release", released.append)
    server = EmbeddedPostgres(tmp_path / "pg")
    starting = asyncio.create_task(server.start())
    await asyncio.sleep(0.05)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    await server.stop()
    assert released == [tmp_path / "pg"]


async def test_a_start_cancelled_twice_is_still_released_by_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second Ctrl-C or SIGTERM while the first one waits for the start: the server
    the thread then starts is still held, and let go."""
    released: list[Path] = []

    def slow_acquire(data_dir: Path) -> tuple[Path, str]:
        time.sleep(0.3)
        return data_dir, "postgresql://held"

    monkeypatch.setattr(embedded, "_acquire", slow_acquire)
    monkeypatch.setattr(embedded, "_release", released.append)
    server = EmbeddedPostgres(tmp_path / "pg")
    starting = asyncio.create_task(server.start())
    await asyncio.sleep(0.05)
    starting.cancel()
    await asyncio.sleep(0.05)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    await server.stop()
    assert released == [tmp_path / "pg"]
