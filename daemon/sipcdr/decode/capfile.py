"""Classic pcap files (tcpdump's format), read from their bytes.

``PcapReader`` splits chunks of a file into records and asks a ``SipExtractor`` about
each frame where it lies in the chunk, so the frames it skips unread (media: see
``prefilter``) are never copied. It reads what dpkt's pcap reader reads:
the same times, to the bit, and the same end of a cut file (a record header cut short
ends the file as truncated; a frame cut short is decoded as it is, and decoding counts
it). pcapng files are read with dpkt (``capture.pcapfile``).
"""

from __future__ import annotations

import struct
from operator import truediv
from typing import Final

from sipcdr.decode.extract import SipExtractor
from sipcdr.model import Packet

__all__ = ["PCAP_HEADER_BYTES", "PCAP_MAGICS", "PcapReader"]

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


def _nanosecond_time(seconds: int, fraction: int) -> float:
    """Exact, then rounded once, as dpkt's Decimal arithmetic gives. Compiled division
    of integers goes through a double and can round twice; operator.truediv is
    Python's own, which rounds once."""
    return float(truediv(seconds * _NANOSECONDS + fraction, _NANOSECONDS))
