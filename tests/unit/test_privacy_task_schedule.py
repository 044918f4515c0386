"""When the daemon's retention runs: a failed run is tried again within minutes, not
at the next daily run (a first start on a fresh database used to fail once and then
leave retention undone for a day)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from sipcdr.config import Config
from sipcdr.privacy import task as task_module
from sipcdr.privacy.stats import PrivacyStats
from sipcdr.privacy.task import RETRY_AFTER_FAILURE_S, PrivacyTask


def test_a_failed_run_is_tried_again_soon_and_a_good_one_a_day_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [0.0]
    runs: list[float] = []
    outcomes = iter([False, True, True])
    task = PrivacyTask(Config(), PrivacyStats(), lambda: None, None, clock=lambda: now[0])

    async def run_once() -> None:
        runs.append(now[0])
        if not next(outcomes):
            task.failures += 1

    async def sleep(seconds: float) -> None:
        now[0] += seconds
        if len(runs) == 3:
            raise asyncio.CancelledError

    monkeypatch.setattr(task, "run_once", run_once)
    monkeypatch.setattr(task_module, "asyncio", SimpleNamespace(sleep=sleep))
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(task._loop())
    interval = Config().retention.run_interval_s
    assert runs[0] == 0.0
    assert runs[1] == pytest.approx(RETRY_AFTER_FAILURE_S, abs=1.0)
    assert runs[2] == pytest.approx(runs[1] + interval, abs=60.0)
