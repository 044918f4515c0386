"""The signaling spool holds each message's captured bytes (`sipcdr.sipevent.spooled`),
and the sinks make of them the same `sip_messages` rows and `sipcdr.sip` records as of
the JSON record spooled before: for every message of the captures and of the malformed
corpora the parser takes, with and without the body kept, with restricted numbers
flagged. JSON values spooled by an earlier version are still delivered after an
upgrade."""

from __future__ import annotations

import asyncio
import random
import struct
import sys
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import orjson
import pytest
from formerspooled import former_spooled
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sipcdr import sipevent
from sipcdr.capture.pcapfile import iter_packets
from sipcdr.delivery import Delivery
from sipcdr.delivery.loop import value_text
from sipcdr.hotpath import load_interpreted
from sipcdr.model import Packet
from sipcdr.privacy.naming import named_numbers
from sipcdr.sinks.base import KIND_SIP, STREAM_SIGNALING, RecordsRejected, SpoolRecord
from sipcdr.sinks.kafka import KafkaSink
from sipcdr.sinks.pgrows import SIP_MESSAGES, sip_message_row, sip_message_row_unspooled
from sipcdr.sinks.postgres import PostgresSink, RecordError
from sipcdr.sinks.signaling import SignalingRecorder, published
from sipcdr.sip import SipMessage, SipParseError, parse
from sipcdr.sipevent import (
    event_of,
    event_record,
    head_text,
    is_spooled,
    message_id,
    replay,
    spooled,
    unspool,
)
from sipcdr.spool import Spool
from test_hotpath_differential import captures, mutated, pjproject_seeds, protos_pdus, rfc4475

T0 = 1_795_000_000.123456


def odd_payloads() -> list[bytes]:
    """Where the end of the headers is not where the first CRLFCRLF is."""
    head = (
        b"OPTIONS sip:4930333444@example.net SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
        b"From: <sip:4940111222@example.com>;tag=1\r\nTo: <sip:4930333444@example.net>\r\n"
        b"Call-ID: odd\r\nCSeq: 1 OPTIONS\r\n"
    )
    sdp = b"v=0\r\n\r\nc=IN IP4 192.0.2.99\r\n"
    length = b"Content-Length: %d\r\n" % len(sdp)
    bare = head.replace(b"\r\n", b"\n")
    return [
        b"\r\n\r\n" + head + b"Content-Length: 0\r\n\r\n",  # led by CRLFs: headers ""
        bare + length.replace(b"\r\n", b"\n") + b"\n" + sdp,  # CRLFCRLF in the body only
        head + length + b"\n" + sdp,  # CRLF LF ends the headers
        bare + length[:-2] + b"\n\r\n" + sdp,  # LF CRLF ends the headers
        head + b"X-Odd: a\x00b\r\n" + length + b"\r\n" + sdp,  # NUL in a header
        head + b"X-Odd: \xff\xfe\r\n" + length + b"\r\n" + sdp,  # not UTF-8
        head + b"Content-Length: 0\r\n",  # no blank line
        head + length + b"\r\n" + sdp + b"trailing octets past Content-Length",
        head.replace(b"Call-ID: odd\r\n", b"") + b"\r\n",  # no Call-ID: key b""
    ]


def corpus() -> Iterator[Packet]:
    """Every message the parser takes, as captured or sent as a datagram."""
    for path in captures():
        yield from iter_packets(path)
    datagrams = [*rfc4475(), *pjproject_seeds(), *protos_pdus(), *odd_payloads()]
    for n, payload in enumerate(datagrams):
        src = "2001:db8::10" if n % 2 else "192.0.2.10"
        yield Packet(T0 + n / 7, src, 5060 + n % 3, "203.0.113.20", 5060, "udp", payload, "n1")


def parsed() -> list[tuple[Packet, SipMessage]]:
    pairs = []
    for packet in corpus():
        try:
            pairs.append((packet, parse(packet.payload)))
        except SipParseError:
            continue  # the pipeline writes no record for it either
    return pairs


MESSAGES = parsed()
# What the mutated messages start from: every message above and the odd payloads.
SEEDS = [packet.payload for packet, _ in MESSAGES[::7]] + odd_payloads()


