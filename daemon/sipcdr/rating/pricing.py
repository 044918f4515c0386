"""The pricing rule: billed seconds from billsec and the row's increments, then cost.

    billed = 0                                    when billsec is 0
           = min_seconds                          when billsec <= min_seconds
           = min_seconds + ceil((billsec - min_seconds) / increment) * increment
    cost   = connect_fee + rate * billed / 60     exact, rounded once, half-up

Seconds are compared as whole milliseconds (a CDR's billsec has three decimals) and
money as exact fractions, so no float touches either.
"""

from __future__ import annotations

from decimal import Context, Decimal, Inexact, Rounded
from typing import Final

# `[rating] decimals`: four places is the sub-cent precision carriers' call-level
# statements use; the total of many calls is rounded by whoever adds them up.
DEFAULT_DECIMALS: Final = 4
MAX_DECIMALS: Final = 12  # beyond this no currency or statement has a use for it
SECONDS_PER_MINUTE: Final = 60
_MS_PER_S: Final = 1000
# Deck amounts are capped at MAX_AMOUNT_DIGITS digits, so a fee * 60 plus a rate
# times any billed time fits in this precision; the traps prove nothing is rounded.
MAX_AMOUNT_DIGITS: Final = 24
_EXACT: Final = Context(prec=MAX_AMOUNT_DIGITS * 3, traps=[Inexact, Rounded])


def billed_seconds(billsec: float, min_seconds: int, increment_seconds: int) -> int:
    """`billsec` (seconds, as in the CDR) rounded up to the row's increments."""
    billed_ms = round(billsec * _MS_PER_S)
    if billed_ms <= 0:
        return 0
    first_ms = min_seconds * _MS_PER_S
    if billed_ms <= first_ms:
        return min_seconds
    step_ms = increment_seconds * _MS_PER_S
    steps = -(-(billed_ms - first_ms) // step_ms)
    return min_seconds + steps * increment_seconds


def cost(rate: Decimal, connect_fee: Decimal, billed: int, decimals: int) -> Decimal:
    """`connect_fee + rate * billed / 60`, rounded half-up to `decimals` places.

    The sum is kept as `fee * 60 + rate * billed` (exact) over 60 and rounded once in
    integers, so 0.00625 becomes 0.0063 at four places, never 0.0062.
    """
    sixtieths = _EXACT.add(
        _EXACT.multiply(connect_fee, SECONDS_PER_MINUTE), _EXACT.multiply(rate, billed)
    )
    numerator, denominator = sixtieths.as_integer_ratio()
    denominator *= SECONDS_PER_MINUTE
    units = (2 * numerator * 10**decimals + denominator) // (2 * denominator)
    return Decimal(units).scaleb(-decimals)


def margin(cost: Decimal, vendor_cost: Decimal) -> Decimal:
    """`cost - vendor_cost`, exact: both are rounded prices, so nothing is rounded here
    (the context traps any rounding rather than hide it)."""
    return _EXACT.subtract(cost, vendor_cost)
