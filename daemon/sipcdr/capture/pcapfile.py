"""Capture files (pcap, pcapng) to SIP ``Packet`` records.

``iter_packets`` reads a file and hands each frame to a ``SipExtractor``
(``sipcdr.decode.extract``), which does the decoding; this module only reads files.
Files are read in large chunks that ``sipcdr.decode.capfile`` splits into records (a
tenth of the cost of dpkt's record objects, and media frames are skipped where they
lie); dpkt reads a pcapng file's section header and first interface description.

A capture compressed with gzip, bzip2 or xz is read through its decompressor (rotated
captures are often kept compressed); other compressions, and files that are not
captures at all, raise ``CaptureFileError`` naming the file and what it holds.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import stat
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final, Protocol, cast

from sipcdr.decode.capfile import PCAP_HEADER_BYTES, PcapngBlocks, PcapReader
from sipcdr.decode.extract import CaptureStats, SipExtractor
from sipcdr.model import Packet

if TYPE_CHECKING:
    import dpkt

__all__ = ["CaptureFileError", "check_capture", "iter_packet_batches", "iter_packets"]

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


# Leading bytes of compressed files: those with a decompressor in the standard library
# are read through it, the others are named in the error.
_DECOMPRESSORS: Final = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
)
_OTHER_COMPRESSIONS: Final = (
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"PK\x03\x04", "zip"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
)


class CaptureFileError(ValueError):
    """The file is not a pcap or pcapng capture, or uses a link type we cannot read.
    The message starts with the file's path."""


