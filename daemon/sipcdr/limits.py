"""The daemon's file descriptors: the soft limit raised at start, and the HEP/TCP
connection limits lowered to what it holds next to everything else the daemon opens."""

from __future__ import annotations

import resource

from sipcdr.capture.hepstream import StreamLimits
from sipcdr.config import CaptureConfig

# Descriptors kept free of HEP/TCP and HEP/TLS connections: spool segments, JSONL files,
# sink and database connections, listeners, the metrics endpoint and the event loop's
# own, with room to spare (a running daemon holds well under 100 of them).
FD_HEADROOM = 256


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
