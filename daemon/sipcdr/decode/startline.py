"""SIP recognised by content: a request line or a status line, after optional CRLFs.

Never by port: SIP runs on any port, and the same ports carry other protocols.
"""

from __future__ import annotations

import re
from string import ascii_letters, digits
from typing import Final

__all__ = ["KEEPALIVE", "MAX_START_LINE", "NOT_SIP", "find_start", "match_start", "sip_offset"]

# Request line (RFC 3261 section 25.1: Method SP Request-URI SP SIP-Version CRLF, with
# a URI that has a scheme) or the start of a status line. Methods are tokens, but every
# method in use starts with a letter, which keeps binary payloads out cheaply. The
# version is matched case-insensitively because the parser accepts that too.
_START_LINE: Final = re.compile(
    rb"(?:(?i:SIP)/2\.0 [1-6][0-9][0-9][ \r\n]"
    rb"|[A-Za-z][A-Za-z0-9.!%*_+`'~-]* [A-Za-z][A-Za-z0-9+.-]*:[^ \r\n]* (?i:SIP)/2\.0\r?\n)"
)
match_start: Final = _START_LINE.match

NOT_SIP: Final = -1
KEEPALIVE: Final = -2

# No real start line is this long; past it a stream is not SIP there.
MAX_START_LINE: Final = 8192

_CR_LF: Final = (13, 10)
# The expression's character classes, as tables indexed by byte: 1 where it allows
# the byte in a method, in a URI scheme, or as a letter.
_LETTERS: Final = bytes(1 if chr(b) in ascii_letters else 0 for b in range(256))
_SCHEME_CHARS: Final = bytes(
    1 if chr(b) in ascii_letters + digits + "+.-" else 0 for b in range(256)
)
_METHOD_CHARS: Final = bytes(
    1 if chr(b) in ascii_letters + digits + ".!%*_+`'~-" else 0 for b in range(256)
)


def sip_offset(data: bytes) -> int:
    """Where the SIP message in ``data`` starts, past leading CRLFs (RFC 3261 section 7.5).

    ``NOT_SIP`` when the first line is neither a request line nor a status line,
    ``KEEPALIVE`` when ``data`` is nothing but CRLFs (RFC 5626 section 4.4.1).
    Recognition only: the message is not parsed.
    """
    if not data:
        return NOT_SIP
    first = data[0]
    pos = 0
    if first in _CR_LF:
        pos = len(data) - len(data.lstrip(b"\r\n"))
        if pos == len(data):
            return KEEPALIVE
        first = data[pos]
    # A letter first: RTP, RTCP, STUN, DNS and TLS all fail here for one compare.
    if not (65 <= first <= 90 or 97 <= first <= 122):
        return NOT_SIP
    # The usual start lines are read here for a few compares and a scan, without the
    # regular expression: a status line with "SIP" in upper case, a code, then a space
    # or line end; a request line with "SIP/2.0" in upper case. Only a line that
    # certainly matches is taken here; any other is the expression's to judge, so both
    # always give the same answer.
    if first == 83 and _version_at(data, pos) and len(data) - pos >= 12 and data[pos + 7] == 32:
        hundreds = data[pos + 8]
        tens = data[pos + 9]
        units = data[pos + 10]
        after = data[pos + 11]
        if (
            49 <= hundreds <= 54
            and 48 <= tens <= 57
            and 48 <= units <= 57
            and after in (32, 13, 10)
        ):
            return pos
    elif _request_line(data, pos):
        return pos
    return pos if match_start(data, pos) is not None else NOT_SIP


# Byte by byte, not by bytes methods: compiled, an index is a C read, and a method a
# call through the interpreter's machinery, several of which cost what the expression
# does.


def _version_at(data: bytes, at: int) -> bool:
    """``data[at:at + 7] == b"SIP/2.0"``."""
    return (
        len(data) - at >= 7
        and data[at] == 83
        and data[at + 1] == 73
        and data[at + 2] == 80
        and data[at + 3] == 47
        and data[at + 4] == 50
        and data[at + 5] == 46
        and data[at + 6] == 48
    )


def _request_line(data: bytes, pos: int) -> bool:
    """True when ``data`` holds at ``pos`` (a letter) a request line the expression
    matches, with "SIP/2.0" in upper case; False when not, or not certainly."""
    end = len(data)
    at = pos + 1
    while at < end and _METHOD_CHARS[data[at]]:
        at += 1
    # The method's space, then a scheme: a letter, scheme characters and a colon.
    at += 1
    if at >= end or data[at - 1] != 32 or not _LETTERS[data[at]]:
        return False
    at += 1
    while at < end and _SCHEME_CHARS[data[at]]:
        at += 1
    if at >= end or data[at] != 58:
        return False
    # The URI runs to the first space, with no line end before it.
    while at < end:
        byte = data[at]
        if byte == 32:
            break
        if byte in (13, 10):
            return False
        at += 1
    if not _version_at(data, at + 1):
        return False
    at += 8
    if at < end and data[at] == 13:
        at += 1
    return at < end and data[at] == 10


def find_start(data: bytes | bytearray, pos: int) -> int:
    """Offset of the next SIP start line at a line start (or at ``pos``), else -1."""
    while True:
        hit = data.find(b"SIP/2.0", pos)
        if hit < 0:
            return -1
        newline = data.rfind(b"\n", pos, hit)
        line = newline + 1 if newline >= 0 else pos
        if match_start(data, line) is not None:
            return line
        pos = hit + 7
