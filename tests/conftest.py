"""Shared fixtures: real SIP peers (Kamailio, SIPp) started by a test and killed in its teardown.

When a test fails, the teardown prints the tail of every peer log, so that
the failure report shows what Kamailio and SIPp saw without a rerun.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
import structlog
from peers import (
    Address,
    Kamailio,
    KamailioFactory,
    Sipp,
    UdpSink,
    format_logs,
    require_program,
)

# Fixtures for the real servers the delivery tests write to, and small real disks.
pytest_plugins = ["pgserver", "kafkabroker", "smalldisk", "daemonproc"]

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Fixture teardown runs before the test's outcome is reported; keeping the
    # setup and call reports on the item lets it know whether to dump logs.
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    # A test that runs the command line in-process configures structlog to print to
    # the stream pytest captured for that test; later tests must not log into it.
    yield
    structlog.reset_defaults()


def _test_failed(node: pytest.Item) -> bool:
    return any(report.failed for report in node.stash.get(_REPORTS, {}).values())


@pytest.fixture
def kamailio_hep(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[KamailioFactory]:
    """Factory: ``kamailio_hep(hep_target, uas)`` starts a tracing proxy in front of ``uas``.

    The proxy listens on a free loopback port (``.address``), relays every
    call to ``uas`` and mirrors all SIP it receives and sends as HEPv3, capture
    id 2001, to ``hep_target``. Stopped in teardown.
    """
    binary = require_program("kamailio")
    started: list[Kamailio] = []

    def start(hep_target: Address, uas: Address) -> Kamailio:
        proxy = Kamailio(tmp_path / f"kamailio{len(started)}", binary=binary)
        started.append(proxy)
        proxy.start(uas=uas, hep_target=hep_target)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
    if _test_failed(request.node):
        for proxy in started:
            print(proxy.describe())


@pytest.fixture
def sipp(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Sipp]:
    """SIPp runner with its files under ``tmp_path/sipp``; every process killed in teardown."""
    runner = Sipp(tmp_path / "sipp", binary=require_program("sipp"))
    yield runner
    runner.stop()
    if _test_failed(request.node):
        print(format_logs(runner.all_log_files()))


@pytest.fixture
def udp_sink() -> Iterator[UdpSink]:
    """A UDP socket on a free loopback port collecting datagrams, e.g. mirrored HEP."""
    with UdpSink() as sink:
        yield sink
