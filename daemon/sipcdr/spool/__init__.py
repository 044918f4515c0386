"""The durable write-ahead spool between the correlator and the sinks.

Every closed CDR and fraud alert is appended here before anything else happens to
it; each sink then reads with its own cursor and moves that cursor only after its
destination confirmed the write. A sink that is down, slow or restarted resumes
from its cursor, so nothing closed is lost and nothing needs to be held in memory
(except, bounded, what a full disk refuses: see below).

On disk, one directory per stream holds segment files named by the sequence number
of their first record and the seed of their CRCs (`00000000000000000001-9f86d081.seg`)
and one cursor file per sink (`cursors/<sink>.cursor`). A record is

    magic u16 | kind u8 | key length u16 | value length u32 | seq u64 | crc32 u32
    | key | value

with the CRC over everything before it and after it, started from the segment's seed,
so a torn write, a flipped bit or a record from another stream is recognised, and a
record forged inside a captured value is not taken for one: the seed is random, drawn
by the writer at each open (kept for a newest segment with no whole record that it
writes on into), and in nothing captured. Segments of earlier versions
(`00000000000000000001.seg`) have seed 0 and are only read. Sequence numbers increase
by one per record across segments, which makes the records lost to corruption
countable.

Durability:
- Appends are written to the segment file at once with one `write` call per record,
  so a killed process (SIGKILL, OOM) loses nothing it appended; the signaling stream,
  which is a hundred times the volume, batches its writes (`buffered=True`) and loses
  at most its unwritten buffer.
- `sync()` fsyncs the active segment; the delivery loop calls it every
  `DEFAULT_FSYNC_INTERVAL_S`, which bounds what a power loss can take.
- A cursor file is created, at its full size, when its reader is, and afterwards only
  rewritten in place, so saving a cursor needs no new disk space. It holds two
  checksummed slots 4 KiB apart (separate pages and sectors on any disk), written in
  turn: a torn write spoils one, and the other still holds the previous position.
  Cursors are not fsynced: a cursor that goes back after a power loss re-delivers
  records, which every sink deduplicates; it never skips one.

A full or failing disk:
- A write that fails (ENOSPC, EIO) or is cut short is cut back to the last whole
  record, so nothing torn is left for the next record to hide behind; if the cut
  itself fails, the readers skip the torn bytes. No sequence number is spent on a
  record that was not written, so a failed write leaves neither a gap nor a backlog.
- The CDR stream keeps what it could not write in a bounded in-memory reserve
  (`reserve_records`), each record encoded once, numbered in the order it will be
  written, and writes it, in order, before anything newer. While the reserve holds
  records an append only joins it: the write is tried again on every `flush` (the
  tick, the delivery loop's sync), so a refusing disk costs the capture path no
  system call. `append` says whether a record is on disk (`WRITTEN`) or waits in the
  reserve (`HELD`); `on_reserve_written` is told of each held record once it is on
  disk, which is when the dialog journal may record its call as closed. A record in
  the reserve lives in memory only: the owner keeps it durable elsewhere (the dialog
  checkpoint carries held CDRs) and may take it back at a stop (`take_reserve`). While
  the reserve holds records the daemon refuses new calls as it does for a full spool;
  a record is lost only when the reserve is full.
- A write refused for want of space (ENOSPC, EDQUOT) first asks `on_no_space` to make
  room (the daemon's spare file) and, when it did, is tried once more at once.
- The buffered signaling stream refuses records while the filesystem's free space is
  below `min_free_bytes`, so signaling gives way before CDRs run out of room. The
  free space is read at most once a second, or sooner when what was written since
  could have crossed the floor: never per record. It refuses them as well, with the
  same reason, while its owner keeps the disk's room for CDRs (`room_withheld`: the
  daemon, while the room its spare file gave is for the calls already open), however
  much of that room is free.
- A cursor that cannot be saved keeps its position in memory, so the sink goes on
  and segments it passed are still deleted; the file is written again later.

Recovery: at open, the newest segment (the only one that was being written) is
scanned; a torn or corrupt tail is cut off and counted. Corruption inside a segment
is skipped by each reader, which finds the next valid record and counts the records
missing between the two sequence numbers.

Size: `max_bytes` bounds all segments of a stream. When it is reached, `full_policy`
decides: `drop_newest` refuses new records (counted, and the delivery loop logs it at
ERROR), `block` keeps writing and raises `full`, on which the daemon stops taking in
signaling (every refused packet counted) until the sinks have caught up below
`RESUME_FRACTION` of the limit. Blocking overshoots the limit only by what the calls
already open still close, which the dialog limits bound.
"""

from sipcdr.spool.reader import SpoolReader
from sipcdr.spool.records import (
    CURSOR_SUFFIX,
    DEFAULT_CDR_RESERVE_RECORDS,
    DEFAULT_FSYNC_INTERVAL_S,
    DEFAULT_FULL_POLICY,
    DEFAULT_MAX_BYTES,
    DEFAULT_SEGMENT_BYTES,
    DEFAULT_SIGNALING_MAX_BYTES,
    DEFAULT_SIGNALING_MIN_FREE_BYTES,
    FULL_POLICIES,
    HEADER_BYTES,
    MAGIC,
    MAX_VALUE_BYTES,
    RESUME_FRACTION,
    SEGMENT_SUFFIX,
)
from sipcdr.spool.writer import Appended, Spool, SpoolError, SpoolStats

__all__ = [
    "CURSOR_SUFFIX",
    "DEFAULT_CDR_RESERVE_RECORDS",
    "DEFAULT_FSYNC_INTERVAL_S",
    "DEFAULT_FULL_POLICY",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_SEGMENT_BYTES",
    "DEFAULT_SIGNALING_MAX_BYTES",
    "DEFAULT_SIGNALING_MIN_FREE_BYTES",
    "FULL_POLICIES",
    "HEADER_BYTES",
    "MAGIC",
    "MAX_VALUE_BYTES",
    "RESUME_FRACTION",
    "SEGMENT_SUFFIX",
    "Appended",
    "Spool",
    "SpoolError",
    "SpoolReader",
    "SpoolStats",
]
