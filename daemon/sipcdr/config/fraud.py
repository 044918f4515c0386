"""`[fraud]`: the detectors' settings, read into `sipcdr.fraud.FraudSettings`.

The keys follow the settings records: one table per detector (named by its id) whose
keys are the record's fields, thresholds as tables of `warning`, `critical` and
`window_s`, `allow` tables of `numbers`, `prefixes` and `sources`. Every key is
optional: a key not given keeps its default, and in `[fraud.trunks.<name>]` it keeps
its global value, so a trunk's table says only what differs. The reader is driven by
the records' defaults, so a field added to a record is readable here without a second
list to keep in step. The high-risk list and the length table are replaced by files
(`prefixes_file`, `lengths_file`), read and checked here, relative to the config file.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from sipcdr.config.reading import Table, join
from sipcdr.config.schema import FraudConfig, TrunkConfig
from sipcdr.fraud.numbering import (
    NumberingPlan,
    PrefixTable,
    TableError,
    parse_numbering_plan,
    parse_prefix_table,
)
from sipcdr.fraud.settings import (
    DETECTORS,
    NO_EXCEPTIONS,
    AllowList,
    Baseline,
    FraudSettings,
    Limit,
    MoneyThreshold,
    Threshold,
    TrunkSettings,
)

# Global keys of [fraud] besides the detectors' tables. `call_ttl_s` follows the
# dialog layer's longest call and is not a setting of its own.
_GLOBAL_KEYS: Final = (
    "enabled",
    "cooldown_s",
    "update_interval_s",
    "max_subjects",
    "max_tracked_calls",
    "max_new_alerts_per_minute",
    "example_calls",
)
_ALLOW_KEYS: Final = ("numbers", "prefixes", "sources")
# Record fields read from a file rather than given inline.
_FILE_KEYS: Final = {"prefixes": "prefixes_file", "plan": "lengths_file"}


def fraud_section(root: Table, trunks: tuple[TrunkConfig, ...], base_dir: Path) -> FraudConfig:
    """Read `[fraud]` against the configured trunks (their numbering, and the names a
    per-trunk table may use)."""
    detector_keys = tuple(DETECTORS)
    table = root.table("fraud", (*_GLOBAL_KEYS, "allow", "trunks", *detector_keys))
    defaults = FraudSettings()
    files: dict[str, str] = {}
    detectors = {
        name: _record(
            table.table(name, _keys(getattr(defaults, name))),
            getattr(defaults, name),
            base_dir,
            files,
        )
        for name in detector_keys
    }
    globals_: dict[str, Any] = {"enabled": table.boolean("enabled", defaults.enabled)}
    for name in _GLOBAL_KEYS[1:]:
        minimum = 0 if name == "example_calls" else 1
        globals_[name] = table.integer(name, getattr(defaults, name), minimum=minimum)
    allow = _allow(table.table("allow", _ALLOW_KEYS), NO_EXCEPTIONS)

    known = {trunk.name: trunk for trunk in trunks}
    per_trunk = table.entries("trunks")
    for name in per_trunk:
        if name not in known:
            expected = f"the name of a [[trunks]] entry: {', '.join(sorted(known)) or 'none'}"
            raise table.context.problem(
                join(table.key("trunks"), name), None, "no such trunk", expected
            )
    trunk_settings: dict[str, TrunkSettings] = {}
    for trunk in trunks:
        raw = per_trunk.get(trunk.name)
        trunk_table = Table(
            table.context, join(table.key("trunks"), trunk.name), raw, ("allow", *detector_keys)
        )
        changes: dict[str, Any] = {}
        for name in detector_keys:
            if trunk_table.has(name):
                changes[name] = _record(
                    trunk_table.table(name, _keys(detectors[name])),
                    detectors[name],
                    base_dir,
                    files,
                )
        trunk_settings[trunk.name] = _build(
            trunk_table,
            "",
            functools.partial(
                TrunkSettings,
                country_code=trunk.country_code,
                national_prefix=trunk.national_prefix,
                allow=_allow(trunk_table.table("allow", _ALLOW_KEYS), NO_EXCEPTIONS),
                **changes,
            ),
        )
    settings = _build(
        table,
        "",
        lambda: FraudSettings(
            **detectors,
            **globals_,
            allow=allow,
            trunks=MappingProxyType(trunk_settings),
        ),
    )
    return FraudConfig(settings=settings, files=MappingProxyType(files))


def _keys(record: object) -> tuple[str, ...]:
    return tuple(_FILE_KEYS.get(f.name, f.name) for f in dataclasses.fields(record))  # type: ignore[arg-type]


def _record(table: Table, base: Any, base_dir: Path, files: dict[str, str]) -> Any:
    """One detector's record: `base` with the keys `table` gives replaced."""
    changes: dict[str, Any] = {}
    for item in dataclasses.fields(base):
        name = item.name
        key = _FILE_KEYS.get(name, name)
        if not table.has(key):
            continue
        current = getattr(base, name)
        if isinstance(current, PrefixTable | NumberingPlan):
            path = table.optional_string(key)
            if path is not None:
                changes[name] = _table_file(table, key, base_dir / path, current)
                files[table.key(key)] = str(base_dir / path)
        elif isinstance(current, bool):
            changes[name] = table.boolean(key, current)
        elif isinstance(current, int):
            changes[name] = table.integer(key, current, minimum=1)
        elif isinstance(current, float):
            changes[name] = table.positive_number(key, current)
        elif isinstance(current, tuple):
            items = table.strings(key)
            changes[name] = current if items is None else tuple(text for _k, text in items)
        elif isinstance(current, AllowList):
            changes[name] = _allow(table.table(key, _ALLOW_KEYS), current)
        elif isinstance(current, Threshold | Limit | Baseline | MoneyThreshold):
            changes[name] = _level(table.table(key, _keys(current)), current)
        else:  # pragma: no cover - a record field of a new kind must be taught here
            raise TypeError(f"no reader for {type(current).__name__} ({table.key(key)})")
    if not changes:
        return base
    return _build(table, "", lambda: dataclasses.replace(base, **changes))


