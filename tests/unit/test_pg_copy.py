"""The binary COPY of `sip_messages` rows (`SipCopy`) holds the rows `sip_message_row`
gives, field for field, once decoded as PostgreSQL decodes them: over every message of
the corpora, with and without the body kept, flagged or not, odd addresses and node
names, NULs, and hostile or damaged values (which both refuse alike)."""

from __future__ import annotations

import random
import struct
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sipcdr.model import Packet
from sipcdr.sinks import pgrows
from sipcdr.sinks.pgrows import SIP_MESSAGES, Row, SipCopy, sip_message_row
from sipcdr.sip import parse
from sipcdr.sipevent import spooled
from test_signaling_spool import MESSAGES, T0, damaged, nul_payloads, restricting

Names = Callable[[str, str], bool] | None
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
# Column types of `sip_messages` (storage/sql/0001_initial.sql, 0002_privacy.sql).
_TYPES = (
    "uuid timestamptz text text int4 text int8 text int4 text int4 text text text text int2 bool"
).split()


def _field(kind: str, raw: bytes) -> object:
    if kind == "uuid":
        return str(uuid.UUID(bytes=raw))
    if kind == "timestamptz":
        return _PG_EPOCH + timedelta(microseconds=struct.unpack("!q", raw)[0])
    if kind == "text":
        text = raw.decode()  # strict: the server refuses invalid UTF-8
        assert "\x00" not in text  # and NUL
        return text
    if kind == "bool":
        assert raw in (b"\x00", b"\x01")
        return raw == b"\x01"
    return int.from_bytes(raw, "big", signed=True)


def decode(data: bytes) -> list[Row]:
    """The rows of a binary COPY stream, read as the server reads them."""
    assert data[:11] == b"PGCOPY\n\xff\r\n\x00"
    assert data[11:19] == bytes(8)
    at = 19
    rows: list[Row] = []
    while True:
        (count,) = struct.unpack_from("!h", data, at)
        at += 2
        if count == -1:
            assert at == len(data)
            return rows
        assert count == len(SIP_MESSAGES.columns) == len(_TYPES)
        row: list[object] = []
        for kind in _TYPES:
            (size,) = struct.unpack_from("!i", data, at)
            at += 4
            if size == -1:
                row.append(None)
                continue
            sizes = {"uuid": 16, "timestamptz": 8, "int4": 4, "int8": 8, "int2": 2, "bool": 1}
            assert size == sizes.get(kind, size)
            row.append(_field(kind, data[at : at + size]))
            at += size
        rows.append(tuple(row))


def _row_or_error(value: bytes, names: Names) -> object:
    try:
        return sip_message_row(value, names)
    except ValueError:
        return ValueError


def _copied_or_error(value: bytes, names: Names) -> object:
    copy = SipCopy()
    try:
        copy.add(value, names)
    except ValueError:
        assert len(copy) == 0
        return ValueError
    (row,) = decode(copy.data())
    assert copy.calls == ([] if row[-1] else [row[2]])
    return row


def _flag() -> Callable[[str, str], bool]:
    restricted = restricting(3)
    calls = {msg.call_id for _, msg in MESSAGES[::5]}
    from sipcdr.privacy.naming import named_numbers

    def names(call_id: str, headers: str) -> bool:
        return call_id in calls or any(restricted(n) for n in named_numbers(headers))

    return names


