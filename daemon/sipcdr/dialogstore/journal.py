"""The dialog journal's records: their layout, and their replay through the correlator
at recovery (`sipcdr.dialogstore` describes the files and the order of things)."""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Final

from sipcdr.dialog import Correlator
from sipcdr.dialogstore.stats import DialogStoreStats
from sipcdr.model import Cdr, Packet
from sipcdr.sip import parse

# A journal is replayed in reads of this size, never read whole.
_READ_BYTES: Final = 1024 * 1024
MAGIC: Final = b"SIPCDRJ\x01"  # journal file format 1
_FRAME = struct.Struct("<II")  # crc32 of the body, body length
# kind, timestamp, source port, destination port, capture node length, source address
# length, destination address length, transport length; then those strings, then the
# payload as captured.
_MESSAGE = struct.Struct("<BdHHHBBB")
_CLOSED = struct.Struct("<BdB")  # kind, close time, cdr_id length; then cdr_id, Call-ID
# kind, decided at, end time, cdr_id length, end reason length, hangup side length;
# then those strings, then the Call-ID.
_DECIDED = struct.Struct("<BddBBB")
_TIMER = struct.Struct("<Bd")  # kind, the time the timers ran at
KIND_MESSAGE: Final = 1
KIND_CLOSED: Final = 2
KIND_DECIDED: Final = 3
KIND_TIMER: Final = 4
MAX_RECORD_BYTES: Final = 16 * 1024 * 1024  # far above any SIP message; bounds a bad length
_TEXT: Final = "surrogatepass"  # any str round-trips, even one a capture file name gave


class JournalReplay:
    """Replays journal files through the correlator, counting what it cannot apply in
    the store's stats; a file that cannot be read goes to `unreadable`."""

    def __init__(
        self,
        correlator: Correlator,
        stats: DialogStoreStats,
        unreadable: Callable[[Path, OSError], None],
    ) -> None:
        self.correlator = correlator
        self.stats = stats
        self._unreadable = unreadable

    def replay(self, path: Path, pending: dict[str, Cdr], *, newest: bool) -> int:
        """Replay one journal, read in pieces; returns the records replayed."""
        try:
            handle = path.open("rb", buffering=_READ_BYTES)
        except OSError as exc:
            self._unreadable(path, exc)
            return 0
        replayed = 0
        offset = 0
        with handle:
            try:
                size = os.fstat(handle.fileno()).st_size
                magic = handle.read(len(MAGIC))
                if not magic:
                    # The newest may have been created just before the crash; an older
                    # one was written and then emptied: damage.
                    if not newest:
                        self._torn(0)
                    return 0
                if magic != MAGIC:
                    self._torn(size)
                    return 0
                offset = len(MAGIC)
                while frame := handle.read(_FRAME.size):
                    if len(frame) < _FRAME.size:
                        break
                    crc, length = _FRAME.unpack(frame)
                    if not 0 < length <= MAX_RECORD_BYTES:
                        break
                    body = handle.read(length)
                    if len(body) < length or zlib.crc32(body) != crc:
                        break
                    offset += _FRAME.size + length
                    replayed += 1
                    self._apply(body, pending)
            except OSError as exc:
                self._unreadable(path, exc)
                return replayed
        if offset < size:
            # A record cut short or damaged (a power loss inside the fsync interval):
            # it and what follows are not replayed. Records are never rewritten, so
            # nothing valid can follow a damaged one.
            self._torn(size - offset)
        return replayed

    def _apply(self, body: bytes, pending: dict[str, Cdr]) -> None:
        kind = body[0]
        if kind == KIND_MESSAGE:
            self._replay_message(body, pending)
        elif kind == KIND_CLOSED:
            self._replay_closed(body, pending)
        elif kind == KIND_DECIDED:
            self._replay_decided(body, pending)
        elif kind == KIND_TIMER and len(body) == _TIMER.size:
            self.correlator.prune_closed(_TIMER.unpack(body)[1])
        else:
            self.stats.bad_records += 1

    def _torn(self, length: int) -> None:
        self.stats.torn_tails += 1
        self.stats.torn_bytes += length

    def _replay_message(self, body: bytes, pending: dict[str, Cdr]) -> None:
        try:
            _kind, timestamp, src_port, dst_port, node_len, src_len, dst_len, proto_len = (
                _MESSAGE.unpack_from(body)
            )
            at = _MESSAGE.size
            strings = []
            for length in (src_len, dst_len, proto_len, node_len):
                strings.append(body[at : at + length].decode("utf-8", _TEXT))
                at += length
            packet = Packet(
                timestamp,
                strings[0],
                src_port,
                strings[1],
                dst_port,
                strings[2],
                body[at:],
                strings[3],
            )
            closed = self.correlator.feed(packet, parse(packet.payload))
        except Exception:
            # A parser of another version that refuses it, or a correlator error: the
            # message is lost, as it would be live.
            self.stats.bad_records += 1
            return
        for cdr in closed:
            pending[cdr.cdr_id] = cdr

    def _replay_closed(self, body: bytes, pending: dict[str, Cdr]) -> None:
        try:
            _kind, closed_at, id_len = _CLOSED.unpack_from(body)
            at = _CLOSED.size
            cdr_id = body[at : at + id_len].decode()
            call_id = body[at + id_len :].decode("utf-8", _TEXT)
        except (struct.error, UnicodeDecodeError):
            self.stats.bad_records += 1
            return
        if pending.pop(cdr_id, None) is None:
            self.correlator.forget(call_id, cdr_id, closed_at)

    def _replay_decided(self, body: bytes, pending: dict[str, Cdr]) -> None:
        try:
            _kind, decided_at, end_time, id_len, reason_len, side_len = _DECIDED.unpack_from(body)
            at = _DECIDED.size
            cdr_id = body[at : at + id_len].decode()
            at += id_len
            end_reason = body[at : at + reason_len].decode()
            at += reason_len
            hangup_by = body[at : at + side_len].decode() or None
            call_id = body[at + side_len :].decode("utf-8", _TEXT)
            cdr = self.correlator.close_decided(
                call_id, cdr_id, end_time, end_reason, hangup_by, decided_at
            )
        except Exception:
            self.stats.bad_records += 1
            return
        if cdr is not None:
            pending[cdr.cdr_id] = cdr


