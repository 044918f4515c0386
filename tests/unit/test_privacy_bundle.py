"""The export bundle: valid JSON, and a zip of CSV files each with its header line,
rows written as they come."""

from __future__ import annotations

import csv
import io
import json
import uuid
import zipfile
from datetime import UTC, datetime
from decimal import Decimal

from sipcdr.privacy.bundle import CsvZipBundle, JsonBundle

WHEN = datetime(2026, 12, 4, tzinfo=UTC)
ROW = {
    "cdr_id": uuid.UUID(int=1),
    "caller": "4940555666",
    "cost": Decimal("0.0100"),
    "fraud_flags": ["a", "b"],
    "start_time": WHEN,
}


def test_json_bundle() -> None:
    out = io.BytesIO()
    bundle = JsonBundle(out, "4940555666", WHEN)
    bundle.begin("cdrs", list(ROW))
    bundle.row("cdrs", ROW)
    bundle.row("cdrs", ROW)
    bundle.end("cdrs")
    bundle.begin("sip_messages", ["message_id"])
    bundle.end("sip_messages")
    bundle.close()
    document = json.loads(out.getvalue())
    assert document["subject"] == "4940555666"
    assert document["cdrs"][0] == {
        "cdr_id": str(uuid.UUID(int=1)),
        "caller": "4940555666",
        "cost": "0.0100",
        "fraud_flags": ["a", "b"],
        "start_time": "2026-12-04T00:00:00.000000Z",
    }
    assert len(document["cdrs"]) == 2 and document["sip_messages"] == []
    assert bundle.counts["cdrs"] == 2


def test_csv_zip_bundle_has_headers_even_when_empty() -> None:
    out = io.BytesIO()
    bundle = CsvZipBundle(out, "4940555666", WHEN)
    bundle.begin("cdrs", list(ROW))
    bundle.row("cdrs", ROW)
    bundle.end("cdrs")
    bundle.begin("fraud_alerts", ["alert_id", "subject"])
    bundle.end("fraud_alerts")
    bundle.close()
    with zipfile.ZipFile(io.BytesIO(out.getvalue())) as archive:
        cdrs = list(csv.reader(io.TextIOWrapper(archive.open("cdrs.csv"), encoding="utf-8")))
        alerts = archive.read("fraud_alerts.csv").decode()
    assert cdrs[0] == list(ROW)
    assert cdrs[1][2:4] == ["0.0100", '["a","b"]']
    assert alerts.splitlines() == ["alert_id,subject"]
