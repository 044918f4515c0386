"""Capture files read from their bytes: classic pcap (tcpdump's format) and the packet
blocks of pcapng.

``PcapReader`` and ``PcapngBlocks`` split chunks of a file into records and ask a
``SipExtractor`` about each frame where it lies in the chunk, so the frames it skips
unread (media: see ``prefilter``) are never copied. They read what dpkt's readers read:
the same times, to the bit, and the same end of a cut file. ``PcapReader`` reads a
whole pcap file (a record header cut short ends it as truncated; a frame cut short is
decoded as it is, and decoding counts it). ``PcapngBlocks`` reads the blocks after the
section header and the first interface description, which dpkt reads (options and
all), and stops at the first block it does not read itself (a packet block with
options or lengths that disagree, an obsolete Packet Block, a block cut short), from
where dpkt reads on (``capture.pcapfile``).
"""

from __future__ import annotations

import struct
from operator import truediv
from typing import Final

from sipcdr.decode.extract import SipExtractor
from sipcdr.model import Packet

__all__ = ["PCAP_HEADER_BYTES", "PCAP_MAGICS", "PcapReader", "PcapngBlocks"]

PCAP_HEADER_BYTES: Final = 24
_RECORD_HEADER: Final = 16
# Magic -> (byte order, nanosecond times): microseconds and nanoseconds, either order.
PCAP_MAGICS: Final = {
    b"\xd4\xc3\xb2\xa1": ("<", False),
    b"\xa1\xb2\xc3\xd4": (">", False),
    b"\x4d\x3c\xb2\xa1": ("<", True),
    b"\xa1\xb2\x3c\x4d": (">", True),
}
_NANOSECONDS: Final = 1_000_000_000
_EPB: Final = 6  # Enhanced Packet Block
_PB: Final = 2  # Packet Block, obsolete: dpkt reads it
_EPB_FIXED: Final = 32  # type, length, interface, time (2), captured, original, length


class PcapReader:
    """The records of one pcap file, fed in chunks of any size, in file order."""

    __slots__ = ("_little", "_nano", "_record", "_rest", "linktype", "truncated")

    def __init__(self, header: bytes) -> None:
        """``header``: the file's first 24 bytes. ValueError if they are not a pcap
        file header."""
        if len(header) < PCAP_HEADER_BYTES or header[:4] not in PCAP_MAGICS:
            raise ValueError("not a pcap file header")
        order, self._nano = PCAP_MAGICS[header[:4]]
        self._little = order == "<"
        # The upper bits of the link-type field hold FCS information.
        self.linktype: int = struct.unpack_from(order + "I", header, 20)[0] & 0xFFFF
        # seconds, fraction, captured length, original length
        self._record = struct.Struct(order + "IIII")
        self._rest = b""
        # Set by finish: the file ended inside a record header.
        self.truncated = False

    def wanted(self) -> int:
        """Bytes the next chunk must hold at least to complete the record begun."""
        rest = self._rest
        if len(rest) < _RECORD_HEADER:
            return _RECORD_HEADER - len(rest)
        captured: int = self._record.unpack_from(rest)[2]
        return _RECORD_HEADER + captured - len(rest)

    def pending(self) -> int:
        """Bytes read of a record not yet complete: at the end of the file, the size of
        the piece of a record it was cut in."""
        return len(self._rest)

    def feed(self, chunk: bytes, extractor: SipExtractor) -> list[Packet]:
        """The SIP packets of every record the bytes read so far complete."""
        buf = self._rest + chunk if self._rest else chunk
        end = len(buf)
        pos = 0
        found: list[Packet] = []
        unpack = self._record.unpack_from
        nano = self._nano
        little = self._little
        # Typed, so that compiled code does this arithmetic on machine numbers.
        seconds: int
        fraction: int
        while end - pos >= _RECORD_HEADER:
            # The captured length read byte by byte: compiled, that costs a tenth of a
            # struct call, which is made only for the frames that are decoded.
            at = pos + 8
            if little:
                captured = buf[at] | buf[at + 1] << 8 | buf[at + 2] << 16 | buf[at + 3] << 24
            else:
                captured = buf[at] << 24 | buf[at + 1] << 16 | buf[at + 2] << 8 | buf[at + 3]
            start = pos + _RECORD_HEADER
            stop = start + captured
            if stop > end:
                break
            if not extractor.skip_media(buf, start, stop):
                seconds, fraction, _captured, _length = unpack(buf, pos)
                # Microseconds in floating point, as dpkt computes them.
                ts = _nanosecond_time(seconds, fraction) if nano else seconds + fraction / 1e6
                packets = extractor.decode(ts, buf[start:stop])
                if packets:
                    found.extend(packets)
            pos = stop
        self._rest = buf[pos:]
        return found

    def finish(self, extractor: SipExtractor) -> list[Packet]:
        """The end of the file: a record cut short in its frame is decoded as far as
        it goes, one cut in its header sets ``truncated``."""
        rest = self._rest
        self._rest = b""
        if not rest:
            return []
        if len(rest) < _RECORD_HEADER:
            self.truncated = True
            return []
        seconds: int
        fraction: int
        seconds, fraction, _captured, _length = self._record.unpack_from(rest)
        ts = _nanosecond_time(seconds, fraction) if self._nano else seconds + fraction / 1e6
        return list(extractor.feed(ts, rest[_RECORD_HEADER:]))


