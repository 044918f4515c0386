"""The rate stage: each closed call priced on both sides, as a CDR stage
(`sipcdr.stages.CdrStage`).

The customer side is the ingress trunk's `rate_plan` (the default plan when it names
none, or when no trunk matched); it fills the CDR's rating fields. The vendor side
is the egress trunk's `cost_plan`; it gives `vendor_cost`, and `margin` when both
sides are priced in one currency. The callee is read with the ingress trunk's
numbering settings; a callee that is not a number is flagged (`callee_valid`) and
not rated.

Plans are swapped whole by `install` (at start and on SIGHUP): a CDR is priced under
the plans in force when it reaches the stage, never under half of a reload. Counts
go to `stats` (plain ints), read by the telemetry exporter; nothing is logged here.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from typing import Final, NamedTuple, TypeAlias

from sipcdr.model import UNKNOWN_TRUNK, Cdr, Trunk, cdr_copier
from sipcdr.rating.plans import NO_PLAN, PlanLoad, RatePlans, Rating, Unrated
from sipcdr.rating.pricing import margin
from sipcdr.sip.numbers import DEFAULT_PLAN, NumberingPlan, first_number

# The vendor side is priced but in another currency than the customer side: there
# is no margin to give (no exchange rate is guessed).
CURRENCY_MISMATCH: Final = "currency_mismatch"
_NO_COST_PLAN: Final = Unrated(NO_PLAN)


class RatingStats:
    """What the rate stage did, for the telemetry exporter. Keys are trunk names from
    the configuration (UNKNOWN_TRUNK for none) and plan names: a small, fixed label set."""

    __slots__ = (
        "currency_mismatches",
        "deck_loads",
        "deck_refusals",
        "deck_rows",
        "rated",
        "unrated",
        "vendor_rated",
        "vendor_unrated",
    )

    def __init__(self) -> None:
        self.rated: dict[str, int] = {}  # by ingress trunk
        self.unrated: dict[tuple[str, str], int] = {}  # by (ingress trunk, reason)
        self.vendor_rated: dict[str, int] = {}  # by egress trunk
        self.vendor_unrated: dict[tuple[str, str], int] = {}  # by (egress trunk, reason)
        self.currency_mismatches: dict[str, int] = {}  # by egress trunk: no margin
        self.deck_loads: dict[str, int] = {}  # by plan: decks checked and put in force
        self.deck_refusals: dict[str, int] = {}  # by plan: decks refused, previous kept
        self.deck_rows: dict[str, int] = {}  # by plan: rows of the deck in force now


class _TrunkRating(NamedTuple):
    trunk: Trunk
    numbering: NumberingPlan


class RateStage:
    """Prices each CDR under the plans in force (`plans`, replaced by `install`)."""

    name = "rate"

    def __init__(self, plans: RatePlans, trunks: Iterable[Trunk]) -> None:
        self.plans = plans
        self.stats = RatingStats()
        self._trunks = {
            trunk.name: _TrunkRating(
                trunk,
                NumberingPlan(
                    country_code=trunk.country_code,
                    national_prefix=trunk.national_prefix,
                    strip_prefixes=trunk.strip_prefixes,
                ),
            )
            for trunk in trunks
        }
        self._count_rows(plans)

    def install(self, load: PlanLoad) -> None:
        """Put a load's plans in force, in one assignment, and count its decks."""
        self.plans = load.plans
        stats = self.stats
        for name in load.loaded:
            stats.deck_loads[name] = stats.deck_loads.get(name, 0) + 1
        for name in load.refused:
            stats.deck_refusals[name] = stats.deck_refusals.get(name, 0) + 1
        self._count_rows(load.plans)

    def _count_rows(self, plans: RatePlans) -> None:
        self.stats.deck_rows = {name: deck.rows for name, deck in plans.decks.items()}

    def on_cdr(self, cdr: Cdr) -> Cdr:
        return _rated(cdr, *self.priced(cdr, cdr.trunk, cdr.egress_trunk, cdr.callee))

    def priced(
        self, cdr: Cdr, trunk: str | None, egress_trunk: str | None, callee: str | None
    ) -> Priced:
        """The CDR's rating fields (`RATED_FIELDS`, in that order) for `cdr` as it
        would be with these `trunk`, `egress_trunk` and `callee`: the enrich stage's,
        when both run as one copy (`sipcdr.enrich.EnrichRateStage`)."""
        plans = self.plans
        stats = self.stats
        trunks = self._trunks
        ingress = trunks.get(trunk) if trunk is not None else None
        numbering = ingress.numbering if ingress is not None else DEFAULT_PLAN
        number = first_number((cdr.request_uri, cdr.to_uri), numbering)
        digits = number.value if number.valid else None
        start_time = cdr.start_time
        answered = cdr.answer_time is not None
        billsec = cdr.billsec if answered else 0.0

        plan = ingress.trunk.rate_plan if ingress is not None else None
        customer = plans.rate(plan, digits, start_time, billsec, answered)
        label = trunk if trunk is not None else UNKNOWN_TRUNK
        if isinstance(customer, Rating):
            stats.rated[label] = stats.rated.get(label, 0) + 1
        else:
            key = (label, customer.reason)
            stats.unrated[key] = stats.unrated.get(key, 0) + 1

        vendor_cost = None
        call_margin = None
        egress = trunks.get(egress_trunk) if egress_trunk is not None else None
        if egress is not None:
            egress_label = egress.trunk.name
            cost_plan = egress.trunk.cost_plan
            vendor = (
                plans.rate(cost_plan, digits, start_time, billsec, answered)
                if cost_plan is not None
                else _NO_COST_PLAN
            )
            if isinstance(vendor, Rating):
                stats.vendor_rated[egress_label] = stats.vendor_rated.get(egress_label, 0) + 1
                vendor_cost = vendor.cost
                if isinstance(customer, Rating):
                    if customer.rate.currency == vendor.rate.currency:
                        call_margin = margin(customer.cost, vendor.cost)
                    else:
                        mismatches = stats.currency_mismatches
                        mismatches[egress_label] = mismatches.get(egress_label, 0) + 1
            else:
                key = (egress_label, vendor.reason)
                stats.vendor_unrated[key] = stats.vendor_unrated.get(key, 0) + 1

        # The trunk's numbering (technical prefixes, national numbers) makes the number
        # billing joins on; without a trunk the correlator's reading stands.
        if ingress is not None and digits is not None:
            callee = digits
        if isinstance(customer, Rating):
            row = customer.rate
            return (
                True,
                row.prefix,
                row.destination,
                row.rate,
                customer.billed_seconds,
                customer.cost,
                row.currency,
                callee,
                number.valid,
                vendor_cost,
                call_margin,
            )
        return (
            False,
            None,
            None,
            None,
            None,
            None,
            None,
            callee,
            number.valid,
            vendor_cost,
            call_margin,
        )


# The fields the rate stage sets, in the order `RateStage.priced` gives them.
RATED_FIELDS: Final = (
    "rated",
    "rate_prefix",
    "rate_name",
    "rate_per_minute",
    "billed_seconds",
    "cost",
    "currency",
    "callee",
    "callee_valid",
    "vendor_cost",
    "margin",
)
Priced: TypeAlias = tuple[
    bool,
    str | None,
    str | None,
    Decimal | None,
    int | None,
    Decimal | None,
    str | None,
    str | None,
    bool,
    Decimal | None,
    Decimal | None,
]
_rated: Final = cdr_copier(*RATED_FIELDS)


__all__ = ["CURRENCY_MISMATCH", "RATED_FIELDS", "Priced", "RateStage", "RatingStats"]
