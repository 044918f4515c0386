"""A stream's segment files, as the writer keeps them (`Spool`) and as a reader in
another process finds them (`SpoolTail`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mypy_extensions import mypyc_attr

from sipcdr.spool.records import SEGMENT_SUFFIX


@dataclass(slots=True)
class _Segment:
    first_seq: int
    path: Path
    size: int  # the writer's: what it completed; a tail's: what it last saw


def list_segments(directory: Path) -> list[_Segment]:
    """The segment files in `directory`, oldest first."""
    found: list[_Segment] = []
    for path in directory.glob(f"*{SEGMENT_SUFFIX}"):
        if not path.stem.isdigit():
            continue
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue  # deleted meanwhile
        found.append(_Segment(int(path.stem), path, size))
    return sorted(found, key=lambda segment: segment.first_seq)


@mypyc_attr(allow_interpreted_subclasses=True)
class Segments:
    """What a `SpoolReader` asks of the stream it reads."""

    _segments: list[_Segment]
    # Written by another process (`SpoolTail`): a segment's end is its file's size. A
    # class attribute, not a slot, so that compiled and interpreted code read one value.
    tailing: ClassVar[bool] = False

    def growing(self, segment: _Segment) -> bool:
        """Whether a record cut short at the end of `segment` may still be completed."""
        return False

    def refresh(self) -> None:
        """Find segments another process created or deleted (`SpoolTail`)."""

    def _segment_after(self, first_seq: int) -> _Segment | None:
        for segment in self._segments:
            if segment.first_seq > first_seq:
                return segment
        return None

    def _segment_for(self, seq: int) -> _Segment:
        """The segment holding `seq`, or the oldest one when it is older than all."""
        found = self._segments[0]
        for segment in self._segments:
            if segment.first_seq <= seq:
                found = segment
            else:
                break
        return found
