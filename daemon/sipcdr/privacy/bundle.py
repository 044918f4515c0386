"""The export bundle, written as rows arrive: one JSON document, or a zip holding one
CSV file per record kind. Nothing is held in memory beyond one row."""

from __future__ import annotations

import csv
import io
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import IO, Any, Final

import orjson

KINDS: Final = ("cdrs", "sip_messages", "fraud_alerts")


def plain(value: Any) -> Any:
    """A database value in its record form."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, str) and value.startswith(("{", "[")):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


class JsonBundle:
    """`{"subject": ..., "generated_at": ..., "cdrs": [...], "sip_messages": [...],
    "fraud_alerts": [...]}`."""

    def __init__(self, out: IO[bytes], subject: str, generated_at: datetime) -> None:
        self._out = out
        self._first = True
        self._open_kind: str | None = None
        head = {"subject": subject, "generated_at": plain(generated_at)}
        out.write(orjson.dumps(head)[:-1])
        self.counts: dict[str, int] = dict.fromkeys(KINDS, 0)

    def begin(self, kind: str, columns: Sequence[str]) -> None:
        self._out.write(b',"' + kind.encode() + b'":[')
        self._first = True

    def row(self, kind: str, row: Mapping[str, Any]) -> None:
        if not self._first:
            self._out.write(b",")
        self._first = False
        self._out.write(orjson.dumps({key: plain(value) for key, value in row.items()}))
        self.counts[kind] += 1

    def end(self, kind: str) -> None:
        self._out.write(b"]")

    def close(self) -> None:
        self._out.write(b"}\n")


class CsvZipBundle:
    """`cdrs.csv`, `sip_messages.csv`, `fraud_alerts.csv` (a header line, then one line
    per record; arrays and objects as JSON text) and `subject.json`."""

    def __init__(self, out: IO[bytes], subject: str, generated_at: datetime) -> None:
        self._zip = zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED)
        self._zip.writestr(
            "subject.json",
            orjson.dumps({"subject": subject, "generated_at": plain(generated_at)}),
        )
        self._file: IO[bytes] | None = None
        self._text: io.TextIOWrapper | None = None
        self._writer: Any = None
        self._columns: tuple[str, ...] = ()
        self.counts: dict[str, int] = dict.fromkeys(KINDS, 0)

    def begin(self, kind: str, columns: Sequence[str]) -> None:
        """`columns`: the header line, and the order of every row's values."""
        self._file = self._zip.open(f"{kind}.csv", "w")
        self._text = io.TextIOWrapper(self._file, encoding="utf-8", newline="")
        self._writer = csv.writer(self._text)
        self._columns = tuple(columns)
        self._writer.writerow(self._columns)

    def row(self, kind: str, row: Mapping[str, Any]) -> None:
        values = []
        for name in self._columns:
            value = row.get(name)
            value = plain(value)
            if isinstance(value, list | dict):
                value = orjson.dumps(value).decode()
            values.append("" if value is None else value)
        self._writer.writerow(values)
        self.counts[kind] += 1

    def end(self, kind: str) -> None:
        if self._text is not None:
            self._text.close()  # closes the member too
        self._text = self._file = None

    def close(self) -> None:
        self._zip.close()


Bundle = JsonBundle | CsvZipBundle