def check_capture(path: Path) -> None:
    """Raise ``CaptureFileError`` (one line, naming ``path``) when ``path`` cannot be
    read as a capture: missing, a directory, empty, unreadable, compressed in a way not
    read here, or not a pcap/pcapng file. Reads the first bytes only; a FIFO or device
    is left to the reader, since reading would consume what it holds."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CaptureFileError(f"{path}: no such file") from None
    except OSError as exc:
        raise CaptureFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise CaptureFileError(f"{path}: a directory, not a capture file (name the files in it)")
    if not stat.S_ISREG(mode):
        return
    try:
        with _open(path) as handle:
            magic = handle.read(4)
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise CaptureFileError(f"{path}: cannot be read ({_reason(exc)})") from None
    if magic != _PCAPNG_MAGIC and magic not in _PCAP_MAGICS:
        raise CaptureFileError(_not_a_capture(path, magic))


def _open(path: Path) -> BinaryIO:
    """The file, through its decompressor when it is compressed in a format the standard
    library reads; ``CaptureFileError`` for the other compressions."""
    handle = path.open("rb")
    try:
        # Peeked, not read: a FIFO cannot seek back.
        head = handle.peek(6)[:6]
    except OSError:
        handle.close()
        raise
    for magic, name in _DECOMPRESSORS:
        if head.startswith(magic):
            if name == "gzip":
                return cast(BinaryIO, gzip.GzipFile(fileobj=handle, mode="rb"))
            if name == "bzip2":
                return cast(BinaryIO, bz2.BZ2File(handle))
            return cast(BinaryIO, lzma.LZMAFile(handle))
    for magic, name in _OTHER_COMPRESSIONS:
        if head.startswith(magic):
            handle.close()
            raise CaptureFileError(
                f"{path}: compressed with {name}, which is not read directly: "
                "decompress it first (gzip, bzip2 and xz are read as they are)"
            )
    return handle


class _Peekable(Protocol):
    def peek(self, size: int = 0, /) -> bytes: ...


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _not_a_capture(path: Path, magic: bytes) -> str:
    if not magic:
        return f"{path}: empty file, no capture in it"
    text = magic.isascii() and all(32 <= b < 127 or b in b"\t\r\n" for b in magic)
    what = "text" if text else f"starts with {magic.hex()}"
    return f"{path}: not a pcap or pcapng capture ({what})"


def _open_reader(handle: BinaryIO, path: Path) -> dpkt.pcap.Reader | dpkt.pcapng.Reader:
    # Here, not at the top: dpkt's import is a tenth of a second of every start, and
    # only pcapng files (their first header blocks) need it.
    import dpkt  # noqa: PLC0415

    magic = handle.read(4)
    handle.seek(0)
    try:
        if magic == _PCAPNG_MAGIC:
            return dpkt.pcapng.Reader(handle)
        if magic in _PCAP_MAGICS:
            return dpkt.pcap.Reader(handle)
    except (ValueError, dpkt.UnpackError, struct.error) as exc:
        raise CaptureFileError(f"{path}: unreadable capture header: {exc}") from None
    raise CaptureFileError(_not_a_capture(path, magic))


def iter_packets(
    path: Path, capture_node: str | None = None, stats: CaptureStats | None = None
) -> Iterator[Packet]:
    """Yield one ``Packet`` per SIP message in a pcap or pcapng file, in capture order.

    ``capture_node`` defaults to the file name; SIP unwrapped from HEP carries the HEP
    capture id instead. Pass ``stats`` to read the counters during or after the run.
    Raises ``CaptureFileError`` for a file that is not a capture or has an unsupported
    link type; a file cut off mid-record ends the iteration and sets
    ``stats.truncated_file``, and ``stats.truncated_at`` to where that record begins.

    pcapng: each Enhanced (or obsolete) Packet Block is read with the link type, time
    resolution (if_tsresol) and offset (if_tsoffset) of the interface it names, so a
    capture of several interfaces (Ethernet and raw IP, microsecond and nanosecond
    times) reads whole; Simple Packet Blocks belong to interface 0 and take the time
    of the packet before them. A block naming an interface no description gave counts
    in ``stats.unknown_interface``, one of an interface whose link type is not read in
    ``stats.unsupported_link`` (only the first interface's link type must be read).
    A block cut short, whose lengths disagree or that claims more than 64 MiB ends the
    file as truncated there; a later section may be in the other byte order. A packet
    timed before 1970 or after 9999 (a hostile if_tsoffset) counts in
    ``stats.bad_time``.
    """
    for batch in iter_packet_batches(path, capture_node, stats):
        yield from batch


def node_of(path: Path) -> str:
    """The capture node of a file's packets: its name, with bytes that are not UTF-8
    (kept by the file system as surrogates) shown as U+FFFD, since a surrogate cannot
    be written into a CDR's JSON, a signaling record or a database row."""
    return path.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def iter_packet_batches(
    path: Path, capture_node: str | None = None, stats: CaptureStats | None = None
) -> Iterator[Sequence[Packet]]:
    """``iter_packets`` in the batches the file's chunks give (up to a few thousand packets
    each, in capture order; never empty): a caller that loops over each batch itself
    resumes no generator per packet, which a SIP-only capture feels (~0.2 µs a packet
    through the generators ``iter_packets`` stacks)."""
    if stats is None:
        stats = CaptureStats()
    node = node_of(path) if capture_node is None else capture_node
    check_capture(path)
    try:
        yield from _packets(path, node, stats)
    except EOFError:
        # A compressed file cut short: like a capture cut mid-record, at an offset
        # the decompressor does not tell.
        stats.truncated_file = True
    except (zlib.error, lzma.LZMAError, OSError) as exc:
        raise CaptureFileError(f"{path}: cannot be read ({_reason(exc)})") from None


def _packets(path: Path, node: str, stats: CaptureStats) -> Iterator[Sequence[Packet]]:
    with _open(path) as handle:
        if cast("_Peekable", handle).peek(4)[:4] in _PCAP_MAGICS:
            yield from _pcap_packets(handle, path, node, stats)
            return
        handle.seek(0)
        reader = _open_reader(handle, path)
        try:
            # The upper bits of the pcap link-type field hold FCS information.
            extractor = SipExtractor(int(reader.datalink()) & 0xFFFF, node, stats)
        except ValueError as exc:
            raise CaptureFileError(f"{path}: {exc}") from None
        # dpkt has read the section header and the first interface description; the
        # blocks after them are read in chunks.
        after_headers = handle.tell()
        handle.seek(8)
        little = handle.read(4) == _PCAPNG_LITTLE_ENDIAN
        handle.seek(after_headers)
        blocks = PcapngBlocks(little, reader._divisor, reader._tsoffset, after_headers)
        while not blocks.stopped and (chunk := handle.read(max(PCAP_CHUNK_BYTES, blocks.wanted()))):
            if found := blocks.feed(chunk, extractor):
                yield found
        blocks.finish()
        if blocks.stopped:
            # A block cut short or whose lengths disagree: the file was cut or
            # damaged there, and nothing after it can be trusted to be a block.
            stats.truncated_file = True
            stats.truncated_at = blocks.position
        extractor.close()


def _pcap_packets(
    handle: BinaryIO, path: Path, node: str, stats: CaptureStats
) -> Iterator[Sequence[Packet]]:
    try:
        reader = PcapReader(handle.read(PCAP_HEADER_BYTES))
    except ValueError as exc:
        raise CaptureFileError(f"{path}: unreadable capture header: {exc}") from None
    try:
        extractor = SipExtractor(reader.linktype, node, stats)
    except ValueError as exc:
        raise CaptureFileError(f"{path}: {exc}") from None
    offset = PCAP_HEADER_BYTES
    while chunk := handle.read(max(PCAP_CHUNK_BYTES, reader.wanted())):
        offset += len(chunk)
        if found := reader.feed(chunk, extractor):
            yield found
    pending = reader.pending()
    if found := reader.finish(extractor):
        yield found
    if pending:
        # A record cut in its header or in its frame: what was captured of the frame
        # is decoded (and counted short by decoding), but the file was cut there.
        stats.truncated_file = True
        stats.truncated_at = offset - pending
    extractor.close()
