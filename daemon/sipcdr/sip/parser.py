"""The hot path: one datagram (or one framed stream message) of bytes into a SipMessage.

Pure and allocation-shy. The header block is decoded once; each line costs one find,
one slice and one dict lookup unless it is a header the correlator reads. Everything
else is kept as lines and parsed only when asked for (see SipMessage).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from sipcdr.sip.address import AddressError, find_param, locate_uri
from sipcdr.sip.headers import COMPACT_FORMS, TOKEN_CHARS, split_list
from sipcdr.sip.message import SipMessage

# Bounds that keep hostile input cheap. RFC 3261 sets no header-count limit; real
# INVITEs through several proxies carry 20-40 header lines.
MAX_MESSAGE_BYTES: Final = 65535  # the largest UDP datagram; longer stream messages refused
MAX_HEADER_LINES = 256
MAX_CSEQ = 2**31 - 1  # RFC 3261 section 8.1.1.5: CSeq MUST be less than 2**31
MAX_CONTENT_LENGTH_DIGITS = 9  # anything longer cannot fit the message size bound anyway


class SipParseError(ValueError):
    """The bytes are not a SIP message sipcdr can use. `reason` is a metric label."""

    __slots__ = ("reason",)

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# Slot numbers of the headers the hot path extracts. 0 means "known, not needed now".
_CALL_ID, _CSEQ, _FROM, _TO, _VIA, _UA, _SERVER, _PAI, _REASON, _CTYPE, _CLEN = range(1, 12)

_WANTED = {
    "call-id": _CALL_ID,
    "cseq": _CSEQ,
    "from": _FROM,
    "to": _TO,
    "via": _VIA,
    "user-agent": _UA,
    "server": _SERVER,
    "p-asserted-identity": _PAI,
    "reason": _REASON,
    "content-type": _CTYPE,
    "content-length": _CLEN,
}
# Headers common enough that the spelling lookup should hit without lower-casing.
_COMMON_SKIPPED = (
    "Max-Forwards Allow Supported Require Proxy-Require Record-Route Route Contact "
    "Content-Disposition Expires Accept Accept-Language Accept-Encoding Session-Expires "
    "Min-SE Allow-Events Privacy P-Preferred-Identity Diversion Remote-Party-ID "
    "Authorization Proxy-Authorization WWW-Authenticate Proxy-Authenticate Date "
    "Organization Subject RSeq RAck Event Subscription-State Content-Encoding MIME-Version "
    "Timestamp Warning Call-Info Alert-Info Error-Info Retry-After Refer-To Referred-By "
    "Replaces Priority P-Charging-Vector P-Access-Network-Info P-Called-Party-ID "
    "P-Early-Media Recv-Info Path Service-Route Unsupported Min-Expires X-Serialnumber"
).split()


def _spellings(name: str) -> set[str]:
    title = "-".join(part.capitalize() for part in name.split("-"))
    return {name, name.lower(), name.upper(), title}


def _build_slot_table() -> dict[str, int]:
    table: dict[str, int] = {}
    for name in _COMMON_SKIPPED:
        for spelling in _spellings(name):
            table[spelling] = 0
    for compact, full in COMPACT_FORMS.items():
        slot = _WANTED.get(full, 0)
        table[compact] = slot
        table[compact.upper()] = slot
    for name, slot in _WANTED.items():
        for spelling in _spellings(name):
            table[spelling] = slot
    for spelling in ("Call-ID", "CSeq", "WWW-Authenticate", "P-Asserted-Identity"):
        table.setdefault(spelling, _WANTED.get(spelling.lower(), 0))
    return table


_SLOT_OF = _build_slot_table()

# The C scanner does the header loop of _build for regular messages and declines the
# rest (returns None), which then take the Python path. It is compiled at install time
# when a compiler is present; SIPCDR_PURE_PYTHON keeps it out (sipcdr.hotpath).
ScanResult = tuple[str, list[str], dict[int, str], int]
_scan_head: Callable[[bytes], ScanResult | None] | None
try:
    from sipcdr.sip import _scan
except ImportError:
    _scan_head = None
else:
    _scan.set_wanted(
        {
            **_WANTED,
            **{
                compact: _WANTED[full] for compact, full in COMPACT_FORMS.items() if full in _WANTED
            },
        },
        MAX_HEADER_LINES,
    )
    _scan_head = _scan.scan_head
_CR_LF = (13, 10)
_S = ("S", "s")
_FOLD_START = (" ", "\t")

KNOWN_METHODS = frozenset(
    "INVITE ACK BYE CANCEL REGISTER OPTIONS PRACK UPDATE INFO SUBSCRIBE NOTIFY REFER "
    "MESSAGE PUBLISH".split()
)
_NO_DEFECTS: list[str] = []  # shared and never mutated: most messages have none
# Skips __init__; SipMessage.__new__ (not object.__new__) is also what a compiled
# SipMessage needs to set up its layout.
_new_message = SipMessage.__new__


def parse(data: bytes) -> SipMessage:
    """Parse one SIP message. Raises SipParseError, and nothing else, for any input."""
    try:
        return _parse(data)
    except SipParseError:
        raise
    except Exception as exc:  # a parser bug must cost one message, never the capture loop
        raise SipParseError("internal_error", type(exc).__name__) from exc


def _parse(data: bytes) -> SipMessage:
    size = len(data)
    if not size:
        raise SipParseError("empty")
    if size > MAX_MESSAGE_BYTES:
        raise SipParseError("too_large", str(size))
    if data[0] in _CR_LF:
        # RFC 3261 section 7.5: CRLFs before the start line are ignored; a datagram of
        # nothing but CRLFs is a keepalive (RFC 5626 section 4.4.1).
        stripped = data.lstrip(b"\r\n")
        if not stripped:
            raise SipParseError("keepalive")
        msg = _parse(stripped)
        # `body_start` counts in the bytes given, the CRLFs leading them too.
        msg.body_start += size - len(stripped)
        return msg

    if _scan_head is not None:
        scanned = _scan_head(data)
        if scanned is not None:
            start_line, lines, first, body_start = scanned
            return _fields(data, _start_line(start_line), lines, first, body_start, _NO_DEFECTS)
    defects = _NO_DEFECTS
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return _parse_irregular(data)
    head_bytes = data[:end]
    try:
        head = head_bytes.decode()
    except UnicodeDecodeError:
        return _parse_irregular(data)
    lines = head.split("\r\n")
    if len(lines) != head.count("\n") + 1 or "\x00" in head:
        # A bare LF somewhere: the blank line may be earlier than the CRLFCRLF found.
        return _parse_irregular(data)
    try:
        return _build(data, lines, end + 4, defects)
    except _Folded:
        return _build(data, _unfold(head.split("\r\n")), end + 4, defects)


def _parse_irregular(data: bytes) -> SipMessage:
    """Bare-LF or mixed line ends, invalid UTF-8, NUL bytes: correct rather than fast."""
    defects: list[str] = []
    end, body_start = _blank_line(data)
    if end < 0:
        raise SipParseError("no_header_end")
    if end == len(data):
        defects.append("missing_blank_line")
    head_bytes = data[:end]
    try:
        head = head_bytes.decode()
    except UnicodeDecodeError:
        head = head_bytes.decode(errors="replace")
        defects.append("invalid_utf8")
    if "\x00" in head:
        # Kept out of every text field: PostgreSQL text and most consumers reject NUL.
        head = head.replace("\x00", "\ufffd")
        defects.append("nul_in_headers")
    lines = head.replace("\r\n", "\n").rstrip("\n").split("\n")
    if len(lines) > MAX_HEADER_LINES:
        # Physical lines, as on the fast path: the bound must also cap the unfolding.
        raise SipParseError("too_many_headers", str(len(lines)))
    return _build(data, _unfold(lines), body_start, defects)


class _Folded(Exception):
    """A continuation line was met: the fast path restarts on unfolded lines."""


def _build(data: bytes, lines: list[str], body_start: int, defects: list[str]) -> SipMessage:
    if len(lines) > MAX_HEADER_LINES:
        raise SipParseError("too_many_headers", str(len(lines)))
    start_line = lines[0]
    del lines[0]
    # Start-line errors come before a fold is found, as on the scanner's path.
    msg = _start_line(start_line)

    # One pass keeps the first value of each wanted header. This loop is most of the
    # parse, so it does three C calls a line and nothing else: values are stripped only
    # when used, and names the spelling table misses go to _slot_of_unusual.
    first: dict[int, str] = {}
    keep_first = first.setdefault
    slot_of = _SLOT_OF
    for line in lines:
        name, _colon, field = line.partition(":")
        slot = slot_of.get(name)
        if slot is None:
            slot = _slot_of_unusual(name)
        keep_first(slot, field)
    return _fields(data, msg, lines, first, body_start, defects)


def _start_line(start_line: str) -> SipMessage:
    """A new message with the fields of its request or status line."""
    msg: SipMessage = _new_message(SipMessage)
    if start_line.startswith("SIP/") or (start_line[:1] in _S and start_line[:4].upper() == "SIP/"):
        _status_line(msg, start_line)
    else:
        # RFC 3261 section 25.1: Method SP Request-URI SP SIP-Version, single spaces.
        parts = start_line.split(" ")
        if len(parts) != 3:
            raise SipParseError("bad_request_line", start_line[:80])
        method, uri, version = parts
        if version != "SIP/2.0" and (version.upper() != "SIP/2.0" or not version.isascii()):
            raise SipParseError("bad_version", version[:20])
        if method not in KNOWN_METHODS and not _is_token(method):
            raise SipParseError("bad_method", method[:40])
        if ":" not in uri or not uri[0].isalpha():
            # Catches <sip:...> (RFC 4475 section 3.1.2.7) and anything without a scheme.
            raise SipParseError("bad_request_uri", uri[:80])
        msg.is_request = True
        msg.method = method
        msg.request_uri = uri
        msg.status_code = 0
        msg.reason_phrase = ""
    return msg


def _fields(
    data: bytes,
    msg: SipMessage,
    lines: list[str],
    first: dict[int, str],
    body_start: int,
    defects: list[str],
) -> SipMessage:
    """The eager fields from the first value of each wanted header (by slot)."""
    msg._lines = lines
    msg._index = None
    get = first.get
    value: str | None

    # Call-ID, CSeq, From, To, Via are mandatory (RFC 3261 section 8.1.1); RFC 4475
    # section 3.3.1 leaves their absence to the layer above, so it is a defect here.
    value = get(_CALL_ID)
    if value is None:
        msg.call_id = ""
        defects = [*defects, "missing_call_id"]
    else:
        msg.call_id = value.strip()

    value = get(_CSEQ)
    if value is None:
        msg.cseq = -1
        msg.cseq_method = ""
        defects = [*defects, "missing_cseq"]
    else:
        parts = value.split()
        if len(parts) != 2:
            raise SipParseError("bad_cseq", value[:40])
        number, cseq_method = parts
        if not (number.isdigit() and number.isascii()) or len(number) > 10:
            raise SipParseError("bad_cseq", number[:40])
        cseq = int(number)
        if cseq > MAX_CSEQ:
            raise SipParseError("bad_cseq", number)
        msg.cseq = cseq
        msg.cseq_method = cseq_method
        if cseq_method != msg.method and msg.is_request:
            # RFC 3261 section 8.1.1.5: the CSeq method MUST match the request's.
            raise SipParseError("cseq_method_mismatch", f"{msg.method} vs {cseq_method}")

    value = get(_FROM)
    if value is None:
        msg.raw_from = msg.from_uri = ""
        msg.from_tag = None
        defects = [*defects, "missing_from"]
    else:
        value = value.strip()
        msg.raw_from = value
        try:
            msg.from_uri, msg.from_tag = _uri_and_tag(value)
        except AddressError as exc:
            raise SipParseError("bad_from", str(exc)) from None

    value = get(_TO)
    if value is None:
        msg.raw_to = msg.to_uri = ""
        msg.to_tag = None
        defects = [*defects, "missing_to"]
    else:
        value = value.strip()
        msg.raw_to = value
        try:
            msg.to_uri, msg.to_tag = _uri_and_tag(value)
        except AddressError as exc:
            raise SipParseError("bad_to", str(exc)) from None

    top = get(_VIA)
    if top is None:
        msg.via_branch = None
        defects = [*defects, "missing_via"]
    else:
        if "," in top:
            # Several values on the top line: the first is the topmost Via.
            elements = split_list(top)
            top = elements[0] if elements else ""
        at = top.find(";branch=")
        if at >= 0 and '"' not in top:
            # With a quote the ";branch=" found may sit inside a quoted param value.
            end = top.find(";", at + 8)
            branch: str | None = top[at + 8 :] if end < 0 else top[at + 8 : end]
            if not branch or " " in branch or "\t" in branch:
                branch = find_param(top, "branch", top.find(";"))
        else:
            semi = top.find(";")
            branch = find_param(top, "branch", semi) if semi >= 0 else None
        msg.via_branch = branch

    value = get(_UA)
    if value is None:
        value = get(_SERVER)
    msg.user_agent = value.strip() if value is not None else None
    msg.raw_pai = get(_PAI)
    msg._pai_read = False
    msg.raw_reason = get(_REASON)
    value = get(_CTYPE)
    msg.content_type = value.strip() if value is not None else None

    value = get(_CLEN)
    if value is None:
        # Optional on UDP (RFC 3261 section 18.3): the datagram ends the body.
        msg.content_length = None
        msg.body = data[body_start:]
    else:
        value = value.strip()
        if not (value.isdigit() and value.isascii()) or len(value) > MAX_CONTENT_LENGTH_DIGITS:
            raise SipParseError("bad_content_length", value[:40])
        length = int(value)
        msg.content_length = length
        if length > len(data) - body_start:
            # RFC 3261 section 18.3: a UDP message with a short body MUST be discarded,
            # so its sender's peer never acted on it either.
            raise SipParseError("body_truncated", f"{length} > {len(data) - body_start}")
        # Octets past Content-Length are not part of the message (RFC 4475 3.1.1.8).
        msg.body = data[body_start : body_start + length] if length else b""
    msg.body_start = body_start
    msg._defects = defects
    return msg


def _slot_of_unusual(name: str) -> int:
    """Slot for a header name spelled in a way the table does not hold (`ViA`, `To `).

    A name starting with SP or HT is a continuation line: the fast path restarts on
    unfolded lines. Lines without a colon land here too and are kept for `defects`.
    """
    if name[:1] in _FOLD_START:
        raise _Folded
    return _SLOT_OF.get(name.strip().lower(), 0)


def _is_token(text: str) -> bool:
    return bool(text) and TOKEN_CHARS.issuperset(text)


def _uri_and_tag(value: str) -> tuple[str, str | None]:
    """From/To: (URI, tag) in as few scans as the common spellings allow; `;tag=` is no tag.

    `"Name" <uri>;tag=x`, `<uri>;tag=x` and `uri;tag=x` take the straight path; escaped
    quotes, a `<` inside the display name or LWS around `;tag =` take locate_uri and the
    general param grammar.
    """
    lt = value.find("<")
    if lt >= 0:
        quote = value.find('"', 0, lt)
        if quote >= 0:
            close = value.find('"', quote + 1)
            if close < 0 or close > lt or value[close - 1] == "\\":
                uri, params_at = locate_uri(value)
                return uri, find_param(value, "tag", params_at) or None
        gt = value.find(">", lt)
        if gt < 0:
            raise AddressError("unterminated <")
        uri = value[lt + 1 : gt]
        if " " in uri:
            uri = uri.strip()
    else:
        gt = value.find(";")
        if gt < 0:
            return value, None
        uri = value[:gt].rstrip()
    at = value.find(";tag=", gt)
    if at < 0 or (at > gt + 1 and value.find(";", gt, at) >= 0):
        # Params before the `;tag=` (rare): one may be a quoted value holding ";tag=" or
        # an LWS-spelled `; tag =` that comes first, so the general grammar decides.
        return uri, (find_param(value, "tag", gt) or None) if value.find(";", gt) >= 0 else None
    end = value.find(";", at + 5)
    tag = value[at + 5 :] if end < 0 else value[at + 5 : end]
    if not tag or " " in tag or "\t" in tag:
        return uri, find_param(value, "tag", gt) or None
    return uri, tag


def _status_line(msg: SipMessage, line: str) -> None:
    # RFC 3261 section 25.1: SIP-Version SP 3DIGIT SP Reason-Phrase. The version is
    # case-insensitive ASCII: str.upper() also maps U+0131 and U+017F to "I" and "S".
    version, _, rest = line.partition(" ")
    if version != "SIP/2.0" and (version.upper() != "SIP/2.0" or not version.isascii()):
        raise SipParseError("bad_version", version[:20])
    code = rest[:3]
    if (len(rest) > 3 and rest[3] != " ") or not (code.isdigit() and code.isascii()):
        raise SipParseError("bad_status_line", line[:80])
    status = int(code)
    if not 100 <= status <= 699:
        raise SipParseError("bad_status_line", line[:80])
    msg.is_request = False
    msg.method = ""
    msg.request_uri = ""
    msg.status_code = status
    msg.reason_phrase = rest[4:]


def _blank_line(data: bytes) -> tuple[int, int]:
    """(end of headers, start of body) for bare-LF or mixed line ends; (-1, -1) if none.

    A message that ends right after its last header line with no blank line (seen from
    some stacks for body-less UDP messages) is taken whole, with an empty body.
    """
    lf = data.find(b"\n\n")
    crlf = data.find(b"\n\r\n")
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf, lf + 2
    if crlf >= 0:
        return crlf, crlf + 3
    if data.endswith(b"\n"):
        return len(data), len(data)
    return -1, -1


def _unfold(lines: list[str]) -> list[str]:
    # RFC 3261 section 7.3.1: a line starting with SP or HT continues the previous one,
    # and the fold is equivalent to a single SP. Only SP and HT are LWS: str.strip()
    # would also eat CR, FF or U+0085 and could leave a line starting with SP. The
    # pieces of a folded line are joined once: appending each fold copied the growing
    # line every time (a 62 KB line with 240 folds parsed 10x slower).
    out: list[str] = []
    group: list[str] = []
    for line in lines:
        if line[:1] in _FOLD_START and group:
            group[-1] = group[-1].rstrip(" \t")
            piece = line.lstrip(" \t")
            if piece:
                group.append(piece)
        else:
            if group:
                out.append(group[0] if len(group) == 1 else " ".join(group))
            group = [line]
    if group:
        out.append(group[0] if len(group) == 1 else " ".join(group))
    return out