@pytest.mark.parametrize("store_body", [False, True])
@pytest.mark.parametrize("flagging", [False, True])
def test_the_copy_holds_the_rows_of_sip_message_row(store_body: bool, flagging: bool) -> None:
    names = _flag() if flagging else None
    extra = [
        (packet._replace(capture_node=node, src_ip=src, transport=transport), msg)
        for (packet, msg), (node, src, transport) in zip(
            MESSAGES[:60],
            [("", "::1", "tcp"), ("nöde", "fe80::1%eth0", "tls"), ("n\x00de", "1.2.3.4\x00", "w")]
            * 20,
            strict=False,
        )
    ]
    nuls = [
        (Packet(T0 + n, "192.0.2.1", 5060, "192.0.2.2", 5060, "udp", payload, "n"), parse(payload))
        for n, payload in enumerate(nul_payloads())
    ]
    # Before 1970 and after 2000, a day apart: the partitions' days.
    far = [
        (packet._replace(timestamp=when), msg)
        for (packet, msg), when in zip(
            MESSAGES[:4], (-86_400.5, 0.0, 946_684_799.9999996, 4_102_444_800.25), strict=True
        )
    ]
    pairs = [*MESSAGES, *extra, *nuls, *far]
    copy = SipCopy()
    expected = []
    for packet, msg in pairs:
        value = spooled(packet, msg, store_body)
        copy.add(value, names)
        expected.append(sip_message_row(value, names))
    assert decode(copy.data()) == expected
    assert len(copy) == len(expected) > 2000
    assert copy.dates() == {row[1].astimezone(UTC).date() for row in expected}
    # The Call-IDs the sink looks up among restricted calls: those of the rows.
    unflagged = [row[2] for row in expected if not row[-1]]
    assert copy.calls == unflagged
    if flagging:
        assert 0 < len(unflagged) < len(expected)


def test_hostile_values_give_the_row_or_fail_alike() -> None:
    hostile = [
        b"\x00",
        b"\xff\xfe",
        b"\xc3",
        b"\xed\xa0\x80",
        b"\r\n",
        b"\n\n",
        b"\r\n\r\n",
        b"Call-ID: x\x00y\r\n",
        b"i: \xff\r\n",
        "é".encode(),
        b"X-Big: " + b"A" * 65_536 + b"\r\n",
    ]
    names = _flag()
    rnd = random.Random(11)
    compared = refused = 0
    for _ in range(800):
        packet, _msg = rnd.choice(MESSAGES)
        payload = damaged(rnd, packet.payload, hostile, edits=3, inserts=0.7, longest_cut=20)
        try:
            msg = parse(payload)
        except ValueError:
            continue
        node = rnd.choice(["n1", "nö", "n\x00", ""])
        for store_body in (False, True):
            value = spooled(packet._replace(payload=payload, capture_node=node), msg, store_body)
            flipped = bytearray(value)
            for _ in range(rnd.randint(1, 2)):
                flipped[rnd.randrange(len(flipped))] = rnd.randrange(256)
            for each in (value, bytes(flipped), value[: rnd.randrange(len(value))]):
                for flag in (None, names):
                    expected = _row_or_error(each, flag)
                    assert _copied_or_error(each, flag) == expected
                    compared += 1
                    refused += expected is ValueError
    assert compared > 2_000
    assert 0 < refused < compared


def test_a_refused_value_leaves_the_copy_as_it_was() -> None:
    packet, msg = MESSAGES[0]
    copy = SipCopy()
    good = spooled(packet, msg, False)
    copy.add(good, None)
    before = copy.data()
    for bad in (b"", b"\x01", good[:30], b"\x07" + good[1:]):
        with pytest.raises(ValueError):
            copy.add(bad, None)
    assert copy.data() == before
    assert len(copy) == 1
    assert decode(SipCopy().data()) == []


def test_hostile_names_and_methods_do_not_fill_the_caches() -> None:
    """A peer may name any number of long methods (up to a datagram's length) and a
    HEP agent long node names: the fields encoded once and kept for the next message
    are kept only for names of the usual length, or 4,096 of each would hold about a
    gigabyte."""
    pgrows._requests.clear()
    pgrows._endpoints.clear()
    copy = SipCopy()
    long_method = b"X" * 20_000
    for n in range(40):
        method = b"%02d" % n + long_method
        payload = (
            method + b" sip:a@b SIP/2.0\r\nCall-ID: c\r\nCSeq: 1 " + method + b"\r\n"
            b"Via: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\n\r\n"
        )
        node = f"n{n:02d}" + "N" * 20_000
        packet = Packet(T0, "192.0.2.1", 5060, "192.0.2.2", 5060, "udp", payload, node)
        value = spooled(packet, parse(payload), False)
        copy.add(value, None)
        assert decode(copy.data())[-1] == sip_message_row(value, None)
    kept = sum(len(key) + len(fields) for key, fields in pgrows._requests.items())
    kept += sum(len(key[-1]) + len(fields) for key, fields in pgrows._endpoints.items())
    assert kept < 40 * 1_000
