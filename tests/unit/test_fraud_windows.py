"""The bounded counters under the detectors: exact against a brute-force count, capped,
and forgetting what has left the window; and the monitor's memory under a spray."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from sipcdr.fraud import FraudMonitor, FraudSettings
from sipcdr.fraud.settings import DETECTORS
from sipcdr.fraud.windows import (
    DistinctCounter,
    Gauge,
    RunTracker,
    SeasonalBaseline,
    WindowCounter,
)
from trafficgen import packet, request

T0 = 1_700_000_000.0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("abc"), st.floats(0, 7), st.integers(1, 3)),
        min_size=1,
        max_size=80,
    )
)
def test_window_counter_equals_a_brute_force_count(events: list[tuple[str, float, int]]) -> None:
    counter = WindowCounter(window_s=10, slices=5, cap=10)
    width = 10 / 5
    now = T0
    seen: list[tuple[str, float, int]] = []
    for subject, step, amount in events:
        now += step
        seen.append((subject, now, amount))
        newest = int(now // width)
        expected = sum(a for s, t, a in seen if s == subject and int(t // width) > newest - 5)
        assert counter.add(subject, now, amount) == expected
    counter.expire(now + 10)
    assert counter.totals == {}


def test_window_counter_evicts_the_least_recently_updated_subjects() -> None:
    counter = WindowCounter(window_s=60, slices=6, cap=32)
    for i in range(32):
        counter.add(f"s{i}", T0)
    counter.add("s0", T0 + 1)  # s0 is busy: s1 is now the idlest
    counter.add("new", T0 + 2)
    # Over the cap, the idlest go in a batch (a sixteenth of the cap, and the excess).
    assert counter.evicted == 3
    assert set(counter.totals) == {"s0", "new"} | {f"s{i}" for i in range(4, 32)}
    assert counter.add("s1", T0 + 3) == 1  # starts afresh, nothing left behind in a slice


def test_window_counter_first_seen_is_the_oldest_slice_still_counted() -> None:
    counter = WindowCounter(window_s=10, slices=10, cap=10)
    counter.add("a", T0 + 0.5)
    counter.add("a", T0 + 7.2)
    assert counter.first_seen("a") == T0
    counter.add("b", T0 + 12.5)
    assert counter.first_seen("a") == T0 + 7
    assert counter.first_seen("b") == T0 + 12


def test_window_counter_counts_a_late_timestamp_in_the_newest_slice() -> None:
    counter = WindowCounter(window_s=10, slices=10, cap=10)
    counter.add("a", T0 + 5)
    assert counter.add("a", T0 + 4.2) == 2  # another agent's clock, milliseconds behind


def test_distinct_counter_counts_values_within_the_window() -> None:
    counter = DistinctCounter(window_s=60, cap=10, max_values=100)
    for i in range(10):
        counter.add("src", f"user{i}", T0 + i)
    assert counter.add("src", "user0", T0 + 10) == 10  # a repeat counts once
    assert counter.add("src", "new", T0 + 65) == 7  # user0 (again at 10), users 5-9, new
    counter.expire(T0 + 200)
    assert len(counter) == 0


def test_distinct_counter_caps_values_and_subjects() -> None:
    counter = DistinctCounter(window_s=60, cap=2, max_values=5)
    assert [counter.add("a", str(i), T0) for i in range(8)] == [1, 2, 3, 4, 5, 5, 5, 5]
    counter.add("b", "x", T0)
    counter.add("c", "x", T0)
    assert counter.evicted >= 1
    assert len(counter) <= 2


def test_run_tracker_follows_runs_up_and_down_with_other_calls_between() -> None:
    runs = RunTracker(max_gap_s=60, cap=100)
    lengths = []
    for i in range(6):
        lengths.append(runs.add("caller", "", 100 + i, T0 + i)[0])
        lengths.append(runs.add("caller", "", 900 - i, T0 + i + 0.5)[0])
        runs.add("caller", "", 5_000_000 + i * 37, T0 + i + 0.7)  # unrelated calls
    assert lengths == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]


def test_run_tracker_follows_a_trunk_whose_callers_change() -> None:
    runs = RunTracker(max_gap_s=60, cap=100)
    results = [runs.add(f"caller{i}", "pbx", 500 + i, T0 + i) for i in range(5)]
    assert results == [(1, 1), (1, 2), (1, 3), (1, 4), (1, 5)]


def test_run_tracker_a_redial_keeps_the_run_and_a_long_gap_ends_it() -> None:
    runs = RunTracker(max_gap_s=60, cap=100)
    calls = [1, 2, 2, 3]
    assert [runs.add("c", "t", n, T0 + i) for i, n in enumerate(calls)] == [
        (1, 1),
        (2, 2),
        (1, 1),
        (3, 3),
    ]
    assert runs.add("c", "t", 4, T0 + 200) == (1, 1)


def test_run_tracker_holds_at_most_its_cap() -> None:
    runs = RunTracker(max_gap_s=60, cap=10)
    for i in range(100):
        runs.add(f"c{i}", "", 5 + i * 1000, T0)
    assert len(runs) <= 10
    assert runs.evicted + len(runs) == 200  # two entries a call
    runs.expire(T0 + 61)
    assert len(runs) == 0


def test_gauge_never_goes_below_zero() -> None:
    gauge = Gauge()
    gauge.down("a")
    assert gauge.up("a") == 1
    gauge.down("a")
    gauge.down("a")
    assert gauge.levels == {}


def test_seasonal_baseline_learns_each_hour_of_the_day() -> None:
    hour = 3600.0
    day = 86400.0
    start = T0 - T0 % day  # midnight UTC
    baseline = SeasonalBaseline(alpha=0.5, cap=10, peak=False)
    baseline.observe("t", start + 0.5 * hour, 1)  # the first, partial hour seeds nothing
    for k in range(10):
        baseline.observe("t", start + 10 * hour + k, 1)
    assert baseline.expected("t", start + 10.5 * hour) is None  # no earlier day yet
    baseline.roll(start + day + 10.5 * hour)
    assert baseline.expected("t", start + day + 10.5 * hour) == 10
    assert baseline.expected("t", start + day + 11.5 * hour) == 10  # a sliding hour spans two
    assert baseline.expected("t", start + day + 12.5 * hour) == 0  # silent hours count as 0
    for k in range(30):
        baseline.observe("t", start + day + 10 * hour + k, 1)
    baseline.roll(start + day + 11 * hour)
    assert baseline.expected("t", start + 2 * day + 10.5 * hour) == 20  # 10 + 0.5 * (30 - 10)


def test_seasonal_peak_carries_the_level_through_quiet_hours() -> None:
    start = T0 - T0 % 86400
    peak = SeasonalBaseline(alpha=1.0, cap=10, peak=True)
    peak.observe("t", start + 100, 5)
    peak.observe("t", start + 3600 + 100, 40)
    peak.roll(start + 5 * 3600, {"t": 12})  # 12 calls stayed up through hours 2-4
    assert peak.expected("t", start + 1.5 * 3600) == 40
    assert peak.expected("t", start + 3.5 * 3600) == 12


def test_a_spray_of_random_sources_and_numbers_cannot_grow_the_monitor() -> None:
    cap = 500
    monitor = FraudMonitor(FraudSettings(max_subjects=cap, max_tracked_calls=cap))
    rng = random.Random(5)
    for i in range(20_000):
        source = f"{i // 65536 + 1}.{i // 256 % 256}.{i % 256}.7"  # each address once
        number = str(rng.randrange(10**10, 10**11))
        msg = request("INVITE", f"spray{i}", caller=number, callee="00" + number)
        monitor.on_message(msg, packet(T0 + i / 100, source), T0 + i / 100, None)
    stats = monitor.stats
    assert cap - cap // 16 <= monitor.tracked_calls <= cap
    assert stats.calls_evicted == 20_000 - monitor.tracked_calls
    for detector in DETECTORS:
        # Each detector holds at most a cap per counter (a couple of counters each).
        assert stats.tracked[detector] <= 3 * cap, detector
    assert stats.evicted["cps_burst"] >= 20_000 - cap
    assert stats.evicted["sequential_dialing"] >= 2 * (20_000 - cap)  # two entries a call