def damaged(
    rnd: random.Random,
    payload: bytes,
    hostile: list[bytes],
    *,
    edits: int,
    inserts: float,
    longest_cut: int,
) -> bytes:
    """`payload` with 1 to `edits` edits at random places: a `hostile` piece inserted
    (with probability `inserts`) or a run of up to `longest_cut` bytes cut out."""
    damaging = bytearray(payload)
    for _ in range(rnd.randint(1, edits)):
        at = rnd.randint(0, len(damaging))
        if rnd.random() < inserts:
            damaging[at:at] = rnd.choice(hostile)
        else:
            del damaging[at : at + rnd.randint(1, longest_cut)]
    return bytes(damaging)


def test_the_corpus_is_large_and_odd() -> None:
    assert len(MESSAGES) >= 2000
    payloads = {packet.payload for packet, _ in MESSAGES}
    assert set(odd_payloads()) <= payloads


def records(store_body: bool) -> tuple[list[SpoolRecord], list[SpoolRecord]]:
    """(what the recorder spools now, the JSON record spooled before) of every message."""
    binary: list[SpoolRecord] = []
    legacy: list[SpoolRecord] = []
    for seq, (packet, msg) in enumerate(MESSAGES, 1):
        key = msg.call_id.encode()
        binary.append(SpoolRecord(seq, KIND_SIP, key, spooled(packet, msg, store_body)))
        value = orjson.dumps(event_record(packet, msg, store_body=store_body))
        legacy.append(SpoolRecord(seq, KIND_SIP, key, value))
    return binary, legacy


@pytest.mark.parametrize("store_body", [False, True])
def test_the_topic_records_are_those_of_the_json(store_body: bool) -> None:
    binary, legacy = records(store_body)
    assert all(is_spooled(record.value) for record in binary)
    assert not any(is_spooled(record.value) for record in legacy)
    assert [published(record.value) for record in binary] == [r.value for r in legacy]
    # JSON spooled before goes out as it is.
    assert [published(record.value) for record in legacy] == [r.value for r in legacy]


def restricting(every: int) -> Callable[[str | None], bool]:
    """Every `every`-th number of the corpus's URIs restricted."""
    numbers = sorted(
        {
            number
            for _, msg in MESSAGES
            for text in (msg.from_uri, msg.to_uri, msg.request_uri, msg.raw_pai or "")
            for number in named_numbers(text)
        }
    )
    restricted = frozenset(numbers[::every])
    assert restricted
    return lambda number: number in restricted


@pytest.mark.parametrize("store_body", [False, True])
def test_the_rows_are_those_of_the_json(store_body: bool) -> None:
    binary, legacy = records(store_body)
    plain = PostgresSink("postgresql://x/y")
    assert plain._rows(STREAM_SIGNALING, binary) == plain._rows(STREAM_SIGNALING, legacy)
    flagging = PostgresSink("postgresql://x/y", restricted=restricting(3))
    rows = flagging._rows(STREAM_SIGNALING, binary)
    assert rows == flagging._rows(STREAM_SIGNALING, legacy)
    flags = [row[-1] for table_rows in rows.values() for row in table_rows]
    assert 0 < sum(flags) < len(flags)


def nul_payloads() -> list[bytes]:
    """NULs where a row's text columns come from, and where none does (the body)."""
    head = (
        b"INVITE sip:4930333444@example.net SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
        b"From: <sip:4940111222@example.com>;tag=1\r\nTo: <sip:4930333444@example.net>\r\n"
        b"CSeq: 7 INVITE\r\n"
    )
    sdp = b"v=0\r\no=- 1 1 IN IP4 192.0.2.9\x00\r\n"
    length = b"Content-Length: %d\r\n" % len(sdp)
    return [
        head + b"Call-ID: a\x00b\r\n" + length + b"\r\n" + sdp,  # in the Call-ID
        head + b"Call-ID: nul-in-body\r\n" + length + b"\r\n" + sdp,  # in the body only
        head + b"Call-ID: no-body\r\nX-N: \x00\r\nContent-Length: 0\r\n\r\n",
    ]


