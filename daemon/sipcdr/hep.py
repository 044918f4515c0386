"""HEP (Homer Encapsulation Protocol) codec: HEPv3 decode/encode, HEPv1/v2 decode.

Pure functions over bytes. ``decode`` is on the capture hot path and is fed
untrusted datagrams, so every malformed input ends in ``HepError`` with a short
machine-readable ``reason`` that callers can use as a metric label:

    truncated               fewer bytes than the header or HEPv3 total length says
    bad_magic               neither "HEP3" nor a HEPv1/v2 version byte
    bad_version             "HEP" followed by something other than "3"
    bad_length              HEPv3 total length smaller than its own header
    zero_length_chunk       chunk length below the 6-byte chunk header
    chunk_overrun           chunk runs past the HEPv3 total length
    bad_address_length      IPv4/IPv6 address chunk of the wrong size
    bad_chunk_length        other fixed-size generic chunk of the wrong size
    bad_address_family      HEPv1/v2 family that is neither IPv4 nor IPv6
    no_payload              no payload chunk (HEPv3) or no bytes after the header (v1/v2)
    bad_compressed_payload  payload chunk 0x0010 is not a complete zlib stream
    inflate_limit           payload chunk 0x0010 inflates past ``max_inflated``

HEPv3 follows the sipcapture "HEP3 Network Protocol Specification" and the
receivers in kamailio ``src/modules/sipcapture/hep.c`` and heplify-server
``decoder/hep.go`` (whose exact-size checks on fixed-size chunks are mirrored
here). HEPv1/v2 follows the C structs of kamailio
``src/modules/sipcapture/hep.h``; see ``_decode_v2``.
"""

from __future__ import annotations

import re
import socket
import struct
import zlib
from typing import Final

from sipcdr.model import TRANSPORT_SCTP, TRANSPORT_TCP, TRANSPORT_UDP, Packet

__all__ = [
    "MAX_CLOCK_SKEW_S",
    "HepError",
    "HepPacket",
    "decode",
    "skew_replaced",
    "to_packet",
]

_AF_INET: Final = 2
_AF_INET6: Final = 10  # HEP carries Linux numbering whatever the receiving host uses
_AF_INET6_HOST: Final = socket.AF_INET6

_MAGIC: Final = b"HEP3"
# Below the 32 s a closed call is remembered and far below the ring timeout, above any
# buffering delay of an agent on the same network.
MAX_CLOCK_SKEW_S: Final = 30.0
_TRANSPORT_OF_IP_PROTOCOL: Final = {6: TRANSPORT_TCP, 17: TRANSPORT_UDP, 132: TRANSPORT_SCTP}
# Vendor id and type id read as one u32: generic chunks (vendor 0) then compare
# equal to their bare type id and vendor chunks never match any of them.
_CHUNK_KEY: Final = struct.Struct("!IH")
_CHUNK: Final = struct.Struct("!HHH")
_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")
_V2_HDR: Final = struct.Struct("!BBBBHH")
# hep_timehdr is not packed in the C sources: u32, u32, u16 plus two bytes of
# tail padding, copied in the sender's byte order (little-endian in practice).
_V2_TIME: Final = struct.Struct("<IIH2x")

_ntoa: Final = socket.inet_ntoa
_ntop: Final = socket.inet_ntop
# An f-string over this table formats an IPv4 address in half the time of
# socket.inet_ntoa.
_DEC: Final = tuple(str(i) for i in range(256))

# Fast path. Senders emit the ten fixed-size generic chunks back to back in one
# of two orders: heplify puts the addresses right after family/protocol, while
# captagent and the hep-c code copied into sofia-sip put them after the capture
# id (both orders appear in the hep-wireshark sample captures). One regex checks
# all ten chunk headers at once and one struct call reads the values, instead of
# ten trips round the generic loop. Only exact headers match, so the outcome is
# the same as the loop's.
_FIXED_BODY: Final = {
    0x0001: "B", 0x0002: "B", 0x0003: "4B", 0x0004: "4B", 0x0005: "16s", 0x0006: "16s",
    0x0007: "H", 0x0008: "H", 0x0009: "I", 0x000A: "I", 0x000B: "B", 0x000C: "I",
}  # fmt: skip
# Regex group number (Match.lastindex) -> chunk order; decode() unpacks each.
_FIXED_ORDERS: Final = (
    (1, 2, 3, 4, 7, 8, 9, 10, 11, 12),
    (1, 2, 7, 8, 9, 10, 11, 12, 3, 4),
    (1, 2, 5, 6, 7, 8, 9, 10, 11, 12),
    (1, 2, 7, 8, 9, 10, 11, 12, 5, 6),
)


