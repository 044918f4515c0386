"""E.164 facts the detectors need: country codes and their number lengths, high-risk
prefixes, and which calls leave the caller's country.

The two tables ship in `data/` with their source and date in their header and are
read once, when the settings are built (`shipped_numbering_plan`,
`shipped_high_risk_prefixes`); an operator's replacement file goes through the same
parser (`parse_prefix_table`, `parse_numbering_plan`). Lookups are pure and cheap:
a few dict probes of string slices.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Final

from sipcdr.sip.numbers import INTERNATIONAL_PREFIX, MAX_E164_DIGITS, to_e164

# The shortest international numbers are 7 digits: a 3-digit country code and a
# 4-digit national number (Niue +683, Tokelau +690). Anything shorter is a short code
# or an extension, never a call abroad.
MIN_INTERNATIONAL_DIGITS: Final = 7
MAX_COUNTRY_CODE_DIGITS: Final = 3  # ITU-T E.164 section 6.2.1

HIGH_RISK_PREFIXES_FILE = "high_risk_prefixes.csv"
NSN_LENGTHS_FILE = "nsn_lengths.csv"

VERDICT_UNASSIGNED_CODE = "unassigned_country_code"
VERDICT_IMPOSSIBLE_LENGTH = "impossible_length"


class TableError(ValueError):
    """A prefix or numbering table that cannot be used; the message names the line."""


def e164(user: str | None, country_code: str | None, national_prefix: str | None) -> str | None:
    """`sipcdr.sip.numbers.to_e164`, with a fast path for the plain forms nearly every
    carrier sends (`+4930...`, `004930...`, `030...`, `4930...`); anything else (URI
    parameters, escapes, visual separators) goes to `to_e164`. Same results."""
    if not user:
        return None
    number = user[1:] if user[0] == "+" else user
    if not (number.isdigit() and number.isascii()):
        return to_e164(user, country_code, national_prefix)
    if number is user:
        if number.startswith(INTERNATIONAL_PREFIX):
            number = number[2:]
        elif country_code and national_prefix and number.startswith(national_prefix):
            number = country_code + number[len(national_prefix) :]
    return number if number and len(number) <= MAX_E164_DIGITS else None


def is_international(
    callee: str, home_country_code: str | None, dialled_international: bool
) -> bool:
    """Whether a call to `callee` (E.164 digits after normalization) leaves the country
    of `home_country_code`.

    With a home country: the callee does not start with its code (and is long enough to
    be a number abroad). Without one, only numbers dialled with "+" or "00" are known
    to be international; anything else may be a national number in any format.
    """
    if home_country_code:
        return len(callee) >= MIN_INTERNATIONAL_DIGITS and not callee.startswith(home_country_code)
    return dialled_international


@dataclass(frozen=True, slots=True)
class PrefixTable:
    """Longest-prefix match over E.164 prefixes, each with a label (regions and kind)."""

    entries: Mapping[str, str]
    source: str = ""  # the file's header: where the list comes from and when
    _lengths: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for prefix in self.entries:
            if not prefix.isdigit() or not prefix.isascii():
                raise TableError(f"prefix {prefix!r} is not E.164 digits")
        object.__setattr__(
            self, "_lengths", tuple(sorted({len(p) for p in self.entries}, reverse=True))
        )

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, number: str) -> str | None:
        """The longest listed prefix of `number`, or None."""
        entries = self.entries
        for length in self._lengths:
            if length <= len(number):
                prefix = number[:length]
                if prefix in entries:
                    return prefix
        return None


@dataclass(frozen=True, slots=True)
class NumberingPlan:
    """Possible lengths of the national significant number per E.164 country code."""

    lengths: Mapping[str, frozenset[int]]
    source: str = ""

    def country_code(self, number: str) -> str | None:
        """The assigned country code `number` starts with (codes are prefix-free)."""
        lengths = self.lengths
        for digits in range(1, MAX_COUNTRY_CODE_DIGITS + 1):
            if number[:digits] in lengths:
                return number[:digits]
        return None

    def verdict(self, number: str) -> str | None:
        """Why `number` (E.164 digits) cannot exist, or None when it can."""
        code = self.country_code(number)
        if code is None:
            return VERDICT_UNASSIGNED_CODE
        if len(number) - len(code) not in self.lengths[code]:
            return VERDICT_IMPOSSIBLE_LENGTH
        return None


def parse_prefix_table(text: str) -> PrefixTable:
    """`prefix,regions,kind` lines after '#' comments and one header line. Only the
    prefix column is required; a leading '+' is accepted."""
    comments: list[str] = []
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            comments.append(line[1:].strip())
            continue
        prefix, _, label = line.partition(",")
        prefix = prefix.strip().removeprefix("+")
        if prefix == "prefix":
            continue
        if not prefix.isdigit() or not prefix.isascii():
            raise TableError(f"line {number}: {prefix!r} is not an E.164 prefix")
        entries[prefix] = label.strip().replace(",", " ")
    if not entries:
        raise TableError("no prefixes")
    return PrefixTable(entries, "\n".join(comments))


def parse_numbering_plan(text: str) -> NumberingPlan:
    """`country_code,regions,lengths` lines (lengths space-separated)."""
    comments: list[str] = []
    lengths: dict[str, frozenset[int]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            comments.append(line[1:].strip())
            continue
        columns = line.split(",")
        if columns[0] == "country_code":
            continue
        if len(columns) != 3 or not columns[0].isdigit():
            raise TableError(f"line {number}: expected country_code,regions,lengths")
        try:
            possible = frozenset(int(n) for n in columns[2].split())
        except ValueError:
            raise TableError(f"line {number}: lengths must be numbers") from None
        if not possible:
            raise TableError(f"line {number}: no lengths")
        lengths[columns[0]] = possible
    if not lengths:
        raise TableError("no country codes")
    return NumberingPlan(lengths, "\n".join(comments))


@functools.cache
def shipped_high_risk_prefixes() -> PrefixTable:
    return parse_prefix_table(_data(HIGH_RISK_PREFIXES_FILE))


@functools.cache
def shipped_numbering_plan() -> NumberingPlan:
    return parse_numbering_plan(_data(NSN_LENGTHS_FILE))


def _data(name: str) -> str:
    return resources.files("sipcdr.fraud").joinpath("data", name).read_text(encoding="utf-8")
