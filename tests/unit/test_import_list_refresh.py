"""An import reads the restriction list again while it runs, as the daemon does: a
restriction added during a long import applies from the next read on."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sipcdr.privacy import import_list
from sipcdr.privacy.outbound import OutboundFilter


async def test_a_restriction_added_during_an_import_applies_from_the_next_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lists = [frozenset(), frozenset({"4940555666"})]
    reads: list[frozenset[str]] = []

    async def read(_dsn: str | None) -> frozenset[str]:
        numbers = lists[min(len(reads), len(lists) - 1)]
        reads.append(numbers)
        return numbers

    monkeypatch.setattr(import_list, "_read", read)
    monkeypatch.setattr(import_list, "REFRESH_S", 0.01)
    outbound = OutboundFilter(None, pseudonymize=False)
    settings = SimpleNamespace(postgres=object(), kafka=object(), state_dir=tmp_path)
    outputs: Any = SimpleNamespace(outbound=outbound, settings=settings, postgres_dsn="x")
    task = await import_list.apply_restrictions(outputs)
    assert task is not None
    assert outbound.restricted == frozenset()
    try:
        async with asyncio.timeout(5):
            while not outbound.restricted:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert outbound.is_restricted("4940555666")
