"""`Cdr.to_record` writes each time as `rfc3339` does and each money field as
`money_text` does, whatever way it takes to get there."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest
from sipcdr import model
from sipcdr.model import Cdr, money_text, rfc3339

BASE = Cdr(
    cdr_id="6f1c1d3e-8f51-5d0b-9a55-3b0a2f1e9c11",
    call_id="a84b4c76e66710@pc33.atlanta.example.com",
    caller="4930123456",
    callee="4989765432",
    from_uri="sip:+4930123456@a.example.net",
    to_uri="sip:+4989765432@b.example.net",
    request_uri="sip:+4989765432@192.0.2.20",
    src_ip="192.0.2.10",
    src_port=5060,
    dst_ip="192.0.2.20",
    dst_port=5060,
    trunk="carrier-a",
    start_time=1_790_000_000.0,
    ring_time=None,
    answer_time=None,
    end_time=1_790_000_001.0,
    pdd_ms=None,
    disposition="failed",
    sip_code=486,
    sip_reason="Busy Here",
    q850_cause=17,
    hangup_by=None,
    end_reason="final_response",
    user_agent=None,
    capture_node="n",
)

TIMES = [
    1_790_000_000.0,
    1_790_000_000.1234564,
    1_790_000_000.9999995,  # rounds into the next second
    1_790_000_000.9999994,
    1_790_003_599.000001,
    0.0,
    1.5e-6,
    4_102_444_799.999999,  # the last microsecond of 2099
]


@pytest.mark.parametrize("start", TIMES)
def test_the_four_times_are_rfc3339s(start: float) -> None:
    for ring, answer in ((None, None), (start + 0.25, None), (start + 0.5, start + 2.0000005)):
        cdr = dataclasses.replace(
            BASE, start_time=start, ring_time=ring, answer_time=answer, end_time=start + 60.1
        )
        record = cdr.to_record()
        assert record["start_time"] == rfc3339(start)
        assert record["ring_time"] == rfc3339(ring)
        assert record["answer_time"] == rfc3339(answer)
        assert record["end_time"] == rfc3339(start + 60.1)


MONEY = ["0.0100", "1E-7", "1E+2", "-0.00", "0", "0E-4", "123456789.123456789", "-1E+3"]
MONEY += ["0.000001", "1.5E-6", "12.3400", "-0.0000001", "5E-9", "7.25"]


@pytest.mark.parametrize("text", MONEY)
def test_money_is_written_as_money_text_writes_it(text: str) -> None:
    value = Decimal(text)
    cdr = dataclasses.replace(
        BASE, rate_per_minute=value, cost=value, vendor_cost=value, margin=value
    )
    record = cdr.to_record()
    for name in model.CDR_MONEY_FIELDS:
        assert record[name] == money_text(value)
        assert "E" not in str(record[name])


def test_the_seconds_remembered_for_records_are_bounded() -> None:
    start = 1_800_000_000
    for offset in range(3 * model._SECONDS_KEPT):
        cdr = dataclasses.replace(
            BASE, start_time=start + offset + 0.5, end_time=start + offset + 1
        )
        assert cdr.to_record()["start_time"] == rfc3339(start + offset + 0.5)
    assert len(model._second_formats) <= model._SECONDS_KEPT


def test_money_under_a_context_of_small_exponent_letters_is_still_plain() -> None:
    import decimal

    with decimal.localcontext() as context:
        context.capitals = 0
        cdr = dataclasses.replace(BASE, cost=Decimal("1E-7"), margin=Decimal("1E+2"))
        record = cdr.to_record()
    assert (record["cost"], record["margin"]) == ("0.0000001", "100")
