"""The signaling spool's value in its former form, kept as it was: every address,
the transport and the capture node encoded per message, the end of the headers
searched for in the captured bytes, the header packed whole. The unit tests hold
`sipcdr.sipevent.spooled` to it byte for byte; `benchmarks/signaling.py` times the
two side by side.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Final

from sipcdr.model import Packet
from sipcdr.sip.message import SipMessage

_NAMESPACE: Final = bytes.fromhex("8d1c2f0a7b3e4d5f9a6b1c2d3e4f5a6b")
_NAMESPACE_SHA1: Final = hashlib.sha1(_NAMESPACE, usedforsecurity=False)
_TIME_AND_PORTS: Final = struct.Struct("<dHH")
_SPOOLED: Final = struct.Struct("<BBdHHIBBBH")
_DIGEST_BYTES: Final = 16
_BODY_KEPT: Final = 1
_DIGESTED: Final = 2
_LINE_ENDS: Final = (b"\r", b"\n")


def former_spooled(packet: Packet, msg: SipMessage, store_body: bool) -> bytes:
    timestamp, src_ip, src_port, dst_ip, dst_port, transport, payload, node = packet
    src = src_ip.encode()
    dst = dst_ip.encode()
    kept = payload
    digest = b""
    if store_body:
        flags = _BODY_KEPT
    else:
        flags = 0
        if msg.body and not payload.startswith(_LINE_ENDS):
            end = payload.find(b"\r\n\r\n")
            if end >= 0:
                kept = payload[: end + 4]
            else:
                end = payload.find(b"\n\n")
                if end >= 0:
                    kept = payload[: end + 2]
            if kept is not payload:
                flags = _DIGESTED
                digest = former_digest(timestamp, src_port, dst_port, src, dst, payload)
    transport_bytes = transport.encode()
    node_bytes = node.encode()
    return b"".join(
        (
            _SPOOLED.pack(
                1,
                flags,
                timestamp,
                src_port,
                dst_port,
                len(payload),
                len(src),
                len(dst),
                len(transport_bytes),
                len(node_bytes),
            ),
            digest,
            src,
            dst,
            transport_bytes,
            node_bytes,
            kept,
        )
    )


def former_digest(
    timestamp: float, src_port: int, dst_port: int, src: bytes, dst: bytes, payload: bytes
) -> bytes:
    hashing = _NAMESPACE_SHA1.copy()
    hashing.update(
        b"".join((_TIME_AND_PORTS.pack(timestamp, src_port, dst_port), src, b"|", dst, b"|"))
    )
    hashing.update(payload)
    return hashing.digest()[:_DIGEST_BYTES]
