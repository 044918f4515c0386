"""Header names: compact forms, canonical spellings, and the list/param grammar shared by
the eager hot path and the lazy accessors."""

from __future__ import annotations

# RFC 3261 section 7.3.3 plus the extensions that registered a compact form (IANA
# "Header Fields" registry): event/allow-events RFC 6665, refer-to RFC 3515,
# referred-by RFC 3892, session-expires RFC 4028, identity RFC 8224, identity-info
# RFC 4474, accept/reject-contact and request-disposition RFC 3841.
COMPACT_FORMS: dict[str, str] = {
    "a": "accept-contact",
    "b": "referred-by",
    "c": "content-type",
    "d": "request-disposition",
    "e": "content-encoding",
    "f": "from",
    "i": "call-id",
    "j": "reject-contact",
    "k": "supported",
    "l": "content-length",
    "m": "contact",
    "n": "identity-info",
    "o": "event",
    "r": "refer-to",
    "s": "subject",
    "t": "to",
    "u": "allow-events",
    "v": "via",
    "x": "session-expires",
    "y": "identity",
}


# RFC 3261 section 25.1 token characters: methods, header names, unquoted display names.
TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~")


def canonical_name(name: str) -> str:
    """Lower-case full name for any spelling: `I`, `call-id` and `Call-ID` all give `call-id`."""
    lowered = name.strip().lower()
    return COMPACT_FORMS.get(lowered, lowered)


def split_list(value: str) -> list[str]:
    """Split a comma-separated header value (RFC 3261 section 7.3.1) into its elements.

    Commas inside quoted strings and inside <...> do not separate; empty elements are
    dropped, as the #rule allows.
    """
    if '"' not in value and "<" not in value:
        parts = value.split(",")
    else:
        parts = _split_outside(value, ",", angle_brackets=True)
    return [part.strip() for part in parts if part.strip()]


def parse_params(text: str) -> dict[str, str]:
    """`;name=value;flag` into {name: value, flag: ""}, names lower-cased, LWS tolerated.

    Quoted values keep their quotes stripped; the first occurrence of a name wins.
    """
    params: dict[str, str] = {}
    for item in _split_semicolons(text):
        name, sep, val = item.partition("=")
        name = name.strip().lower()
        if not name:
            continue
        val = val.strip()
        if sep and len(val) >= 2 and val[0] == '"' and val[-1] == '"':
            val = val[1:-1]
        params.setdefault(name, val)
    return params


def _split_semicolons(text: str) -> list[str]:
    if '"' not in text:
        return text.split(";")
    return _split_outside(text, ";", angle_brackets=False)


def _split_outside(text: str, separator: str, *, angle_brackets: bool) -> list[str]:
    """Split on `separator` where it stands outside quoted strings (with backslash
    escapes) and, when asked, outside <...>."""
    items: list[str] = []
    start = 0
    quoted = False
    angle = False
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif angle_brackets and ch == "<":
            angle = True
        elif angle_brackets and ch == ">":
            angle = False
        elif ch == separator and not angle:
            items.append(text[start:i])
            start = i + 1
        i += 1
    items.append(text[start:])
    return items