@pytest.mark.parametrize("store_body", [False, True])
@pytest.mark.parametrize("flagging", [False, True])
def test_the_row_read_straight_from_the_value_is_the_unspooled_one(
    store_body: bool, flagging: bool
) -> None:
    """Differential: the sink's row, read field by field from the value, against the
    row of the whole packet and event read back (`unspool`), over every message of the
    corpus, odd node names and addresses, and NULs in and out of the columns."""
    restricted = restricting(3)
    calls = {msg.call_id for _, msg in MESSAGES[::5]}

    def names(call_id: str, headers: str) -> bool:
        return call_id in calls or any(restricted(n) for n in named_numbers(headers))

    flag = names if flagging else None
    extra = [
        (packet._replace(capture_node=node, src_ip=src, transport=transport), msg)
        for (packet, msg), (node, src, transport) in zip(
            MESSAGES[:40],
            [("", "::1", "tcp"), ("nöde", "fe80::1%eth0", "tls"), ("n\x00de", "1.2.3.4\x00", "w")]
            * 14,
            strict=False,
        )
    ]
    nuls = [
        (Packet(T0 + n, "192.0.2.1", 5060, "192.0.2.2", 5060, "udp", payload, "n"), parse(payload))
        for n, payload in enumerate(nul_payloads())
    ]
    compared = 0
    for packet, msg in [*MESSAGES, *extra, *nuls]:
        value = spooled(packet, msg, store_body)
        assert sip_message_row(value, flag) == sip_message_row_unspooled(value, flag)
        compared += 1
    assert compared >= len(MESSAGES) + 40
    if flagging:
        rows = [sip_message_row(spooled(p, m, store_body), flag) for p, m in MESSAGES]
        assert 0 < sum(row[-1] for row in rows) < len(rows)


def _row_or_error(
    build: Callable[[bytes, Callable[[str, str], bool] | None], tuple[object, ...]],
    value: bytes,
    flag: Callable[[str, str], bool] | None,
) -> object:
    try:
        return build(value, flag)
    except ValueError:
        return ValueError


def test_hostile_signaling_gives_the_unspooled_row_or_fails_alike() -> None:
    """Differential over messages made hostile (NULs, invalid UTF-8, bare line ends, a
    64 KiB header, the Call-ID gone) and values with a byte changed: the row read
    straight from the value is the unspooled one, or both refuse it."""
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
        b"X-Big: " + b"A" * 65_536 + b"\r\n",
    ]

    def flag(call_id: str, headers: str) -> bool:
        return "7" in call_id or "49" in headers

    rnd = random.Random(7)
    compared = 0
    for _ in range(600):
        packet, _msg = rnd.choice(MESSAGES)
        payload = bytearray(packet.payload)
        for _ in range(rnd.randint(1, 3)):
            at = rnd.randint(0, len(payload))
            if rnd.random() < 0.6:
                payload[at:at] = rnd.choice(hostile)
            elif (call_id := payload.find(b"Call-ID")) >= 0:
                payload[call_id : call_id + 7] = b"X-Gone!"
            else:
                del payload[at : at + rnd.randint(1, 20)]
        try:
            msg = parse(bytes(payload))
        except ValueError:
            continue
        for store_body in (False, True):
            value = spooled(packet._replace(payload=bytes(payload)), msg, store_body)
            damaged = bytearray(value)
            damaged[rnd.randrange(len(damaged))] = rnd.randrange(256)
            for each in (value, bytes(damaged)):
                for names in (None, flag):
                    fast = _row_or_error(sip_message_row, each, names)
                    assert fast == _row_or_error(sip_message_row_unspooled, each, names)
                    compared += 1
    assert compared > 1_000


def test_a_damaged_value_fails_both_ways_alike() -> None:
    """A value the row cannot be read from raises ValueError, the sink's cue to set the
    record aside, wherever the fast path stops reading it."""
    packet, msg = MESSAGES[0]
    for store_body in (False, True):
        good = spooled(packet, msg, store_body)
        for cut in range(len(good)):
            damaged = [good[:cut], good[:cut] + bytes(len(good) - cut)]
            for value in damaged:
                try:
                    expected = sip_message_row_unspooled(value, None)
                except ValueError:
                    with pytest.raises(ValueError):
                        sip_message_row(value, None)
                else:
                    assert sip_message_row(value, None) == expected


