"""The catalogue of personal data (`sipcdr.model.PERSONAL_FIELDS`, `PERSONAL_COLUMNS`)
names every field of every record and table that holds a phone number, an address, a
SIP URI or header text: export and erasure find and blank a subject's data by it, so
a field missing from it would be silently kept. A field is taken as personal by its
name and by what the records made from the shared captures hold in it."""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import fields
from importlib import resources
from pathlib import Path

import pytest
from pcapdata import require_shared_data
from sipcdr import model
from sipcdr.capture.pcapfile import iter_packets
from sipcdr.config import Config
from sipcdr.importer import import_files
from sipcdr.model import PERSONAL_COLUMNS, PERSONAL_FIELDS, PERSONAL_KINDS, SCHEMA_VERSIONS
from sipcdr.sip import SipParseError, parse
from sipcdr.sipevent import event_of

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
# Words that make a field name personal: numbers, addresses, URIs, identities, text.
PERSONAL_NAME = re.compile(
    r"(^|_)(ip|ips|addr|address|caller|callee|number|msisdn|imsi|phone|e164|uri|user|agent|"
    r"header|headers|body|subject|identity|call_id|call_ids|contact|display|actor|"
    r"created_by|reason)($|_)"
)
# Names the heuristic takes for personal that are not, and why.
NOT_PERSONAL = {
    "subject_kind": "names the kind of subject (source_ip, caller, ...), not the subject",
    "reason_phrase": "the status line's phrase (Busy Here), from the responding stack",
    "sip_reason": "the status line's phrase of the final response",
    "end_reason": "why sipcdr closed the call (bye, cancel, timeout_no_bye)",
    # By content: random tokens of the sending stack, sometimes all digits.
    "from_tag": "a dialog tag, random per call",
    "to_tag": "a dialog tag, random per call",
}
RECORD_FIELDS = {
    "cdr": [f.name for f in fields(model.Cdr)],
    "sip_message": list(model.SipEvent._fields),
    "fraud_alert": [f.name for f in fields(model.FraudAlert)],
}


def looks_personal(value: object) -> bool:
    """A value that is, or holds, a phone number, an address, a URI or header text."""
    if isinstance(value, list):
        return any(looks_personal(item) for item in value)
    if not isinstance(value, str):
        return False
    if re.fullmatch(r"\+?\d{6,15}", value) or re.search(r"\b(sips?|tel):", value):
        return True
    if "\n" in value or re.search(r"@\d{1,3}(\.\d{1,3}){3}", value):
        return True
    try:
        ipaddress.ip_address(value.split("%", 1)[0])
    except ValueError:
        return False
    return True


def record_fields(name: str) -> set[str]:
    schema = json.loads((SCHEMAS / f"{name}.v{SCHEMA_VERSIONS[name]}.schema.json").read_text())
    return set(schema["properties"])


def table_columns() -> dict[str, set[str]]:
    """Every table and its columns, as the shipped migrations create them."""
    sql = "\n".join(
        path.read_text()
        for path in resources.files("sipcdr.storage").joinpath("sql").iterdir()
        if path.name.endswith(".sql")
    )
    tables: dict[str, set[str]] = {}
    for name, body in re.findall(r"CREATE TABLE (\w+) \((.*?)\n\)", sql, re.S):
        columns = tables.setdefault(name, set())
        for line in body.splitlines():
            match = re.match(r"\s+([a-z_]+)\s+[a-z]", line)
            if match and match[1] not in {"constraint", "primary", "check"}:
                columns.add(match[1])
    for name, body in re.findall(r"ALTER TABLE (\w+)\s(.*?);", sql, re.S):
        tables.setdefault(name, set()).update(re.findall(r"ADD COLUMN (\w+)", body))
    return tables


def test_the_schema_versions_are_the_schema_files() -> None:
    for name, version in SCHEMA_VERSIONS.items():
        schema = json.loads((SCHEMAS / f"{name}.v{version}.schema.json").read_text())
        assert schema["properties"]["schema_version"] == {"const": version}


@pytest.mark.parametrize("record", sorted(PERSONAL_FIELDS))
def test_every_personal_looking_record_field_is_catalogued(record: str) -> None:
    catalogued = PERSONAL_FIELDS[record]
    names = record_fields(record) | set(RECORD_FIELDS[record])
    suspects = {n for n in names if PERSONAL_NAME.search(n) and n not in NOT_PERSONAL}
    assert suspects - set(catalogued) == set()
    assert set(catalogued) <= names  # no stale entry
    assert set(catalogued.values()) <= PERSONAL_KINDS


def test_every_personal_looking_column_is_catalogued() -> None:
    tables = table_columns()
    assert {"cdrs", "sip_messages", "fraud_alerts", "holds", "audit_log"} <= set(tables)
    for table, columns in tables.items():
        if table == "schema_migrations":
            continue
        catalogued = PERSONAL_COLUMNS.get(table, {})
        suspects = {c for c in columns if PERSONAL_NAME.search(c) and c not in NOT_PERSONAL}
        assert (table, suspects - set(catalogued)) == (table, set())
        assert (table, set(catalogued) - columns) == (table, set())
        assert set(catalogued.values()) <= PERSONAL_KINDS


def test_every_field_holding_personal_values_is_catalogued() -> None:
    """By content: the CDRs and signaling records of every shared capture."""
    seen: dict[str, set[str]] = {"cdr": set(), "sip_message": set()}
    for path in sorted((require_shared_data() / "pcaps").glob("*.pcap*")):
        sink = _Collector()
        import_files(Config(), [path], sinks=[sink], progress=False)
        for cdr in sink.cdrs:
            seen["cdr"] |= {k for k, v in cdr.to_record().items() if looks_personal(v)}
        for packet in iter_packets(path):
            try:
                msg = parse(packet.payload)
            except SipParseError:
                continue
            record = event_of(packet, msg, store_body=True).to_record()
            seen["sip_message"] |= {k for k, v in record.items() if looks_personal(v)}
    # The captures hold what the catalogue is about, so the check has teeth.
    assert {"caller", "src_ip", "from_uri"} <= seen["cdr"]
    assert {"headers", "body", "dst_ip"} <= seen["sip_message"]
    for kind, names in seen.items():
        unlisted = names - set(PERSONAL_FIELDS[kind]) - set(NOT_PERSONAL)
        assert (kind, unlisted) == (kind, set())


def test_an_alert_about_a_number_is_caught_by_content() -> None:
    alert = model.FraudAlert(
        model.alert_id("d", "caller", "4930901820", 1.0), "d", "4930901820", "caller",
        "warning", 60, 5, 3, 1.0, 0.5, 1.0, ("c1@192.0.2.1",), (), {"sources": ["192.0.2.1"]},
    )  # fmt: skip
    found = {k for k, v in alert.to_record().items() if looks_personal(v)}
    assert found == {"subject", "call_ids"}
    assert found <= set(PERSONAL_FIELDS["fraud_alert"])


class _Collector:
    name = "collector"

    def __init__(self) -> None:
        self.cdrs: list[model.Cdr] = []

    def write(self, cdr: model.Cdr) -> None:
        self.cdrs.append(cdr)

    def flush(self) -> None:
        pass