def _build_fast_path() -> tuple[re.Pattern[bytes], tuple[struct.Struct, ...]]:
    patterns = []
    # Slot 0 is never used: regex groups count from 1.
    layouts = [_CHUNK]
    for order in _FIXED_ORDERS:
        pattern = b""
        fmt = "!"
        for ctype in order:
            code = _FIXED_BODY[ctype]
            size = struct.calcsize("!" + code)
            pattern += re.escape(_CHUNK.pack(0, ctype, 6 + size)) + b".{%d}" % size
            fmt += "6x" + code
        patterns.append(b"(" + pattern + b")")
        layouts.append(struct.Struct(fmt))
    return re.compile(b"|".join(patterns), re.DOTALL), tuple(layouts)


_FAST_RE, _LAYOUTS = _build_fast_path()
_fast_match: Final = _FAST_RE.match


class HepError(Exception):
    """Input is not a HEP packet we can use; ``reason`` is a stable snake_case label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[HepError], tuple[str, str]]:
        # The default would rebuild from the formatted message and lose reason.
        return HepError, (self.reason, self.detail)


# Field names of HepPacket, as its repr lists them.
_PACKET_FIELDS: Final = (
    "auth_key",
    "capture_id",
    "compressed",
    "correlation_id",
    "dst_ip",
    "dst_port",
    "ip_family",
    "ip_protocol",
    "node_name",
    "payload",
    "proto_type",
    "src_ip",
    "src_port",
    "timestamp",
    "version",
)


class HepPacket:
    """One decoded HEP message. Treated as immutable; compares by value."""

    __slots__ = _PACKET_FIELDS

    version: int
    ip_family: int
    ip_protocol: int
    src_ip: str
    dst_ip: str
    src_port: int
    dst_port: int
    timestamp: float
    proto_type: int
    capture_id: int
    auth_key: str | None
    payload: bytes
    correlation_id: str | None
    node_name: str | None
    compressed: bool

    # Positional on purpose: keyword passing costs measurably per packet.
    def __init__(
        self,
        version: int,
        ip_family: int,
        ip_protocol: int,
        src_ip: str,
        dst_ip: str,
        src_port: int,
        dst_port: int,
        timestamp: float,
        proto_type: int,
        capture_id: int,
        auth_key: str | None,
        payload: bytes,
        correlation_id: str | None,
        node_name: str | None,
        compressed: bool,
    ) -> None:
        self.version = version
        self.ip_family = ip_family
        self.ip_protocol = ip_protocol
        self.src_ip = src_ip
        self.dst_ip = dst_ip
        self.src_port = src_port
        self.dst_port = dst_port
        self.timestamp = timestamp
        self.proto_type = proto_type
        self.capture_id = capture_id
        self.auth_key = auth_key
        self.payload = payload
        self.correlation_id = correlation_id
        self.node_name = node_name
        self.compressed = compressed

    def _key(self) -> tuple[object, ...]:
        return (
            self.version,
            self.ip_family,
            self.ip_protocol,
            self.src_ip,
            self.dst_ip,
            self.src_port,
            self.dst_port,
            self.timestamp,
            self.proto_type,
            self.capture_id,
            self.auth_key,
            self.payload,
            self.correlation_id,
            self.node_name,
            self.compressed,
        )

    def __reduce__(self) -> tuple[type[HepPacket], tuple[object, ...]]:
        # Through __init__, field by field: a compiled HepPacket has no other way in.
        return HepPacket, self._key()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HepPacket):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in _PACKET_FIELDS)
        return f"HepPacket({fields})"


def to_packet(
    decoded: HepPacket, payload: bytes, received: float, max_skew_s: float = 0.0
) -> Packet:
    """The SIP `Packet` a HEP packet carries: the agent's original endpoints, transport
    and capture time, and as capture node the agent's node name, else its capture id.
    The one conversion for every HEP input, live or imported, so that the same traffic
    gives the same CDRs whichever way it arrives.

    `payload` is the SIP message (the caller may have cut keepalive CRLFs off
    `decoded.payload`). `received` is when this host got the packet; it stands in for
    the agent's time when there is none (HEPv1) and, with `max_skew_s` above 0, when
    the agent's clock is off from it by more than that: live, the dialog timers run on
    this host's clock, and a skewed time would close live calls. An import passes 0,
    since its timers run on capture time. A caller counts a replaced time by
    comparing the packet's time with `decoded.timestamp`.
    """
    timestamp = decoded.timestamp
    if not timestamp or (max_skew_s > 0.0 and abs(timestamp - received) > max_skew_s):
        timestamp = received
    return Packet(
        timestamp,
        decoded.src_ip,
        decoded.src_port,
        decoded.dst_ip,
        decoded.dst_port,
        _TRANSPORT_OF_IP_PROTOCOL.get(decoded.ip_protocol, TRANSPORT_UDP),
        payload,
        decoded.node_name or str(decoded.capture_id),
    )


def skew_replaced(decoded: HepPacket, packet: Packet) -> bool:
    """True when `to_packet` replaced the agent's time because its clock was off."""
    return bool(decoded.timestamp) and packet.timestamp != decoded.timestamp


