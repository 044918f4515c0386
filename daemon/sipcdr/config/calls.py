"""The sections about calls: `[dialog]` timers and limits, `[[trunks]]` and `[rating]`
(`[fraud]` is `config.fraud`)."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from types import MappingProxyType
from typing import Final

from sipcdr.config.reading import GAP, Table, join, networks
from sipcdr.config.schema import (
    DEFAULT_DIALOG_LIMITS,
    DEFAULT_RATING_DECIMALS,
    MAX_RATING_DECIMALS,
    Network,
    RatingConfig,
    TrunkConfig,
)
from sipcdr.dialog.correlator import DialogLimits
from sipcdr.privacy import settings as privacy_settings
from sipcdr.sip.numbers import NumberingPlan

_COUNTRY_CODE = re.compile(r"[1-9][0-9]{0,2}")  # E.164 country codes: 1-3 digits, no 0 first
_DIGITS = re.compile(r"[0-9]+")


# Listed rather than taken from DialogLimits' fields: a field added there must not be
# accepted here before this module reads it.
DIALOG_KEYS: Final = (
    "ring_timeout_s",
    "max_duration_s",
    "max_open_dialogs",
    "transaction_timeout_s",
    "auth_retry_wait_s",
    "answered_sweep_s",
)


def dialog_section(table: Table) -> DialogLimits:
    defaults = DEFAULT_DIALOG_LIMITS
    return DialogLimits(
        ring_timeout_s=table.positive_number("ring_timeout_s", defaults.ring_timeout_s),
        max_duration_s=table.positive_number("max_duration_s", defaults.max_duration_s),
        max_open_dialogs=table.integer("max_open_dialogs", defaults.max_open_dialogs, minimum=1),
        transaction_timeout_s=table.positive_number(
            "transaction_timeout_s", defaults.transaction_timeout_s
        ),
        auth_retry_wait_s=table.positive_number("auth_retry_wait_s", defaults.auth_retry_wait_s),
        answered_sweep_s=table.positive_number("answered_sweep_s", defaults.answered_sweep_s),
    )


def rating_section(table: Table, base_dir: Path) -> RatingConfig:
    decks: dict[str, Path] = {}
    for name, location in table.entries("decks").items():
        entry = join(table.key("decks"), name)
        if not name:
            raise table.context.problem(entry, name, "empty plan name", "a plan name")
        if not isinstance(location, str) or not location:
            raise table.context.invalid(entry, location, "the path of a CSV rate deck")
        decks[name] = base_dir / location
    default_plan = table.optional_string("default_plan")
    if decks and default_plan is not None and default_plan not in decks:
        expected = f"one of the plans in rating.decks: {', '.join(sorted(decks))}"
        raise table.problem("default_plan", default_plan, "no such deck", expected)
    decimals = table.integer("decimals", DEFAULT_RATING_DECIMALS, minimum=0)
    if decimals > MAX_RATING_DECIMALS:
        raise table.invalid("decimals", decimals, f"an integer from 0 to {MAX_RATING_DECIMALS}")
    return RatingConfig(decks=MappingProxyType(decks), default_plan=default_plan, decimals=decimals)


def _plan(table: Table, name: str, rating: RatingConfig) -> str | None:
    """A trunk's rate or cost plan: one of the decks, once any deck is configured."""
    plan = table.optional_string(name)
    if rating.decks and plan is not None and plan not in rating.decks:
        expected = f"one of the plans in rating.decks: {', '.join(sorted(rating.decks))}"
        raise table.problem(name, plan, "no such deck", expected)
    return plan


_TRUNK_KEYS: Final = tuple(item.name for item in fields(TrunkConfig))


def trunks_section(root: Table, rating: RatingConfig) -> tuple[TrunkConfig, ...]:
    context = root.context
    names: set[str] = set()
    owners: dict[Network, str] = {}  # network -> trunk name, to refuse ambiguous sources
    result = []
    for index, item in enumerate(root.array_of_tables("trunks")):
        path = f"trunks[{index}]"
        if item is GAP:
            expected = "trunks from the environment numbered on from the file's, without gaps"
            raise context.problem(path, None, "missing", expected)
        table = Table(context, path, item, _TRUNK_KEYS)
        if not table.has("name"):
            raise context.problem(table.key("name"), None, "missing", "a unique trunk name")
        name = table.string("name", "")
        if not name:
            raise table.invalid("name", name, "a non-empty trunk name")
        if name in names:
            raise table.problem("name", name, "duplicate trunk name", "a unique trunk name")
        names.add(name)
        sources = networks(table, "sources", ())
        if not sources:
            expected = "a non-empty list of CIDR networks"
            raise context.problem(table.key("sources"), None, "missing or empty", expected)
        for offset, network in enumerate(sources):
            owner = owners.get(network)
            if owner is not None:
                raise context.problem(
                    f"{table.key('sources')}[{offset}]",
                    str(network),
                    f"already a source of trunk {owner!r}",
                    "each network in one trunk only, so a source names one trunk",
                )
            owners[network] = name
        rate_plan = _plan(table, "rate_plan", rating)
        cost_plan = _plan(table, "cost_plan", rating)
        country_code = table.optional_string("country_code")
        if country_code is not None and not _COUNTRY_CODE.fullmatch(country_code):
            raise table.invalid("country_code", country_code, "a country code of 1-3 digits")
        national_prefix = table.optional_string("national_prefix")
        if national_prefix is not None and not _DIGITS.fullmatch(national_prefix):
            raise table.invalid("national_prefix", national_prefix, "digits, e.g. '0'")
        cdr_retention_days = privacy_settings.trunk_cdr_days(table)  # privacy hook
        result.append(
            TrunkConfig(
                name=name,
                sources=sources,
                rate_plan=rate_plan,
                cost_plan=cost_plan,
                country_code=country_code,
                national_prefix=national_prefix,
                cdr_retention_days=cdr_retention_days,
                strip_prefixes=_strip_prefixes(table),
            )
        )
    return tuple(result)


def _strip_prefixes(table: Table) -> tuple[str, ...]:
    prefixes = []
    for key, prefix in table.strings("strip_prefixes") or ():
        try:
            NumberingPlan(strip_prefixes=(prefix,))
        except ValueError:
            expected = "a technical prefix without spaces around it, e.g. '1010' or '#31#'"
            raise table.context.invalid(key, prefix, expected) from None
        prefixes.append(prefix)
    return tuple(prefixes)
