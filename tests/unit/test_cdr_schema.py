"""Every CDR sipcdr writes validates against the published schema (schemas/), the
contract billing consumes."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
from pcapdata import require_shared_data
from sipcalls import CdrCollector
from sipcdr.config import Config
from sipcdr.importer import import_files
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
