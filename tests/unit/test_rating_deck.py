"""Deck checks: every reason, on the line the user's editor shows (header = line 1)."""

from __future__ import annotations

from calendar import timegm
from decimal import Decimal

import pytest
from sipcdr.rating import ERROR, WARNING, DeckReport, Problem, Rate, check_deck
from sipcdr.rating import deck as d

HEADER = (
    "prefix,destination,rate,connect_fee,min_seconds,increment_seconds,"
    "effective_from,effective_to,currency,change"
)
GOOD = "4930,Germany Berlin,0.0120,0,30,6,2026-01-01,,EUR,new"
NOW = float(timegm((2026, 6, 1, 0, 0, 0)))


def deck(*rows: str, header: str = HEADER) -> bytes:
    return ("\n".join((header, *rows)) + "\n").encode()


def problems(report: DeckReport) -> list[tuple[int | None, str, str]]:
    return [(p.line, p.severity, p.reason) for p in report.problems]


def test_a_good_row_becomes_a_rate_with_exact_amounts() -> None:
    report = check_deck(
        deck(GOOD, "49,Germany,0.0100,0.0150,60,60,2026-01-01,2027-01-01,EUR,"), NOW
    )
    assert report.ok
    assert report.problems == ()
    assert report.rows_read == 2
    assert report.rates == (
        Rate(
            "4930",
            "Germany Berlin",
            Decimal("0.0120"),
            Decimal(0),
            30,
            6,
            float(timegm((2026, 1, 1, 0, 0, 0))),
            None,
            "EUR",
            "new",
            2,
        ),
        Rate(
            "49",
            "Germany",
            Decimal("0.0100"),
            Decimal("0.0150"),
            60,
            60,
            float(timegm((2026, 1, 1, 0, 0, 0))),
            float(timegm((2027, 1, 1, 0, 0, 0))),
            "EUR",
            None,
            3,
        ),
    )


