"""sipcdr: passive SIP capture into rated Call Detail Records."""

from sipcdr import hotpath

__version__ = "0.1.0"

# Before any hot-path module is imported: compiled or interpreted, once per process.
hotpath.install()
