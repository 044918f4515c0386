"""Pure retention and hold planning: which partitions expire when, per table and per
retention class; which holds are allowed."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from types import MappingProxyType

import pytest
from sipcdr.privacy.plan import (
    Hold,
    HoldRefused,
    Partition,
    check_hold,
    expired,
    jsonl_expired,
    kafka_retention_ms,
    kept_days,
    plan_retention,
    rotation_time,
)
from sipcdr.privacy.settings import RetentionSettings

TODAY = date(2026, 12, 4)
NOW = datetime(2026, 12, 4, 12, tzinfo=UTC)
SETTINGS = RetentionSettings(trunk_cdr_days=MappingProxyType({"long": 2557, "short": 30}))


def part(table: str, days_ago: int, klass: int | None = None) -> Partition:
    day = TODAY - timedelta(days=days_ago)
    name = f"{table}_p{day:%Y%m%d}" + (f"_r{klass}" if klass is not None else "")
    parent = f"{table}_p{day:%Y%m%d}" if klass is not None else None
    return Partition(table, name, day, klass, 100, parent)


@pytest.mark.parametrize(
    ("table", "klass", "days"),
    [
        ("sip_messages", None, 90),
        ("fraud_alerts", None, 365),
        ("cdrs", 0, 180),
        ("cdrs", 30, 30),
        ("cdrs", 2557, 2557),
        ("cdrs", None, 2557),  # a plain day of the first schema: the longest period
    ],
)
def test_a_partition_goes_the_day_after_its_last_row_reaches_its_period(
    table: str, klass: int | None, days: int
) -> None:
    assert kept_days(part(table, 0, klass), SETTINGS) == days
    assert not expired(part(table, days, klass), TODAY, SETTINGS)
    assert expired(part(table, days + 1, klass), TODAY, SETTINGS)


def test_plan_drops_expired_and_parents_left_empty() -> None:
    partitions = [
        part("cdrs", 181, 0),
        part("cdrs", 181, 30),
        part("cdrs", 400, 0),
        part("cdrs", 400, 2557),
        part("sip_messages", 91),
        part("sip_messages", 89),
    ]
    day181 = f"cdrs_p{TODAY - timedelta(days=181):%Y%m%d}"
    day400 = f"cdrs_p{TODAY - timedelta(days=400):%Y%m%d}"
    today_parent = f"cdrs_p{TODAY:%Y%m%d}"  # no class made yet: not this run's to drop
    plan = plan_retention(partitions, TODAY, SETTINGS, {day181: 2, day400: 2, today_parent: 0})
    dropped = {drop.partition.name for drop in plan.drops}
    assert dropped == {
        f"{day181}_r0",
        f"{day181}_r30",
        f"{day400}_r0",
        f"sip_messages_p{TODAY - timedelta(days=91):%Y%m%d}",
    }
    assert plan.empty_parents == [day181]  # day400 still holds its 7-year class
    assert plan.bytes == 400
    assert [d.partition.table for d in plan.by_table()["cdrs"]] == ["cdrs"] * 3


def hold(**changes: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "kind": "number",
        "subject": "4940555666",
        "tables": ("cdrs", "sip_messages"),
        "starts_at": NOW,
        "expires_at": NOW + timedelta(days=365),
        "signaling_max_days": 365,
        "now": NOW,
    }
    fields.update(changes)
    return fields


def test_hold_limits() -> None:
    check_hold(**hold())  # type: ignore[arg-type]
    with pytest.raises(HoldRefused, match="at most 365 days"):
        check_hold(**hold(expires_at=NOW + timedelta(days=366)))  # type: ignore[arg-type]
    # Counted from when it is placed, when it claims to have started earlier.
    with pytest.raises(HoldRefused, match="at most 365 days"):
        check_hold(
            **hold(
                starts_at=NOW + timedelta(days=10),  # type: ignore[arg-type]
                expires_at=NOW + timedelta(days=370),
            )
        )
    check_hold(**hold(tables=("cdrs",), expires_at=NOW + timedelta(days=3000)))  # type: ignore[arg-type]
    for bad in (
        {"kind": "ip"},
        {"subject": ""},
        {"tables": ("cdrs", "audit_log")},
        {"tables": ()},
        {"expires_at": NOW},
    ):
        with pytest.raises(HoldRefused):
            check_hold(**hold(**bad))  # type: ignore[arg-type]


def test_hold_is_active_inside_its_period_until_released() -> None:
    item = Hold(1, "number", "1", ("cdrs",), NOW, NOW + timedelta(days=1))
    assert not item.active(NOW - timedelta(seconds=1))
    assert item.active(NOW)
    assert not item.active(NOW + timedelta(days=1))
    released = Hold(1, "number", "1", ("cdrs",), NOW, NOW + timedelta(days=1), NOW)
    assert not released.active(NOW + timedelta(hours=1))


def test_rotated_jsonl_files_expire_by_their_rotation_time() -> None:
    rotated = [
        ("cdrs.jsonl.20260101T000000Z", rotation_time("20260101T000000Z")),
        ("cdrs.jsonl.20261201T000000Z.2", rotation_time("20261201T000000Z.2")),
    ]
    assert rotation_time("garbage") is None
    assert jsonl_expired(rotated, NOW, 180) == ["cdrs.jsonl.20260101T000000Z"]  # type: ignore[arg-type]


def test_kafka_topics_get_the_tables_retention() -> None:
    wanted = kafka_retention_ms(SETTINGS, "cdrs", "fraud", "")
    assert wanted == {"cdrs": 2557 * 86_400_000, "fraud": 365 * 86_400_000}