@pytest.mark.parametrize(
    ("row", "reason", "words"),
    [
        ("4930,Berlin,abc,0,30,6,2026-01-01,,EUR,", d.BAD_NUMBER, "rate 'abc'"),
        ("4930,Berlin,1e-2,0,30,6,2026-01-01,,EUR,", d.BAD_NUMBER, "rate '1e-2'"),
        ("4930,Berlin,NaN,0,30,6,2026-01-01,,EUR,", d.BAD_NUMBER, "rate 'NaN'"),
        ('4930,Berlin,"0,012",0,30,6,2026-01-01,,EUR,', d.BAD_NUMBER, "rate '0,012'"),
        ("4930,Berlin,0.01,1_0,30,6,2026-01-01,,EUR,", d.BAD_NUMBER, "connect_fee '1_0'"),
        ("4930,Berlin,0.01,0,30.5,6,2026-01-01,,EUR,", d.BAD_NUMBER, "min_seconds '30.5'"),
        ("4930,Berlin,0.01,0,30,-6,2026-01-01,,EUR,", d.BAD_NUMBER, "increment_seconds '-6'"),
        ("4930,Berlin,0.1234567890123456789012345,0,30,6,2026-01-01,,EUR,", d.BAD_NUMBER, "24"),
        ("4930,Berlin,-0.01,0,30,6,2026-01-01,,EUR,", d.NEGATIVE_RATE, "rate '-0.01'"),
        ("4930,Berlin,0.01,-0.5,30,6,2026-01-01,,EUR,", d.NEGATIVE_RATE, "connect_fee"),
        ("4930,Berlin,0.01,0,30,0,2026-01-01,,EUR,", d.ZERO_INCREMENT, "increment_seconds is 0"),
        ("4930,Berlin,0.01,0,30,6,2026-01-01,,XYZ,", d.UNKNOWN_CURRENCY, "'XYZ'"),
        ("4930,Berlin,0.01,0,30,6,2026-01-01,,eur,", d.UNKNOWN_CURRENCY, "'eur'"),
        ("4930,Berlin,0.01,0,30,6,2026-02-30,,EUR,", d.BAD_DATE, "effective_from '2026-02-30'"),
        ("4930,Berlin,0.01,0,30,6,01/02/2026,,EUR,", d.BAD_DATE, "effective_from"),
        ("4930,Berlin,0.01,0,30,6,2026-01-01,tomorrow,EUR,", d.BAD_DATE, "effective_to"),
        ("4930,Berlin,0.01,0,30,6,2026-01-01,2026-01-01,EUR,", d.BAD_DATE, "not after"),
        ("4930,Berlin,0.01,0,30,6,2026-01-01,2025-12-31,EUR,", d.BAD_DATE, "not after"),
        ("+4930,Berlin,0.01,0,30,6,2026-01-01,,EUR,", d.BAD_PREFIX, "'+4930'"),
        ("1234567890123456,X,0.01,0,30,6,2026-01-01,,EUR,", d.BAD_PREFIX, "1-15 digits"),
        ("4930,Berlin,0.01,0,30,6,2026-01-01,,EUR,renamed", d.BAD_CHANGE, "'renamed'"),
        (",Berlin,0.01,0,30,6,2026-01-01,,EUR,", d.MISSING_COLUMN, "'prefix'"),
        ("4930,,0.01,0,30,6,2026-01-01,,EUR,", d.MISSING_COLUMN, "'destination'"),
        ("4930,Berlin,0.01,0,30,6", d.MISSING_COLUMN, "'effective_from'"),
        ("4930,Berlin, Mitte,0.01,0,30,6,2026-01-01,,EUR,", d.EXTRA_CELLS, "11 cells"),
    ],
)
def test_each_bad_row_gives_its_reason_on_its_line(row: str, reason: str, words: str) -> None:
    report = check_deck(deck(GOOD, row, GOOD.replace("4930", "4940")), NOW)
    assert not report.ok
    assert (3, ERROR, reason) in problems(report)
    assert all(p.line == 3 for p in report.errors), report.problems
    assert words in next(p.message for p in report.problems if p.reason == reason)
    # The row is refused; the good ones around it still parse (and are reported on).
    assert [rate.line for rate in report.rates] == [2, 4]


def test_one_row_can_have_several_problems_each_reported() -> None:
    report = check_deck(deck("4930,Berlin,-1,x,30,0,2026-13-01,,EUR,foo"), NOW)
    assert problems(report) == [
        (2, ERROR, d.NEGATIVE_RATE),
        (2, ERROR, d.BAD_NUMBER),
        (2, ERROR, d.ZERO_INCREMENT),
        (2, ERROR, d.BAD_DATE),
        (2, ERROR, d.BAD_CHANGE),
    ]


def test_line_numbers_count_physical_lines() -> None:
    data = (
        HEADER
        + "\r\n"
        + GOOD
        + "\r\n\r\n"  # a blank line 3
        + '4931,"Berlin\nMitte",0.01,0,30,6,2026-01-01,,EUR,\r\n'  # lines 4-5
        + "4932,Berlin,bad,0,30,6,2026-01-01,,EUR,\r\n"  # line 6
    ).encode()
    report = check_deck(data, NOW)
    assert problems(report) == [(6, ERROR, d.BAD_NUMBER)]
    assert [rate.line for rate in report.rates] == [2, 4]
    assert report.rates[1].destination == "Berlin\nMitte"
    assert report.rows_read == 3


def test_header_names_are_matched_loosely_and_columns_in_any_order() -> None:
    header = (
        "\ufeffCurrency , Prefix,DESTINATION,rate,connect_fee,min_seconds,"
        "increment_seconds,effective_from,notes"
    )
    data = deck("USD,1212,New York,0.005,0,6,6,2026-01-01,call center", header=header)
    report = check_deck(data, NOW)
    assert report.ok
    assert problems(report) == [(1, WARNING, d.UNKNOWN_COLUMN)]
    assert "'notes'" in report.problems[0].message
    rate = report.rates[0]
    assert (rate.prefix, rate.destination, rate.currency, rate.change) == (
        "1212",
        "New York",
        "USD",
        None,
    )


