"""Spool segments past retention: deleted whether every sink has them or not, readers
moved past them, their undelivered records counted as dropped, never as corrupt."""

from __future__ import annotations

import os
import time
from pathlib import Path

from sipcdr.sinks.base import KIND_CDR
from sipcdr.spool import Spool
from sipcdr.spool.records import parse_segment_name

OLD = time.time() - 400 * 86400


def fill(spool: Spool, count: int) -> None:
    for n in range(count):
        assert spool.append(KIND_CDR, b"k%d" % n, b'{"n":%d,"pad":"%s"}' % (n, b"x" * 40))


def seqs(spool: Spool, name: str, *, commit: bool = True) -> list[int]:
    reader = spool.reader(name)
    found: list[int] = []
    while batch := reader.read(5, 1 << 20):
        found += [record.seq for record in batch]
        if commit:
            reader.commit()
    return found


def first_seq(path: Path) -> int:
    named = parse_segment_name(path.name)
    assert named is not None, path
    return named[0]


def age(spool: Spool, segments: int) -> list[int]:
    """Make the oldest `segments` segment files look written long ago; their first
    sequence numbers, and the first one of the segment after them."""
    paths = sorted(spool.directory.glob("*.seg"))
    for path in paths[:segments]:
        os.utime(path, (OLD, OLD))
    return [first_seq(path) for path in paths[: segments + 1]]


def test_expired_segments_go_and_a_reader_behind_skips_them(tmp_path: Path) -> None:
    with Spool(tmp_path, ("fast", "slow"), segment_bytes=400) as spool:
        fill(spool, 40)
        seqs(spool, "fast")  # the other sink is down: nothing of its is confirmed
        assert spool.segments > 3
        firsts = age(spool, 2)
        dropped = spool.expire_segments(time.time() - 90 * 86400)
        assert dropped == firsts[2] - 1  # every record of the two segments, unconfirmed
        assert spool.stats.dropped == {"retention": dropped}
        assert min(first_seq(p) for p in tmp_path.glob("*.seg")) == firsts[2]
        assert seqs(spool, "slow") == list(range(firsts[2], 41))
        assert spool.reader("slow").corrupt_records == 0
        # Nothing else is old: a second run removes nothing.
        assert spool.expire_segments(time.time() - 90 * 86400) == 0


def test_a_batch_in_flight_from_an_expired_segment_commits_past_it(tmp_path: Path) -> None:
    with Spool(tmp_path, ("only",), segment_bytes=400) as spool:
        fill(spool, 40)
        reader = spool.reader("only")
        batch = reader.read(3, 1 << 20)
        assert [record.seq for record in batch] == [1, 2, 3]
        firsts = age(spool, 1)
        assert spool.expire_segments(time.time() - 86400) == firsts[1] - 1
        reader.commit()  # the sink confirmed the batch it had read
        assert reader.confirmed_seq == firsts[1]
        assert seqs(spool, "only") == list(range(firsts[1], 41))
    with Spool(tmp_path, ("only",), segment_bytes=400) as spool:
        assert spool.reader("only").confirmed_seq == 41  # the cursor survived


def test_the_active_segment_and_what_every_sink_has_are_not_counted(tmp_path: Path) -> None:
    with Spool(tmp_path, ("a",), segment_bytes=100_000) as spool:
        fill(spool, 10)
        age(spool, 1)  # the only, active segment
        assert spool.expire_segments(time.time()) == 0
        assert spool.segments == 1
        assert len(seqs(spool, "a")) == 10
