"""Rate plans (named decks) and the rater: a callee, a start time and a billsec in,
a price or the reason there is none out.

`RatePlans` is immutable. Loading (`load_rate_plans`) builds a new one from the
decks' bytes; a deck that fails its check is refused and the plan keeps the deck it
had, so a holder swaps its reference in one assignment (at start and on SIGHUP) and a
bad file never leaves a plan half loaded or empty.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Final, NamedTuple, TypedDict

from sipcdr.rating.deck import DeckReport, Rate, check_deck
from sipcdr.rating.index import NO_PREFIX, NOT_EFFECTIVE, PrefixIndex
from sipcdr.rating.pricing import DEFAULT_DECIMALS, MAX_DECIMALS, billed_seconds, cost

NO_PLAN: Final = "no_plan"
INVALID_NUMBER: Final = "invalid_number"
# Every reason a CDR is not rated: a metric label set, fixed and small.
UNRATED_REASONS: Final = (NO_PLAN, NO_PREFIX, NOT_EFFECTIVE, INVALID_NUMBER)
_MAX_DIGITS: Final = 15  # ITU-T E.164
# Prices remembered per plans: rows times the distinct billed times of their calls;
# cleared rather than grown past this. Full, it holds ~16 MiB (~260 bytes an entry:
# the key's tuple and two ints, the Decimal, the dict's slot; measured with
# tracemalloc); a reload's new plans start empty and the old ones go with theirs.
_COSTS_KEPT: Final = 65536


class CdrRating(TypedDict):
    """The CDR's rating fields by name, as `dataclasses.replace(cdr, **fields)` takes them."""

    rated: bool
    rate_prefix: str | None
    rate_name: str | None
    rate_per_minute: Decimal | None
    billed_seconds: int | None
    cost: Decimal | None
    currency: str | None


class Rating(NamedTuple):
    """A priced call. `cost` has exactly the plans' `decimals` places."""

    plan: str
    rate: Rate  # the deck row that matched
    billed_seconds: int
    cost: Decimal

    @property
    def rated(self) -> bool:
        return True

    def cdr_fields(self) -> CdrRating:
        """The CDR's rating fields, money as exact decimals."""
        rate = self.rate
        return {
            "rated": True,
            "rate_prefix": rate.prefix,
            "rate_name": rate.destination,
            "rate_per_minute": rate.rate,
            "billed_seconds": self.billed_seconds,
            "cost": self.cost,
            "currency": rate.currency,
        }


class Unrated(NamedTuple):
    """No price: `reason` is one of UNRATED_REASONS."""

    reason: str

    @property
    def rated(self) -> bool:
        return False

    def cdr_fields(self) -> CdrRating:
        return {
            "rated": False,
            "rate_prefix": None,
            "rate_name": None,
            "rate_per_minute": None,
            "billed_seconds": None,
            "cost": None,
            "currency": None,
        }


_UNRATED: Final = {reason: Unrated(reason) for reason in UNRATED_REASONS}


@dataclass(frozen=True, slots=True)
class Deck:
    """One plan's checked deck, indexed."""

    index: PrefixIndex
    rows: int
    currencies: frozenset[str]

    @classmethod
    def from_report(cls, report: DeckReport) -> Deck:
        if not report.ok:
            raise ValueError("a deck with errors cannot be indexed")
        return cls(
            PrefixIndex(report.rates),
            len(report.rates),
            frozenset(rate.currency for rate in report.rates),
        )


@dataclass(frozen=True, slots=True)
class RatePlans:
    decks: Mapping[str, Deck] = field(default_factory=lambda: MappingProxyType({}))
    default_plan: str | None = None
    decimals: int = DEFAULT_DECIMALS
    # The cost of each (deck row, billed seconds) priced so far: a call's price
    # depends on nothing else, and calls bill in few distinct increments, so most
    # calls find theirs here rather than do the exact arithmetic again. Keyed by the
    # row's id, which stays its own while these plans (holding their own copy of the
    # decks mapping) live.
    _costs: dict[tuple[int, int], Decimal] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _zero: Decimal = field(default=Decimal(0), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.decimals <= MAX_DECIMALS:
            raise ValueError(f"decimals must be 0 to {MAX_DECIMALS}: {self.decimals}")
        # A dict of their own even when handed a read-only view: the view's owner could
        # swap a deck, and the prices remembered by row id would outlive its rows.
        object.__setattr__(self, "decks", MappingProxyType(dict(self.decks)))
        # What an unanswered call costs: zero at the plans' places.
        object.__setattr__(self, "_zero", Decimal(0).scaleb(-self.decimals))

    def rate(
        self,
        plan: str | None,
        callee: str | None,
        start_time: float,
        billsec: float,
        answered: bool,
    ) -> Rating | Unrated:
        """Price one call under `plan` (None: the default plan).

        `callee` is E.164 digits, or None when the callee is not a number. An
        unanswered call is matched and recorded at 0 s and cost 0; an answered one
        pays the connect fee and its billed seconds.
        """
        name = plan if plan is not None else self.default_plan
        deck = self.decks.get(name) if name is not None else None
        if deck is None or name is None:
            return _UNRATED[NO_PLAN]
        if callee is None or len(callee) > _MAX_DIGITS:
            return _UNRATED[INVALID_NUMBER]
        row = deck.index.lookup(callee, start_time)
        if row is None:
            return _UNRATED[deck.index.miss_reason(callee)]
        if not answered:
            return Rating(name, row, 0, self._zero)
        billed = billed_seconds(billsec, row.min_seconds, row.increment_seconds)
        costs = self._costs
        key = (id(row), billed)
        price = costs.get(key)
        if price is None:
            if len(costs) >= _COSTS_KEPT:
                costs.clear()
            price = costs[key] = cost(row.rate, row.connect_fee, billed, self.decimals)
        return Rating(name, row, billed, price)


class PlanLoad(NamedTuple):
    """What a load did: the plans now in force, the plans whose deck was (re)loaded
    and the reports of every deck, refused ones with their errors."""

    plans: RatePlans
    loaded: tuple[str, ...]
    refused: tuple[str, ...]
    reports: Mapping[str, DeckReport]


def load_rate_plans(
    decks: Mapping[str, bytes | DeckReport],
    default_plan: str | None,
    decimals: int,
    now: float,
    previous: RatePlans | None = None,
) -> PlanLoad:
    """Check and index every deck: plan name -> the file's contents, or the report
    of why it could not be read (`unreadable`).

    A refused deck leaves its plan with the deck it had in `previous` (or without
    one, so its calls are counted as `no_plan`). Plans not in `decks` are dropped.
    """
    kept = previous.decks if previous is not None else {}
    result: dict[str, Deck] = {}
    loaded: list[str] = []
    refused: list[str] = []
    reports: dict[str, DeckReport] = {}
    for name, data in decks.items():
        report = data if isinstance(data, DeckReport) else check_deck(data, now)
        reports[name] = report
        if report.ok:
            result[name] = Deck.from_report(report)
            loaded.append(name)
            continue
        refused.append(name)
        if name in kept:
            result[name] = kept[name]
    plans = RatePlans(MappingProxyType(result), default_plan, decimals)
    return PlanLoad(plans, tuple(loaded), tuple(refused), MappingProxyType(reports))
