"""When a signaling message names a data subject: the one rule every privacy operation
uses, in Python (the Kafka filter, the PostgreSQL sink as it writes) and in SQL
(`restrict`, `unrestrict`, holds, export and erasure through `privacy.matching`).

A message names a number when its header section (start line included) holds the
number's E.164 digits as a whole run of digits: `sip:+4930123456@`, `tel:4930123456`,
`Diversion: <sip:4930123456@...>`, any header, with or without `+`, but not inside a
longer number (`14930123456`); or as a global number with visual separators
(`tel:+49-30-123456`, RFC 3966): its digits joined by `-.()` after a `+`, taken whole.
Both forms below select exactly that, so a message the daemon withholds from Kafka is
one PostgreSQL flags, and one `unrestrict` finds again.

An alert's details name a number by the same rule, over their JSON text (sequential
dialing's `last_number`, say): an alert about someone else that names a restricted
number is withheld and flagged as one about it.

Digits written otherwise (national format, `030 123456`) are not the E.164 number and
do not match; such messages are tied to the subject through their call instead (the
Call-ID of a CDR whose caller or callee is the subject).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any, Final

import orjson

# A whole run of ASCII digits: neither a digit before nor after it. E.164 numbers have
# at most 15 digits, and stored ones (`normalize_number`) at least 7.
NUMBER_RUN: Final = re.compile(r"(?<![0-9])[0-9]{7,15}(?![0-9])")
# A global number with the visual separators RFC 3966 allows (`tel:+49-40-555-666`):
# `+`, then digits joined by separators, taken whole; its digits are the number.
_SEPARATORS: Final = "-.()"
_GLOBAL: Final = re.compile(r"\+([0-9](?:[-.()]*[0-9])*)")
NO_SEPARATORS: Final = str.maketrans("", "", _SEPARATORS)
# Either form in one pattern, the global one first: for a single pass over a text that
# rewrites what it finds (pseudonyms), so no replacement is read again.
NAMED_NUMBER: Final = re.compile(r"\+[0-9](?:[-.()]*[0-9])*|(?<![0-9])[0-9]{7,15}(?![0-9])")


def named_numbers(headers: str) -> Iterator[str]:
    """The numbers a text names, by the rule above (repeats included)."""
    yield from NUMBER_RUN.findall(headers)
    if "+" in headers:
        for written in _GLOBAL.findall(headers):
            if not written.isdigit():  # without separators it is a run already
                yield written.translate(NO_SEPARATORS)


def names_any(headers: object, restricted: Callable[[str], bool]) -> bool:
    """Whether a header section (when it is one) names a number `restricted` accepts."""
    return isinstance(headers, str) and any(map(restricted, named_numbers(headers)))


def details_name_any(details: object, restricted: Callable[[str], bool]) -> bool:
    """Whether an alert's details (any JSON value) name a number `restricted` accepts."""
    if details is None:
        return False
    try:
        text = orjson.dumps(details).decode()
    except TypeError:
        return False
    return any(map(restricted, named_numbers(text)))


# A CDR's URIs as the signaling wrote them: a From the P-Asserted-Identity overrode, a
# To a forwarded call left, still name their numbers.
CDR_URI_FIELDS: Final = ("from_uri", "to_uri", "request_uri")


def cdr_numbers(cdr: dict[str, Any]) -> Iterator[str]:
    """The numbers a CDR record names: its caller and callee, and those its URIs name
    by the rule above."""
    for name in ("caller", "callee"):
        value = cdr.get(name)
        if isinstance(value, str):
            yield value
    for name in CDR_URI_FIELDS:
        value = cdr.get(name)
        if isinstance(value, str):
            yield from named_numbers(value)


def sql_cdr_names(number_sql: str) -> str:
    """`cdr_numbers` as a SQL condition on a CDR row, for a number that is a SQL
    expression."""
    uris = " OR ".join(sql_names(number_sql, field) for field in CDR_URI_FIELDS)
    return f"({number_sql} IN (caller, callee) OR {uris})"


def alert_names_any(alert: dict[str, Any], restricted: Callable[[str], bool]) -> bool:
    """Whether an alert record is about, or its details name, a number `restricted`
    accepts (alerts are rare: their details are read each time)."""
    subject = alert.get("subject")
    return (isinstance(subject, str) and restricted(subject)) or details_name_any(
        alert.get("details"), restricted
    )


def header_pattern(number: str) -> str:
    """The same rule as a PostgreSQL regular expression (`headers ~ pattern`) for one
    number: its digits not preceded or followed by another digit, or after a `+` joined
    by visual separators and followed by no more digits."""
    if not number.isdigit() or not number.isascii():
        raise ValueError("a number is E.164 digits")
    separated = "[-.()]*".join(number)
    return f"(^|[^0-9]){number}([^0-9]|$)|\\+{separated}(?![-.()]*[0-9])"


def sql_names(number_sql: str, text_sql: str = "headers") -> str:
    """The rule as a SQL condition on `headers` (or another text, `details::text`), for
    a number that is itself a SQL expression (a column of `restrictions`, say)."""
    separated = f"regexp_replace({number_sql}, '([0-9])(?=[0-9])', '\\1[-.()]*', 'g')"
    return (
        f"{text_sql} ~ ('(^|[^0-9])' || {number_sql} || '([^0-9]|$)|\\+' || "
        f"{separated} || '(?![-.()]*[0-9])')"
    )
