"""The JSON Schemas of the Kafka records other than the CDR (schemas/): each is a valid
draft 2020-12 schema, takes the records sipcdr writes and turns away broken ones."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from sipcalls import CALLEE_ADDR, CALLER_ADDR, Call, packet
from sipcdr import model
from sipcdr.sinks.base import KIND_SIP
from sipcdr.sinks.signaling import SignalingRecorder, published
from sipcdr.sip import parse
from sipcdr.spool import Spool

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
T0 = 1_700_000_000.0


# Properties added to a schema after its version was published: optional for readers.
ADDED_WITHIN_VERSION = {
    "fraud_alert.v1.schema.json": {
        "subject_kind",
        "observed",
        "threshold_value",
        "first_seen",
        "last_seen",
        "call_ids",
        "revision",
    },
    "sip_message.v1.schema.json": set(model.SIP_EVENT_CORRELATION_FIELDS),
}


def validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((SCHEMAS / name).read_text()))


def errors(name: str, record: object) -> list[str]:
    return [error.message for error in validator(name).iter_errors(record)]


ALERT: dict[str, Any] = {
    "alert_id": "3f0c8e1a-6b2d-4c1e-9a7f-2b8d4e6f1a3c",
    "raised_at": "2026-11-23T14:40:45.123456Z",
    "detector": "short_calls_burst",
    "subject": "4940111222",
    "severity": "critical",
    "window_s": 300,
    "count": 51,
    "threshold": 50,
    "cdr_ids": [
        "9b2f6a4c-1d3e-5f70-8a9b-0c1d2e3f4a5b",
        "1a2b3c4d-5e6f-5a7b-8c9d-0e1f2a3b4c5d",
    ],
    "details": {"prefixes": {"882": 40, "979": 11}},
    "schema_version": 1,
}

SIP_REQUEST: dict[str, Any] = {
    "message_id": "0d5e3b2a-1c4f-5e6d-9a8b-7c6d5e4f3a2b",
    "captured_at": "2026-11-23T14:40:45.000001Z",
    "call_id": "a84b4c76e66710@pc33.example.com",
    "method": "INVITE",
    "status_code": None,
    "cseq_method": "INVITE",
    "cseq": 314159,
    "src_ip": "192.0.2.10",
    "src_port": 5060,
    "dst_ip": "2001:db8::1",
    "dst_port": 5060,
    "transport": "udp",
    "capture_node": "2001",
    "headers": "INVITE sip:bob@example.com SIP/2.0\r\nCall-ID: a84b4c76e66710@pc33.example.com",
    "body": None,
    "schema_version": 1,
}

SIP_RESPONSE: dict[str, Any] = {
    **SIP_REQUEST,
    "method": None,
    "status_code": 180,
    "cseq": None,
    "transport": "tcp",
    "body": "v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\n",
}

GOOD = [
    pytest.param("fraud_alert.v1.schema.json", ALERT, id="alert-critical"),
    pytest.param(
        "fraud_alert.v1.schema.json",
        {**ALERT, "severity": "warning", "cdr_ids": [], "details": {}},
        id="alert-warning-empty",
    ),
    pytest.param("sip_message.v1.schema.json", SIP_REQUEST, id="sip-request"),
    pytest.param("sip_message.v1.schema.json", SIP_RESPONSE, id="sip-response"),
]


@pytest.mark.parametrize("name", ["fraud_alert.v1.schema.json", "sip_message.v1.schema.json"])
def test_schema_is_a_valid_draft_2020_12_schema(name: str) -> None:
    schema = json.loads((SCHEMAS / name).read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    # Every field is required: a consumer never has to guess between absent and null.
    # Fields added within a version are the exception, so that records written before
    # them stay valid; sipcdr itself always writes them (test_fraud_alerts.py).
    optional = set(schema["properties"]) - set(schema["required"])
    assert optional == ADDED_WITHIN_VERSION.get(name, set())


@pytest.mark.parametrize(("name", "record"), GOOD)
def test_good_records_validate(name: str, record: dict[str, Any]) -> None:
    assert errors(name, record) == []


def _without(record: dict[str, Any], field: str) -> dict[str, Any]:
    broken = copy.deepcopy(record)
    del broken[field]
    return broken


def _with(record: dict[str, Any], **fields: Any) -> dict[str, Any]:
    broken = copy.deepcopy(record)
    broken.update(fields)
    return broken


BAD = [
    # missing fields
    pytest.param("fraud_alert.v1.schema.json", _without(ALERT, "alert_id"), id="alert-no-id"),
    pytest.param("fraud_alert.v1.schema.json", _without(ALERT, "details"), id="alert-no-details"),
    pytest.param(
        "sip_message.v1.schema.json", _without(SIP_REQUEST, "call_id"), id="sip-no-call-id"
    ),
    pytest.param("sip_message.v1.schema.json", _without(SIP_REQUEST, "body"), id="sip-no-body"),
    # wrong types and values
    pytest.param("fraud_alert.v1.schema.json", _with(ALERT, count="51"), id="alert-count-str"),
    pytest.param("fraud_alert.v1.schema.json", _with(ALERT, window_s=0), id="alert-window-0"),
    pytest.param("fraud_alert.v1.schema.json", _with(ALERT, severity="info"), id="alert-severity"),
    pytest.param("fraud_alert.v1.schema.json", _with(ALERT, details=[]), id="alert-details-list"),
    pytest.param(
        "fraud_alert.v1.schema.json", _with(ALERT, cdr_ids=["not-a-uuid"]), id="alert-cdr-id"
    ),
    pytest.param(
        "fraud_alert.v1.schema.json",
        _with(ALERT, cdr_ids=[ALERT["cdr_ids"][0]] * 2),
        id="alert-cdr-id-twice",
    ),
    pytest.param(
        "fraud_alert.v1.schema.json",
        _with(ALERT, raised_at="2026-11-23 14:40:45"),
        id="alert-time-format",
    ),
    pytest.param(
        "fraud_alert.v1.schema.json",
        _with(ALERT, alert_id=ALERT["alert_id"].upper()),
        id="alert-id-case",
    ),
    pytest.param("fraud_alert.v1.schema.json", _with(ALERT, schema_version=2), id="alert-version"),
    pytest.param(
        "sip_message.v1.schema.json", _with(SIP_REQUEST, src_port="5060"), id="sip-port-str"
    ),
    pytest.param(
        "sip_message.v1.schema.json", _with(SIP_REQUEST, dst_port=70000), id="sip-port-range"
    ),
    pytest.param("sip_message.v1.schema.json", _with(SIP_REQUEST, cseq=-1), id="sip-cseq-negative"),
    pytest.param(
        "sip_message.v1.schema.json", _with(SIP_REQUEST, cseq=2**31), id="sip-cseq-too-big"
    ),
    pytest.param(
        "sip_message.v1.schema.json", _with(SIP_REQUEST, method="IN VITE"), id="sip-method"
    ),
    pytest.param(
        "sip_message.v1.schema.json", _with(SIP_REQUEST, transport="quic"), id="sip-transport"
    ),
    pytest.param(
        "sip_message.v1.schema.json", _with(SIP_REQUEST, headers=None), id="sip-headers-null"
    ),
    pytest.param(
        "sip_message.v1.schema.json", _with(SIP_RESPONSE, status_code=99), id="sip-status"
    ),
    # a request with a status, a response with a method, neither
    pytest.param("sip_message.v1.schema.json", _with(SIP_REQUEST, status_code=200), id="sip-both"),
    pytest.param(
        "sip_message.v1.schema.json",
        _with(SIP_RESPONSE, method=None, status_code=None),
        id="sip-neither",
    ),
    # extra fields
    pytest.param("fraud_alert.v1.schema.json", _with(ALERT, account="x"), id="alert-extra"),
    pytest.param("sip_message.v1.schema.json", _with(SIP_REQUEST, sdp="v=0"), id="sip-extra"),
]


@pytest.mark.parametrize(("name", "record"), BAD)
def test_broken_records_are_rejected(name: str, record: dict[str, Any]) -> None:
    assert errors(name, record) != []


def test_schema_transports_are_the_models() -> None:
    schema = json.loads((SCHEMAS / "sip_message.v1.schema.json").read_text())
    transports = {value for name, value in vars(model).items() if name.startswith("TRANSPORT_")}
    assert set(schema["properties"]["transport"]["enum"]) == transports


def test_signaling_records_written_by_sipcdr_validate(tmp_path: Path) -> None:
    """What `SignalingRecorder` puts in the spool, for requests and responses, with and
    without bodies, becomes what the schema describes."""
    spool = Spool(tmp_path / "spool", ("test",))
    spool.open()
    call = Call()
    sdp = "v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\n"
    invite = call.request("INVITE").replace(
        b"Content-Length: 0\r\n\r\n",
        f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n{sdp}".encode(),
    )
    messages = [
        (invite, CALLER_ADDR, CALLEE_ADDR),
        (call.response(180, "Ringing"), CALLEE_ADDR, CALLER_ADDR),
        (call.response(200, "OK"), CALLEE_ADDR, CALLER_ADDR),
        (
            call.request("BYE", cseq=2, branch="z9hG4bK-bye", to_tag="callee-tag"),
            CALLER_ADDR,
            CALLEE_ADDR,
        ),
    ]
    try:
        for keep_body in (False, True):
            recorder = SignalingRecorder(spool, store_body=keep_body)
            for offset, (data, src, dst) in enumerate(messages):
                recorder(packet(T0 + offset, data, src, dst), parse(data))
        spool.flush()
        records = spool.reader("test").read(100, 1 << 20)
    finally:
        spool.close()
    assert len(records) == 2 * len(messages)
    bodies = []
    for record in records:
        assert record.kind == KIND_SIP
        # The spool holds the captured bytes; the sinks send what they are made into.
        value = orjson.loads(published(record.value))
        assert errors("sip_message.v1.schema.json", value) == [], value
        assert record.key == value["call_id"].encode()
        bodies.append(value["body"])
    assert bodies[0] is None  # SDP is not kept by default
    assert bodies[len(messages)] == sdp
