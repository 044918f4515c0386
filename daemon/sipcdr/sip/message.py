"""SipMessage: what the parser hands on. Correlator fields are plain slots filled by the
parser; everything else is derived on first use from the kept header lines."""

from __future__ import annotations

import re

from sipcdr.sip.address import (
    AddressError,
    locate_uri,
    split_name_addr,
    unquote_display,
    user_part,
)
from sipcdr.sip.headers import TOKEN_CHARS, canonical_name, parse_params, split_list

_Q850_CAUSE_FIRST = re.compile(r"Q\.850[ \t]*;[ \t]*cause[ \t]*=[ \t]*([0-9]{1,3})(?![0-9])", re.I)
_SINGLE_VALUED = ("call-id", "cseq", "from", "to", "content-length")
_DATE_ZONE = "GMT"  # RFC 3261 section 20.17: SIP-date is RFC 1123 with the zone always GMT


class SipMessage:
    """One parsed SIP request or response. Treat as immutable: the parser sets every slot.

    Text fields are `str` (the header block is decoded once as UTF-8); `body` is the raw
    bytes, exactly Content-Length long when that header is present.
    """

    __slots__ = (
        "_defects",
        "_index",
        "_lines",
        "_pai",
        "_pai_read",
        "body",
        "body_start",
        "call_id",
        "content_length",
        "content_type",
        "cseq",
        "cseq_method",
        "from_tag",
        "from_uri",
        "is_request",
        "method",
        "raw_from",
        "raw_pai",
        "raw_reason",
        "raw_to",
        "reason_phrase",
        "request_uri",
        "status_code",
        "to_tag",
        "to_uri",
        "user_agent",
        "via_branch",
    )

    is_request: bool
    method: str  # request method; "" on a response (see cseq_method)
    request_uri: str
    status_code: int  # 0 on a request
    reason_phrase: str
    call_id: str
    cseq: int  # -1 when the CSeq header is missing
    cseq_method: str
    from_uri: str
    from_tag: str | None
    to_uri: str
    to_tag: str | None
    via_branch: str | None  # branch of the topmost Via value
    user_agent: str | None  # User-Agent, or Server on a response
    content_type: str | None
    content_length: int | None  # None when the header is absent
    body: bytes
    # Where the body starts in the bytes parsed (after the blank line), -1 when not
    # known (a message rebuilt from an event): the signaling record cuts the body off
    # there without searching the bytes again for the end of the headers.
    body_start: int
    raw_from: str
    raw_to: str
    raw_pai: str | None  # as on the line, unstripped: only the first INVITE needs it
    raw_reason: str | None  # likewise
    _lines: list[str]
    _defects: list[str]
    _index: dict[str, list[str]] | None
    # `p_asserted_identity` once read: the fraud detectors and the correlator both read
    # it from each new call's INVITE. Whoever builds a message sets `_pai_read` False.
    _pai: str | None
    _pai_read: bool

    # -- generic header access -------------------------------------------------

    def header(self, name: str) -> str | None:
        """First value of header `name` (any case, compact form or full name), or None."""
        values = self._header_index().get(canonical_name(name))
        return values[0] if values else None

    def headers(self, name: str) -> list[str]:
        """Every line's value of header `name`, in message order (lines, not list elements:
        use `sipcdr.sip.split_list` to split a comma-separated value)."""
        return list(self._header_index().get(canonical_name(name), ()))

    def header_names(self) -> list[str]:
        """Canonical names of every header present, in first-seen order."""
        return list(self._header_index())

    def _header_index(self) -> dict[str, list[str]]:
        index = self._index
        if index is None:
            index = {}
            for line in self._lines:
                name, sep, value = line.partition(":")
                if sep:
                    index.setdefault(canonical_name(name), []).append(value.strip())
            self._index = index
        return index

    # -- lazily derived fields -------------------------------------------------

    @property
    def via_count(self) -> int:
        """Via values over all Via lines: one per hop the message has crossed."""
        return sum(len(split_list(line)) for line in self.headers("via"))

    @property
    def from_user(self) -> str | None:
        return user_part(self.from_uri)

    @property
    def to_user(self) -> str | None:
        return user_part(self.to_uri)

    @property
    def p_asserted_identity(self) -> str | None:
        """URI of the first P-Asserted-Identity value (RFC 3325)."""
        if self._pai_read:
            return self._pai
        uri = self._asserted_identity()
        self._pai = uri
        self._pai_read = True
        return uri

    def _asserted_identity(self) -> str | None:
        raw = self.raw_pai
        if raw is None:
            return None
        if "," in raw:
            elements = split_list(raw)
            if not elements:
                return None
            raw = elements[0]
        try:
            uri = locate_uri(raw.strip())[0]
        except AddressError:
            return None
        return uri or None  # an empty header value asserts no identity

    @property
    def from_display(self) -> str | None:
        return _display_of(self.raw_from)

    @property
    def to_display(self) -> str | None:
        return _display_of(self.raw_to)

    @property
    def contact(self) -> str | None:
        """URI of the first Contact value, or "*" for a REGISTER removing all bindings."""
        value = self.header("contact")
        if value is None:
            return None
        first = split_list(value)
        if not first:
            return None
        if first[0] == "*":
            return "*"
        try:
            return split_name_addr(first[0])[1]
        except AddressError:
            return None

    @property
    def reason_header(self) -> int | None:
        """The Q.850 cause of a Reason header (RFC 3326), the one billing keeps."""
        raw = self.raw_reason
        if raw is None:
            return None
        # Every stack seen writes `Q.850;cause=N` first: one regex, no header index.
        match = _Q850_CAUSE_FIRST.search(raw)
        if match is not None and raw.count('"', 0, match.start()) % 2 == 0:
            return int(match[1])
        for line in self.headers("reason"):
            for element in split_list(line):
                protocol, _, params = element.partition(";")
                if protocol.strip().upper() != "Q.850":
                    continue
                cause = parse_params(params).get("cause", "")
                if cause.isascii() and cause.isdigit() and len(cause) <= 3:
                    return int(cause)
        return None

    @property
    def defects(self) -> tuple[str, ...]:
        """Deviations from RFC 3261 grammar that did not stop parsing, as reason codes.

        The hot path records only what it meets anyway; the checks of fields the
        correlator never reads (display names, Date, Contact syntax) run here, on demand.
        """
        found = list(self._defects)
        index = self._header_index()
        for name in _SINGLE_VALUED:
            values = index.get(name, ())
            if len(values) > 1 and (name != "content-length" or len(set(values)) > 1):
                # RFC 4475 section 3.3.8/3.3.9: the parser kept the first value.
                found.append("duplicate_" + name.replace("-", "_"))
        for line in self._lines:
            if ":" not in line:
                found.append("header_without_colon")
                break
        vias = index.get("via", ())
        if vias and any("," in via for via in vias):
            if any(not part.strip() for via in vias for part in via.split(",")):
                found.append("empty_via_element")
        for label, raw in (("from", self.raw_from), ("to", self.raw_to)):
            if raw:
                found.extend(_address_defects(label, raw))
        for contact in self.headers("contact"):
            for element in split_list(contact):
                if element != "*":
                    found.extend(_address_defects("contact", element))
        if self.is_request and "?" in self.request_uri[self.request_uri.rfind("@") + 1 :]:
            # RFC 3261 section 19.1.1: headers are not allowed in a Request-URI. A "?"
            # before the "@" is a legal user-part character (RFC 4475 section 3.1.1.2).
            found.append("request_uri_headers")
        date = self.header("date")
        if date is not None and not date.rstrip().endswith(_DATE_ZONE):
            found.append("bad_date")
        return tuple(dict.fromkeys(found))

    def __repr__(self) -> str:
        if self.is_request:
            first = f"{self.method} {self.request_uri}"
        else:
            first = f"{self.status_code} {self.reason_phrase}"
        return f"<SipMessage {first} call_id={self.call_id!r} cseq={self.cseq} {self.cseq_method}>"


def _display_of(raw: str) -> str | None:
    if not raw:
        return None
    try:
        display, _uri, _params = split_name_addr(raw)
    except AddressError:
        return None
    return unquote_display(display)


def _address_defects(label: str, value: str) -> list[str]:
    try:
        display, uri, _params = split_name_addr(value)
    except AddressError:
        return [f"bad_{label}_address"]
    found: list[str] = []
    bracketed = "<" in value[len(display) :]
    text = display.strip()
    if text and not text.startswith('"'):
        # An unquoted display name is a sequence of tokens (RFC 3261 section 25.1).
        if any(ch not in TOKEN_CHARS for word in text.split() for ch in word):
            found.append(f"bad_{label}_display_name")
    if bracketed:
        inner = value[value.find("<", len(display)) + 1 : value.find(">", len(display))]
        if inner != inner.strip():
            found.append(f"bad_{label}_addr_spec")
    elif "?" in uri or "," in uri:
        # A URI with headers or commas must be enclosed in <> (RFC 3261 section 20.10).
        found.append(f"unbracketed_{label}_uri")
    return found
