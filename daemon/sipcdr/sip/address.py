"""name-addr / addr-spec (RFC 3261 section 20.10 and 25.1): display name, URI, header params."""

from __future__ import annotations

from sipcdr.sip.headers import parse_params


class AddressError(ValueError):
    """A From/To/Contact-style value whose URI cannot be located."""


def split_name_addr(value: str) -> tuple[str, str, str]:
    """Return (display name as written, URI, text after the URI holding header params).

    `"A \\" B" <sip:a@b;lr>;tag=1` gives ('"A \\" B" ', 'sip:a@b;lr', ';tag=1');
    a bare addr-spec `sip:a@b;tag=1` gives ('', 'sip:a@b', ';tag=1') because RFC 3261
    puts every parameter after an unbracketed URI in the header, not the URI.
    """
    start, end, params_at = _uri_span(value)
    return (value[: start - 1] if start else ""), _uri(value, start, end), value[params_at:]


def locate_uri(value: str) -> tuple[str, int]:
    """split_name_addr without copying out the display name and params:
    (URI, index where header params begin)."""
    start, end, params_at = _uri_span(value)
    return _uri(value, start, end), params_at


def _uri(value: str, start: int, end: int) -> str:
    uri = value[start:end]
    return uri.strip() if " " in uri or "\t" in uri else uri


def _uri_span(value: str) -> tuple[int, int, int]:
    """(start, end, params_at): the URI is value[start:end], header params follow from
    params_at. A `<` inside a quoted display name does not count (RFC 3261 25.1)."""
    if value[:1] == '"':
        q = value.find('"', 1)
        if q < 0 or value[q - 1] == "\\":
            q = _closing_quote(value)
        lt = value.find("<", q)
        if lt < 0:
            raise AddressError("display name without <URI>")
    else:
        lt = value.find("<")
    if lt >= 0:
        gt = value.find(">", lt)
        if gt < 0:
            raise AddressError("unterminated <")
        return lt + 1, gt, gt + 1
    semi = value.find(";")
    if semi < 0:
        return 0, len(value), len(value)
    return 0, semi, semi


def _closing_quote(value: str) -> int:
    i = value.find('"', 1)
    while i > 0:
        backslashes = 0
        j = i - 1
        while value[j] == "\\":
            backslashes += 1
            j -= 1
        if backslashes % 2 == 0:
            return i
        i = value.find('"', i + 1)
    raise AddressError("unterminated quoted display name")


def unquote_display(raw: str) -> str | None:
    """The display name as a person reads it: quotes and backslash escapes removed."""
    text = raw.strip()
    if not text:
        return None
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        inner = text[1:-1]
        if "\\" not in inner:
            return inner
        out: list[str] = []
        i = 0
        while i < len(inner):
            ch = inner[i]
            if ch == "\\" and i + 1 < len(inner):
                i += 1
                ch = inner[i]
            out.append(ch)
            i += 1
        return "".join(out)
    return " ".join(text.split())


def find_param(text: str, name: str, start: int = 0) -> str | None:
    """Value of param `name` (lower case) in the `;a=b;name=value` part of `text` that
    begins at `start`; LWS around `;` and `=` tolerated, "" for a flag.

    The exact spelling `;name=` is tried first because it is what nearly every
    peer sends; the general grammar runs when that fails or when other params come
    before it (a quoted value may hold `;name=`, or `; name =` may come first).
    """
    key = ";" + name + "="
    i = text.find(key, start)
    if i >= 0 and text.find(";", start, i) < 0:
        begin = i + len(key)
        end = text.find(";", begin)
        value = text[begin:] if end < 0 else text[begin:end]
        if value and " " not in value and "\t" not in value:
            return value
    if text.find(";", start) < 0:
        return None
    return parse_params(text[start:]).get(name)


def user_part(uri: str) -> str | None:
    """The user of a sip:/sips: URI (password dropped), the number of a tel: URI, else None.

    Escapes are kept as written (`%2B`): normalising numbers is sipcdr.sip.numbers' job.
    """
    colon = uri.find(":")
    if colon <= 0:
        return None
    at = uri.find("@", colon)
    if at > 0:
        user = uri[colon + 1 : at]
        pw = user.find(":")
        return user[:pw] if pw >= 0 else user
    if uri[:colon].lower() == "tel":
        semi = uri.find(";", colon)
        return uri[colon + 1 : semi] if semi >= 0 else uri[colon + 1 :]
    return None
