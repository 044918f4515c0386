"""Every CDR sipcdr writes validates against the published schema (schemas/), the
contract billing consumes."""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal
from pathlib import Path

import jsonschema
import orjson
from pcapdata import require_shared_data
from sipcalls import CdrCollector
from sipcdr.config import Config
from sipcdr.dialogstore import _unwritten_cdrs, _unwritten_json
from sipcdr.importer import import_files
from sipcdr.model import CDR_ADDED_FIELDS, Cdr
from sipcdr.sinks.pgrows import CDRS
from test_import_captures import EXPECTED

SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "cdr.v1.schema.json"


def test_every_cdr_from_every_capture_validates() -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    sink = CdrCollector()
    files = [require_shared_data() / "pcaps" / name for name in sorted(EXPECTED)]
    import_files(Config(), files, sinks=[sink], progress=False)
    assert len(sink.cdrs) > 40
    dispositions = set()
    for cdr in sink.cdrs:
        record = json.loads(json.dumps(cdr.to_record()))
        errors = sorted(validator.iter_errors(record), key=str)
        assert not errors, (cdr.call_id, [e.message for e in errors])
        dispositions.add(record["disposition"])
    assert {"answered", "cancelled", "rejected", "no_answer", "timeout"} <= dispositions


def test_fields_added_within_v1_are_optional_and_last() -> None:
    """A record written before the fields were added stays valid; a new one has them."""
    schema = json.loads(SCHEMA.read_text())
    assert set(schema["properties"]) - set(schema["required"]) == set(CDR_ADDED_FIELDS)
    record = rated_cdr().to_record()
    assert list(record)[-len(CDR_ADDED_FIELDS) :] == list(CDR_ADDED_FIELDS)
    for name in CDR_ADDED_FIELDS:
        del record[name]
    jsonschema.validate(record, schema)


def test_schema_rejects_a_broken_record() -> None:
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    sink = CdrCollector()
    import_files(
        Config(),
        [require_shared_data() / "pcaps" / "sngrep-ipip.pcap"],
        sinks=[sink],
        progress=False,
    )
    record = sink.cdrs[0].to_record()
    record["disposition"] = "maybe"
    record["start_time"] = "yesterday"
    assert len(list(validator.iter_errors(record))) == 2


# Money no float can hold: 17 significant digits and a rate below 1e-6.
COST = Decimal("123456789.123456789")
RATE = Decimal("1E-7")
VENDOR_COST = Decimal("23456789.000000001")


def rated_cdr() -> Cdr:
    sink = CdrCollector()
    import_files(
        Config(),
        [require_shared_data() / "pcaps" / "sngrep-ipip.pcap"],
        sinks=[sink],
        progress=False,
    )
    return dataclasses.replace(
        sink.cdrs[0],
        rated=True,
        rate_prefix="49",
        rate_name="Germany",
        rate_per_minute=RATE,
        billed_seconds=60,
        cost=COST,
        currency="EUR",
        egress_trunk="vendor-b",
        vendor_cost=VENDOR_COST,
        margin=COST - VENDOR_COST,
        callee_valid=True,
    )


def test_money_is_exact_on_the_wire() -> None:
    """JSONL, Kafka and the PostgreSQL sink all take `to_record`: money leaves it as a
    plain decimal string, exact, and the sink's numeric columns read it back exact."""
    record = rated_cdr().to_record()
    assert (record["cost"], record["rate_per_minute"]) == ("123456789.123456789", "0.0000001")
    wire = orjson.loads(orjson.dumps(record))
    assert Decimal(wire["cost"]) == COST and Decimal(wire["rate_per_minute"]) == RATE
    assert float(wire["cost"]) != COST  # a float would have lost digits
    jsonschema.validate(wire, json.loads(SCHEMA.read_text()))
    assert (wire["vendor_cost"], wire["margin"]) == ("23456789.000000001", "100000000.123456788")
    row = dict(zip(CDRS.columns, CDRS.row(wire), strict=True))
    assert (row["cost"], row["rate_per_minute"]) == (COST, RATE)
    assert (row["vendor_cost"], row["margin"]) == (VENDOR_COST, COST - VENDOR_COST)


def test_money_survives_a_dialog_checkpoint() -> None:
    """CDRs closed but not yet spooled are kept in a checkpoint: money stays Decimal."""
    cdr = rated_cdr()
    (back,) = _unwritten_cdrs(orjson.loads(_unwritten_json([cdr])))
    assert back == cdr
    assert isinstance(back.cost, Decimal) and back.cost == COST