def _inflate(data: bytes, limit: int) -> bytes:
    if limit < 0:
        # limit + 1 == 0 would mean "no limit" to zlib.
        raise ValueError(f"max_inflated must be >= 0, not {limit}")
    inflater = zlib.decompressobj()
    try:
        # One byte over the limit tells "exactly at the limit" from "over it"
        # while a zip bomb never gets more than limit + 1 bytes of output.
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise HepError("bad_compressed_payload", str(exc)) from None
    if len(out) > limit:
        raise HepError("inflate_limit", f"inflates past {limit} bytes")
    if not inflater.eof:
        raise HepError("bad_compressed_payload", "zlib stream ends early")
    return out


def decode(data: bytes | bytearray | memoryview, max_inflated: int = 65536) -> HepPacket:
    """Decode one HEP packet (v3, or legacy v1/v2) from ``data``.

    For HEPv3 only the first ``total length`` bytes are read; anything after
    them is ignored so a stream reader can pass its whole buffer. Fields the
    packet does not carry come back as 0, ``""`` or ``None``. Strings are
    UTF-8 with errors replaced, trailing NULs dropped. A compressed payload is
    inflated to at most ``max_inflated`` bytes. Whatever ``data`` holds, failure
    is ``HepError`` and nothing else.
    """
    # A name of its own, typed bytes, keeps the compiled code on bytes operations.
    buf = data if type(data) is bytes else memoryview(data).tobytes()
    # HEPv3 is decoded inline: a call level less is measurable at this rate.
    if buf[:4] != _MAGIC:
        return _decode_other(buf)
    size = len(buf)
    if size < 6:
        raise HepError("truncated", f"{size} bytes")
    total = (buf[4] << 8) | buf[5]
    if total > size:
        raise HepError("truncated", f"total length {total} > {size} bytes")
    if total < 6:
        raise HepError("bad_length", f"total length {total}")

    family = 0
    ip_protocol = 0
    src_ip = ""
    dst_ip = ""
    src_port = 0
    dst_port = 0
    ts_sec = 0
    ts_usec = 0
    proto_type = 0
    capture_id = 0
    # Strings and the payload are kept as offsets and materialised once after
    # the walk, so repeated chunks cost nothing and a packet stuffed with
    # compressed chunks is inflated at most once.
    auth_at = auth_end = corr_at = corr_end = node_at = node_end = 0
    payload_at = payload_end = -1
    compressed = False

    pos = 6
    fast = _fast_match(buf, 6, total)
    if fast is not None:
        kind = fast.lastindex
        layout = _LAYOUTS[kind or 0]
        if kind == 1:
            (family, ip_protocol, s0, s1, s2, s3, d0, d1, d2, d3, src_port, dst_port,
             ts_sec, ts_usec, proto_type, capture_id) = layout.unpack_from(buf, 6)  # fmt: skip
        elif kind == 2:
            (family, ip_protocol, src_port, dst_port, ts_sec, ts_usec, proto_type, capture_id,
             s0, s1, s2, s3, d0, d1, d2, d3) = layout.unpack_from(buf, 6)  # fmt: skip
        elif kind == 3:
            (family, ip_protocol, src6, dst6, src_port, dst_port,
             ts_sec, ts_usec, proto_type, capture_id) = layout.unpack_from(buf, 6)  # fmt: skip
        else:
            (family, ip_protocol, src_port, dst_port, ts_sec, ts_usec, proto_type, capture_id,
             src6, dst6) = layout.unpack_from(buf, 6)  # fmt: skip
        if kind in {1, 2}:
            src_ip = f"{_DEC[s0]}.{_DEC[s1]}.{_DEC[s2]}.{_DEC[s3]}"
            dst_ip = f"{_DEC[d0]}.{_DEC[d1]}.{_DEC[d2]}.{_DEC[d3]}"
        else:
            src_ip = _ntop(_AF_INET6_HOST, src6)
            dst_ip = _ntop(_AF_INET6_HOST, dst6)
        pos = fast.end()

    unpack_chunk = _CHUNK_KEY.unpack_from
    try:
        while pos < total:
            # A header cut by the end of buf raises struct.error (below); one
            # cut by the total length alone reads on and fails the checks here.
            key, clen = unpack_chunk(buf, pos)
            if clen < 6:
                # Zero would never advance pos (the classic HEP parser hang);
                # anything below the header size is as bogus.
                raise HepError("zero_length_chunk", f"chunk {key:#010x} length {clen}")
            end = pos + clen
            if end > total:
                raise HepError("chunk_overrun", f"chunk {key:#010x} ends at {end} > {total}")
            # Most likely first: what the fast path leaves is usually strings
            # and the payload.
            if key in {0x000F, 0x0010}:
                payload_at = pos + 6
                payload_end = end
                compressed = key == 0x0010
            elif key == 0x000E:
                auth_at = pos + 6
                auth_end = end
            elif key == 0x0011:
                corr_at = pos + 6
                corr_end = end
            elif key == 0x0013:
                node_at = pos + 6
                node_end = end
            elif key <= 0x0008:
                body = pos + 6
                if key in {0x0003, 0x0004}:
                    if clen != 10:
                        raise HepError("bad_address_length", f"chunk {key:#x} length {clen}")
                    if key == 0x0003:
                        src_ip = _ntoa(buf[body:end])
                    else:
                        dst_ip = _ntoa(buf[body:end])
                    if not family:
                        family = _AF_INET
                elif key in {0x0005, 0x0006}:
                    if clen != 22:
                        raise HepError("bad_address_length", f"chunk {key:#x} length {clen}")
                    if key == 0x0005:
                        src_ip = _ntop(_AF_INET6_HOST, buf[body:end])
                    else:
                        dst_ip = _ntop(_AF_INET6_HOST, buf[body:end])
                    if not family:
                        family = _AF_INET6
                elif key in {0x0007, 0x0008}:
                    if clen != 8:
                        raise HepError("bad_chunk_length", f"chunk {key:#x} length {clen}")
                    if key == 0x0007:
                        src_port = (buf[body] << 8) | buf[body + 1]
                    else:
                        dst_port = (buf[body] << 8) | buf[body + 1]
                elif key in {0x0001, 0x0002}:
                    if clen != 7:
                        raise HepError("bad_chunk_length", f"chunk {key:#x} length {clen}")
                    if key == 0x0001:
                        family = buf[body]
                    else:
                        ip_protocol = buf[body]
            elif key <= 0x000C:
                if key == 0x000B:
                    if clen != 7:
                        raise HepError("bad_chunk_length", f"chunk {key:#x} length {clen}")
                    proto_type = buf[pos + 6]
                else:
                    if clen != 10:
                        raise HepError("bad_chunk_length", f"chunk {key:#x} length {clen}")
                    value = _U32.unpack_from(buf, pos + 6)[0]
                    if key == 0x0009:
                        ts_sec = value
                    elif key == 0x000A:
                        ts_usec = value
                    else:
                        capture_id = value
            # Type 0, keep-alive (0x000d), VLAN (0x0012), unknown types and all
            # vendor chunks carry nothing we use.
            pos = end
    except struct.error:
        raise HepError("chunk_overrun", f"partial chunk header at {pos}") from None

    if payload_at < 0:
        raise HepError("no_payload", "no payload chunk")
    if compressed:
        payload = _inflate(buf[payload_at:payload_end], max_inflated)
    else:
        payload = buf[payload_at:payload_end]

    # C senders sometimes count a string's terminating NUL in the chunk length.
    return HepPacket(
        3,
        family,
        ip_protocol,
        src_ip,
        dst_ip,
        src_port,
        dst_port,
        ts_sec + ts_usec / 1_000_000,
        proto_type,
        capture_id,
        buf[auth_at:auth_end].decode("utf-8", "replace").rstrip("\x00") if auth_at else None,
        payload,
        buf[corr_at:corr_end].decode("utf-8", "replace").rstrip("\x00") if corr_at else None,
        buf[node_at:node_end].decode("utf-8", "replace").rstrip("\x00") if node_at else None,
        compressed,
    )


