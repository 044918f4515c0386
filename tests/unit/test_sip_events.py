"""SipEvent, the signaling record of the `sipcdr.sip` topic, is a correlatable event:
what the capture parsed, written as topic bytes, read back and replayed into a
correlator, closes the same calls with the same CDRs as the capture itself."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import orjson
import pytest
from pcapdata import require_shared_data
from sipcalls import CdrCollector
from sipcdr.capture.pcapfile import iter_packets
from sipcdr.config import Config
from sipcdr.engine import Destinations, correlate_events
from sipcdr.importer import import_files
from sipcdr.model import SIP_EVENT_CORRELATION_FIELDS, Cdr, Packet, SipEvent
from sipcdr.sinks.signaling import SignalingRecorder, published
from sipcdr.sip import SipParseError, parse
from sipcdr.sipevent import event_of, replay
from sipcdr.spool import Spool

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "schemas" / "sip_message.v1.schema.json").read_text()
)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def captures() -> list[Path]:
    return sorted((require_shared_data() / "pcaps").glob("*.pcap*"))


def topic_values(path: Path) -> Iterator[bytes]:
    """What the signaling recorder puts on the topic for each message of a capture."""
    for packet in iter_packets(path):
        try:
            msg = parse(packet.payload)
        except SipParseError:
            continue  # the pipeline writes no record for it either
        yield orjson.dumps(event_of(packet, msg).to_record())


def correlate_from_topic(values: Iterator[bytes]) -> list[Cdr]:
    """The engine fed only by topic records: the chain `run` and `import` build, on
    the records' own time."""
    collector = CdrCollector()
    events = (SipEvent.from_record(orjson.loads(value)) for value in values)
    correlate_events(Config(), events, Destinations([collector]))
    return collector.cdrs


def test_every_capture_is_read() -> None:
    assert len(captures()) >= 15


@pytest.mark.parametrize("path", captures(), ids=lambda path: path.name)
def test_topic_records_replayed_give_the_cdrs_of_the_capture(path: Path) -> None:
    imported = CdrCollector()
    import_files(Config(), [path], sinks=[imported], progress=False)
    replayed = correlate_from_topic(topic_values(path))
    assert [c.to_record() for c in replayed] == [c.to_record() for c in imported.cdrs]


def test_the_captures_hold_calls_to_compare() -> None:
    """The replay test above compares something: most captures close calls."""
    total = sum(len(correlate_from_topic(topic_values(path))) for path in captures())
    assert total >= 50


@pytest.mark.parametrize("path", captures()[:6], ids=lambda path: path.name)
def test_topic_records_are_valid_and_round_trip(path: Path) -> None:
    for value in topic_values(path):
        record = orjson.loads(value)
        assert [e.message for e in VALIDATOR.iter_errors(record)] == []
        event = SipEvent.from_record(record)
        assert orjson.dumps(event.to_record()) == value


@pytest.mark.parametrize("store_body", [False, True])
def test_the_recorder_writes_the_event(store_body: bool, tmp_path: Path) -> None:
    """The record the daemon sends of what it spooled is the event's record, byte for
    byte, for every message of every capture (the recorder spools the captured bytes,
    the sinks build the record from them without the event in between)."""
    expected = []
    with Spool(tmp_path, ("s",)) as spool:
        recorder = SignalingRecorder(spool, store_body=store_body)
        for path in captures():
            for packet in iter_packets(path):
                try:
                    msg = parse(packet.payload)
                except SipParseError:
                    continue
                recorder(packet, msg)
                record = event_of(packet, msg, store_body=store_body).to_record()
                expected.append(orjson.dumps(record))
        appended = [record.value for record in spool.reader("s").read(1 << 20, 1 << 40)]
    assert [published(value) for value in appended] == expected
    assert len(appended) >= 500
    assert any(b'"body":"v=0' in value for value in expected) == store_body
    # The SDP does not even reach the spool's disk unless it is kept.
    assert any(b"\r\nv=0\r\n" in value for value in appended) == store_body


def test_replay_keeps_the_header_lines_for_lookups_beyond_the_fields() -> None:
    payload = (
        b"BYE sip:bob@192.0.2.20 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1\r\n"
        b"From: <sip:alice@example.com>;tag=a\r\nTo: <sip:bob@example.com>;tag=b\r\n"
        b"Call-ID: r1\r\nCSeq: 2 BYE\r\n"
        b'Reason: SIP;cause=200;text="x", Q.850;cause=16\r\nContent-Length: 0\r\n\r\n'
    )
    packet = Packet(1.5, "192.0.2.10", 5060, "192.0.2.20", 5060, "udp", payload, "n")
    original = parse(payload)
    _, msg = replay(
        SipEvent.from_record(orjson.loads(orjson.dumps(event_of(packet, original).to_record())))
    )
    assert msg.reason_header == original.reason_header == 16
    assert msg.header("cseq") == "2 BYE"
    assert (msg.raw_from, msg.raw_to) == (original.raw_from, original.raw_to)


def test_a_record_without_the_correlation_fields_is_refused() -> None:
    packet = Packet(1.5, "192.0.2.10", 5060, "192.0.2.20", 5060, "udp", b"", "n")
    payload = (
        b"OPTIONS sip:x@example.com SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK2\r\n"
        b"From: <sip:a@example.com>;tag=1\r\nTo: <sip:x@example.com>\r\n"
        b"Call-ID: o1\r\nCSeq: 1 OPTIONS\r\n\r\n"
    )
    record = event_of(packet._replace(payload=payload), parse(payload)).to_record()
    older = {k: v for k, v in record.items() if k not in SIP_EVENT_CORRELATION_FIELDS}
    assert [e.message for e in VALIDATOR.iter_errors(older)] == []  # valid, but not an event
    with pytest.raises(ValueError, match="without captured_ts"):
        SipEvent.from_record(older)
    with pytest.raises(ValueError, match="src_port"):
        SipEvent.from_record({**record, "src_port": "5060"})
    with pytest.raises(ValueError, match="exactly one"):
        SipEvent.from_record({**record, "status_code": 200})
    with pytest.raises(ValueError, match="v1"):
        SipEvent.from_record({**record, "schema_version": 2})


@pytest.mark.parametrize(
    "pai",
    [
        b'P-Asserted-Identity: "Alice" <sip:+4930111@example.com>, <tel:+4930111>\r\n',
        b"P-Asserted-Identity: <sip:+4930111@example.com>\r\n",
        b"P-Asserted-Identity:\r\n",
        b"",
    ],
)
def test_a_replayed_invite_asserts_the_identity_the_captured_one_did(pai: bytes) -> None:
    """The replay builds its message itself: the asserted identity it reads (and keeps
    once read, for the fraud detectors and the correlator) is the parsed one's."""
    payload = (
        b"INVITE sip:bob@192.0.2.20 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1\r\n"
        b"From: <sip:alice@example.com>;tag=a\r\nTo: <sip:bob@example.com>\r\n"
        b"Call-ID: r2\r\nCSeq: 1 INVITE\r\n" + pai + b"Content-Length: 0\r\n\r\n"
    )
    packet = Packet(1.5, "192.0.2.10", 5060, "192.0.2.20", 5060, "udp", payload, "n")
    original = parse(payload)
    _, msg = replay(
        SipEvent.from_record(orjson.loads(orjson.dumps(event_of(packet, original).to_record())))
    )
    for _twice in range(2):
        assert msg.p_asserted_identity == original.p_asserted_identity
    assert (original.p_asserted_identity is None) == (pai.count(b"sip:") == 0)
