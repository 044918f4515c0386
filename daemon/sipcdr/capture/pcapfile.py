"""Capture files (pcap, pcapng) to SIP ``Packet`` records.

``iter_packets`` reads a file and hands each frame to a ``SipExtractor``
(``sipcdr.decode.extract``), which does the decoding; this module only reads files.
Files are read in large chunks that ``sipcdr.decode.capfile`` splits into records (a
tenth of the cost of dpkt's record objects, and media frames are skipped where they
lie); dpkt reads a pcapng file's header blocks, and every block from the first one
``capfile`` leaves to it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Final

import dpkt

from sipcdr.decode.capfile import PCAP_HEADER_BYTES, PcapngBlocks, PcapReader
from sipcdr.decode.extract import CaptureStats, SipExtractor
from sipcdr.model import Packet

__all__ = ["CaptureFileError", "iter_packets"]

_PCAPNG_MAGIC: Final = b"\x0a\x0d\x0d\x0a"
_PCAPNG_LITTLE_ENDIAN: Final = b"\x4d\x3c\x2b\x1a"  # the byte-order magic, as written
_PCAP_MAGICS: Final = frozenset(
    {
        b"\xd4\xc3\xb2\xa1",  # microseconds, little-endian
        b"\xa1\xb2\xc3\xd4",
        b"\x4d\x3c\xb2\xa1",  # nanoseconds
        b"\xa1\xb2\x3c\x4d",
    }
)


# Bytes read at a time from a pcap file: large enough that splitting a chunk into
# records costs far more than reading it, small enough to stay in the CPU's caches.
PCAP_CHUNK_BYTES: Final = 1 << 20


class CaptureFileError(ValueError):
    """The file is not a pcap or pcapng capture, or uses a link type we cannot read."""


def _open_reader(handle: BinaryIO, path: Path) -> dpkt.pcap.Reader | dpkt.pcapng.Reader:
    magic = handle.read(4)
    handle.seek(0)
    try:
        if magic == _PCAPNG_MAGIC:
            return dpkt.pcapng.Reader(handle)
        if magic in _PCAP_MAGICS:
            return dpkt.pcap.Reader(handle)
    except (ValueError, dpkt.UnpackError, struct.error) as exc:
        raise CaptureFileError(f"{path}: unreadable capture header: {exc}") from None
    raise CaptureFileError(f"{path}: not a pcap or pcapng file (magic {magic.hex()})")


def iter_packets(
    path: Path, capture_node: str | None = None, stats: CaptureStats | None = None
) -> Iterator[Packet]:
    """Yield one ``Packet`` per SIP message in a pcap or pcapng file, in capture order.

    ``capture_node`` defaults to the file name; SIP unwrapped from HEP carries the HEP
    capture id instead. Pass ``stats`` to read the counters during or after the run.
    Raises ``CaptureFileError`` for a file that is not a capture or has an unsupported
    link type; a file cut off mid-record ends the iteration and sets
    ``stats.truncated_file``.

    pcapng: dpkt reads the first interface's link type and timestamp resolution, and
    Enhanced Packet Blocks only; files mixing interfaces of different link types are
    read as if all were the first.
    """
    if stats is None:
        stats = CaptureStats()
    node = path.name if capture_node is None else capture_node
    with path.open("rb") as handle:
        if handle.read(4) in _PCAP_MAGICS:
            handle.seek(0)
            yield from _pcap_packets(handle, path, node, stats)
            return
        handle.seek(0)
        reader = _open_reader(handle, path)
        try:
            # The upper bits of the pcap link-type field hold FCS information.
            extractor = SipExtractor(int(reader.datalink()) & 0xFFFF, node, stats)
        except ValueError as exc:
            raise CaptureFileError(str(exc)) from None
        # dpkt has read the section header and the first interface description; the
        # packet blocks after them are read in chunks, until one needs dpkt.
        after_headers = handle.tell()
        handle.seek(8)
        little = handle.read(4) == _PCAPNG_LITTLE_ENDIAN
        handle.seek(after_headers)
        blocks = PcapngBlocks(little, reader._divisor, reader._tsoffset, after_headers)
        while not blocks.stopped and (chunk := handle.read(max(PCAP_CHUNK_BYTES, blocks.wanted()))):
            yield from blocks.feed(chunk, extractor)
        blocks.finish()
        if blocks.stopped:
            handle.seek(blocks.position)
            records = iter(reader)
            while True:
                try:
                    ts, frame = next(records)
                except StopIteration:
                    break
                except (dpkt.UnpackError, struct.error, ValueError):
                    stats.truncated_file = True
                    break
                found = extractor.feed(float(ts), frame)
                if found:
                    yield from found
        extractor.close()


def _pcap_packets(handle: BinaryIO, path: Path, node: str, stats: CaptureStats) -> Iterator[Packet]:
    try:
        reader = PcapReader(handle.read(PCAP_HEADER_BYTES))
    except ValueError as exc:
        raise CaptureFileError(f"{path}: unreadable capture header: {exc}") from None
    try:
        extractor = SipExtractor(reader.linktype, node, stats)
    except ValueError as exc:
        raise CaptureFileError(str(exc)) from None
    while chunk := handle.read(max(PCAP_CHUNK_BYTES, reader.wanted())):
        yield from reader.feed(chunk, extractor)
    yield from reader.finish(extractor)
    if reader.truncated:
        stats.truncated_file = True
    extractor.close()
