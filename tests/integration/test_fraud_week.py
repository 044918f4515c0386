"""A simulated week of a regional carrier through the fraud monitor with the shipped
defaults: quiet on its own; every injected attack alerted within its window.

Volume: 30,000 calls a weekday over 50 trunks (office, residential, call-centre and
wholesale trunks; fewer calls at weekends): about 185,000 calls and 840,000 messages
in the week, with 400 phones re-registering hourly, three phones failing with a
stale password every minute and an office rebooting 60 phones behind one address
each morning. That is about a twentieth of a national carrier; the rates the
thresholds are about (calls a second, calls in progress) are shown at full size in
test_fraud_detectors.py, each against a normal mix of the same volume.
"""

from __future__ import annotations

import random

import pytest
from sipcdr.fraud import FraudMonitor
from trafficgen import ATTACKS, DAY, MONDAY, Carrier, Timeline, inject

CALLS_PER_WEEKDAY = 30_000
SEED = 20261102


@pytest.fixture(scope="module")
def week() -> tuple[Carrier, Timeline]:
    carrier = Carrier(seed=SEED, calls_per_day=CALLS_PER_WEEKDAY)
    timeline = Timeline()
    carrier.week(timeline)
    return carrier, timeline


def test_a_normal_week_raises_no_alert(week: tuple[Carrier, Timeline]) -> None:
    carrier, events = week
    timeline = events.copy()
    monitor = FraudMonitor(carrier.settings(), rating=True)
    timeline.run(monitor, carrier.trunk_of())
    # The week is the carrier it claims to be...
    assert 150_000 < timeline.calls < 220_000
    assert 0.45 < timeline.answered / timeline.calls < 0.55
    assert 0.02 < timeline.abroad / timeline.calls < 0.06
    # ...and nothing in it is fraud.
    assert timeline.alerts == []
    assert timeline.flagged == {}
    assert monitor.stats.alerts == {}
    assert monitor.stats.evicted == dict.fromkeys(monitor.stats.evicted, 0)


def test_every_attack_is_alerted_within_its_window(week: tuple[Carrier, Timeline]) -> None:
    carrier, events = week
    timeline = events.copy()
    rng = random.Random(SEED)
    # At random times after the first day, which trunk baselines spend learning.
    attacks = [
        inject(name, carrier, timeline, MONDAY + DAY + rng.uniform(0, 6 * DAY - 3 * 3600), rng)
        for name in ATTACKS
    ]
    settings = carrier.settings()
    monitor = FraudMonitor(settings, rating=True)
    timeline.run(monitor, carrier.trunk_of())

    for attack in attacks:
        raised = [
            alert.raised_at
            for alert in timeline.alerts
            if (alert.detector, alert.subject, alert.revision)
            == (attack.detector, attack.subject, 0)
        ]
        assert raised, f"{attack.detector} did not alert on {attack.subject}"
        delay = min(raised) - attack.start
        assert 0 <= delay <= attack.deadline_s, (attack.detector, delay)
    # Every alert is one of the attacks, on a subject it touched, while it ran.
    stray = [
        alert
        for alert in timeline.alerts
        if not any(
            alert.subject in attack.related | {attack.subject}
            and attack.start <= alert.raised_at <= attack.end + settings.cooldown_s
            for attack in attacks
        )
    ]
    assert stray == []
    # Flags go on the attack's calls, and on the ordinary calls of an attacked trunk
    # that counted while it was over a threshold (its spend in that hour, say).
    assert any(call_id.startswith("attack-") for call_id in timeline.flagged)
    ordinary = {call_id.partition("@")[2] for call_id in timeline.flagged if "@" in call_id}
    assert ordinary <= carrier.victims
