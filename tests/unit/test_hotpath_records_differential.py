"""The compiled signaling, row and record modules give the bytes their source gives.

Beside the parser and correlator (test_hotpath_differential.py), the capture process's
signaling value (`sipevent.spooled`), the journal's message record, the spool's
record encoding, and the delivery side's `sip_messages` rows (`pgrows.sip_message_row`
and the binary COPY of `SipCopy`) and topic records (`signaling.published`) are
compiled. Each is run compiled and from its source (`hotpath.load_interpreted`) on
every message of the corpora (with the body kept and not, restricted names flagged)
and on damaged values, which must be refused alike; the classes of the two differ, so
a refusal compares by its class's name and message.
"""

from __future__ import annotations

import importlib
import random
import struct
import subprocess
import sys
from collections.abc import Callable
from types import ModuleType

import pytest
from sipcdr.hotpath import COMPILED_MODULES, hot_path, load_interpreted
from sipcdr.model import Packet
from sipcdr.privacy.naming import named_numbers
from sipcdr.sinks.base import KIND_SIP
from test_signaling_spool import MESSAGES, SEEDS, damaged, restricting

Modules = dict[str, ModuleType]
# A signaling value's fixed fields (`sipevent.spooled`): layout, flags, time, ports,
# the message's length, the lengths of the names.
SPOOLED = struct.Struct("<BBdHHIBBBH")
Names = Callable[[str, str], bool]

# The modules compared here; each must be among the compiled ones.
COMPARED = (
    "sipcdr.sip.parser",
    "sipcdr.sipevent",
    "sipcdr.sinks.signaling",
    "sipcdr.sinks.pgrows",
    "sipcdr.spool.records",
    "sipcdr.dialogstore.journal",
)


@pytest.fixture(scope="module")
def compiled() -> Modules:
    return {name: importlib.import_module(name) for name in COMPARED}


@pytest.fixture(scope="module")
def interpreted() -> Modules:
    return load_interpreted()


@pytest.fixture(scope="module")
def names() -> Names:
    restricted = restricting(3)
    calls = {msg.call_id for _, msg in MESSAGES[::5]}

    def flagged(call_id: str, headers: str) -> bool:
        return call_id in calls or any(restricted(n) for n in named_numbers(headers))

    return flagged


