"""Rate decks: the A-Z CSV carriers exchange, parsed and checked row by row.

The column contract, the effective-dating rule and every reason below are described
for users in schemas/rate_deck.md. `check_deck` reads bytes and a reference time
(for the "already expired" warning) and returns every row that parsed and every
problem with its line in the file (the header is line 1); a deck with any error is
refused whole, so a price list is never half applied.
"""

from __future__ import annotations

import csv
import io
import re
from calendar import timegm
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Final, NamedTuple

from sipcdr.rating.currencies import ISO_4217
from sipcdr.rating.pricing import MAX_AMOUNT_DIGITS

if TYPE_CHECKING:
    from _csv import Reader

PREFIX: Final = "prefix"
DESTINATION: Final = "destination"
RATE: Final = "rate"
CONNECT_FEE: Final = "connect_fee"
MIN_SECONDS: Final = "min_seconds"
INCREMENT_SECONDS: Final = "increment_seconds"
EFFECTIVE_FROM: Final = "effective_from"
EFFECTIVE_TO: Final = "effective_to"
CURRENCY: Final = "currency"
CHANGE: Final = "change"
REQUIRED_COLUMNS: Final = (
    PREFIX,
    DESTINATION,
    RATE,
    CONNECT_FEE,
    MIN_SECONDS,
    INCREMENT_SECONDS,
    EFFECTIVE_FROM,
    CURRENCY,
)
OPTIONAL_COLUMNS: Final = (EFFECTIVE_TO, CHANGE)
CHANGES: Final = frozenset({"new", "increase", "decrease", "unchanged", "closed"})
CLOSED: Final = "closed"
# ITU-T E.164: no number, so no prefix, is longer than 15 digits.
MAX_PREFIX_DIGITS: Final = 15

ERROR: Final = "error"
WARNING: Final = "warning"

# Reasons, one per kind of problem (schemas/rate_deck.md lists them for users).
UNREADABLE: Final = "unreadable"
NOT_TEXT: Final = "not_text"
NOT_CSV: Final = "not_csv"
EMPTY: Final = "empty"
MISSING_COLUMN: Final = "missing_column"
DUPLICATE_COLUMN: Final = "duplicate_column"
UNKNOWN_COLUMN: Final = "unknown_column"
EXTRA_CELLS: Final = "extra_cells"
BAD_PREFIX: Final = "bad_prefix"
BAD_NUMBER: Final = "bad_number"
NEGATIVE_RATE: Final = "negative_rate"
ZERO_INCREMENT: Final = "zero_increment"
UNKNOWN_CURRENCY: Final = "unknown_currency"
BAD_DATE: Final = "bad_date"
BAD_CHANGE: Final = "bad_change"
DUPLICATE: Final = "duplicate"
OVERLAP: Final = "overlap"
EXPIRED: Final = "expired"
CLOSED_OPEN_ENDED: Final = "closed_open_ended"
MIXED_CURRENCIES: Final = "mixed_currencies"

# A date, or an RFC 3339 time (offset optional: without one it is UTC; a space for
# the T as RFC 3339 section 5.6 allows).
_TIME: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:[Zz]|[+-]\d{2}:\d{2})?)?"
)
_SHOWN_CHARS: Final = 40  # a cell quoted in a message is cut here


class Rate(NamedTuple):
    """One deck row: the price of calls to `prefix` from `effective_from` (epoch
    seconds, inclusive) to `effective_to` (exclusive; None: until the prefix's next
    row takes effect, or for good)."""

    prefix: str
    destination: str
    rate: Decimal  # per minute
    connect_fee: Decimal
    min_seconds: int
    increment_seconds: int
    effective_from: float
    effective_to: float | None
    currency: str
    change: str | None
    line: int


class Problem(NamedTuple):
    """`line` is the file's line (header = 1); None for the deck as a whole."""

    line: int | None
    severity: str
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class DeckReport:
    rates: tuple[Rate, ...]  # every row that parsed, in file order
    problems: tuple[Problem, ...]  # in line order, deck-wide ones last
    rows_read: int = 0  # data rows in the file, blank lines not counted

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == ERROR)

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == WARNING)

    @property
    def ok(self) -> bool:
        return not any(p.severity == ERROR for p in self.problems)


def check_deck(data: bytes, now: float) -> DeckReport:
    """Parse and check a deck. `now` (epoch seconds) only decides which rows are
    reported as already expired."""
    text, problem = _decode(data)
    if problem is not None:
        return DeckReport((), (problem,))
    return _Checker(now).run(text)


def unreadable(message: str) -> DeckReport:
    """The report of a deck that could not be read at all (missing, a directory...)."""
    return DeckReport((), (Problem(None, ERROR, UNREADABLE, message),))


def shown(value: str) -> str:
    """A cell as quoted in a message: repr, cut to a readable length."""
    if len(value) > _SHOWN_CHARS:
        value = value[:_SHOWN_CHARS] + "..."
    return repr(value)