def _decode_other(data: bytes) -> HepPacket:
    if data and data[0] in (1, 2):
        return _decode_v2(data)
    if len(data) < 4 and _MAGIC.startswith(data):
        raise HepError("truncated", f"{len(data)} bytes")
    if data[:3] == b"HEP":
        raise HepError("bad_version", repr(data[:4]))
    raise HepError("bad_magic", repr(data[:4]))


def _decode_v2(data: bytes) -> HepPacket:
    """HEPv1/v2, laid out as the C structs in kamailio sipcapture ``hep.h``::

        struct hep_hdr     { u8 hp_v; u8 hp_l; u8 hp_f; u8 hp_p;
                             u16 hp_sport; u16 hp_dport; };        8 bytes, ports htons()
        struct hep_iphdr   { in_addr hp_src, hp_dst; };            8 bytes, hp_f == AF_INET
        struct hep_ip6hdr  { in6_addr hp6_src, hp6_dst; };        32 bytes, hp_f == AF_INET6
        struct hep_timehdr { u32 tv_sec; u32 tv_usec; u16 captid; };   v2 only

    followed by the SIP message. ``hep_timehdr`` is not packed, so it takes
    12 bytes (two of tail padding), and captagent, kamailio siptrace and
    sofia-sip copy it in host order; kamailio reads it back with ``to_le()``,
    so on the wire it is little-endian. ``hp_l`` is ignored, as kamailio
    ignores it: captagent and kamailio write 8 + addresses, sofia-sip
    (FreeSWITCH) writes 8 + addresses (+ 12 for v2).
    """
    size = len(data)
    if size < 8:
        raise HepError("truncated", f"{size} bytes")
    version, _hdr_len, family, ip_protocol, src_port, dst_port = _V2_HDR.unpack_from(data)
    if family == _AF_INET:
        start = 16
        if size < start:
            raise HepError("truncated", f"{size} bytes")
        src_ip = _ntoa(data[8:12])
        dst_ip = _ntoa(data[12:16])
    # hp_f is the sender's own AF_INET6: 10 on Linux, 28 on FreeBSD, 30 on macOS.
    elif family in (10, 28, 30):
        family = _AF_INET6
        start = 40
        if size < start:
            raise HepError("truncated", f"{size} bytes")
        src_ip = _ntop(_AF_INET6_HOST, data[8:24])
        dst_ip = _ntop(_AF_INET6_HOST, data[24:40])
    else:
        raise HepError("bad_address_family", f"family {family}")

    timestamp = 0.0
    capture_id = 0
    if version == 2:
        if size < start + 12:
            raise HepError("truncated", f"{size} bytes")
        ts_sec, ts_usec, capture_id = _V2_TIME.unpack_from(data, start)
        timestamp = ts_sec + ts_usec / 1_000_000
        start += 12
    if size == start:
        raise HepError("no_payload", "nothing after the header")

    # HEPv1/v2 has no protocol type field: it only ever carried SIP.
    return HepPacket(
        version,
        family,
        ip_protocol,
        src_ip,
        dst_ip,
        src_port,
        dst_port,
        timestamp,
        1,
        capture_id,
        None,
        data[start:],
        None,
        None,
        False,
    )
