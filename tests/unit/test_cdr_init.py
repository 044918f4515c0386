"""`Cdr`'s own `__init__` makes the records the dataclass's did, and takes the same
arguments."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sipcdr.model import Cdr
from sipcdr.slotinit import slot_init

FIELDS = dataclasses.fields(Cdr)
_DATACLASS_CDR_INIT = Cdr.__init__.dataclass_init  # type: ignore[attr-defined]
REQUIRED = [f.name for f in FIELDS if f.default is dataclasses.MISSING]
OPTIONAL = [f.name for f in FIELDS if f.default is not dataclasses.MISSING]


def _by_dataclass(*args: Any, **kwargs: Any) -> Cdr:
    cdr: Cdr = object.__new__(Cdr)
    _DATACLASS_CDR_INIT(cdr, *args, **kwargs)
    return cdr


def _values(seed: int) -> dict[str, Any]:
    return {
        "cdr_id": f"id-{seed}",
        "call_id": f"call-{seed}@192.0.2.10",
        "caller": None if seed % 3 == 0 else f"49301{seed}",
        "callee": f"49401{seed}",
        "from_uri": "sip:a@example.com",
        "to_uri": "sip:b@example.net",
        "request_uri": "sip:b@example.net",
        "src_ip": "192.0.2.10",
        "src_port": 5060 + seed,
        "dst_ip": "198.51.100.1",
        "dst_port": 5060,
        "trunk": None if seed % 2 else "berlin",
        "start_time": 1_780_000_000.0 + seed,
        "ring_time": None,
        "answer_time": 1_780_000_002.5 + seed,
        "end_time": 1_780_000_030.25 + seed,
        "pdd_ms": 1000,
        "disposition": "answered",
        "sip_code": 200,
        "sip_reason": "OK",
        "q850_cause": 16,
        "hangup_by": "caller",
        "end_reason": "bye",
        "user_agent": None,
        "capture_node": "n1",
    }


def test_the_parameters_are_the_dataclasses() -> None:
    ours = inspect.signature(Cdr.__init__).parameters
    theirs = inspect.signature(_DATACLASS_CDR_INIT).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [
        (p.name, p.kind, p.default) for p in theirs.values()
    ]
    assert len(REQUIRED) == 25
    assert len(OPTIONAL) == 13
    # What the generated `__init__` cannot do, no field asks for.
    assert all(f.default_factory is dataclasses.MISSING for f in FIELDS)
    assert all(f.init and not f.kw_only for f in FIELDS)
    assert not hasattr(Cdr, "__post_init__")


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    optional=st.dictionaries(
        st.sampled_from(OPTIONAL),
        st.one_of(
            st.none(),
            st.booleans(),
            st.text(max_size=5),
            st.decimals(allow_nan=False, allow_infinity=False, places=4),
            st.tuples(st.text(max_size=4)),
        ),
    ),
    positional=st.booleans(),
)
def test_the_records_are_the_dataclasses(
    seed: int, optional: dict[str, Any], positional: bool
) -> None:
    values = {**_values(seed), **optional}
    if positional:
        args = [values[f.name] for f in FIELDS if f.name in REQUIRED]
        rest = {name: values[name] for name in OPTIONAL if name in values}
        ours, theirs = Cdr(*args, **rest), _by_dataclass(*args, **rest)
    else:
        ours, theirs = Cdr(**values), _by_dataclass(**values)
    for item in FIELDS:
        assert getattr(ours, item.name) is getattr(theirs, item.name)
    assert ours == theirs
    assert hash(ours) == hash(theirs)


def test_wrong_arguments_are_refused_and_the_record_stays_frozen() -> None:
    values = _values(1)
    with pytest.raises(TypeError):
        Cdr(**{**values, "no_such_field": 1})
    del values["capture_node"]
    with pytest.raises(TypeError):
        Cdr(**values)
    cdr = Cdr(**_values(2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cdr.caller = "1"  # type: ignore[misc]
    assert dataclasses.replace(cdr, caller="1").caller == "1"
    assert Cdr(**_values(3)).rated is False
    assert Cdr(**_values(3)).fraud_flags == ()


def test_what_the_generated_init_cannot_do_is_refused() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Later:
        a: int
        b: tuple[int, ...] = dataclasses.field(default_factory=tuple)

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        a: int

        def __post_init__(self) -> None:
            pass

    for cls in (Later, Checked):
        with pytest.raises(TypeError):
            slot_init(cls)


def test_init_resolves_its_annotations_and_names_its_module_as_the_dataclasses() -> None:
    """Tools reading the constructor (type hints, documentation, strategies) see what
    they saw of the dataclass's."""
    ours = Cdr.__init__
    assert ours.__module__ == _DATACLASS_CDR_INIT.__module__ == "sipcdr.model"
    assert typing.get_type_hints(ours) == typing.get_type_hints(_DATACLASS_CDR_INIT)
