"""The compiled fraud detectors and the interpreted ones give identical results.

`sipcdr.fraud` is compiled with the rest of the hot path (`hotpath.COMPILED_MODULES`);
the modules in use and copies loaded from their source (`hotpath.load_interpreted`)
run side by side on the same simulated carrier with every attack injected, and on a
spray of random subjects past small caps. Compared: every alert record (new, updated,
closed), every call's `fraud_flags`, the running totals and the baseline snapshot.
"""

from __future__ import annotations

import copy
import importlib
import random
from typing import Any

import pytest
from sipcdr.fraud.settings import FraudSettings
from sipcdr.hotpath import COMPILED_MODULES, hot_path, load_interpreted
from sipcdr.model import Packet
from sipcdr.sip import parse
from trafficgen import ATTACKS, DAY, MONDAY, Carrier, Timeline, inject

SEED = 20261205
MONITOR = "sipcdr.fraud.monitor"
# FraudStats' fields (a compiled class has no __slots__ to read them from).
STATS = (
    "alerts",
    "calls_evicted",
    "evicted",
    "inactive",
    "incidents_evicted",
    "suppressed",
    "tracked",
    "updates",
)


@pytest.fixture(scope="module")
def monitors() -> tuple[Any, Any]:
    """The FraudMonitor class in use, and its twin from source."""
    compiled = importlib.import_module(MONITOR)
    interpreted = load_interpreted()[MONITOR]
    assert MONITOR in COMPILED_MODULES
    assert interpreted.FraudMonitor is not compiled.FraudMonitor
    return compiled.FraudMonitor, interpreted.FraudMonitor


def _stats(monitor: Any) -> dict[str, object]:
    stats = monitor.stats
    return {name: getattr(stats, name) for name in STATS}


def test_the_suite_runs_the_compiled_detectors_when_the_install_built_them() -> None:
    kind, _reason = hot_path()
    module = importlib.import_module(MONITOR)
    assert (kind == "compiled") == (not module.__file__.endswith(".py"))  # type: ignore[union-attr]


def test_a_carrier_with_every_attack(monitors: tuple[Any, Any]) -> None:
    carrier = Carrier(seed=SEED, calls_per_day=4000)
    timeline = Timeline()
    carrier.week(timeline, days=3)
    rng = random.Random(SEED)
    for name in ATTACKS:
        inject(name, carrier, timeline, MONDAY + DAY + rng.uniform(0, DAY - 3 * 3600), rng)
    results = []
    for cls in monitors:
        run = timeline.copy()
        monitor = cls(carrier.settings(), rating=True)
        run.run(monitor, carrier.trunk_of())
        results.append((run.alerts, run.flagged, _stats(monitor), monitor.snapshot()))
    compiled, interpreted = results
    assert compiled[0], "the attacks raise alerts"
    assert {alert.detector for alert in compiled[0]} >= {
        name for name in ATTACKS if name != "scanner_probing"
    }
    assert compiled == interpreted


def test_a_spray_past_the_caps(monitors: tuple[Any, Any]) -> None:
    """Random sources and numbers with small caps: the same evictions, the same
    alerts."""
    invite = parse(
        b"INVITE sip:+442071234567@203.0.113.5 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 198.51.100.10;branch=z9hG4bK1\r\n"
        b"From: <sip:+4930123456@198.51.100.10>;tag=1\r\n"
        b"To: <sip:+442071234567@203.0.113.5>\r\n"
        b"Call-ID: spray\r\nCSeq: 1 INVITE\r\nUser-Agent: sipvicious\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    results = []
    for cls in monitors:
        monitor = cls(FraudSettings(max_subjects=50, max_tracked_calls=40))
        rng = random.Random(SEED)
        alerts = []
        for n in range(3000):
            now = 1_790_000_000.0 + n * 0.01
            msg = copy.copy(invite)
            msg.call_id = f"spray-{n}"
            msg.request_uri = f"sip:+{rng.choice(('44', '882', '7'))}{rng.randrange(10**9)}@x"
            msg.from_uri = f"sip:+49{rng.randrange(10**6)}@x"
            source = f"10.0.{rng.randrange(4)}.{rng.randrange(256)}"
            packet = Packet(now, source, 5060, "203.0.113.5", 5060, "udp", b"", "t")
            alerts += monitor.on_message(msg, packet, now, None)
            if n % 100 == 0:
                alerts += monitor.expire(now)
        results.append((alerts, _stats(monitor), monitor.tracked_calls))
    assert results[0][0]
    assert results[0] == results[1]
