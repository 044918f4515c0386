"""Capture files read from their bytes: classic pcap (tcpdump's format) and the packet
blocks of pcapng.

``PcapReader`` and ``PcapngBlocks`` split chunks of a file into records and ask a
``SipExtractor`` about each frame where it lies in the chunk, so the frames it skips
unread (media: see ``prefilter``) are never copied. ``PcapReader`` reads what dpkt's
reader reads: the same times, to the bit, and the same end of a cut file; it reads a
whole pcap file (a record header cut short ends it as truncated; a frame cut short is
decoded as it is, and decoding counts it). ``PcapngBlocks`` reads every block after
the section header and the first interface description, which dpkt reads: each
packet block with its own interface's link type, time resolution and offset (times
computed as dpkt computes them for the first interface), up to the first block cut
short or whose lengths disagree, where the file ends as truncated
(``capture.pcapfile``).
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
_SPB: Final = 3  # Simple Packet Block: interface 0, no time
_SPB_FIXED: Final = 16  # type, length, original length, length
_IDB: Final = 1  # Interface Description Block
_IDB_FIXED: Final = 20  # type, length, link type and reserved, snap length, length
_SHB: Final = 0x0A0D0D0A  # Section Header Block
_IF_TSRESOL: Final = 9
_IF_TSOFFSET: Final = 14
# Larger than any packet block a capture tool writes (Wireshark refuses blocks over
# 16 MiB): a length above it is damage, not a block to buffer the rest of the file for.
_MAX_BLOCK: Final = 1 << 26
_SHB_LITTLE: Final = b"\x4d\x3c\x2b\x1a"  # byte-order magic, little-endian
_SHB_BIG: Final = b"\x1a\x2b\x3c\x4d"
# The end of year 9999: a packet time past it (or before 1970), which a huge
# if_tsoffset or tick count gives, has no calendar date for a record or row to hold.
_LATEST: Final = 253402300800.0


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
    """The blocks of a pcapng file from a given offset on, fed in chunks of any size.

    Each packet block is read with its own interface's link type, time resolution and
    offset: Interface Description Blocks are read here as they come (a Section Header
    Block forgets them), Enhanced and obsolete Packet Blocks find theirs by interface
    id, Simple Packet Blocks belong to interface 0 and, having no time, take the last
    packet's. A packet block naming an interface not yet described, or one whose link
    type is not read, is counted (``CaptureStats.unknown_interface``,
    ``unsupported_link``). Other blocks are skipped. ``stopped`` is set at the first
    block whose lengths disagree or that the file cuts short, at file offset
    ``position``: the file is read no further."""

    __slots__ = (
        "_divisors",
        "_extractors",
        "_first",
        "_last_ts",
        "_little",
        "_offsets",
        "_rest",
        "_siblings",
        "_u32",
        "position",
        "stopped",
    )

    def __init__(self, little: bool, divisor: float, ts_offset: int, position: int) -> None:
        """Byte order, time resolution (ticks per second) and offset (seconds) of the
        first interface, as dpkt read them, and the file offset reading starts at. That
        interface's frames go to the extractor ``feed`` is given."""
        self._u32 = struct.Struct("<I" if little else ">I").unpack_from
        self._little = little
        # Per interface, by id: a short list indexed per packet, no dictionary.
        self._extractors: list[SipExtractor | None] = [None]
        self._divisors: list[float] = [divisor]
        self._offsets: list[int] = [ts_offset]
        self._first = True  # interface 0 still waits for feed's extractor
        self._last_ts = 0.0
        # One extractor per link type, however many interfaces name it: a file of a
        # million interface descriptions holds a million list slots, not extractors.
        self._siblings: dict[int, SipExtractor | None] = {}
        self._rest = b""
        self.position = position
        self.stopped = False

    def wanted(self) -> int:
        """Bytes the next chunk must hold at least to complete the block begun."""
        rest = self._rest
        if len(rest) < 8:
            return 8 - len(rest)
        if len(rest) < 12 and rest[:4] == b"\x0a\x0d\x0d\x0a":
            return 12 - len(rest)  # a section header's length is in its own byte order
        length: int = self._u32(rest, 4)[0]
        return max(length - len(rest), 1)

    def feed(self, chunk: bytes, extractor: SipExtractor) -> list[Packet]:
        """The SIP packets of every block the bytes read so far complete, up to the
        first block this does not read (then ``stopped``)."""
        if self.stopped:
            return []
        if self._first:
            self._extractors[0] = extractor
            self._first = False
        buf = self._rest + chunk if self._rest else chunk
        end = len(buf)
        pos = 0
        found: list[Packet] = []
        little = self._little
        extractors = self._extractors
        divisors = self._divisors
        offsets = self._offsets
        kind: int
        length: int
        captured: int
        iface: int
        while end - pos >= 8:
            # Block type and lengths read byte by byte, as PcapReader reads its
            # records: compiled, a tenth of a struct call each.
            kind = _word(buf, pos, little)
            if kind == _SHB:
                # A new section may be in the other byte order (captures joined end
                # to end): its magic, not the last section's order, reads its lengths.
                if end - pos < 12:
                    break
                magic = buf[pos + 8 : pos + 12]
                if magic not in (_SHB_LITTLE, _SHB_BIG):
                    self.stopped = True
                    break
                little = magic == _SHB_LITTLE
                if little != self._little:
                    self._little = little
                    self._u32 = struct.Struct("<I" if little else ">I").unpack_from
            length = _word(buf, pos + 4, little)
            if length < 8 or length > _MAX_BLOCK:
                self.stopped = True
                break
            stop = pos + length
            if stop > end:
                break
            if kind == _EPB and length >= _EPB_FIXED:
                # The common block, inline: _packet reads it the same way.
                captured = _word(buf, pos + 20, little)
                if (
                    _word(buf, stop - 4, little) != length
                    or _EPB_FIXED + ((captured + 3) & ~3) > length
                ):
                    self.stopped = True  # lengths that disagree
                    break
                iface = _word(buf, pos + 8, little)
                reader = extractors[iface] if iface < len(extractors) else None
                if reader is None:
                    self._reject(iface, extractor)
                else:
                    start = pos + 28
                    if not reader.skip_media(buf, start, start + captured):
                        high = _word(buf, pos + 12, little)
                        low = _word(buf, pos + 16, little)
                        # As dpkt computes it: the tick count divided as a float.
                        ts = offsets[iface] + ((high << 32) | low) / divisors[iface]
                        if 0.0 <= ts < _LATEST:
                            self._last_ts = ts
                            packets = reader.decode(ts, buf[start : start + captured])
                            if packets:
                                found.extend(packets)
                        else:
                            reader.stats.bad_time += 1
            else:
                if not self._block(buf, pos, kind, length, extractor, found):
                    self.stopped = True  # lengths that disagree
                    break
                # An interface description or a new section changes the lists.
                extractors = self._extractors
                divisors = self._divisors
                offsets = self._offsets
            pos = stop
        self.position += pos
        self._rest = b"" if self.stopped else buf[pos:]
        return found

    def _block(
        self,
        buf: bytes,
        pos: int,
        kind: int,
        length: int,
        extractor: SipExtractor,
        found: list[Packet],
    ) -> bool:
        """The whole block at ``pos`` read, its SIP put in ``found``; False if its
        lengths disagree."""
        little = self._little
        if kind in (_EPB, _PB, _SPB, _IDB) and (
            length < 12 or _word(buf, pos + length - 4, little) != length
        ):
            return False  # as dpkt reads them: these, and only these, are checked
        if kind in (_EPB, _PB, _SPB):
            return self._packet(buf, pos, kind, length, extractor, found)
        if kind == _IDB:
            if length < _IDB_FIXED:
                return False
            self.describe(buf, pos, length, extractor)
        elif kind == _SHB:
            # A new section (files joined end to end): its interfaces are its own.
            self._extractors = []
            self._divisors = []
            self._offsets = []
        return True

    def _packet(
        self,
        buf: bytes,
        pos: int,
        kind: int,
        length: int,
        extractor: SipExtractor,
        found: list[Packet],
    ) -> bool:
        """The packet block at ``pos`` decoded into ``found``; False if its captured
        length does not fit in the block."""
        little = self._little
        captured: int
        iface: int
        if kind == _SPB:
            if length < _SPB_FIXED:
                return False
            # No captured length: the original one, up to what the block holds.
            captured = min(_word(buf, pos + 8, little), length - _SPB_FIXED)
            start = pos + 12
            iface = 0
        else:
            if length < _EPB_FIXED:
                return False
            captured = _word(buf, pos + 20, little)
            if _EPB_FIXED + ((captured + 3) & ~3) > length:
                return False
            start = pos + 28
            iface = _word(buf, pos + 8, little)
            if kind == _PB:
                # 16-bit interface id, then a 16-bit drops count.
                iface = iface & 0xFFFF if little else iface >> 16
        extractors = self._extractors
        reader = extractors[iface] if iface < len(extractors) else None
        if reader is None:
            self._reject(iface, extractor)
            return True
        if reader.skip_media(buf, start, start + captured):
            return True
        if kind == _SPB:
            ts = self._last_ts
        else:
            high = _word(buf, pos + 12, little)
            low = _word(buf, pos + 16, little)
            # As dpkt computes it: the tick count divided as a float.
            ts = self._offsets[iface] + ((high << 32) | low) / self._divisors[iface]
            if not 0.0 <= ts < _LATEST:
                reader.stats.bad_time += 1
                return True
            self._last_ts = ts
        packets = reader.decode(ts, buf[start : start + captured])
        if packets:
            found.extend(packets)
        return True

    def _reject(self, iface: int, extractor: SipExtractor) -> None:
        """A packet block of interface ``iface``, which is not read: counted."""
        if iface >= len(self._extractors):
            extractor.stats.unknown_interface += 1
        else:
            extractor.stats.unsupported_link += 1

    def describe(self, buf: bytes, pos: int, length: int, extractor: SipExtractor) -> None:
        """The Interface Description Block at ``pos``: the next interface id gets its
        link type, resolution (if_tsresol) and offset (if_tsoffset)."""
        little = self._little
        word = _word(buf, pos + 8, little)
        linktype = word & 0xFFFF if little else word >> 16
        divisor = 1e6
        offset = 0
        at = pos + _IDB_FIXED - 4
        body_end = pos + length - 4
        # Options: 16-bit code and length, value padded to 32 bits; end or a truncated
        # option ends them (the block's own lengths were checked).
        while at + 4 <= body_end:
            word = _word(buf, at, little)
            code = word & 0xFFFF if little else word >> 16
            size = word >> 16 if little else word & 0xFFFF
            value = at + 4
            if code == 0 or value + size > body_end:
                break
            if code == _IF_TSRESOL and size >= 1:
                resol = buf[value]
                # High bit set: a negative power of two, else of ten (as dpkt reads it).
                divisor = float((2 if resol & 0x80 else 10) ** (resol & 0x7F))
            elif code == _IF_TSOFFSET and size >= 8:
                offset = int.from_bytes(
                    buf[value : value + 8], "little" if little else "big", signed=True
                )
            at = value + ((size + 3) & ~3)
        if linktype in self._siblings:
            reader: SipExtractor | None = self._siblings[linktype]
        else:
            try:
                reader = extractor.sibling(linktype)
            except ValueError:
                reader = None
            self._siblings[linktype] = reader
        self._extractors.append(reader)
        self._divisors.append(divisor)
        self._offsets.append(offset)

    def finish(self) -> None:
        """The end of the file: a block cut short stops the reading there."""
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