def test_the_body_reaches_the_spool_only_when_kept() -> None:
    # Not those whose headers, as the record has them, run into the body (a bare-LF
    # head with a CRLFCRLF in the body): there the record has the SDP too.
    sdp_messages = [
        (p, m)
        for p, m in MESSAGES
        if m.body.startswith(b"v=0") and "v=0" not in head_text(p.payload)
    ]
    assert len(sdp_messages) >= 20
    for packet, msg in sdp_messages:
        assert packet.payload in spooled(packet, msg, True)
        without = spooled(packet, msg, False)
        assert b"\r\nv=0" not in without and b"\nv=0" not in without
        assert len(without) < len(orjson.dumps(event_record(packet, msg)))


def test_the_id_is_computed_once_and_the_same() -> None:
    """On the capture side when the body is cut off (the sink could not), else by the
    sink."""
    digested = 0
    for packet, msg in MESSAGES:
        value = spooled(packet, msg, False)
        digested += value[1] == 2  # the flags: digested here
        assert unspool(value).message_id == message_id(packet)
    assert 100 < digested < len(MESSAGES)


def test_a_spool_of_the_json_layout_is_delivered_after_an_upgrade(tmp_path: Path) -> None:
    """A signaling spool written by an earlier version (JSON values), reopened by this
    one, which appends its own: the sinks read both, in order, to the same records."""
    directory = tmp_path / "signaling"
    pairs = MESSAGES[:300]
    before, after = pairs[:150], pairs[150:]
    with Spool(directory, ("postgres", "kafka"), buffered=True) as old:
        for packet, msg in before:
            old.append(KIND_SIP, msg.call_id.encode(), orjson.dumps(event_record(packet, msg)))
    with Spool(directory, ("postgres", "kafka"), buffered=True) as spool:
        recorder = SignalingRecorder(spool)
        for packet, msg in after:
            recorder(packet, msg)
        spool.flush()
        read = spool.reader("kafka").read(1000, 1 << 26)
    assert len(read) == len(pairs)
    assert [is_spooled(record.value) for record in read] == [False] * 150 + [True] * 150
    expected = [orjson.dumps(event_record(packet, msg)) for packet, msg in pairs]
    assert [published(record.value) for record in read] == expected
    legacy = [record._replace(value=value) for record, value in zip(read, expected, strict=True)]
    sink = PostgresSink("postgresql://x/y", restricted=restricting(2))
    assert sink._rows(STREAM_SIGNALING, read) == sink._rows(STREAM_SIGNALING, legacy)


def test_a_field_beyond_the_layout_is_spooled_as_json(tmp_path: Path) -> None:
    packet, msg = MESSAGES[0]
    packet = packet._replace(capture_node="n" * 70_000)
    with Spool(tmp_path, ("s",)) as spool:
        SignalingRecorder(spool)(packet, msg)
        appended = [record.value for record in spool.reader("s").read(10, 1 << 20)]
    assert appended == [orjson.dumps(event_record(packet, msg))]
    assert not is_spooled(appended[0])


def test_a_damaged_value_is_rejected_not_retried_forever() -> None:
    packet, msg = MESSAGES[0]
    good = spooled(packet, msg, True)  # the whole message: its bytes end the value
    damaged = [
        good[:20],  # cut inside the header
        bytes([9]) + good[1:],  # a layout this version does not know
        good[:-5],  # shorter than the header says
        good[: len(good) - len(packet.payload)] + bytes(len(packet.payload)),  # no SIP
    ]
    sink = PostgresSink("postgresql://x/y")
    kafka = KafkaSink("127.0.0.1:9", topic_sip="sipcdr.sip", create_topics=False)
    for n, value in enumerate(damaged):
        record = SpoolRecord(n + 1, KIND_SIP, b"k", value)
        with pytest.raises(RecordError):
            sink._rows(STREAM_SIGNALING, [record])
        with pytest.raises(RecordsRejected):
            asyncio.run(kafka.deliver(STREAM_SIGNALING, [record]))


