"""SIP message parsing: `parse(bytes) -> SipMessage`, raising `SipParseError` only."""

from sipcdr.sip.headers import canonical_name, split_list
from sipcdr.sip.message import SipMessage
from sipcdr.sip.parser import SipParseError, parse

__all__ = ["SipMessage", "SipParseError", "canonical_name", "parse", "split_list"]
