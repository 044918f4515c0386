"""A call restored from a checkpoint: every field checked for its kind and range
before it is trusted, so a damaged or foreign snapshot is refused rather than
restored into calls that close wrong."""

from __future__ import annotations

import sys

from sipcdr.dialog.state import Dialog, Phase

# What every field of a restored call must be: its kind, and whether it may be null.
_TEXT, _TIME, _INT = "text", "time", "int"
_FIELD_KINDS: dict[str, tuple[str, bool]] = {
    "call_id": (_TEXT, False),
    "from_tag": (_TEXT, False),
    "phase": (_INT, False),
    "start_time": (_TIME, False),
    "invite_time": (_TIME, False),
    "last_time": (_TIME, False),
    "invite_cseq": (_INT, False),
    "invite_branch_crc": (_INT, False),
    "src_ip": (_TEXT, False),
    "src_port": (_INT, False),
    "dst_ip": (_TEXT, False),
    "dst_port": (_INT, False),
    "egress_ip": (_TEXT, True),
    "from_uri": (_TEXT, False),
    "to_uri": (_TEXT, False),
    "request_uri": (_TEXT, False),
    "capture_node": (_TEXT, False),
    "ring_time": (_TIME, True),
    "first_response_time": (_TIME, True),
    "answer_time": (_TIME, True),
    "cancel_time": (_TIME, True),
    "final_time": (_TIME, True),
    "final_code": (_INT, True),
    "final_reason": (_TEXT, True),
    "q850_cause": (_INT, True),
    "pai_uri": (_TEXT, True),
    "user_agent": (_TEXT, True),
}
_REQUIRED_FIELDS = frozenset(
    name for name, (_kind, nullable) in _FIELD_KINDS.items() if not nullable
)
# Integer fields whose range is narrower than any 32-bit value.
_INT_RANGES: dict[str, tuple[int, int]] = {
    "phase": (Phase.EARLY, Phase.ANSWERED),
    "src_port": (0, 0xFFFF),
    "dst_port": (0, 0xFFFF),
    "final_code": (100, 699),
}
_INT_LIMIT = 1 << 32
# Times from the epoch to this (the year 2514): anything else cannot be a capture time
# and would fail when the CDR renders it.
_TIME_LIMIT = float(1 << 34)


def _is_time(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and 0.0 <= value < _TIME_LIMIT  # False for NaN too
    )


def _invite_time(dialog: Dialog) -> float:
    return dialog.invite_time


def _tombstone(entry: object) -> tuple[float, str, int]:
    if not isinstance(entry, list) or len(entry) != 3:
        raise ValueError("snapshot closed call is malformed")
    closed_at, from_tag, invite_cseq = entry
    if not (
        _is_time(closed_at)
        and isinstance(from_tag, str)
        and isinstance(invite_cseq, int)
        and not isinstance(invite_cseq, bool)
    ):
        raise ValueError("snapshot closed call is malformed")
    return (float(closed_at), from_tag, invite_cseq)


def _dialog_of(row: object, names: list[str] | None) -> Dialog:
    """A call from a snapshot row: a list in the order of `names` (version 2), or an
    object (version 1). Raises ValueError naming the field at fault, never its value
    (values are phone numbers and addresses). Every value is checked before it is set:
    compiled, `Dialog` refuses a value of the wrong type with a TypeError."""
    values: dict[str, object]
    if names is not None:
        if not isinstance(row, list) or len(row) != len(names):
            raise ValueError("snapshot row does not match its fields")
        values = dict(zip(names, row, strict=True))
        unknown = next((name for name in values if name not in _FIELD_KINDS), None)
        if unknown is not None:
            raise ValueError(f"snapshot row field {unknown[:32]!r} is not a call field")
    elif isinstance(row, dict):
        values = row
    else:
        raise ValueError("snapshot row is not an object")
    for name, (kind, nullable) in _FIELD_KINDS.items():
        value = values.get(name)  # an optional field an older version lacks is None
        if value is None and nullable:
            continue
        if kind == _TEXT:
            valid = isinstance(value, str)
        elif kind == _TIME:
            valid = _is_time(value)
        else:
            low, high = _INT_RANGES.get(name, (0, _INT_LIMIT - 1))
            valid = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        if not valid:
            raise ValueError(f"snapshot row field {name!r} is not a valid {kind}")
    if not values.get("call_id"):
        raise ValueError("snapshot row without a Call-ID")
    dialog = Dialog()
    intern = sys.intern
    for name in _FIELD_KINDS:
        value = values.get(name)
        if name == "phase":
            value = Phase(int(str(value)))  # checked above: an int in Phase's range
        elif name in _INTERNED_FIELDS and isinstance(value, str):
            value = intern(value)
        setattr(dialog, name, value)
    dialog.seen = 0
    return dialog


# Repeated across calls: one copy each, as live (`_new_dialog` interns them too).
_INTERNED_FIELDS = frozenset({"src_ip", "dst_ip", "egress_ip", "capture_node", "user_agent"})