def test_a_utf8_bom_is_not_part_of_the_first_column() -> None:
    report = check_deck(b"\xef\xbb\xbf" + deck(GOOD), NOW)
    assert report.ok
    assert report.rates[0].prefix == "4930"


def test_a_missing_column_is_reported_on_the_header_and_stops_the_check() -> None:
    header = "prefix,destination,rate,min_seconds,increment_seconds,effective_from"
    report = check_deck(deck("4930,Berlin,0.01,30,6,2026-01-01", header=header), NOW)
    assert problems(report) == [(1, ERROR, d.MISSING_COLUMN), (1, ERROR, d.MISSING_COLUMN)]
    assert [p.message for p in report.problems] == [
        "the header has no 'connect_fee' column",
        "the header has no 'currency' column",
    ]
    assert report.rates == ()


def test_a_column_named_twice_is_an_error() -> None:
    report = check_deck(deck(GOOD + ",0.5", header=HEADER + ",rate"), NOW)
    assert problems(report) == [(1, ERROR, d.DUPLICATE_COLUMN)]


@pytest.mark.parametrize(
    ("data", "line", "reason"),
    [
        (b"", 1, d.EMPTY),
        (b"\n\n", 1, d.EMPTY),
        (b"prefix,rate\n\xff\xfe\n", 2, d.NOT_TEXT),
        (b"\x89PNG\r\n\x1a\n\x00\x00", 1, d.NOT_TEXT),
        (HEADER.encode() + b"\n4930,\x00\n", 2, d.NOT_TEXT),
        (HEADER.encode() + b'\n4930,"Berlin,0.01\n', 2, d.NOT_CSV),  # unterminated quote
    ],
)
def test_what_is_not_a_csv_deck_is_one_clear_problem(data: bytes, line: int, reason: str) -> None:
    report = check_deck(data, NOW)
    assert problems(report)[0] == (line, ERROR, reason)
    assert not report.ok


def test_a_json_file_lacks_the_columns() -> None:
    report = check_deck(b'{"prefix": "49", "rate": 0.01}\n', NOW)
    assert not report.ok
    assert {p.reason for p in report.problems} >= {d.MISSING_COLUMN}
    assert all(p.line == 1 for p in report.errors)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-01", (2026, 1, 1, 0, 0, 0)),
        ("2026-01-01T00:00:00Z", (2026, 1, 1, 0, 0, 0)),
        ("2026-01-01t00:00:00z", (2026, 1, 1, 0, 0, 0)),
        ("2026-01-01 12:30:00", (2026, 1, 1, 12, 30, 0)),  # no offset: UTC
        ("2026-01-01T02:00:00+02:00", (2026, 1, 1, 0, 0, 0)),
        ("2025-12-31T19:00:00-05:00", (2026, 1, 1, 0, 0, 0)),
    ],
)
def test_effective_times_are_dates_or_rfc3339_times_in_utc(
    text: str, expected: tuple[int, ...]
) -> None:
    report = check_deck(deck(f"4930,Berlin,0.01,0,30,6,{text},,EUR,"), NOW)
    assert report.ok, report.problems
    assert report.rates[0].effective_from == float(timegm(expected))


def test_fractions_of_a_second_in_effective_times() -> None:
    report = check_deck(deck("4930,Berlin,0.01,0,30,6,2026-01-01T00:00:00.250Z,,EUR,"), NOW)
    assert report.rates[0].effective_from == timegm((2026, 1, 1, 0, 0, 0)) + 0.25


def test_the_same_prefix_and_effective_from_twice_is_a_duplicate() -> None:
    report = check_deck(
        deck(GOOD, "49,Germany,0.01,0,60,60,2026-01-01,,EUR,", GOOD.replace("0.0120", "0.0130")),
        NOW,
    )
    assert problems(report) == [(4, ERROR, d.DUPLICATE)]
    assert "line 2" in report.problems[0].message


