"""User parts of sip:/tel: URIs into E.164 digits (no "+"), the form billing joins on.

`normalize` applies one trunk's `NumberingPlan` and says whether the result is an
E.164 number or a user part that is not a number (kept raw, never guessed at, and
never rated). The rules, in the order they apply:

1. Parameters after `;` are dropped, except `phone-context` (RFC 3966 section 5.1.5);
   `%XX` escapes are decoded; visual separators `-.()` and spaces are removed.
2. The trunk's technical prefixes (`strip_prefixes`, e.g. `#31#`, `1010`) are removed
   from the front, longest first, as often as they occur.
3. `+digits` is international. So is a number after one of the trunk's international
   prefixes (by default `011` under country code 1, `00` under any other, both when
   the trunk has no country code).
4. A number starting with the trunk's national prefix is national: the prefix gives
   way to the country code (a `phone-context=+CC` names it, else the trunk). Under a
   `phone-context=+digits`, any other number is local to it: the context's digits
   go in front.
5. Other digits are taken as E.164 already, without `+` (the form carrier
   interconnects send).

The result must be ASCII digits, 7 to 15 of them, not starting with 0 (ITU-T E.164:
country codes start with 1-9, no assigned international number is shorter than 7
digits and none longer than 15). So service codes (`112`, `*21#`) and national
numbers the trunk cannot resolve are marked invalid instead of being read as some
country's prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, NamedTuple
from urllib.parse import unquote

# ITU-T E.164 section 6: at most 15 digits including the country code.
MAX_E164_DIGITS: Final = 15
# The shortest international numbers in service (e.g. +683 XXXX) have 7 digits.
MIN_E164_DIGITS: Final = 7
# Visual separators allowed in tel: numbers (RFC 3966 section 5.1.1), plus spaces.
_VISUAL_SEPARATORS: Final = str.maketrans("", "", "-.() ")
INTERNATIONAL_PREFIX: Final = "00"  # ITU-T E.164 recommended international call prefix
NANP_INTERNATIONAL_PREFIX: Final = "011"  # North American Numbering Plan (country code 1)
NANP_COUNTRY_CODE: Final = "1"
_PHONE_CONTEXT: Final = "phone-context="

# Why a user part is not a number; Number.reason carries one of these.
EMPTY: Final = "empty"
NOT_DIGITS: Final = "not_digits"
TOO_SHORT: Final = "too_short"
TOO_LONG: Final = "too_long"
LEADING_ZERO: Final = "leading_zero"
NATIONAL_WITHOUT_COUNTRY: Final = "national_without_country_code"


def _is_digits(text: str) -> bool:
    return text.isdigit() and text.isascii()


def _longest_first(prefixes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted(dict.fromkeys(prefixes), key=len, reverse=True))


def default_international_prefixes(country_code: str | None) -> tuple[str, ...]:
    """The usual international prefixes for a trunk in `country_code`.

    `011` only where it cannot be a national number (the UK has 0113 area codes),
    so under another country code it is left to an explicit setting.
    """
    if country_code is None:
        return (NANP_INTERNATIONAL_PREFIX, INTERNATIONAL_PREFIX)
    if country_code == NANP_COUNTRY_CODE:
        return (NANP_INTERNATIONAL_PREFIX,)
    return (INTERNATIONAL_PREFIX,)


@dataclass(frozen=True, slots=True)
class NumberingPlan:
    """One trunk's numbering parameters. `international_prefixes=None` takes
    `default_international_prefixes(country_code)`; prefixes are kept longest first.

    Raises ValueError for a value that cannot be a numbering parameter, so a
    config loader can name the key.
    """

    country_code: str | None = None
    national_prefix: str | None = None
    strip_prefixes: tuple[str, ...] = ()
    international_prefixes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        cc = self.country_code
        if cc is not None and not (_is_digits(cc) and 1 <= len(cc) <= 3 and cc[0] != "0"):
            raise ValueError(f"country_code must be 1-3 digits not starting with 0: {cc!r}")
        national = self.national_prefix
        if national is not None and not _is_digits(national):
            raise ValueError(f"national_prefix must be digits: {national!r}")
        for prefix in self.strip_prefixes:
            if not prefix or prefix.strip() != prefix:
                raise ValueError(f"strip_prefixes must be non-empty, unpadded: {prefix!r}")
        international = self.international_prefixes
        if international is None:
            international = default_international_prefixes(cc)
        for prefix in international:
            if not _is_digits(prefix):
                raise ValueError(f"international_prefixes must be digits: {prefix!r}")
        object.__setattr__(self, "international_prefixes", _longest_first(international))
        object.__setattr__(self, "strip_prefixes", _longest_first(self.strip_prefixes))


DEFAULT_PLAN: Final = NumberingPlan()


class Number(NamedTuple):
    """`value` is E.164 digits without "+" when `valid`; otherwise the user part as
    seen ("" when there was none), and `reason` says why it is not a number."""

    value: str
    valid: bool
    reason: str | None = None


def normalize(user: str | None, plan: NumberingPlan = DEFAULT_PLAN) -> Number:
    """The E.164 number in a URI user part (or tel: number with its parameters).

    `+49 (30) 1234567`, `004930 1234567`, `030-1234567` (country 49, national
    prefix 0) and `301234567;phone-context=+49` all give `Number("49301234567", True)`.
    """
    if not user:
        return Number("", False, EMPTY)
    number, context = _split_params(user)
    if "%" in number:
        number = unquote(number)
    number = number.translate(_VISUAL_SEPARATORS)
    number = _strip_technical(number, plan.strip_prefixes)
    if number.startswith("+"):
        return _checked(user, number[1:])
    if not (number.isdigit() and number.isascii()):
        return Number(user, False, NOT_DIGITS)
    for prefix in plan.international_prefixes or ():
        if number.startswith(prefix):
            return _checked(user, number[len(prefix) :])
    national = plan.national_prefix
    if national and number.startswith(national):
        # A context longer than a country code names an area too, and a national
        # number already holds its area.
        country = context if context and len(context) <= 3 else plan.country_code
        if country is None:
            return Number(user, False, NATIONAL_WITHOUT_COUNTRY)
        return _checked(user, country + number[len(national) :])
    if context is not None:
        return _checked(user, context + number)
    return _checked(user, number)


def number_from_uri(uri: str | None, plan: NumberingPlan = DEFAULT_PLAN) -> Number:
    """`normalize` of a sip:/sips: URI's user part or a tel: URI's number.

    tel: parameters stay with the number, so a `phone-context` is honoured.
    """
    if not uri:
        return Number("", False, EMPTY)
    colon = uri.find(":")
    if colon <= 0:
        return Number("", False, EMPTY)
    at = uri.find("@", colon)
    if at > 0:
        user = uri[colon + 1 : at]
        password = user.find(":")
        return normalize(user[:password] if password >= 0 else user, plan)
    if uri[:colon].lower() == "tel":
        return normalize(uri[colon + 1 :], plan)
    return Number("", False, EMPTY)


def first_number(uris: tuple[str | None, ...], plan: NumberingPlan = DEFAULT_PLAN) -> Number:
    """The first of `uris` (in order of preference, e.g. P-Asserted-Identity then
    From, or Request-URI then To) that holds a number; when none does, the first
    user part present, raw and marked invalid."""
    first: Number | None = None
    for uri in uris:
        number = number_from_uri(uri, plan)
        if number.valid:
            return number
        if first is None or (not first.value and number.value):
            first = number
    return first if first is not None else Number("", False, EMPTY)


def to_e164(
    user: str | None,
    country_code: str | None = None,
    national_prefix: str | None = None,
) -> str | None:
    """`+49 (30) 1234`, `0049301234`, `tel:+49-30-1234;npdi` all give `49301234`.

    The CDR's `caller`/`callee` digits: a national number (`030 1234` with national
    prefix "0") needs the trunk's country code; without one it is returned as
    dialled. Anything that is not a number (`alice`, `*21#`) gives None: the CDR then
    carries the URI only. Rating uses the stricter `normalize`.
    """
    if not user:
        return None
    number = user.split(";", 1)[0]
    if "%" in number:
        number = unquote(number)
    number = number.translate(_VISUAL_SEPARATORS)
    international = number.startswith("+")
    if international:
        number = number[1:]
    if not number.isdigit() or not number.isascii():
        return None
    if not international:
        if number.startswith(INTERNATIONAL_PREFIX):
            number = number[len(INTERNATIONAL_PREFIX) :]
        elif country_code and national_prefix and number.startswith(national_prefix):
            number = country_code + number[len(national_prefix) :]
    if not number or len(number) > MAX_E164_DIGITS:
        return None
    return number


def _split_params(user: str) -> tuple[str, str | None]:
    """(number, digits of a global phone-context or None). A domain-name context
    (RFC 3966 `domainname`) names no country, so the trunk's plan applies."""
    semi = user.find(";")
    if semi < 0:
        return user, None
    number = user[:semi]
    lowered = user.lower()
    at = lowered.find(_PHONE_CONTEXT, semi)
    if at < 0:
        return number, None
    value = user[at + len(_PHONE_CONTEXT) :].split(";", 1)[0]
    if "%" in value:
        value = unquote(value)
    if not value.startswith("+"):
        return number, None
    digits = value[1:].translate(_VISUAL_SEPARATORS)
    if not _is_digits(digits):
        return number, None
    return number, digits


def _strip_technical(number: str, prefixes: tuple[str, ...]) -> str:
    stripped = True
    while stripped and prefixes:
        stripped = False
        for prefix in prefixes:
            if number.startswith(prefix) and len(number) > len(prefix):
                number = number[len(prefix) :]
                stripped = True
                break
    return number


def _checked(user: str, digits: str) -> Number:
    if not (digits.isdigit() and digits.isascii()):
        return Number(user, False, NOT_DIGITS)
    if digits[0] == "0":
        return Number(user, False, LEADING_ZERO)
    if len(digits) < MIN_E164_DIGITS:
        return Number(user, False, TOO_SHORT)
    if len(digits) > MAX_E164_DIGITS:
        return Number(user, False, TOO_LONG)
    return Number(digits, True)