def test_a_capture_time_beyond_the_calendar_is_rejected_not_retried_forever() -> None:
    """A pcapng's 64-bit tick count can put a message past year 9999. The capture side
    spools it without formatting its time; the sinks must then set it aside, as they
    did the JSON record's unreadable `captured_at`, rather than fail the whole stream
    and retry it forever."""
    packet, msg = MESSAGES[0]
    sink = PostgresSink("postgresql://x/y")
    kafka = KafkaSink("127.0.0.1:9", topic_sip="sipcdr.sip", create_topics=False)
    for n, timestamp in enumerate((1e12, -1e12, 1e20)):
        value = spooled(packet._replace(timestamp=timestamp), msg, False)
        record = SpoolRecord(n + 1, KIND_SIP, b"k", value)
        with pytest.raises(RecordError):
            sink._rows(STREAM_SIGNALING, [record])
        with pytest.raises(RecordsRejected):
            asyncio.run(kafka.deliver(STREAM_SIGNALING, [record]))
        assert value_text(KIND_SIP, value)  # the file of records set aside takes it


class RefusingSink:
    """Refuses every signaling record of the INVITE method, as a broker refuses one
    too large."""

    name = "refusing"
    streams: tuple[str, ...] = (STREAM_SIGNALING,)

    def __init__(self) -> None:
        self.got: list[bytes] = []

    async def start(self) -> None: ...
    async def prepare(self) -> None: ...
    async def probe(self) -> None: ...
    async def flush(self) -> None: ...
    async def stop(self) -> None: ...

    async def deliver(self, stream: str, records: Sequence[SpoolRecord]) -> None:
        values = [published(record.value) for record in records]
        if any(b'"method":"INVITE"' in value for value in values):
            raise RecordsRejected("too large")
        self.got.extend(values)