def test_the_same_moment_written_two_ways_is_a_duplicate() -> None:
    second = GOOD.replace("2026-01-01", "2026-01-01T01:00:00+01:00")
    assert problems(check_deck(deck(GOOD, second), NOW)) == [(3, ERROR, d.DUPLICATE)]


def test_an_open_ended_row_gives_way_to_a_later_row_of_its_prefix() -> None:
    # The usual announcement of a price change: no overlap, no error.
    report = check_deck(
        deck(
            "4930,Berlin,0.0120,0,30,6,2025-01-01,,EUR,",
            "4930,Berlin,0.0150,0,30,6,2026-07-01,,EUR,increase",
        ),
        NOW,
    )
    assert report.ok
    assert report.problems == ()


def test_an_explicit_period_running_into_a_later_row_overlaps() -> None:
    report = check_deck(
        deck(
            "4930,Berlin,0.0120,0,30,6,2025-01-01,2026-08-01,EUR,",
            "4930,Berlin,0.0150,0,30,6,2026-07-01,,EUR,increase",
            "4930,Berlin,0.0160,0,30,6,2026-07-15,2026-07-20,EUR,increase",
            "4930,Berlin,0.0170,0,30,6,2026-08-01,,EUR,increase",  # starts as line 2 ends
        ),
        NOW,
    )
    assert problems(report) == [(3, ERROR, d.OVERLAP), (4, ERROR, d.OVERLAP)]
    assert all("line 2" in p.message for p in report.problems)


def test_rows_already_expired_are_a_warning_only() -> None:
    report = check_deck(
        deck(
            "4930,Berlin,0.0120,0,30,6,2025-01-01,2026-01-01,EUR,",
            "4931,Berlin,0.0120,0,30,6,2025-01-01,2026-06-01,EUR,",  # ends at NOW
            "4932,Berlin,0.0120,0,30,6,2025-01-01,2026-06-01T00:00:01Z,EUR,",
        ),
        NOW,
    )
    assert report.ok
    assert problems(report) == [(2, WARNING, d.EXPIRED), (3, WARNING, d.EXPIRED)]
    assert len(report.rates) == 3


def test_a_closed_row_without_an_end_is_a_warning() -> None:
    report = check_deck(deck("4930,Berlin,0.0120,0,30,6,2026-01-01,,EUR,CLOSED"), NOW)
    assert report.ok
    assert problems(report) == [(2, WARNING, d.CLOSED_OPEN_ENDED)]
    assert report.rates[0].change == "closed"
    closed = check_deck(deck("4930,Berlin,0.0120,0,30,6,2026-01-01,2026-09-01,EUR,closed"), NOW)
    assert closed.problems == ()


def test_a_deck_in_several_currencies_is_warned_about_once() -> None:
    report = check_deck(
        deck(GOOD, "44,UK,0.01,0,60,60,2026-01-01,,GBP,", GOOD.replace("30", "31")), NOW
    )
    assert report.ok
    assert problems(report) == [(None, WARNING, d.MIXED_CURRENCIES)]
    assert report.problems[0].message.startswith(
        "the deck prices in several currencies: EUR (line 2), GBP (line 3)"
    )


def test_problems_come_in_line_order_whatever_found_them() -> None:
    report = check_deck(
        deck(
            GOOD, "4940,X,bad,0,30,6,2026-01-01,,EUR,", GOOD, "4950,X,0.1,0,30,6,2026-01-01,,EUR,"
        ),
        NOW,
    )
    assert [p.line for p in report.problems] == [3, 4]
    assert isinstance(report.problems[0], Problem)


def test_long_cells_are_cut_in_messages() -> None:
    report = check_deck(deck(f"4930,Berlin,{'9' * 50}x,0,30,6,2026-01-01,,EUR,"), NOW)
    message = report.errors[0].message
    assert "..." in message
    assert len(message) < 160
