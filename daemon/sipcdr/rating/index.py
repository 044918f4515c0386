"""Longest-prefix match among the rows effective at a moment.

One dict from prefix to its periods, probed with the callee's leading digits at each
prefix length the deck has, longest first. `benchmarks/rating.py` chose it: on a
100,000-prefix deck it answers about 1.5x as many look-ups per second as a trie of
per-digit dicts (slicing a str and one hash probe cost less than a Python-level
step per digit), and it holds one dict instead of one per trie node.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from sipcdr.rating.deck import Rate

NO_PREFIX: Final = "no_prefix"
NOT_EFFECTIVE: Final = "not_effective"
_FOREVER: Final = float("inf")
_MAX_DIGITS: Final = 15  # ITU-T E.164: no prefix or number is longer

# (effective from, effective until, row); latest first, since calls are priced at
# or near the newest rows a deck holds.
Period = tuple[float, float, Rate]


class PrefixIndex:
    """Immutable after construction; built from rows that passed `check_deck`."""

    __slots__ = ("_lengths_upto", "_table", "size")

    def __init__(self, rates: Iterable[Rate]) -> None:
        table: dict[str, tuple[Period, ...]] = {}
        several: dict[str, list[Rate]] = {}  # most prefixes have one row; these more
        for rate in rates:
            prefix = rate.prefix
            if prefix in table:
                several.setdefault(prefix, [table[prefix][0][2]]).append(rate)
            else:
                end = rate.effective_to
                table[prefix] = ((rate.effective_from, _FOREVER if end is None else end, rate),)
        for prefix, rows in several.items():
            table[prefix] = _periods(rows)
        lengths = sorted({len(prefix) for prefix in table}, reverse=True)
        self._table = table
        # For a number of n digits: the prefix lengths worth probing, longest first.
        self._lengths_upto = tuple(
            tuple(length for length in lengths if length <= n) for n in range(_MAX_DIGITS + 1)
        )
        self.size = len(table)

    def lookup(self, digits: str, moment: float) -> Rate | None:
        """The row of the longest prefix of `digits` effective at `moment`, or None
        (then `miss_reason` says why)."""
        get = self._table.get
        count = len(digits)
        for length in self._lengths_upto[count if count <= _MAX_DIGITS else _MAX_DIGITS]:
            periods = get(digits[:length])
            if periods is not None:
                for start, end, rate in periods:
                    if start <= moment < end:
                        return rate
        return None

    def miss_reason(self, digits: str) -> str:
        """After a miss: NOT_EFFECTIVE when some prefix matched at another time."""
        table = self._table
        for length in self._lengths_upto[min(len(digits), _MAX_DIGITS)]:
            if digits[:length] in table:
                return NOT_EFFECTIVE
        return NO_PREFIX


def _periods(rows: list[Rate]) -> tuple[Period, ...]:
    """A row without effective_to lasts until the next row of its prefix begins."""
    rows.sort(key=_start)
    periods = []
    for i, row in enumerate(rows):
        end = row.effective_to
        if end is None:
            end = rows[i + 1].effective_from if i + 1 < len(rows) else _FOREVER
        periods.append((row.effective_from, end, row))
    periods.reverse()
    return tuple(periods)


def _start(rate: Rate) -> float:
    return rate.effective_from
