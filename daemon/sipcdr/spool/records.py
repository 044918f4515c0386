"""The spool's bytes on disk: the record layout and its checks, segment file names,
the cursor file's two slots, the sizes and policies' defaults, and the scan that finds
whole records (`sipcdr.spool` describes the whole)."""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Final, NamedTuple

# Record kinds, one byte each in the spool. The JSON value of each kind has a schema
# in schemas/.
KIND_CDR: Final = "cdr"  # CDR v1 (schemas/cdr.v1.schema.json); key: call_id
KIND_ALERT: Final = "alert"  # fraud alert v1; key: the detector's subject
KIND_SIP: Final = "sip"  # one captured SIP message; key: call_id

# Spool streams. CDRs and alerts share one, so a sink sees them in the order they
# closed; captured signaling has its own, with its own size limit, because it is a
# hundred times the volume and a troubleshooting copy rather than a billing record.
STREAM_RECORDS: Final = "records"
STREAM_SIGNALING: Final = "signaling"


class SpoolRecord(NamedTuple):
    seq: int  # position in its stream, from 1, increasing by one per record
    kind: str  # KIND_*
    key: bytes  # partitioning key (the Kafka message key)
    # The record as UTF-8 JSON, exactly what Kafka and JSONL carry; for KIND_SIP, what
    # the sinks make that of (`sipcdr.sipevent.spooled`), or JSON spooled before.
    value: bytes


_HEAD = struct.Struct("<HBHIQ")  # magic, kind, key length, value length, seq
_CRC = struct.Struct("<I")
HEADER_BYTES: Final = _HEAD.size + _CRC.size
MAGIC: Final = 0x5350  # "PS" little-endian; an arbitrary start-of-record mark
_MAGIC_BYTES: Final = struct.pack("<H", MAGIC)
_KIND_CODES: Final = {KIND_CDR: 1, KIND_ALERT: 2, KIND_SIP: 3}
_KIND_NAMES: Final = {code: name for name, code in _KIND_CODES.items()}
MAX_VALUE_BYTES: Final = 16 * 1024 * 1024  # far above any record; bounds a corrupt length
SEGMENT_SUFFIX: Final = ".seg"
# A segment's name is its first sequence number and the CRC's start value for its
# records (`<first seq>-<seed hex>.seg`): the seed is drawn when its writer opens the
# spool and is in nothing captured, so a record forged inside a captured value fails
# its check wherever a search for the next record lands. Named by the first number
# alone, a segment of earlier versions: seed 0, the plain CRC32.
_SEED_HEX_DIGITS: Final = 8

FULL_POLICIES: Final = ("block", "drop_newest")
# A day of CDRs of a large carrier (~10 M calls at ~1 KB) can wait out a sink outage.
DEFAULT_MAX_BYTES: Final = 10 * 1024**3
# Signaling copies are for troubleshooting: a few hours of backlog, then newest dropped.
DEFAULT_SIGNALING_MAX_BYTES: Final = 4 * 1024**3
# Small enough that a delivered segment is deleted soon, large enough for few files.
DEFAULT_SEGMENT_BYTES: Final = 64 * 1024 * 1024
# A power loss takes at most this much; an fsync costs ~1-5 ms, five times a second.
DEFAULT_FSYNC_INTERVAL_S: Final = 0.2
# CDRs are money: stop intake rather than lose closed calls.
DEFAULT_FULL_POLICY: Final = "block"
# Resume intake only with room for a burst, so it does not flap at the limit.
RESUME_FRACTION: Final = 0.9
# The signaling stream writes when this much is buffered (and on every flush); the
# reserve is written back in batches of this size too.
_WRITE_BUFFER_BYTES: Final = 256 * 1024
# Closed CDRs the disk refuses wait in memory, up to this many: every call a large
# carrier has open when its disk fills (~120 calls/s x 3 min) twice over, ~120 MB (the
# encoded record and the CDR itself, which the dialog checkpoints carry, ~2.3 KB each).
DEFAULT_CDR_RESERVE_RECORDS: Final = 50_000
# Signaling stops below this much free space, so CDRs keep room on a shared disk:
# about two hours of a large carrier's CDRs (~400 MB an hour).
DEFAULT_SIGNALING_MIN_FREE_BYTES: Final = 1024**3
# Free space is read at most this often, unless what was written since could have
# crossed the floor.
_FLOOR_CHECK_S: Final = 1.0
CURSOR_SUFFIX: Final = ".cursor"
_CURSOR = struct.Struct("<4sQQI")  # magic, generation, seq, crc32 of the rest
_CURSOR_MAGIC: Final = b"SPCU"
# One slot per page (and so per sector, whatever the disk's sector size): a write torn
# by a power loss spoils one slot only.
_CURSOR_SLOT_BYTES: Final = 4096
_CURSOR_FILE_BYTES: Final = 2 * _CURSOR_SLOT_BYTES
# Where earlier versions put the second slot (1 KiB files); read, then rewritten.
_LEGACY_CURSOR_SLOT_BYTES: Final = 512
# A generation this high cannot have been counted to: a crafted or damaged file, whose
# position is kept but whose slots are written anew from generation 1.
_CURSOR_GENERATION_LIMIT: Final = 1 << 63
_NO_SPACE: Final = frozenset((errno.ENOSPC, errno.EDQUOT))


