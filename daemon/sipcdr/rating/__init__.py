"""Pure rating: rate decks (CSV) checked and indexed, the pricing rule, rate plans.

No I/O here: decks come in as bytes, calls as digits and times; `sipcdr.rates` reads
the files and runs `sipcdr rates check`.
"""

from sipcdr.rating.deck import (
    ERROR,
    WARNING,
    DeckReport,
    Problem,
    Rate,
    check_deck,
    unreadable,
)
from sipcdr.rating.index import NO_PREFIX, NOT_EFFECTIVE, PrefixIndex
from sipcdr.rating.plans import (
    INVALID_NUMBER,
    NO_PLAN,
    UNRATED_REASONS,
    CdrRating,
    Deck,
    PlanLoad,
    RatePlans,
    Rating,
    Unrated,
    load_rate_plans,
)
from sipcdr.rating.pricing import DEFAULT_DECIMALS, billed_seconds, cost, margin
from sipcdr.rating.stage import CURRENCY_MISMATCH, RateStage, RatingStats

__all__ = [
    "CURRENCY_MISMATCH",
    "DEFAULT_DECIMALS",
    "ERROR",
    "INVALID_NUMBER",
    "NOT_EFFECTIVE",
    "NO_PLAN",
    "NO_PREFIX",
    "UNRATED_REASONS",
    "WARNING",
    "CdrRating",
    "Deck",
    "DeckReport",
    "PlanLoad",
    "PrefixIndex",
    "Problem",
    "Rate",
    "RatePlans",
    "RateStage",
    "Rating",
    "RatingStats",
    "Unrated",
    "billed_seconds",
    "check_deck",
    "cost",
    "load_rate_plans",
    "margin",
    "unreadable",
]