def _decode(data: bytes) -> tuple[str, Problem | None]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        message = "not UTF-8 text; save the deck as UTF-8 CSV"
        return "", Problem(line, ERROR, NOT_TEXT, message)
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        return "", Problem(line, ERROR, NOT_TEXT, "holds NUL bytes: not a CSV text file")
    return text, None


class _Checker:
    """One pass over the rows, then the checks across rows of one prefix."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.problems: list[Problem] = []
        self.rates: list[Rate] = []
        self.rows_read = 0
        self._times: dict[str, float | None] = {}
        self._amounts: dict[str, Decimal | None] = {}

    def error(self, line: int | None, reason: str, message: str) -> None:
        self.problems.append(Problem(line, ERROR, reason, message))

    def warning(self, line: int | None, reason: str, message: str) -> None:
        self.problems.append(Problem(line, WARNING, reason, message))

    def run(self, text: str) -> DeckReport:
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        try:
            self._rows(reader)
        except csv.Error as exc:
            self.error(reader.line_num or 1, NOT_CSV, f"not readable as CSV: {exc}")
        self._across_rows()
        deck_wide = [p for p in self.problems if p.line is None]
        by_line = sorted((p for p in self.problems if p.line is not None), key=_line_of)
        return DeckReport(tuple(self.rates), tuple(by_line + deck_wide), self.rows_read)

    def _rows(self, reader: Reader) -> None:
        header = next(reader, None)
        while header is not None and not any(cell.strip() for cell in header):
            header = next(reader, None)
        if header is None:
            self.error(1, EMPTY, "no header row: the file is empty")
            return
        header_line = reader.line_num
        columns = self._columns(header, header_line)
        if columns is None:
            return
        width = len(header)
        # Optional columns missing from the header read as an empty cell past the row.
        required = tuple(columns[name] for name in REQUIRED_COLUMNS)
        to_index = columns.get(EFFECTIVE_TO, width)
        change_index = columns.get(CHANGE, width)
        padding = [""] * (width + 1)
        start = reader.line_num + 1
        for cells in reader:
            line = start
            start = reader.line_num + 1
            if len(cells) <= 1 and not "".join(cells).strip():
                continue  # blank line
            self.rows_read += 1
            if len(cells) > width:
                self.error(
                    line,
                    EXTRA_CELLS,
                    f"{len(cells)} cells where the header has {width} "
                    "(a comma inside an unquoted value?)",
                )
                continue
            cells += padding[: width + 1 - len(cells)]
            self._row(
                line,
                [cells[index].strip() for index in required],
                cells[to_index].strip(),
                cells[change_index].strip(),
            )

    def _columns(self, header: list[str], line: int) -> dict[str, int] | None:
        columns: dict[str, int] = {}
        for index, raw in enumerate(header):
            name = raw.strip().lower()
            if not name:
                continue
            if name in columns:
                self.error(line, DUPLICATE_COLUMN, f"column {name!r} appears twice")
            elif name not in REQUIRED_COLUMNS and name not in OPTIONAL_COLUMNS:
                self.warning(line, UNKNOWN_COLUMN, f"column {shown(raw)} is not used")
            columns.setdefault(name, index)
        missing = [name for name in REQUIRED_COLUMNS if name not in columns]
        for name in missing:
            self.error(line, MISSING_COLUMN, f"the header has no {name!r} column")
        if missing or any(p.reason == DUPLICATE_COLUMN for p in self.problems):
            return None
        return columns

    def _row(self, line: int, values: list[str], to_text: str, change_text: str) -> None:
        """`values` are the REQUIRED_COLUMNS' cells, in that order, stripped."""
        if not all(values):
            for name, value in zip(REQUIRED_COLUMNS, values, strict=True):
                if not value:
                    self.error(line, MISSING_COLUMN, f"no value in column {name!r}")
            return
        prefix, destination, rate_text, fee_text, min_text, step_text, from_text, currency = values
        count = len(self.problems)
        if not (prefix.isdigit() and prefix.isascii() and len(prefix) <= MAX_PREFIX_DIGITS):
            self.error(
                line, BAD_PREFIX, f"prefix {shown(prefix)} is not 1-15 digits (E.164, no '+')"
            )
        rate = self._amount(line, RATE, rate_text)
        connect_fee = self._amount(line, CONNECT_FEE, fee_text)
        min_seconds = self._seconds(line, MIN_SECONDS, min_text)
        increment = self._seconds(line, INCREMENT_SECONDS, step_text)
        if increment == 0:
            self.error(line, ZERO_INCREMENT, "increment_seconds is 0: no call could be billed")
        effective_from = self._time(line, EFFECTIVE_FROM, from_text)
        effective_to = None
        if to_text:
            effective_to = self._time(line, EFFECTIVE_TO, to_text)
            if (
                effective_to is not None
                and effective_from is not None
                and effective_to <= effective_from
            ):
                self.error(
                    line,
                    BAD_DATE,
                    f"effective_to {shown(to_text)} is not after effective_from {shown(from_text)}",
                )
        if currency not in ISO_4217:
            self.error(
                line, UNKNOWN_CURRENCY, f"currency {shown(currency)} is not an ISO 4217 code"
            )
        change = change_text.lower() or None
        if change is not None and change not in CHANGES:
            self.error(
                line,
                BAD_CHANGE,
                f"change {shown(change_text)} is none of {', '.join(sorted(CHANGES))}",
            )
        if len(self.problems) != count:
            return
        assert rate is not None and connect_fee is not None  # for the type checker
        assert min_seconds is not None and increment is not None
        assert effective_from is not None
        if change == CLOSED and effective_to is None:
            self.warning(
                line,
                CLOSED_OPEN_ENDED,
                "change is 'closed' but there is no effective_to, so the row still "
                "prices calls; give the closing time in effective_to",
            )
        if effective_to is not None and effective_to <= self.now:
            self.warning(line, EXPIRED, f"expired: effective_to {shown(to_text)} has passed")
        self.rates.append(
            Rate(
                prefix,
                destination,
                rate,
                connect_fee,
                min_seconds,
                increment,
                effective_from,
                effective_to,
                currency,
                change,
                line,
            )
        )

    def _amount(self, line: int, column: str, text: str) -> Decimal | None:
        """A plain decimal (`0.0125`, `3`, `.5`): no exponent, sign, grouping or NaN."""
        if text in self._amounts:
            amount = self._amounts[text]
        else:
            digits = text[1:] if text[:1] == "-" else text
            digits = digits.replace(".", "", 1)
            plain = digits.isdigit() and digits.isascii() and len(digits) <= MAX_AMOUNT_DIGITS
            amount = Decimal(text) if plain else None
            self._amounts[text] = amount
        if amount is None:
            self.error(
                line,
                BAD_NUMBER,
                f"{column} {shown(text)} is not a plain decimal number "
                f"(digits and one '.', at most {MAX_AMOUNT_DIGITS} digits)",
            )
        elif text[:1] == "-":
            self.error(line, NEGATIVE_RATE, f"{column} {shown(text)} is negative")
            return None
        return amount

    def _seconds(self, line: int, column: str, text: str) -> int | None:
        if text.isdigit() and text.isascii():
            return int(text)
        self.error(line, BAD_NUMBER, f"{column} {shown(text)} is not a whole number of seconds")
        return None

    def _time(self, line: int, column: str, text: str) -> float | None:
        if text in self._times:
            moment = self._times[text]
        else:
            moment = self._times[text] = _parse_time(text)
        if moment is None:
            self.error(
                line,
                BAD_DATE,
                f"{column} {shown(text)} is neither a date (2026-01-31) nor an RFC 3339 "
                "time (2026-01-31T00:00:00Z)",
            )
        return moment

    def _across_rows(self) -> None:
        first: dict[str, Rate] = {}
        several: dict[str, list[Rate]] = {}  # most prefixes have one row; these more
        currencies: dict[str, int] = {}
        for rate in self.rates:
            prefix = rate.prefix
            if prefix in first:
                several.setdefault(prefix, [first[prefix]]).append(rate)
            else:
                first[prefix] = rate
            if rate.currency not in currencies:
                currencies[rate.currency] = rate.line
        for rows in several.values():
            self._periods(rows)
        if len(currencies) > 1:
            listed = ", ".join(f"{code} (line {line})" for code, line in currencies.items())
            self.warning(
                None,
                MIXED_CURRENCIES,
                f"the deck prices in several currencies: {listed}; "
                "costs of one plan in different currencies do not add up",
            )

    def _periods(self, rows: list[Rate]) -> None:
        """Rows of one prefix: two may not start at the same time, and a row's explicit
        period may not run into a later row's. An open-ended row ends where the next
        one begins (the usual way a deck announces a price change)."""
        rows.sort(key=_start_then_line)
        previous = rows[0]
        reach = previous.effective_to  # furthest explicit end so far
        reach_line = previous.line
        for row in rows[1:]:
            if row.effective_from == previous.effective_from:
                first, second = sorted((previous.line, row.line))
                self.error(
                    second,
                    DUPLICATE,
                    f"prefix {row.prefix} already has a row from this effective_from "
                    f"(line {first})",
                )
            elif reach is not None and row.effective_from < reach:
                self.error(
                    row.line,
                    OVERLAP,
                    f"prefix {row.prefix}: this row starts before the period of line "
                    f"{reach_line} ends (its effective_to)",
                )
            if row.effective_to is not None and (reach is None or row.effective_to > reach):
                reach, reach_line = row.effective_to, row.line
            previous = row


def _parse_time(text: str) -> float | None:
    if not _TIME.fullmatch(text):
        return None
    try:
        if len(text) == 10:
            return float(timegm(datetime.strptime(text, "%Y-%m-%d").timetuple()))
        moment = datetime.fromisoformat(text.replace("z", "Z").replace("t", "T"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return float(timegm(moment.timetuple())) + moment.microsecond / 1_000_000
    return moment.timestamp()


def _line_of(problem: Problem) -> int:
    return problem.line or 0


def _start_then_line(rate: Rate) -> tuple[float, int]:
    return rate.effective_from, rate.line
