"""Spool records byte for byte against the layout `sipcdr.spool` documents, on both
streams: the CDR stream's one write per record and the buffered (signaling) stream's
batches, however `append` encodes them."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import pytest
from sipcdr.sinks.base import KIND_ALERT, KIND_CDR, KIND_SIP
from sipcdr.spool import Appended, Spool

CODES = {KIND_CDR: 1, KIND_ALERT: 2, KIND_SIP: 3}


def documented(kind: str, key: bytes, value: bytes, seq: int, seed: int = 0) -> bytes:
    """magic u16 | kind u8 | key length u16 | value length u32 | seq u64 | crc32 u32 |
    key | value, the CRC over everything before it and after it, started from the
    segment's seed."""
    head = struct.pack("<HBHIQ", 0x5350, CODES[kind], len(key), len(value), seq)
    crc = zlib.crc32(head + key + value, seed)
    return head + struct.pack("<I", crc) + key + value


RECORDS = [
    (KIND_CDR, b"call-1@x", b'{"cdr_id": "1"}'),
    (KIND_SIP, b"call-1@x", b"INVITE sip:x SIP/2.0\r\n\r\n" * 40),
    (KIND_ALERT, b"", b"{}"),
    (KIND_CDR, b"k" * 0xFFFF, b""),
    (KIND_SIP, "ünïcode@x".encode(), bytes(range(256)) * 3),
]


@pytest.mark.parametrize("buffered", [False, True])
def test_records_are_the_documented_layout(tmp_path: Path, buffered: bool) -> None:
    with Spool(tmp_path, ("r",), buffered=buffered) as spool:
        outcomes = [spool.append(kind, key, value) for kind, key, value in RECORDS]
        spool.flush()
        assert outcomes == [Appended.WRITTEN] * len(RECORDS)
        assert spool.size_bytes == sum(len(documented(*r, 1)) for r in RECORDS)
        got = spool.reader("r").read(100, 1 << 24)
    (segment,) = tmp_path.glob("*.seg")
    named = re.fullmatch(r"(\d{20})-([0-9a-f]{8})\.seg", segment.name)
    assert named is not None, segment.name
    assert int(named[1]) == 1
    seed = int(named[2], 16)
    expected = b"".join(documented(*record, seq, seed) for seq, record in enumerate(RECORDS, 1))
    assert segment.read_bytes() == expected
    assert [(r.kind, r.key, r.value, r.seq) for r in got] == [
        (*record, seq) for seq, record in enumerate(RECORDS, 1)
    ]


def test_a_record_too_large_is_refused_on_the_buffered_stream_too(tmp_path: Path) -> None:
    with Spool(tmp_path, ("r",), buffered=True) as spool:
        assert spool.append(KIND_SIP, b"k" * 0x10000, b"v") == Appended.REFUSED
        assert spool.append(KIND_SIP, b"k", b"v") == Appended.WRITTEN
        assert spool.stats.dropped == {"too_large": 1}
        spool.flush()
        assert [r.seq for r in spool.reader("r").read(10, 1 << 20)] == [1]
