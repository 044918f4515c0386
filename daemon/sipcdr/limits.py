"""The daemon's process limits: the soft limit on file descriptors raised at start,
the HEP/TCP connection limits lowered to what it holds next to everything else the
daemon opens, and large freed blocks returned to the system (`return_large_blocks`)."""

from __future__ import annotations

import ctypes
import resource
from typing import Final

from sipcdr.capture.hepstream import StreamLimits
from sipcdr.config import CaptureConfig

# Descriptors kept free of HEP/TCP and HEP/TLS connections: spool segments, JSONL files,
# sink and database connections, listeners, the metrics endpoint and the event loop's
# own, with room to spare (a running daemon holds well under 100 of them).
FD_HEADROOM = 256
# glibc's mallopt(M_MMAP_THRESHOLD): blocks at least this big get their own mapping,
# unmapped when freed.
_M_MMAP_THRESHOLD: Final = -3
LARGE_BLOCK_BYTES: Final = 1 << 20


def raise_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (an unprivileged process may);
    returns (soft, hard) as they are afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft, hard
        soft = hard
    return soft, hard


def stream_limits(capture: CaptureConfig, file_limit: int) -> StreamLimits:
    """The configured connection limits, with the total lowered to what `file_limit`
    holds next to everything else the daemon opens (a quarter of a limit too small for
    the headroom): running out of descriptors would stall the spool and the sinks, not
    only the listeners."""
    capacity = max(file_limit - FD_HEADROOM, file_limit // 4)
    return StreamLimits(
        max_connections=min(capture.hep_tcp_max_connections, capacity),
        max_per_source=capture.hep_tcp_max_per_source,
        idle_timeout_s=capture.hep_tcp_idle_timeout_s,
        frame_timeout_s=capture.hep_tcp_frame_timeout_s,
        max_buffer_bytes=capture.hep_tcp_max_buffer_bytes,
    )


def return_large_blocks() -> bool:
    """Give every block of `LARGE_BLOCK_BYTES` or more its own mapping, returned to the
    system when freed; whether the C library took it (glibc does, others are left
    alone).

    The bounded tables that churn (the fraud detectors' subjects and calls at their
    caps, the correlator's calls) are dicts of several MiB, reallocated whole each time
    their deletions fill them. glibc maps such a block only until the first one is
    freed, then raises its threshold to 32 MiB and puts the next ones on the heap,
    where the holes they leave are split by small allocations and never fit the next
    table: under a spray of new subjects the resident size kept growing (by ~40 MiB per
    million subjects) while what the tables held stayed level. Blocks below the
    threshold (every buffer of a message's path) stay on the heap as before."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES))
