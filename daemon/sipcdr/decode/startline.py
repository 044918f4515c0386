"""SIP recognised by content: a request line or a status line, after optional CRLFs.

Never by port: SIP runs on any port, and the same ports carry other protocols.
"""

from __future__ import annotations

import re
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
    return pos if match_start(data, pos) is not None else NOT_SIP


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