# Bound once: called for every record of both streams.
_HEAD_PACK: Final = _HEAD.pack
_CRC_PACK: Final = _CRC.pack
_crc32: Final = zlib.crc32


def _encode(kind: str, key: bytes, value: bytes, seq: int, seed: int) -> bytes:
    """One record as it goes to disk, into a segment of CRC start value `seed`."""
    head = _HEAD_PACK(MAGIC, _KIND_CODES[kind], len(key), len(value), seq)
    return b"".join((head, _CRC_PACK(_crc32(value, _crc32(key, _crc32(head, seed)))), key, value))


def segment_name(first_seq: int, seed: int) -> str:
    return f"{first_seq:020d}-{seed:0{_SEED_HEX_DIGITS}x}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> tuple[int, int] | None:
    """(first sequence number, seed) of a segment file's name, or None for a file that
    is not one."""
    if not name.endswith(SEGMENT_SUFFIX):
        return None
    first, dash, seed = name[: -len(SEGMENT_SUFFIX)].partition("-")
    # Numbers from 2**63 on cannot have been counted to (a million records a second for
    # 290,000 years): a crafted or damaged name, left alone.
    if not first.isdigit() or not first.isascii() or int(first) >= 1 << 63:
        return None
    if not dash:
        return int(first), 0
    if len(seed) != _SEED_HEX_DIGITS or not all(c in "0123456789abcdef" for c in seed):
        return None
    return int(first), int(seed, 16)


def _encode_cursor_slot(generation: int, seq: int) -> bytes:
    body = _CURSOR.pack(_CURSOR_MAGIC, generation, seq, 0)[:-4]
    return body + _CRC.pack(zlib.crc32(body))


def _newest_cursor_slot(data: bytes) -> tuple[int, int, int, bool] | None:
    """(slot, generation, seq, current) of the newest valid slot of a cursor file, or
    None; `current` is False when the file is not of the current layout (the 1 KiB one
    of earlier versions, or one cut short), which is then to be written anew. Slots are
    read at the old offset too: the newest generation wins wherever it is."""
    newest: tuple[int, int, int, bool] | None = None
    for slot, offset in ((0, 0), (1, _LEGACY_CURSOR_SLOT_BYTES), (1, _CURSOR_SLOT_BYTES)):
        raw = data[offset : offset + _CURSOR.size]
        if len(raw) < _CURSOR.size:
            continue
        magic, generation, seq, crc = _CURSOR.unpack(raw)
        if magic != _CURSOR_MAGIC or crc != zlib.crc32(raw[:-4]):
            continue
        if newest is None or generation > newest[1]:
            current = len(data) == _CURSOR_FILE_BYTES and offset != _LEGACY_CURSOR_SLOT_BYTES
            newest = (slot, generation, seq, current)
    return newest


def read_cursor_seq(path: Path) -> int | None:
    """The position a cursor file holds, or None (missing, unreadable). Read while its
    reader may be writing a slot: a torn slot fails its check and the other one, older,
    is taken, which only holds back more."""
    try:
        newest = _newest_cursor_slot(path.read_bytes())
    except OSError:
        return None
    return None if newest is None else newest[2]


def _decode_header(header: bytes) -> tuple[int, int, int, int] | None:
    if len(header) < HEADER_BYTES:
        return None
    magic, kind_code, key_len, value_len, seq = _HEAD.unpack_from(header)
    if magic != MAGIC or kind_code not in _KIND_NAMES or value_len > MAX_VALUE_BYTES:
        return None
    return kind_code, key_len, value_len, seq


def _scan(
    data: bytes, offset: int, seed: int, *, first_only: bool = False
) -> Iterator[tuple[int, str, bytes, bytes, int]]:
    """Valid records of `data`, from a segment of CRC start value `seed`, from
    `offset`, stopping at the first invalid one: (seq, kind, key, value, end offset)."""
    view = memoryview(data)
    while offset + HEADER_BYTES <= len(data):
        decoded = _decode_header(data[offset : offset + HEADER_BYTES])
        if decoded is None:
            return
        kind_code, key_len, value_len, seq = decoded
        body_start = offset + HEADER_BYTES
        end = body_start + key_len + value_len
        if end > len(data):
            return
        head_crc = zlib.crc32(view[offset : offset + _HEAD.size], seed)
        crc = zlib.crc32(view[body_start:end], head_crc)
        if crc != _CRC.unpack_from(data, offset + _HEAD.size)[0]:
            return
        yield (
            seq,
            _KIND_NAMES[kind_code],
            data[body_start : body_start + key_len],
            data[body_start + key_len : end],
            end,
        )
        if first_only:
            return
        offset = end


def _next_valid(data: bytes, offset: int, seed: int) -> int:
    """Offset of the next valid record at or after `offset`, or -1."""
    position = data.find(_MAGIC_BYTES, offset)
    while position >= 0:
        for _record in _scan(data, position, seed, first_only=True):
            return position
        position = data.find(_MAGIC_BYTES, position + 1)
    return -1


def _fsync_directory(directory: Path) -> None:
    """A new segment's name must survive a power loss as well as its contents."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
