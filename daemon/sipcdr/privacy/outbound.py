"""What leaves the daemon towards Kafka: records of restricted subjects are withheld,
and with `[sinks.kafka] pseudonymize_numbers` every number is replaced by its keyed
pseudonym.

`OutboundFilter.apply` sees each record's bytes before it is sent. With no
restriction in force and no pseudonymization it returns them untouched without
parsing, so the common case costs one attribute test per record.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

import orjson

from sipcdr.privacy.naming import (
    NAMED_NUMBER,
    NO_SEPARATORS,
    NUMBER_RUN,
    alert_names_any,
    cdr_numbers,
    names_any,
)
from sipcdr.privacy.pseudonym import pseudonym
from sipcdr.sinks.base import KIND_ALERT, KIND_CDR, KIND_SIP

# A number standing alone in free text (an alert's details).
_BARE_NUMBER: Final = re.compile(r"(^|[^0-9])\+?(\d{7,15})(?![0-9])")
_URI_FIELDS: Final = ("from_uri", "to_uri", "request_uri")
# A signaling record carries its parsed URIs next to the headers they came from.
_SIP_TEXT_FIELDS: Final = ("headers", "body", *_URI_FIELDS, "p_asserted_identity")


# Calls remembered as a restricted subject's (by Call-ID): enough for the signaling
# that follows a CDR by minutes, bounded so a long restriction costs no more memory.
RESTRICTED_CALLS_KEPT: Final = 65536


class RestrictedCalls:
    """Call-IDs of CDRs written or withheld as a restricted subject's, with that
    subject's numbers: signaling in national format (`030...`) does not name the E.164
    number, but belongs to the call. Messages of such a call seen after its CDR are
    withheld from Kafka and flagged in PostgreSQL. A message sent before its call
    closed cannot be known yet; `sipcdr subject restrict` and the PostgreSQL sink flag
    the stored ones by Call-ID."""

    __slots__ = ("_calls", "any_restricted")

    def __init__(self, *, any_restricted: bool = True) -> None:
        # Ordered by last add: forgetting the oldest is popping the first. A dict's first
        # key deleted over and over leaves holes the next `next(iter())` walks over,
        # 40 times an insertion at the bound (benchmarks/restricted_calls.py).
        self._calls: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        # False while no number is restricted: a sink then skips reading each
        # message's headers (the filter that shares this keeps it up to date).
        self.any_restricted = any_restricted

    def add(self, call_id: str, numbers: tuple[str, ...]) -> None:
        calls = self._calls
        calls[call_id] = numbers
        calls.move_to_end(call_id)
        if len(calls) > RESTRICTED_CALLS_KEPT:
            calls.popitem(last=False)

    def __contains__(self, call_id: object) -> bool:
        return call_id in self._calls

    def __len__(self) -> int:
        return len(self._calls)

    def note(self, cdr: dict[str, Any], restricted: Callable[[str], bool]) -> bool:
        """Whether a CDR record is a restricted subject's (its caller or callee is, or
        its URIs name one), remembering its call when it is."""
        if not self.any_restricted:
            return False  # every CDR stored passes here: no URI read while none is restricted
        numbers = tuple(dict.fromkeys(filter(restricted, cdr_numbers(cdr))))
        call_id = cdr.get("call_id")
        if numbers and isinstance(call_id, str):
            self.add(call_id, numbers)
        return bool(numbers)

    def keep_only(self, restricted: frozenset[str]) -> None:
        """Forget the calls of subjects no longer restricted."""
        self._calls = OrderedDict(
            (call_id, numbers)
            for call_id, numbers in self._calls.items()
            if any(number in restricted for number in numbers)
        )


class OutboundFilter:
    def __init__(self, key: bytes | None, *, pseudonymize: bool) -> None:
        if pseudonymize and key is None:
            raise ValueError("pseudonymize_numbers needs the pseudonym key")
        self._key = key
        self.pseudonymize = pseudonymize
        self.restricted: frozenset[str] = frozenset()
        # Whether `restricted` is a list read from PostgreSQL (now or saved by an
        # earlier run) rather than the empty one it starts with.
        self.known = False
        # Told once, when the first list is known (the delivery held until then).
        self.on_known: list[Callable[[], None]] = []
        self.withheld: dict[str, int] = {}  # record kind -> count, for the metric
        self.calls = RestrictedCalls(any_restricted=False)

    def set_restricted(self, numbers: frozenset[str]) -> None:
        if self.calls and not numbers >= self.restricted:
            self.calls.keep_only(numbers)
        self.restricted = numbers
        self.calls.any_restricted = bool(numbers)
        if not self.known:
            self.known = True
            listeners, self.on_known = self.on_known, []
            for listener in listeners:
                listener()

    @property
    def idle(self) -> bool:
        return not self.restricted and not self.pseudonymize

    def is_restricted(self, number: str | None) -> bool:
        return number is not None and number in self.restricted

    def apply(self, kind: str, value: bytes) -> bytes | None:
        """The bytes to publish, or None to withhold the record."""
        if self.idle or kind not in (KIND_CDR, KIND_ALERT, KIND_SIP):
            return value
        try:
            record = orjson.loads(value)
        except orjson.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            # Not a record this filter can read: with pseudonyms promised, it could carry
            # a number, so it is withheld (and counted) rather than sent as it is.
            if self.pseudonymize:
                self.withheld[kind] = self.withheld.get(kind, 0) + 1
                return None
            return value
        if self._restricted(kind, record):
            self.withheld[kind] = self.withheld.get(kind, 0) + 1
            return None
        if not self.pseudonymize:
            return value
        return orjson.dumps(self._pseudonymized(kind, record))

    def key(self, kind: str, key: bytes) -> bytes:
        """The Kafka key to publish: an alert is keyed by its subject, pseudonymized
        as the record's own `subject` is."""
        if self.pseudonymize and kind == KIND_ALERT and key.isdigit():
            return self._alias(key.decode()).encode()
        return key

    def _restricted(self, kind: str, record: dict[str, Any]) -> bool:
        if not self.restricted:
            return False
        if kind == KIND_CDR:
            return self.calls.note(record, self.restricted.__contains__)
        if kind == KIND_ALERT:
            return alert_names_any(record, self.restricted.__contains__)
        # A message of a restricted call, or one naming a restricted number (the rule
        # PostgreSQL flags by, `sipcdr.privacy.naming`).
        return record.get("call_id") in self.calls or names_any(
            record.get("headers"), self.restricted.__contains__
        )

    def _pseudonymized(self, kind: str, record: dict[str, Any]) -> dict[str, Any]:
        alias = self._alias
        if kind == KIND_CDR:
            for name in ("caller", "callee"):
                if isinstance(record.get(name), str):
                    record[name] = alias(record[name])
            for name in _URI_FIELDS:
                if isinstance(record.get(name), str):
                    record[name] = NAMED_NUMBER.sub(self._number_sub, record[name])
        elif kind == KIND_ALERT:
            subject = record.get("subject")
            if isinstance(subject, str) and subject.isdigit():
                record["subject"] = alias(subject)
            record["details"] = self._scrub(record.get("details"))
        else:
            for name in _SIP_TEXT_FIELDS:
                if isinstance(record.get(name), str):
                    record[name] = NAMED_NUMBER.sub(self._number_sub, record[name])
        return record

    def _scrub(self, value: Any) -> Any:
        """Numbers quoted anywhere in an alert's details."""
        if isinstance(value, str):
            return _BARE_NUMBER.sub(lambda m: m.group(1) + self._alias(m.group(2)), value)
        if isinstance(value, list):
            return [self._scrub(item) for item in value]
        if isinstance(value, dict):
            return {key: self._scrub(item) for key, item in value.items()}
        return value

    def _alias(self, number: str) -> str:
        assert self._key is not None
        return pseudonym(self._key, number)

    def _number_sub(self, match: re.Match[str]) -> str:
        written = match.group(0)
        digits = written.removeprefix("+").translate(NO_SEPARATORS)
        if 7 <= len(digits) <= 15:
            return self._alias(digits)
        # No number as a whole (`+1-2`, too long): any run inside it still is one.
        return NUMBER_RUN.sub(lambda run: self._alias(run.group(0)), written)


Transform = Callable[[str, bytes], bytes | None]
