"""HEP v3 frames made from a message and its addresses: what `sipcdr replay` sends
and what tests feed the listeners. The layout is `sipcdr.hep`'s, which decodes it."""

from __future__ import annotations

import socket
import zlib

from sipcdr.hep import _AF_INET, _AF_INET6, _CHUNK, _MAGIC, _U16, _U32


def _chunk(ctype: int, body: bytes) -> bytes:
    if len(body) > 0xFFFF - 6:
        raise ValueError(f"chunk {ctype:#x} too large for HEPv3: {len(body)} bytes")
    return _CHUNK.pack(0, ctype, 6 + len(body)) + body


def _address(text: str) -> tuple[int, bytes]:
    try:
        return _AF_INET, socket.inet_pton(socket.AF_INET, text)
    except OSError:
        pass
    try:
        return _AF_INET6, socket.inet_pton(socket.AF_INET6, text)
    except OSError:
        raise ValueError(f"not an IP address: {text!r}") from None


def encode(
    *,
    src_ip: str,
    dst_ip: str,
    src_port: int,
    dst_port: int,
    timestamp: float,
    payload: bytes,
    ip_protocol: int = 17,
    proto_type: int = 1,
    capture_id: int = 0,
    auth_key: str | None = None,
    correlation_id: str | None = None,
    node_name: str | None = None,
    compress: bool = False,
) -> bytes:
    """Build a HEPv3 packet; the address family follows the address text.

    Chunks go out in the order heplify uses, so ``decode`` takes its fast
    path on them. Raises ``ValueError`` for arguments HEPv3 cannot carry.
    """
    src_family, src_raw = _address(src_ip)
    dst_family, dst_raw = _address(dst_ip)
    if src_family != dst_family:
        raise ValueError(f"mixed address families: {src_ip!r} -> {dst_ip!r}")
    for name, value, bits in (
        ("src_port", src_port, 16),
        ("dst_port", dst_port, 16),
        ("ip_protocol", ip_protocol, 8),
        ("proto_type", proto_type, 8),
        ("capture_id", capture_id, 32),
    ):
        if not 0 <= value < 1 << bits:
            raise ValueError(f"{name} out of range: {value}")
    if not 0 <= timestamp < 1 << 32:
        raise ValueError(f"timestamp out of range: {timestamp}")
    ts_sec = int(timestamp)
    ts_usec = round((timestamp - ts_sec) * 1_000_000)
    if ts_usec >= 1_000_000:
        ts_sec += 1
        ts_usec -= 1_000_000
    if ts_sec >= 1 << 32:
        raise ValueError(f"timestamp out of range: {timestamp}")

    v4 = src_family == _AF_INET
    parts = [
        _chunk(0x0001, bytes((src_family,))),
        _chunk(0x0002, bytes((ip_protocol,))),
        _chunk(0x0003 if v4 else 0x0005, src_raw),
        _chunk(0x0004 if v4 else 0x0006, dst_raw),
        _chunk(0x0007, _U16.pack(src_port)),
        _chunk(0x0008, _U16.pack(dst_port)),
        _chunk(0x0009, _U32.pack(ts_sec)),
        _chunk(0x000A, _U32.pack(ts_usec)),
        _chunk(0x000B, bytes((proto_type,))),
        _chunk(0x000C, _U32.pack(capture_id)),
    ]
    if auth_key is not None:
        parts.append(_chunk(0x000E, auth_key.encode()))
    if correlation_id is not None:
        parts.append(_chunk(0x0011, correlation_id.encode()))
    if node_name is not None:
        parts.append(_chunk(0x0013, node_name.encode()))
    parts.append(_chunk(0x0010, zlib.compress(payload)) if compress else _chunk(0x000F, payload))
    body = b"".join(parts)
    total = 6 + len(body)
    if total > 0xFFFF:
        raise ValueError(f"packet too large for HEPv3: {total} bytes")
    return _MAGIC + _U16.pack(total) + body
