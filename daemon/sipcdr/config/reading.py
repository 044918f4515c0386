"""Reading the parsed TOML: typed values out of its tables, each error naming its key,
where the value came from (the file, a variable, the defaults) and what was expected."""

from __future__ import annotations

import difflib
import ipaddress
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from sipcdr.config.schema import Endpoint, Network
from sipcdr.config.secrets import shown_value
from sipcdr.storage.dsn import HOST_LABEL

BOOLEANS: Final = {
    "true": True,
    "1": True,
    "yes": True,
    "on": True,
    "false": False,
    "0": False,
    "no": False,
    "off": False,
}


class ConfigError(ValueError):
    """A setting that cannot be used. `key` is its dotted path (`sinks.kafka.bootstrap`,
    `trunks[0].name`), `value` how it was given (secrets masked) or None for an unknown or
    missing key, `expected` what would have been accepted."""

    def __init__(self, message: str, *, key: str, value: str | None, expected: str) -> None:
        super().__init__(message)
        self.key = key
        self.value = value
        self.expected = expected


def parse_endpoint(text: str, *, min_port: int = 0) -> Endpoint:
    """`host:port`, `1.2.3.4:port` or `[v6]:port`; ValueError says what is wrong."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError("[IPv6]:PORT")
        try:
            host = str(ipaddress.IPv6Address(text[1:close]))
        except ValueError:
            raise ValueError("an IPv6 address inside the brackets of [IPv6]:PORT") from None
        port_text = text[close + 2 :]
    else:
        host_text, colon, port_text = text.rpartition(":")
        if not colon or not host_text:
            raise ValueError("HOST:PORT")
        if ":" in host_text:
            raise ValueError("HOST:PORT with an IPv6 host in brackets: [IPv6]:PORT")
        host = check_host(host_text)
    if not (port_text.isascii() and port_text.isdigit()) or not (
        min_port <= int(port_text) <= 65535
    ):
        raise ValueError(f"HOST:PORT with a port from {min_port} to 65535")
    return Endpoint(host, int(port_text))


class EnvStr(str):
    """A value from the environment: always text, converted by the type its key expects."""

    __slots__ = ()


class Gap:
    """A trunk index the environment skipped; reported if nothing fills it."""


GAP: Final = Gap()
_ARRAYS_OF_TABLES: Final = frozenset({"trunks"})


class Context:
    """Where values came from, to say so in error messages."""

    def __init__(self, file: Path | None) -> None:
        self.file = file
        self.env_origins: dict[str, str] = {}  # dotted key -> variable that set or created it

    def origin(self, key: str) -> str:
        probe = key
        while probe:
            variable = self.env_origins.get(probe)
            if variable is not None:
                return f"from environment variable {variable}"
            probe = parent(probe)
        return f"in {self.file}" if self.file is not None else "in the embedded defaults"

    def invalid(self, key: str, value: object, expected: str) -> ConfigError:
        shown = shown_value(key, value)
        if isinstance(value, EnvStr) and expected.startswith(("a table", "an array")):
            variable = self.env_origins.get(key, "the variable")
            expected += f"; {variable} cannot set it whole, set its keys with {variable}__<KEY>"
        message = f"{key} = {shown} ({self.origin(key)}): expected {expected}"
        return ConfigError(message, key=key, value=shown, expected=expected)

    def unknown(self, key: str, known: Iterable[str]) -> ConfigError:
        known = sorted(known)
        what = "section" if "." not in key else "key"
        expected = f"one of {', '.join(known)}" if known else "no keys here"
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        message = f"{key} ({self.origin(key)}): unknown {what}{hint}; expected {expected}"
        return ConfigError(message, key=key, value=None, expected=expected)

    def problem(self, key: str, value: object, problem: str, expected: str) -> ConfigError:
        """A value that is wrong in context; `value` None is a key that is missing."""
        shown = None if value is None else shown_value(key, value)
        named = key if shown is None else f"{key} = {shown}"
        message = f"{named} ({self.origin(key)}): {problem}; expected {expected}"
        return ConfigError(message, key=key, value=shown, expected=expected)


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def parent(key: str) -> str:
    if key.endswith("]"):
        return key[: key.rindex("[")]
    return key.rpartition(".")[0]


class Table:
    """One TOML table being read. Keys it does not know are rejected before any value is
    used, so a misspelt key is reported as such rather than through a later cross-check."""

    __slots__ = ("_raw", "context", "path")

    def __init__(self, context: Context, path: str, raw: object, known: Iterable[str]) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise context.invalid(path, raw, "a table")
        known = tuple(known)
        for key in raw:
            if key not in known:
                raise context.unknown(join(path, key), known)
        self.context = context
        self._raw: dict[str, object] = raw
        self.path = path

    def key(self, name: str) -> str:
        return join(self.path, name)

    def invalid(self, name: str, value: object, expected: str) -> ConfigError:
        return self.context.invalid(self.key(name), value, expected)

    def problem(self, name: str, value: object, problem: str, expected: str) -> ConfigError:
        return self.context.problem(self.key(name), value, problem, expected)

    def has(self, name: str) -> bool:
        return name in self._raw

    def value(self, name: str) -> object:
        """The value as given (None when absent), for a type the readers below lack."""
        return self._raw.get(name)

    def table(self, name: str, known: Iterable[str]) -> Table:
        return Table(self.context, self.key(name), self._raw.get(name), known)

    def entries(self, name: str) -> dict[str, object]:
        """A table whose keys are data (capture ids, plan names), not settings."""
        value = self._raw.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.invalid(name, value, "a table")
        return value

    def array_of_tables(self, name: str) -> list[object]:
        value = self._raw.get(name)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.invalid(name, value, "an array of tables ([[trunks]] entries)")
        return value

    def string(self, name: str, default: str) -> str:
        value = self._raw.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.invalid(name, value, "a string")
        return str(value)

    def optional_string(self, name: str) -> str | None:
        """Absent and "" both mean unset."""
        return self.string(name, "") or None

    def boolean(self, name: str, default: bool) -> bool:
        value = self._raw.get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, EnvStr) and value.strip().lower() in BOOLEANS:
            return BOOLEANS[value.strip().lower()]
        raise self.invalid(name, value, "true or false (from the environment: 1/0, yes/no)")

    def integer(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        value = self._raw.get(name)
        if value is None:
            return default
        expected = (
            f"an integer >= {minimum}" if maximum is None else f"an integer {minimum}-{maximum}"
        )
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, EnvStr):
            try:
                number = int(value)
            except ValueError:
                number = None
        if number is None or number < minimum or (maximum is not None and number > maximum):
            raise self.invalid(name, value, expected)
        return number

    def positive_number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        """A finite number above 0, and at least `minimum` when that is given."""
        value = self._raw.get(name)
        if value is None:
            return default
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, EnvStr):
            try:
                number = float(value)
            except ValueError:
                number = None
        if number is None or not math.isfinite(number) or number <= 0 or number < minimum:
            raise self.invalid(name, value, f"a number >= {minimum}" if minimum else "a number > 0")
        return number

    def strings(self, name: str) -> tuple[tuple[str, str], ...] | None:
        """The items of a list of strings with their dotted keys, or None if absent.
        From the environment a list is comma-separated; "" is the empty list."""
        value = self._raw.get(name)
        if value is None:
            return None
        key = self.key(name)
        if isinstance(value, EnvStr):
            items: list[object] = [item.strip() for item in value.split(",")] if value else []
        elif isinstance(value, list):
            items = value
        else:
            raise self.invalid(name, value, "a list of strings")
        result = []
        for index, item in enumerate(items):
            item_key = f"{key}[{index}]"
            if not isinstance(item, str) or not item:
                raise self.context.invalid(item_key, item, "a non-empty string")
            result.append((item_key, str(item)))
        return tuple(result)


def check_host(text: str) -> str:
    if text.replace(".", "").isdigit():
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise ValueError("HOST:PORT with a valid IPv4 address") from None
    labels = text.removesuffix(".").split(".")
    if len(text) > 253 or not all(HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError("HOST:PORT with a host name or IP address")
    return text


def endpoints(
    table: Table, name: str, default: tuple[Endpoint, ...], *, min_port: int = 0
) -> tuple[Endpoint, ...]:
    items = table.strings(name)
    if items is None:
        return default
    result = []
    for key, item in items:
        try:
            result.append(parse_endpoint(item, min_port=min_port))
        except ValueError as exc:
            raise table.context.invalid(key, item, str(exc)) from None
    return tuple(result)


def networks(table: Table, name: str, default: tuple[Network, ...]) -> tuple[Network, ...]:
    items = table.strings(name)
    if items is None:
        return default
    result = []
    for key, item in items:
        try:
            result.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            expected = "a network in CIDR form, e.g. 192.0.2.0/24 or 2001:db8::/32"
            raise table.context.invalid(key, item, expected) from None
    return tuple(result)


def one_endpoint(table: Table, name: str, default: Endpoint) -> Endpoint:
    if not table.has(name):
        return default
    text = table.string(name, "")
    try:
        return parse_endpoint(text)
    except ValueError as exc:
        raise table.invalid(name, text, str(exc)) from None
