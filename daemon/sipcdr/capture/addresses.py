"""Listener addresses that cannot be opened, named as the configuration names them: the
key and the address (`capture.sip_udp 0.0.0.0:5060: cannot listen there (address
already in use)`), instead of an errno without either."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence

from sipcdr.capture.listeners import udp_socket

__all__ = ["ListenerError", "named_udp_socket", "unbound_stream"]


class ListenerError(OSError):
    """A listener that cannot be opened, named by its config key and address."""

    def __init__(self, key: str, address: str, exc: OSError) -> None:
        # asyncio's own bind errors repeat the address in strerror; the errno's text
        # is the plain reason.
        reason = os.strerror(exc.errno) if exc.errno else exc.strerror or str(exc)
        super().__init__(f"{key} {address}: cannot listen there ({reason[:1].lower()}{reason[1:]})")


def named_udp_socket(
    key: str, endpoint: object, host: str, port: int, rcvbuf: int
) -> socket.socket:
    """`udp_socket`, raising ListenerError naming `key` and `endpoint` (as configured)."""
    try:
        return udp_socket(host, port, rcvbuf)
    except OSError as exc:
        raise ListenerError(key, str(endpoint), exc) from None


def unbound_stream(
    bound: Mapping[str, Sequence[object]], listeners: Sequence[tuple[str, Sequence[object]]]
) -> tuple[str, str]:
    """The key and address a failed start of stream listeners stopped at: they are
    opened in the order of `listeners` ((kind, configured endpoints)), so it is the first
    one not in `bound` yet."""
    for kind, endpoints in listeners:
        done = len(bound.get(kind, ()))
        if done < len(endpoints):
            return f"capture.{kind}", str(endpoints[done])
    every = [str(endpoint) for _kind, endpoints in listeners for endpoint in endpoints]
    return "capture." + "/".join(kind for kind, _ in listeners), ", ".join(every)
