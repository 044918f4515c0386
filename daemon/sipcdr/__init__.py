"""sipcdr: passive SIP capture into rated Call Detail Records."""

import sys

from sipcdr import hotpath

__version__ = "0.1.0"

# Before any hot-path module is imported: compiled or interpreted, once per process.
hotpath.install()


def _load_structlog() -> None:
    """structlog imports rich (and pygments through it) whenever rich is installed, for
    its console renderer's tracebacks: a third of every start's imports, `sipcdr
    import` included. Exceptions reach the renderer already formatted as text
    (`telemetry.logs`), so structlog is loaded with rich out of its sight; rich itself
    is imported later by whatever draws with it (the import's progress bar)."""
    if "structlog" in sys.modules:
        return
    hidden = "rich" not in sys.modules
    if hidden:
        sys.modules["rich"] = None  # type: ignore[assignment]  # import rich: ImportError
    try:
        import structlog  # noqa: F401, PLC0415
    finally:
        if hidden:
            del sys.modules["rich"]


_load_structlog()
