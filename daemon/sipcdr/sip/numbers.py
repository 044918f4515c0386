"""User parts of sip:/tel: URIs into E.164 digits (no "+"), the form billing joins on."""

from __future__ import annotations

from urllib.parse import unquote

# ITU-T E.164 section 6: at most 15 digits including the country code.
MAX_E164_DIGITS = 15
# Visual separators allowed in tel: numbers (RFC 3966 section 5.1.1).
_VISUAL_SEPARATORS = str.maketrans("", "", "-.() ")
INTERNATIONAL_PREFIX = "00"  # ITU-T E.164 recommended international call prefix


def to_e164(
    user: str | None,
    country_code: str | None = None,
    national_prefix: str | None = None,
) -> str | None:
    """`+49 (30) 1234`, `0049301234`, `tel:+49-30-1234;npdi` all give `49301234`.

    A national number (`030 1234` with national prefix "0") needs the trunk's country
    code; without one it is returned as dialled. Anything that is not a number
    (`alice`, `*21#`) gives None: the CDR then carries the URI only.
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