# The encoded addresses, transport and capture node of recent messages, with their
# lengths: a carrier's traffic comes from few of them, and encoding four strings per
# message cost more than finding them here. Cleared rather than grown, so a spray of
# addresses costs what encoding them did, and a bounded amount of memory.
_ENDPOINTS_KEPT: Final = 4096
# Longer strings (together) are encoded per message, not kept: a HEP agent names its
# capture node in up to 64 KB, and 4,096 such would hold gigabytes.
_ENDPOINT_BYTES: Final = 512
_endpoints: dict[tuple[str, str, str, str], tuple[bytes, int, int, int, int]] = {}


def message_record(packet: Packet) -> bytes | None:
    """The record of one message that changed a call; None when a field is out of the
    range the layout holds."""
    timestamp, src_ip, src_port, dst_ip, dst_port, transport, payload, node = packet
    where = (src_ip, dst_ip, transport, node)
    known = _endpoints.get(where)
    if known is None:
        known = _endpoint_strings(where)
    strings, node_len, src_len, dst_len, proto_len = known
    try:
        head = _MESSAGE.pack(
            KIND_MESSAGE, timestamp, src_port, dst_port, node_len, src_len, dst_len, proto_len
        )
    except struct.error:
        return None
    return b"".join((head, strings, payload))


def _endpoint_strings(where: tuple[str, str, str, str]) -> tuple[bytes, int, int, int, int]:
    """The strings of a message record, encoded and joined in their order (source,
    destination, transport, capture node), and their lengths in the header's order."""
    src, dst, proto, node = (text.encode("utf-8", _TEXT) for text in where)
    strings = b"".join((src, dst, proto, node))
    known = (strings, len(node), len(src), len(dst), len(proto))
    if len(strings) > _ENDPOINT_BYTES:
        return known
    if len(_endpoints) >= _ENDPOINTS_KEPT:
        _endpoints.clear()
    _endpoints[where] = known
    return known


def closed_record(cdr: Cdr, closed_at: float) -> bytes:
    ident = cdr.cdr_id.encode()
    head = _CLOSED.pack(KIND_CLOSED, closed_at, len(ident))
    return b"".join((head, ident, cdr.call_id.encode("utf-8", _TEXT)))


def decided_record(cdr: Cdr, decided_at: float) -> bytes:
    ident = cdr.cdr_id.encode()
    reason = cdr.end_reason.encode()
    side = (cdr.hangup_by or "").encode()
    head = _DECIDED.pack(KIND_DECIDED, decided_at, cdr.end_time, len(ident), len(reason), len(side))
    return b"".join((head, ident, reason, side, cdr.call_id.encode("utf-8", _TEXT)))


def timer_record(timer_at: float) -> bytes:
    return _TIMER.pack(KIND_TIMER, timer_at)