class PcapngBlocks:
    """The blocks of a pcapng file from a given offset on, fed in chunks of any size:
    Enhanced Packet Blocks without options are read here, other blocks skipped as dpkt
    skips them; ``stopped`` is set at the first block left to dpkt, at file offset
    ``position``."""

    __slots__ = ("_divisor", "_little", "_rest", "_ts_offset", "_u32", "position", "stopped")

    def __init__(self, little: bool, divisor: float, ts_offset: int, position: int) -> None:
        """Byte order, time resolution (ticks per second) and offset (seconds) of the
        first interface, as dpkt read them, and the file offset reading starts at."""
        self._u32 = struct.Struct("<I" if little else ">I").unpack_from
        self._little = little
        self._divisor = divisor
        self._ts_offset = ts_offset
        self._rest = b""
        self.position = position
        self.stopped = False

    def wanted(self) -> int:
        """Bytes the next chunk must hold at least to complete the block begun."""
        rest = self._rest
        if len(rest) < 8:
            return 8 - len(rest)
        length: int = self._u32(rest, 4)[0]
        return max(length - len(rest), 1)

    def feed(self, chunk: bytes, extractor: SipExtractor) -> list[Packet]:
        """The SIP packets of every block the bytes read so far complete, up to the
        first block this does not read (then ``stopped``)."""
        if self.stopped:
            return []
        buf = self._rest + chunk if self._rest else chunk
        end = len(buf)
        pos = 0
        found: list[Packet] = []
        little = self._little
        kind: int
        length: int
        captured: int
        while end - pos >= 8:
            # Block type and lengths read byte by byte, as PcapReader reads its
            # records: compiled, a tenth of a struct call each.
            kind = _word(buf, pos, little)
            length = _word(buf, pos + 4, little)
            if length < 8:
                self.stopped = True
                break
            stop = pos + length
            if stop > end:
                break
            if kind == _EPB:
                captured = _word(buf, pos + 20, little) if length >= _EPB_FIXED else -1
                if (
                    captured < 0
                    or length != _EPB_FIXED + ((captured + 3) & ~3)
                    or _word(buf, stop - 4, little) != length
                ):
                    self.stopped = True  # options, or lengths that disagree
                    break
                start = pos + 28
                if not extractor.skip_media(buf, start, start + captured):
                    high = _word(buf, pos + 12, little)
                    low = _word(buf, pos + 16, little)
                    # As dpkt computes it: the tick count divided as a float.
                    ts = self._ts_offset + ((high << 32) | low) / self._divisor
                    packets = extractor.decode(ts, buf[start : start + captured])
                    if packets:
                        found.extend(packets)
            elif kind == _PB:
                self.stopped = True
                break
            pos = stop
        self.position += pos
        self._rest = b"" if self.stopped else buf[pos:]
        return found

    def finish(self) -> None:
        """The end of the file: a block cut short is dpkt's to read."""
        if self._rest:
            self.stopped = True
            self._rest = b""


def _word(buf: bytes, at: int, little: bool) -> int:
    """The unsigned 32-bit number at ``buf[at:at + 4]`` in the file's byte order."""
    if little:
        return buf[at] | buf[at + 1] << 8 | buf[at + 2] << 16 | buf[at + 3] << 24
    return buf[at] << 24 | buf[at + 1] << 16 | buf[at + 2] << 8 | buf[at + 3]


def _nanosecond_time(seconds: int, fraction: int) -> float:
    """Exact, then rounded once, as dpkt's Decimal arithmetic gives. Compiled division
    of integers goes through a double and can round twice; operator.truediv is
    Python's own, which rounds once."""
    return float(truediv(seconds * _NANOSECONDS + fraction, _NANOSECONDS))