async def test_a_record_set_aside_is_kept_as_its_json(tmp_path: Path) -> None:
    """The file of records set aside holds what would have been sent, not the spooled
    bytes."""
    pairs = [(p, m) for p, m in MESSAGES if m.is_request][:40]
    sink = RefusingSink()
    with Spool(tmp_path, (sink.name,), buffered=True) as spool:
        recorder = SignalingRecorder(spool)
        for packet, msg in pairs:
            recorder(packet, msg)
        spool.flush()
        delivery = Delivery({STREAM_SIGNALING: spool}, [sink], batch_records=8)
        await delivery.start()
        async with asyncio.timeout(10):
            while not delivery.caught_up():
                await asyncio.sleep(0.01)
        await delivery.stop()
    expected = [orjson.dumps(event_record(packet, msg)) for packet, msg in pairs]
    invites = [value for value in expected if b'"method":"INVITE"' in value]
    assert invites and len(invites) < len(expected)
    assert sink.got == [value for value in expected if value not in invites]
    lines = (tmp_path / "rejected" / f"{sink.name}.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["value"].encode() for line in lines] == invites


def test_a_compact_row_is_flagged_by_any_header_and_by_its_call() -> None:
    """The compact layout flags as the JSON layout does (`sipcdr.privacy.naming`): a
    number in any header, and a national-format message of a restricted call."""
    head = (
        b"INVITE sip:030555666@example.net SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK9\r\n"
        b"From: <sip:4940111222@example.com>;tag=1\r\nTo: <sip:030555666@example.net>\r\n"
        b"CSeq: 1 INVITE\r\n"
    )
    diverted = head + b"Call-ID: by-header\r\nDiversion: <sip:4930777888@example.net>\r\n"
    national = head + b"Call-ID: by-call\r\n"
    values = [
        spooled(Packet(T0, "192.0.2.1", 5060, "192.0.2.2", 5060, "udp", payload, ""), msg, False)
        for payload in (diverted + b"\r\n", national + b"\r\n")
        for msg in [parse(payload)]
    ]
    records = [SpoolRecord(n, KIND_SIP, b"", value) for n, value in enumerate(values)]
    sink = PostgresSink("postgresql://x/y", restricted=lambda number: number == "4930777888")
    assert [row[-1] for row in sink._rows(STREAM_SIGNALING, records)[SIP_MESSAGES]] == [
        True,
        False,
    ]
    sink._restricted_calls.note({"call_id": "by-call", "caller": "4930777888"}, sink._restricted)
    assert [row[-1] for row in sink._rows(STREAM_SIGNALING, records)[SIP_MESSAGES]] == [
        True,
        True,
    ]


# -- the value as it was spooled before (tests/support/formerspooled.py) ---------------


def led_by_line_ends() -> list[tuple[Packet, SipMessage]]:
    """Messages with a body led by CRLFs, which the parser skips and the record keeps
    whole."""
    pairs = []
    for n, (packet, _msg) in enumerate(p for p in MESSAGES if p[1].body):
        led = packet._replace(payload=(b"\r\n", b"\r\n\r\n", b"\n")[n % 3] + packet.payload)
        pairs.append((led, parse(led.payload)))
    return pairs


@pytest.mark.parametrize("store_body", [False, True])
def test_the_value_is_the_former_one_byte_for_byte(store_body: bool) -> None:
    """Every corpus (the captures, RFC 4475, PROTOS, the pjproject seeds, the odd
    payloads): the parser's own end of the headers cuts where the search did."""
    pairs = MESSAGES + led_by_line_ends()
    assert len(pairs) > len(MESSAGES) + 500
    assert [spooled(packet, msg, store_body) for packet, msg in pairs] == [
        former_spooled(packet, msg, store_body) for packet, msg in pairs
    ]


def test_the_value_is_the_former_one_of_the_interpreted_parse_too() -> None:
    parser, events = INTERPRETED["sipcdr.sip.parser"], INTERPRETED["sipcdr.sipevent"]
    count = 0
    for packet, _msg in MESSAGES:
        msg = parser.parse(packet.payload)
        assert events.spooled(packet, msg, False) == former_spooled(packet, msg, False)
        count += 1
    assert count == len(MESSAGES)


def test_a_message_rebuilt_from_its_event_is_cut_as_before() -> None:
    """`replay` knows no parser's blank line: the search finds it, even where the
    headers hold a blank line of their own."""
    odd = odd_payloads()
    pairs = [replay(event_of(packet, msg, store_body=True)) for packet, msg in MESSAGES[:300]]
    for n, payload in enumerate(odd[1:-1]):
        packet = Packet(T0 + n, "192.0.2.1", 5060, "192.0.2.2", 5060, "udp", payload, "n1")
        pairs.append(replay(event_of(packet, parse(payload), store_body=True)))
    assert sum(msg.body_start < 0 and bool(msg.body) for _, msg in pairs) > 20
    for packet, msg in pairs:
        assert spooled(packet, msg, False) == former_spooled(packet, msg, False)


@st.composite
def packets(draw: st.DrawFn, seeds: list[bytes]) -> Packet:
    """A mutated message (its line ends, leading CRLFs, body and Content-Length
    among what changes) between addresses and names of any length."""
    payload = draw(mutated(seeds))
    if draw(st.booleans()):
        payload = draw(st.sampled_from((b"\r\n", b"\n", b"\r\n\r\n"))) + payload
    name = st.text(min_size=0, max_size=300) | st.sampled_from(("192.0.2.10", "2001:db8::1"))
    port = st.integers(0, 65535)
    return Packet(
        draw(st.floats(allow_nan=False) | st.just(T0)),
        draw(name),
        draw(port),
        draw(name),
        draw(port),
        draw(st.sampled_from(("udp", "tcp", "ws")) | st.text(max_size=300)),
        payload,
        draw(st.sampled_from(("n1", "")) | st.text(max_size=300)),
    )


def _spooled_or_error(
    spool: Callable[[Packet, SipMessage, bool], bytes],
    packet: Packet,
    msg: SipMessage,
    store_body: bool,
) -> bytes | str:
    try:
        return spool(packet, msg, store_body)
    except struct.error:
        return "struct.error"


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_mutated_message_is_spooled_as_before(data: st.DataObject) -> None:
    packet = data.draw(packets(SEEDS), label="packet")
    try:
        msg = parse(packet.payload)
    except SipParseError:
        return
    for store_body in (False, True):
        assert _spooled_or_error(spooled, packet, msg, store_body) == _spooled_or_error(
            former_spooled, packet, msg, store_body
        )


def test_the_kept_names_are_bounded_and_change_no_value() -> None:
    packet, msg = next((p, m) for p, m in MESSAGES if m.body and not m.body_start < 0)
    sipevent._ENDS.clear()
    for n in range(sipevent._ENDS_KEPT + 500):
        spoofed = packet._replace(src_ip=f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}")
        assert spooled(spoofed, msg, False) == former_spooled(spoofed, msg, False)
        assert len(sipevent._ENDS) <= sipevent._ENDS_KEPT
    assert (packet.src_ip, packet.dst_ip, packet.transport, packet.capture_node) not in (
        sipevent._ENDS
    )
    assert spooled(packet, msg, True) == former_spooled(packet, msg, True)
    too_long = packet._replace(dst_ip="d" * 256)
    with pytest.raises(struct.error):
        spooled(too_long, msg, False)
    assert all(key[1] != too_long.dst_ip for key in sipevent._ENDS)


def test_a_spray_of_long_capture_node_names_keeps_little_memory() -> None:
    """A HEP agent names its capture node in up to 64 KB: distinct long names must not
    each stay kept, or the 4,096 pairs kept would hold most of a gigabyte."""
    packet, msg = next((p, m) for p, m in MESSAGES if m.body and not m.body_start < 0)
    sipevent._ENDS.clear()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(200):
            sprayed = packet._replace(capture_node=f"{n:05d}" + "n" * 60_000)
            assert spooled(sprayed, msg, False) == former_spooled(sprayed, msg, False)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # 200 names of 60 KB kept would be ~36 MB (three copies of each).
    assert kept < 2_000_000
    assert spooled(packet, msg, False) == former_spooled(packet, msg, False)


# The parser and the signaling value from source (their messages are of another class
# than the compiled ones', so each side spools its own parser's messages).
INTERPRETED = load_interpreted()


@st.composite
def heads_of_every_shape(draw: st.DrawFn) -> bytes:
    """Messages the parser takes on each of its paths: line ends of every kind within
    the head and at its end, CRLFs before the start line, folded lines, NUL and bytes
    not UTF-8, header values and bodies holding blank lines of their own."""
    start = draw(st.sampled_from((b"INVITE sip:a@b SIP/2.0", b"SIP/2.0 200 OK")))
    lines = [
        b"Via: SIP/2.0/UDP h;branch=z9hG4bK1",
        b"From: <sip:a@b>;tag=1",
        b"To: <sip:b@c>",
        b"Call-ID: shapes",
        b"CSeq: 1 INVITE",
    ]
    odd = (b"X-A: a", b" folded", b"\tfolded", b"X-U: \xc3\xa9", b"X-F: \xff", b"X-N: a\x00b")
    for line in draw(st.lists(st.sampled_from(odd), max_size=4)):
        lines.insert(draw(st.integers(1, len(lines))), line)
    body = draw(
        st.sampled_from((b"v=0\r\n", b"v=0\r\n\r\nx", b"\r\n\r\nb", b"\n\nb", b"b\r\n\r\n"))
    )
    length = draw(st.sampled_from((None, len(body), len(body) - 1)))
    if length is not None:
        lines.append(b"Content-Length: %d" % length)
    ends = st.sampled_from((b"\r\n", b"\r\n", b"\n", b"\r"))
    head = start + b"".join(draw(ends) + line for line in lines)
    blank = draw(st.sampled_from((b"\r\n\r\n", b"\n\n", b"\r\n\n", b"\n\r\n")))
    lead = draw(st.sampled_from((b"", b"", b"\r\n", b"\n", b"\r\n\r\n")))
    return lead + head + blank + body


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=heads_of_every_shape())
def test_every_parser_path_cuts_where_the_search_did(payload: bytes) -> None:
    """Compiled and interpreted, the parser's body start gives the former value, and a
    message rebuilt from its event (no body start) does too."""
    packet = Packet(T0, "192.0.2.1", 5060, "192.0.2.2", 5062, "udp", payload, "n1")
    starts: list[int | None] = []
    for parser, events in (
        (sys.modules["sipcdr.sip.parser"], sys.modules["sipcdr.sipevent"]),
        (INTERPRETED["sipcdr.sip.parser"], INTERPRETED["sipcdr.sipevent"]),
    ):
        try:
            msg = parser.parse(payload)
        except ValueError:
            starts.append(None)
            continue
        starts.append(msg.body_start)
        for store_body in (False, True):
            value = events.spooled(packet, msg, store_body)
            assert value == former_spooled(packet, msg, store_body)
        rebuilt, again = events.replay(events.event_of(packet, msg, store_body=True))
        assert events.spooled(rebuilt, again, False) == former_spooled(rebuilt, again, False)
    assert starts[0] == starts[1]
