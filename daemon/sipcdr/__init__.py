"""sipcdr: passive SIP capture into rated Call Detail Records."""

__version__ = "0.1.0"