def _raised(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


def value_outcome(modules: Modules, value: bytes, names: Names) -> tuple[object, ...]:
    """What delivery makes of one signaling value: the row, the COPY bytes, the topic
    record, or what refused each."""
    rows = modules["sipcdr.sinks.pgrows"]
    try:
        row: object = rows.sip_message_row(value, names)
    except Exception as exc:
        row = _raised(exc)
    copy = rows.SipCopy()
    try:
        copy.add(value, names)
        copied: object = (copy.data(), sorted(copy.dates()), list(copy.calls))
    except Exception as exc:
        copied = _raised(exc)
    try:
        published: object = modules["sipcdr.sinks.signaling"].published(value)
    except Exception as exc:
        published = _raised(exc)
    return row, copied, published


def message_outcome(
    modules: Modules, packet: Packet, store_body: bool, names: Names
) -> tuple[object, ...]:
    """What capture writes of one message, and what delivery makes of it."""
    try:
        msg = modules["sipcdr.sip.parser"].parse(packet.payload)
    except Exception as exc:
        return _raised(exc)
    try:
        journal: object = modules["sipcdr.dialogstore.journal"].message_record(packet)
    except Exception as exc:  # as the value's below
        journal = _raised(exc)
    try:
        value = modules["sipcdr.sipevent"].spooled(packet, msg, store_body)
    except Exception as exc:  # a name beyond the layout (the recorder writes JSON)
        return _raised(exc), journal
    try:
        # The spool refuses a key over 64 KiB before it encodes: here it raises.
        record: object = modules["sipcdr.spool.records"]._encode(
            KIND_SIP, msg.call_id.encode(), value, 12_345, 0x5EED
        )
    except Exception as exc:
        record = _raised(exc)
    return (
        value,
        record,
        journal,
        value_outcome(modules, value, names),
    )


def test_the_compared_modules_are_among_the_compiled_ones(compiled: Modules) -> None:
    assert set(COMPARED) <= set(COMPILED_MODULES)
    # Compiled where the install built them (test_hotpath.py checks that it did), so
    # the tests below compare the two implementations, not the source with itself.
    kind, _why = hot_path()
    for module in compiled.values():
        assert (kind == "compiled") == (not str(module.__file__).endswith(".py"))


@pytest.mark.parametrize("store_body", [False, True])
def test_every_message_of_the_corpora(
    compiled: Modules, interpreted: Modules, names: Names, store_body: bool
) -> None:
    assert len(MESSAGES) >= 2000
    for packet, _msg in MESSAGES:
        assert message_outcome(compiled, packet, store_body, names) == message_outcome(
            interpreted, packet, store_body, names
        ), packet.payload[:200]


def test_mutated_messages(compiled: Modules, interpreted: Modules, names: Names) -> None:
    rnd = random.Random(29)
    hostile = [b"\x00", b"\r\n", b"\n\n", b"\r\n\r\n", b"\xff", "é".encode(), b":", b";tag="]
    base = MESSAGES[0][0]
    for _ in range(1500):
        payload = damaged(rnd, rnd.choice(SEEDS), hostile, edits=4, inserts=0.6, longest_cut=40)
        packet = base._replace(payload=payload, capture_node=rnd.choice(["n", "nö", ""]))
        store_body = rnd.random() < 0.3
        assert message_outcome(compiled, packet, store_body, names) == message_outcome(
            interpreted, packet, store_body, names
        ), payload[:200]


def test_damaged_values_are_refused_alike(
    compiled: Modules, interpreted: Modules, names: Names
) -> None:
    """Values cut short, grown, or with bytes changed anywhere, the header's lengths
    among them: where a compiled slice would end before it starts."""
    spooled = compiled["sipcdr.sipevent"].spooled
    values = [
        spooled(p, m, keep)
        for p, m in MESSAGES[::9]
        if len(p.capture_node) < 256 and len(p.src_ip) < 256
        for keep in (False, True)
    ]
    assert len(values) > 400
    rnd = random.Random(31)
    refused = 0
    for _ in range(4000):
        value = bytearray(rnd.choice(values))
        choice = rnd.random()
        if choice < 0.3:
            del value[rnd.randint(0, len(value)) :]
        elif choice < 0.5:
            value += bytes(rnd.randint(1, 30))
        else:
            for _ in range(rnd.randint(1, 3)):
                value[rnd.randrange(min(len(value), 64) if rnd.random() < 0.7 else len(value))] = (
                    rnd.randrange(256)
                )
        mine = value_outcome(compiled, bytes(value), names)
        assert mine == value_outcome(interpreted, bytes(value), names), bytes(value[:80])
        refused += isinstance(mine[0], tuple) and len(mine[0]) == 2
    assert refused > 100


def test_a_length_beyond_any_message_is_refused_not_padded(compiled: Modules) -> None:
    """A damaged length would have a reader pad gigabytes of body back; the parser
    refuses a message over 65,535 bytes, so none is spooled longer."""
    packet, msg = next((p, m) for p, m in MESSAGES if m.body and len(p.capture_node) < 256)
    value = bytearray(compiled["sipcdr.sipevent"].spooled(packet, msg, False))
    _layout, _flags, _time, _src, _dst, size, *_lengths = SPOOLED.unpack_from(value)
    assert size == len(packet.payload)
    for damaged_size in (65_536, 0xFFFFFFFF):
        damaged = bytes(value[:14]) + damaged_size.to_bytes(4, "little") + bytes(value[18:])
        assert SPOOLED.unpack_from(damaged)[5] == damaged_size
        rows = compiled["sipcdr.sinks.pgrows"]
        with pytest.raises(ValueError, match="longer than any"):
            rows.sip_message_row(damaged, None)
        with pytest.raises(ValueError, match="longer than any"):
            rows.SipCopy().add(damaged, None)
        with pytest.raises(ValueError, match="longer than any"):
            compiled["sipcdr.sipevent"].unspool(damaged)


def test_a_value_cut_inside_its_message_id_is_refused(compiled: Modules) -> None:
    """Not an IndexError, which the Kafka sink would take for a broker fault and retry
    for ever."""
    digested = SPOOLED.pack(1, 2, 1.0, 1, 2, 40, 0, 0, 0, 0)
    for cut in range(16):
        value = digested + bytes(cut)
        with pytest.raises(ValueError, match="shorter than its message id"):
            compiled["sipcdr.sipevent"].unspool(value)
        with pytest.raises(ValueError, match="shorter than its message id"):
            compiled["sipcdr.sinks.pgrows"].sip_message_row(value, None)
        with pytest.raises(ValueError):
            compiled["sipcdr.sinks.signaling"].published(value)


LEAVES_NOTHING = """
import sys
import sipcdr.sipevent
from sipcdr.hotpath import load_interpreted

in_use = {name: module for name, module in sys.modules.items() if name.startswith("sipcdr")}
load_interpreted()
after = {name: module for name, module in sys.modules.items() if name.startswith("sipcdr")}
assert after.keys() == in_use.keys(), sorted(after.keys() - in_use.keys())
assert all(after[name] is module for name, module in in_use.items())
for name, module in in_use.items():
    parent, _, child = name.rpartition(".")
    if parent in in_use:
        assert getattr(in_use[parent], child, module) is module, name
import sipcdr.sinks.base as base
import sipcdr.spool.records as records
assert base.SpoolRecord is records.SpoolRecord
print("ok")
"""


def test_loading_the_source_leaves_the_modules_in_use_as_they_were() -> None:
    """The packages' __init__ import modules from source too (the spool's writer, the
    delivery loop): none may stay for the code in use to import later (two classes of
    one name). In a process of its own, which has imported little before."""
    done = subprocess.run(
        [sys.executable, "-c", LEAVES_NOTHING], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_a_slice_ending_before_it_starts_is_empty_compiled_too(
    compiled: Modules, interpreted: Modules
) -> None:
    """A digested value keeping one byte of its message cuts its headers at two bytes
    before its end, before where they start: b"" in Python, a SystemError from mypyc's
    unmended runtime (setup.py mends it)."""
    head = SPOOLED.pack(1, 2, 1.0, 1, 2, 40, 0, 0, 0, 0) + bytes(16)
    for kept in (b"I", b"IN", b"\r"):
        for modules in (compiled, interpreted):
            with pytest.raises(ValueError) as refused:
                modules["sipcdr.sinks.pgrows"].sip_message_row(head + kept, None)
            assert type(refused.value).__name__ == "SipParseError"