def _level(table: Table, base: Any) -> Any:
    """A threshold table: each key not given keeps `base`'s value."""
    changes: dict[str, Any] = {}
    for item in dataclasses.fields(base):
        name = item.name
        if not table.has(name):
            continue
        current = getattr(base, name)
        if isinstance(current, Decimal):
            changes[name] = _money(table, name)
        elif isinstance(current, int):
            changes[name] = table.integer(name, current, minimum=1)
        else:
            changes[name] = table.positive_number(name, current)
    if not changes:
        return base
    return _build(table, "", lambda: dataclasses.replace(base, **changes))


def _money(table: Table, name: str) -> Decimal:
    raw = table.value(name)
    expected = 'an exact positive amount, as a string ("1000.50") or an integer'
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise table.invalid(name, raw, expected)
    try:
        amount = Decimal(str(raw).strip())
    except InvalidOperation:
        raise table.invalid(name, raw, expected) from None
    if not amount.is_finite() or amount <= 0:
        raise table.invalid(name, raw, expected)
    return amount


def _allow(table: Table, base: AllowList) -> AllowList:
    if not any(table.has(key) for key in _ALLOW_KEYS):
        return base
    numbers: dict[str, list[str]] = {}
    for key in ("numbers", "prefixes"):
        items = table.strings(key) or ()
        numbers[key] = []
        for item_key, text in items:
            digits = text.strip().removeprefix("+")
            if not (digits.isascii() and digits.isdigit()):
                raise table.context.invalid(item_key, text, "E.164 digits, e.g. 4930123456")
            numbers[key].append(digits)
    sources = []
    for item_key, text in table.strings("sources") or ():
        try:
            AllowList(sources=(text,))
        except ValueError:
            expected = "an IP address or a network in CIDR form, e.g. 192.0.2.0/24"
            raise table.context.invalid(item_key, text, expected) from None
        sources.append(text)
    return AllowList(frozenset(numbers["numbers"]), tuple(numbers["prefixes"]), tuple(sources))


def _table_file(
    table: Table, key: str, path: Path, current: PrefixTable | NumberingPlan
) -> PrefixTable | NumberingPlan:
    parse: Callable[[str], PrefixTable | NumberingPlan]
    if isinstance(current, PrefixTable):
        parse, expected = parse_prefix_table, "a CSV with a prefix column (E.164 digits)"
    else:
        parse, expected = parse_numbering_plan, "a CSV of country_code,regions,lengths"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise table.problem(key, str(path), f"cannot be read ({reason})", expected) from None
    try:
        return parse(text)
    except TableError as exc:
        raise table.problem(key, str(path), str(exc), expected) from None


def _build(table: Table, name: str, make: Callable[[], Any]) -> Any:
    """Build a settings record; a value its checks refuse (critical below warning, an
    alpha above 1) becomes a ConfigError naming the table."""
    try:
        return make()
    except (ValueError, TableError) as exc:
        key = table.key(name) if name else table.path
        raise table.context.problem(key, None, str(exc), "consistent values") from None
