"""Tests for sipcdr.hep: round trips, every error reason, hostile input, HEPv2, real captures."""

from __future__ import annotations

import pickle
import socket
import struct
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pcapdata
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pcapdata import require_shared_data, udp_datagrams, udp_payloads
from sipcdr import hep as hep_module
from sipcdr.hep import HepError, HepPacket, decode
from sipcdr.hepencode import encode

INVITE = (
    b"INVITE sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK776asdhds\r\n"
    b"Max-Forwards: 70\r\n"
    b"To: Bob <sip:bob@example.com>\r\n"
    b"From: Alice <sip:alice@example.com>;tag=1928301774\r\n"
    b"Call-ID: a84b4c76e66710@pc33.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Content-Length: 0\r\n\r\n"
)

Chunk = tuple[int, int, bytes]


def chunk(ctype: int, body: bytes, vendor: int = 0, length: int | None = None) -> bytes:
    return struct.pack("!HHH", vendor, ctype, 6 + len(body) if length is None else length) + body


def hep3(*chunks: bytes, total: int | None = None, trailer: bytes = b"") -> bytes:
    body = b"".join(chunks)
    return b"HEP3" + struct.pack("!H", 6 + len(body) if total is None else total) + body + trailer


def split_chunks(packet: bytes) -> list[Chunk]:
    """(vendor, type, body) of each chunk of a well-formed HEPv3 packet."""
    total = struct.unpack_from("!H", packet, 4)[0]
    pos = 6
    out: list[Chunk] = []
    while pos < total:
        vendor, ctype, length = struct.unpack_from("!HHH", packet, pos)
        out.append((vendor, ctype, packet[pos + 6 : pos + length]))
        pos += length
    return out


def join_chunks(chunks: list[Chunk]) -> bytes:
    return hep3(*(chunk(ctype, body, vendor) for vendor, ctype, body in chunks))


def base_chunks(*, v6: bool = False) -> list[bytes]:
    """The fixed-size generic chunks of a plausible SIP packet, without payload."""
    if v6:
        src = chunk(5, socket.inet_pton(socket.AF_INET6, "2001:db8::1"))
        dst = chunk(6, socket.inet_pton(socket.AF_INET6, "2001:db8::2"))
    else:
        src = chunk(3, bytes([10, 0, 0, 1]))
        dst = chunk(4, bytes([10, 0, 0, 2]))
    return [
        chunk(1, bytes([10 if v6 else 2])),
        chunk(2, bytes([17])),
        src,
        dst,
        chunk(7, struct.pack("!H", 5060)),
        chunk(8, struct.pack("!H", 5080)),
        chunk(9, struct.pack("!I", 1_700_000_000)),
        chunk(10, struct.pack("!I", 250_000)),
        chunk(11, bytes([1])),
        chunk(12, struct.pack("!I", 42)),
    ]


def reason_of(data: bytes, max_inflated: int = 65536) -> str:
    with pytest.raises(HepError) as info:
        decode(data, max_inflated)
    return info.value.reason


# --------------------------------------------------------------------------- round trips

ROUND_TRIP_CASES = [
    pytest.param("10.1.2.3", "192.168.200.254", False, id="ipv4"),
    pytest.param("10.1.2.3", "192.168.200.254", True, id="ipv4-compressed"),
    pytest.param("2001:db8::10", "fe80::1:2:3:4", False, id="ipv6"),
    pytest.param("2001:db8::10", "fe80::1:2:3:4", True, id="ipv6-compressed"),
]


@pytest.mark.parametrize(("src", "dst", "compress"), ROUND_TRIP_CASES)
def test_round_trip_with_all_fields(src: str, dst: str, compress: bool) -> None:
    packet = encode(
        src_ip=src,
        dst_ip=dst,
        src_port=5061,
        dst_port=65535,
        timestamp=1_700_000_123.654321,
        payload=INVITE,
        ip_protocol=6,
        proto_type=1,
        capture_id=0xFFFFFFFF,
        auth_key="s3cret",
        correlation_id="a84b4c76e66710@pc33.example.com",
        node_name="sbc-eu-1 ünïcode",
        compress=compress,
    )
    hep = decode(packet)
    assert hep.version == 3
    assert hep.ip_family == (10 if ":" in src else 2)
    assert hep.ip_protocol == 6
    assert (hep.src_ip, hep.src_port) == (src, 5061)
    assert (hep.dst_ip, hep.dst_port) == (dst, 65535)
    assert hep.timestamp == pytest.approx(1_700_000_123.654321, abs=1e-6)
    assert hep.proto_type == 1
    assert hep.capture_id == 0xFFFFFFFF
    assert hep.auth_key == "s3cret"
    assert hep.correlation_id == "a84b4c76e66710@pc33.example.com"
    assert hep.node_name == "sbc-eu-1 ünïcode"
    assert hep.payload == INVITE
    assert hep.compressed is compress
    assert decode(packet) == hep
    assert "HepPacket(" in repr(hep)


@pytest.mark.parametrize(("src", "dst", "compress"), ROUND_TRIP_CASES)
def test_round_trip_defaults(src: str, dst: str, compress: bool) -> None:
    hep = decode(
        encode(
            src_ip=src,
            dst_ip=dst,
            src_port=1,
            dst_port=2,
            timestamp=0,
            payload=b"x",
            compress=compress,
        )
    )
    assert (hep.ip_protocol, hep.proto_type, hep.capture_id) == (17, 1, 0)
    assert (hep.auth_key, hep.correlation_id, hep.node_name) == (None, None, None)
    assert hep.timestamp == 0.0
    assert hep.payload == b"x"


def test_empty_strings_and_payload_survive() -> None:
    hep = decode(
        encode(
            src_ip="1.2.3.4",
            dst_ip="5.6.7.8",
            src_port=0,
            dst_port=0,
            timestamp=1.5,
            payload=b"",
            auth_key="",
            correlation_id="",
            node_name="",
        )
    )
    assert (hep.auth_key, hep.correlation_id, hep.node_name, hep.payload) == ("", "", "", b"")


def test_timestamp_rounding_carries_into_seconds() -> None:
    hep = decode(
        encode(
            src_ip="1.2.3.4",
            dst_ip="5.6.7.8",
            src_port=1,
            dst_port=2,
            timestamp=9.9999999,
            payload=b"x",
        )
    )
    assert hep.timestamp == 10.0


def _as_encoded(chunks: list[Chunk]) -> list[Chunk]:
    return chunks


def _captagent_order(chunks: list[Chunk]) -> list[Chunk]:
    # family, protocol, ports, times, type, capture id, then the addresses
    return chunks[:2] + chunks[4:10] + chunks[2:4] + chunks[10:]


def _reversed(chunks: list[Chunk]) -> list[Chunk]:
    return chunks[::-1]


def _interleaved(chunks: list[Chunk]) -> list[Chunk]:
    return chunks[1::2] + chunks[::2]


def _fixed_block(src: str, dst: str, reorder: Callable[[list[Chunk]], list[Chunk]]) -> bytes:
    packet = encode(
        src_ip=src,
        dst_ip=dst,
        src_port=5060,
        dst_port=5062,
        timestamp=1_600_000_000.5,
        payload=INVITE,
        capture_id=7,
        auth_key="k",
        node_name="n",
    )
    return join_chunks(reorder(split_chunks(packet)))


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("reorder", [_as_encoded, _captagent_order, _reversed, _interleaved])
def test_chunk_order_does_not_matter(
    v6: bool, reorder: Callable[[list[Chunk]], list[Chunk]]
) -> None:
    """The fixed-layout fast path and the generic chunk walk must agree."""
    src, dst = ("2001:db8::1", "2001:db8::2") if v6 else ("10.0.0.1", "10.0.0.2")
    assert decode(_fixed_block(src, dst, reorder)) == decode(_fixed_block(src, dst, _as_encoded))


@pytest.mark.parametrize(
    ("src", "dst", "reorder", "layout"),
    [
        ("10.0.0.1", "10.0.0.2", _as_encoded, 1),
        ("10.0.0.1", "10.0.0.2", _captagent_order, 2),
        ("2001:db8::1", "2001:db8::2", _as_encoded, 3),
        ("2001:db8::1", "2001:db8::2", _captagent_order, 4),
        ("10.0.0.1", "10.0.0.2", _reversed, None),
    ],
)
def test_common_chunk_orders_take_the_fast_path(
    src: str, dst: str, reorder: Callable[[list[Chunk]], list[Chunk]], layout: int | None
) -> None:
    """Guards the speed of decode: the orders real senders use must hit the fixed layouts."""
    match = hep_module._FAST_RE.match(_fixed_block(src, dst, reorder), 6)
    assert (match.lastindex if match else None) == layout


@pytest.mark.parametrize("where", [0, 2, 5, 10, -1, 99])
def test_vendor_chunks_are_skipped(where: int) -> None:
    packet = encode(
        src_ip="10.0.0.1",
        dst_ip="10.0.0.2",
        src_port=5060,
        dst_port=5060,
        timestamp=1_600_000_000.25,
        payload=INVITE,
        auth_key="k",
    )
    chunks = split_chunks(packet)
    # Vendor 0x0002 (Kamailio) reusing generic type numbers must not be read as them.
    chunks.insert(where, (0x0002, 0x0003, b"\xff\xff\xff\xff\xff"))
    chunks.insert(where, (0x0006, 0x000F, b"not the payload"))
    chunks.insert(where, (0xFFFF, 0x0001, b""))
    assert decode(join_chunks(chunks)) == decode(packet)


def test_unknown_and_ignored_generic_chunks_are_skipped() -> None:
    packet = encode(
        src_ip="10.0.0.1", dst_ip="10.0.0.2", src_port=1, dst_port=2, timestamp=3.0, payload=b"p"
    )
    chunks = split_chunks(packet)
    chunks[2:2] = [
        (0, 0x0000, b"zero type"),
        (0, 0x000D, struct.pack("!H", 30)),  # keep-alive timer
        (0, 0x0012, struct.pack("!H", 100)),  # VLAN
        (0, 0x0014, b"\x00" * 9),
        (0, 0x7FFF, b"future"),
    ]
    assert decode(join_chunks(chunks)) == decode(packet)


def test_generic_walk_fills_every_field() -> None:
    chunks = [
        chunk(0x0013, b"node\x00"),  # C senders may count the NUL
        chunk(0x000E, b"key\xff"),
        chunk(0x0011, b"corr"),
        chunk(0x000F, b"payload"),
        *base_chunks(v6=True)[::-1],
    ]
    hep = decode(hep3(*chunks))
    assert hep == HepPacket(
        3, 10, 17, "2001:db8::1", "2001:db8::2", 5060, 5080, 1_700_000_000.25, 1, 42,
        "key\ufffd", b"payload", "corr", "node", False,
    )  # fmt: skip


def test_family_defaults_from_address_chunks() -> None:
    v4 = decode(hep3(chunk(3, bytes(4)), chunk(4, bytes([1, 2, 3, 4])), chunk(15, b"x")))
    assert (v4.ip_family, v4.src_ip, v4.dst_ip) == (2, "0.0.0.0", "1.2.3.4")
    v6 = decode(hep3(chunk(6, bytes(16)), chunk(15, b"x")))
    assert (v6.ip_family, v6.src_ip, v6.dst_ip) == (10, "", "::")


def test_minimal_packet_has_neutral_defaults() -> None:
    hep = decode(hep3(chunk(15, b"just a payload")))
    assert hep == HepPacket(
        3, 0, 0, "", "", 0, 0, 0.0, 0, 0, None, b"just a payload", None, None, False
    )


def test_last_payload_chunk_wins() -> None:
    packet = hep3(
        *base_chunks(),
        chunk(16, zlib.compress(b"first")),
        chunk(15, b"second"),
        chunk(15, b"third"),
    )
    hep = decode(packet)
    assert (hep.payload, hep.compressed) == (b"third", False)


def test_bytes_after_total_length_are_ignored() -> None:
    packet = encode(
        src_ip="10.0.0.1", dst_ip="10.0.0.2", src_port=1, dst_port=2, timestamp=3.0, payload=INVITE
    )
    assert decode(packet + b"\x00\x00\x00") == decode(packet)
    assert decode(packet + packet) == decode(packet)
    assert decode(bytearray(packet)) == decode(packet)
    assert decode(memoryview(packet + b"zz")[:-2]) == decode(packet)


def test_inflate_limit_is_inclusive() -> None:
    payload = b"a" * 1000
    packet = encode(
        src_ip="10.0.0.1", dst_ip="10.0.0.2", src_port=1, dst_port=2, timestamp=3.0,
        payload=payload, compress=True,
    )  # fmt: skip
    assert decode(packet, max_inflated=1000).payload == payload
    assert reason_of(packet, max_inflated=999) == "inflate_limit"


def test_compressed_payload_accepts_trailing_bytes_after_stream() -> None:
    hep = decode(hep3(*base_chunks(), chunk(16, zlib.compress(INVITE) + b"pad")))
    assert hep.payload == INVITE


def test_encode_rejects_what_hep3_cannot_carry() -> None:
    good = {
        "src_ip": "10.0.0.1",
        "dst_ip": "10.0.0.2",
        "src_port": 1,
        "dst_port": 2,
        "timestamp": 3.0,
        "payload": b"x",
    }
    bad_values: list[dict[str, object]] = [
        {"src_ip": "not-an-ip"},
        {"dst_ip": "2001:db8::1"},
        {"src_port": 65536},
        {"dst_port": -1},
        {"ip_protocol": 256},
        {"proto_type": -1},
        {"capture_id": 1 << 32},
        {"timestamp": -1.0},
        {"timestamp": float(1 << 32)},
        {"payload": bytes(70_000)},
        {"payload": bytes(65_000), "auth_key": "k" * 1000},
    ]
    for override in bad_values:
        with pytest.raises(ValueError):
            encode(**{**good, **override})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- errors


def test_errors_and_packets_pickle() -> None:
    err = pickle.loads(pickle.dumps(HepError("chunk_overrun", "at 12")))
    assert (err.reason, err.detail) == ("chunk_overrun", "at 12")
    packet = decode(VALID_PACKETS[0])
    assert pickle.loads(pickle.dumps(packet)) == packet


def test_negative_inflate_limit_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="max_inflated"):
        decode(VALID_PACKETS[1], max_inflated=-1)


def test_error_carries_reason_and_detail() -> None:
    err = HepError("truncated", "3 bytes")
    assert (err.reason, err.detail, str(err)) == ("truncated", "3 bytes", "truncated: 3 bytes")
    assert str(HepError("bad_magic")) == "bad_magic"
    assert isinstance(err, Exception)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"", "truncated", id="empty"),
        pytest.param(b"H", "truncated", id="H"),
        pytest.param(b"HEP", "truncated", id="HEP"),
        pytest.param(b"HEP3\x00", "truncated", id="no-length"),
        pytest.param(hep3(chunk(15, b"abc"), total=100), "truncated", id="total-past-data"),
        pytest.param(b"GET / HTTP/1.1\r\n", "bad_magic", id="http"),
        pytest.param(b"INVITE sip:x SIP/2.0\r\n", "bad_magic", id="raw-sip"),
        pytest.param(b"\x00\x00\x00\x00\x00\x00", "bad_magic", id="zeros"),
        pytest.param(b"\x03" + bytes(60), "bad_magic", id="version-byte-3"),
        pytest.param(b"EEP1\x00\x06", "bad_magic", id="EEP1"),
        pytest.param(b"HEP2" + bytes(20), "bad_version", id="HEP2"),
        pytest.param(b"HEP4\x00\x06", "bad_version", id="HEP4"),
        pytest.param(b"HEP", "truncated", id="HEP-short"),
        pytest.param(b"HEP3\x00\x00", "bad_length", id="total-0"),
        pytest.param(b"HEP3\x00\x05\x00", "bad_length", id="total-5"),
        pytest.param(hep3(chunk(1, b"\x02", length=0)), "zero_length_chunk", id="chunk-len-0"),
        pytest.param(hep3(chunk(1, b"\x02", length=5)), "zero_length_chunk", id="chunk-len-5"),
        pytest.param(
            hep3(chunk(15, b"xx"), chunk(0, b"", vendor=9, length=0)),
            "zero_length_chunk",
            id="vendor-chunk-len-0",
        ),
        pytest.param(hep3(chunk(15, b"abc", length=50)), "chunk_overrun", id="chunk-past-total"),
        pytest.param(
            hep3(chunk(15, b"abc", length=50), total=15, trailer=bytes(100)),
            "chunk_overrun",
            id="chunk-past-total-into-trailer",
        ),
        pytest.param(
            hep3(chunk(15, b"abc"), b"\x00\x00\x00"), "chunk_overrun", id="partial-header"
        ),
        pytest.param(
            hep3(chunk(15, b"abc"), b"\x00\x00\x00", trailer=b"\x00\x0f\x00\x06"),
            "chunk_overrun",
            id="partial-header-then-trailer",
        ),
        pytest.param(hep3(chunk(3, bytes(5)), chunk(15, b"x")), "bad_address_length", id="ipv4-5"),
        pytest.param(hep3(chunk(4, bytes(3)), chunk(15, b"x")), "bad_address_length", id="ipv4-3"),
        pytest.param(hep3(chunk(5, bytes(4)), chunk(15, b"x")), "bad_address_length", id="ipv6-4"),
        pytest.param(
            hep3(chunk(6, bytes(17)), chunk(15, b"x")), "bad_address_length", id="ipv6-17"
        ),
        pytest.param(hep3(chunk(1, b""), chunk(15, b"x")), "bad_chunk_length", id="family-empty"),
        pytest.param(hep3(chunk(2, b"ab"), chunk(15, b"x")), "bad_chunk_length", id="proto-2"),
        pytest.param(hep3(chunk(7, b"\x13"), chunk(15, b"x")), "bad_chunk_length", id="port-1"),
        pytest.param(hep3(chunk(8, bytes(4)), chunk(15, b"x")), "bad_chunk_length", id="port-4"),
        pytest.param(hep3(chunk(9, bytes(8)), chunk(15, b"x")), "bad_chunk_length", id="tsec-8"),
        pytest.param(hep3(chunk(10, bytes(2)), chunk(15, b"x")), "bad_chunk_length", id="tusec-2"),
        pytest.param(hep3(chunk(11, bytes(2)), chunk(15, b"x")), "bad_chunk_length", id="ptype-2"),
        pytest.param(hep3(chunk(12, bytes(2)), chunk(15, b"x")), "bad_chunk_length", id="capid-2"),
        pytest.param(hep3(), "no_payload", id="no-chunks"),
        pytest.param(hep3(*base_chunks()), "no_payload", id="no-payload-chunk"),
        pytest.param(
            hep3(*base_chunks(), chunk(15, b"x", vendor=2)), "no_payload", id="vendor-payload-only"
        ),
        pytest.param(
            hep3(*base_chunks(), chunk(16, b"definitely not zlib")),
            "bad_compressed_payload",
            id="garbage-zlib",
        ),
        pytest.param(
            hep3(*base_chunks(), chunk(16, zlib.compress(INVITE)[:-10])),
            "bad_compressed_payload",
            id="cut-zlib",
        ),
        pytest.param(
            hep3(*base_chunks(), chunk(16, b"")), "bad_compressed_payload", id="empty-zlib"
        ),
        pytest.param(
            hep3(*base_chunks(), chunk(16, zlib.compress(INVITE)[2:])),
            "bad_compressed_payload",
            id="raw-deflate",
        ),
    ],
)
def test_error_reasons(data: bytes, reason: str) -> None:
    assert reason_of(data) == reason


def test_zlib_bomb_stops_at_the_limit() -> None:
    bomb = zlib.compress(bytes(10_000_000), 9)
    assert len(bomb) < 65535 - 200
    packet = hep3(*base_chunks(), chunk(16, bomb))
    assert reason_of(packet) == "inflate_limit"
    assert reason_of(packet, max_inflated=1_000_000) == "inflate_limit"


def test_many_compressed_chunks_inflate_once() -> None:
    """Only the last payload chunk is inflated, so stacking chunks buys an attacker nothing."""
    small_bomb = zlib.compress(bytes(60_000), 9)
    packet = hep3(*base_chunks(), *[chunk(16, small_bomb)] * 200, chunk(16, zlib.compress(b"ok")))
    assert decode(packet).payload == b"ok"


VALID_PACKETS = [
    encode(
        src_ip=src,
        dst_ip=dst,
        src_port=5060,
        dst_port=5060,
        timestamp=1_700_000_000.000001,
        payload=INVITE,
        auth_key="key",
        correlation_id="cid",
        node_name="node",
        compress=compress,
    )
    for src, dst in (("10.0.0.1", "10.0.0.2"), ("2001:db8::1", "2001:db8::2"))
    for compress in (False, True)
]


@pytest.mark.parametrize("packet", VALID_PACKETS)
def test_every_prefix_is_rejected(packet: bytes) -> None:
    decode(packet)
    for cut in range(len(packet)):
        with pytest.raises(HepError):
            decode(packet[:cut])


@pytest.mark.parametrize("packet", VALID_PACKETS)
def test_every_shortened_total_length_is_rejected(packet: bytes) -> None:
    """A total length that lies low (all data still present) cuts a chunk or drops the payload."""
    for total in range(len(packet)):
        with pytest.raises(HepError):
            decode(packet[:4] + struct.pack("!H", total) + packet[6:])


# --------------------------------------------------------------------------- fuzzing


def _mutate(packet: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    data = bytearray(packet)
    for op, where, value in ops:
        if not data:
            data.append(value & 0xFF)
            continue
        i = where % len(data)
        if op == 0:  # flip bits of one byte
            data[i] ^= value & 0xFF or 1
        elif op == 1:  # truncate
            del data[i:]
        elif op == 2:  # insert a byte
            data.insert(i, value & 0xFF)
        elif op == 3:  # delete a byte
            del data[i]
        elif op == 4:  # overwrite a u16 (hits length fields often enough)
            data[i : i + 2] = (value & 0xFFFF).to_bytes(2, "big")
        else:  # duplicate a slice
            data[i:i] = data[i : i + (value & 0x3F)]
    return bytes(data)


def _check_decode(data: bytes, max_inflated: int = 4096) -> None:
    try:
        hep = decode(data, max_inflated)
    except HepError as err:
        assert err.reason
        assert err.reason.replace("_", "").isalpha()
        assert err.reason.islower()
        return
    assert isinstance(hep, HepPacket)
    assert isinstance(hep.payload, bytes)
    assert 0 <= hep.src_port <= 0xFFFF
    assert 0 <= hep.dst_port <= 0xFFFF
    assert hep.version in (1, 2, 3)
    if hep.compressed:
        assert len(hep.payload) <= max_inflated


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    _check_decode(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([b"HEP3", b"\x01", b"\x02", b"HEP"]), st.binary(max_size=200))
def test_fuzz_random_bytes_after_magic(prefix: bytes, rest: bytes) -> None:
    _check_decode(prefix + rest)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(VALID_PACKETS),
    st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 1 << 16), st.integers(0, 0xFFFF)),
        min_size=1,
        max_size=6,
    ),
)
def test_fuzz_mutated_packets(packet: bytes, ops: list[tuple[int, int, int]]) -> None:
    _check_decode(_mutate(packet, ops))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0, 0, 0, 1, 0xFFFF]),
            st.integers(0, 0x14),
            st.binary(max_size=20),
            st.one_of(st.none(), st.integers(0, 0xFFFF)),
        ),
        max_size=14,
    ),
    st.one_of(st.none(), st.integers(0, 0xFFFF)),
)
def test_fuzz_structured_chunks(
    chunks: list[tuple[int, int, bytes, int | None]], total: int | None
) -> None:
    """Well-framed but arbitrary chunks reach the per-type checks that random bytes rarely do."""
    _check_decode(
        hep3(*(chunk(t, body, vendor, length) for vendor, t, body, length in chunks), total=total)
    )


# --------------------------------------------------------------------------- HEPv1/v2


def hep_v2(
    *,
    version: int = 2,
    family: int = 2,
    header_len: int | None = None,
    protocol: int = 17,
    src: bytes = bytes([192, 168, 0, 1]),
    dst: bytes = bytes([192, 168, 0, 2]),
    sport: int = 5060,
    dport: int = 5080,
    tv_sec: int = 1_700_000_000,
    tv_usec: int = 123_456,
    captid: int = 0x1234,
    payload: bytes = INVITE,
) -> bytes:
    """hep_hdr + hep_iphdr/hep_ip6hdr (+ hep_timehdr for v2) + payload, as captagent sends it."""
    addresses = src + dst
    if header_len is None:
        header_len = 8 + len(addresses)
    out = struct.pack("!BBBBHH", version, header_len, family, protocol, sport, dport) + addresses
    if version == 2:
        # Host-order (x86: little-endian) u32, u32, u16 + 2 bytes of struct padding.
        out += struct.pack("<IIH2x", tv_sec, tv_usec, captid)
    return out + payload


def test_hep_v2_ipv4() -> None:
    packet = hep_v2()
    assert len(packet) == 8 + 8 + 12 + len(INVITE)
    hep = decode(packet)
    assert hep == HepPacket(
        2, 2, 17, "192.168.0.1", "192.168.0.2", 5060, 5080, 1_700_000_000.123456, 1, 0x1234,
        None, INVITE, None, None, False,
    )  # fmt: skip


def test_hep_v2_ipv6() -> None:
    src = socket.inet_pton(socket.AF_INET6, "2001:db8::a")
    dst = socket.inet_pton(socket.AF_INET6, "2001:db8:0:1::b")
    packet = hep_v2(family=10, protocol=6, src=src, dst=dst, sport=40000, dport=5061)
    assert packet[1] == 40
    hep = decode(packet)
    assert (hep.version, hep.ip_family, hep.ip_protocol) == (2, 10, 6)
    assert (hep.src_ip, hep.dst_ip) == ("2001:db8::a", "2001:db8:0:1::b")
    assert (hep.src_port, hep.dst_port) == (40000, 5061)
    assert hep.timestamp == pytest.approx(1_700_000_000.123456, abs=1e-6)
    assert (hep.capture_id, hep.proto_type, hep.payload) == (0x1234, 1, INVITE)


@pytest.mark.parametrize("family", [28, 30])
def test_hep_v2_bsd_ipv6_family_is_normalised(family: int) -> None:
    hep = decode(hep_v2(family=family, src=bytes(15) + b"\x01", dst=bytes(16)))
    assert (hep.ip_family, hep.src_ip, hep.dst_ip) == (10, "::1", "::")


def test_hep_v1_has_no_time_header() -> None:
    hep = decode(hep_v2(version=1))
    assert (hep.version, hep.timestamp, hep.capture_id, hep.payload) == (1, 0.0, 0, INVITE)
    assert (hep.src_ip, hep.dst_ip, hep.src_port) == ("192.168.0.1", "192.168.0.2", 5060)


@pytest.mark.parametrize("header_len", [8, 16, 28, 0, 255])
def test_hep_v2_header_length_field_is_ignored(header_len: int) -> None:
    """sofia-sip writes 8 + addresses + 12, captagent 8 + addresses; kamailio ignores it."""
    assert decode(hep_v2(header_len=header_len)).payload == INVITE


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(hep_v2()[:7], "truncated", id="short-header"),
        pytest.param(hep_v2()[:15], "truncated", id="short-ipv4"),
        pytest.param(
            hep_v2(family=10, src=bytes(16), dst=bytes(16))[:39], "truncated", id="short-ipv6"
        ),
        pytest.param(hep_v2()[:27], "truncated", id="short-time"),
        pytest.param(hep_v2(payload=b""), "no_payload", id="v2-empty"),
        pytest.param(hep_v2(version=1, payload=b""), "no_payload", id="v1-empty"),
        pytest.param(hep_v2(family=0), "bad_address_family", id="family-0"),
        pytest.param(hep_v2(family=7), "bad_address_family", id="family-7"),
    ],
)
def test_hep_v2_errors(data: bytes, reason: str) -> None:
    assert reason_of(data) == reason


def test_hep_v2_every_header_prefix_is_rejected() -> None:
    packet = hep_v2(family=10, src=bytes(16), dst=bytes(16))
    for cut in range(8 + 32 + 12 + 1):
        with pytest.raises(HepError):
            decode(packet[:cut])


# --------------------------------------------------------------------------- real captures


def test_missing_shared_data_fails_under_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(pcapdata, "SHARED_DATA", tmp_path / "absent")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        require_shared_data()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_shared_data()
    monkeypatch.setattr(pcapdata, "SHARED_DATA", tmp_path)
    assert require_shared_data() == tmp_path


def sip_kind(payload: bytes) -> str:
    """Request method or response status code from the first line."""
    first = payload.split(b"\n", 1)[0].rstrip(b"\r")
    if first.startswith(b"SIP/2.0 "):
        return first.split(b" ")[1].decode()
    method, _, rest = first.partition(b" ")
    assert rest.endswith(b" SIP/2.0"), first
    return method.decode()


def pcap(name: str) -> Path:
    return require_shared_data() / "pcaps" / name


def test_hep_pcap_from_hep_wireshark() -> None:
    payloads = udp_payloads(pcap("hepwireshark-hep.pcap"))
    assert len(payloads) == 8
    packets = [decode(data) for _, data in payloads]
    assert Counter(p.proto_type for p in packets) == {1: 6, 5: 1, 100: 1}
    assert Counter(sip_kind(p.payload) for p in packets if p.proto_type == 1) == {
        "INVITE": 1,
        "100": 1,
        "407": 1,
        "OPTIONS": 1,
        "200": 1,
        "PUBLISH": 1,
    }
    for hep in packets:
        assert (hep.version, hep.ip_family, hep.compressed) == (3, 2, False)
        assert {hep.src_ip, hep.dst_ip} == {"192.168.1.1", "192.168.1.2"}
        assert hep.timestamp > 1_400_000_000
        assert (hep.capture_id, hep.auth_key) == (2001, "myHep")
    rtcp = next(p for p in packets if p.proto_type == 5)
    assert rtcp.payload.startswith(b"{")
    log = next(p for p in packets if p.proto_type == 100)
    assert b"SYSLOG" in log.payload


def test_hep3_compressed_pcapng_from_hep_wireshark() -> None:
    datagrams = udp_datagrams(pcap("hepwireshark-hep3_compressed.pcapng"))
    assert len(datagrams) == 21
    packets = []
    for datagram in datagrams:
        assert 9060 in (datagram.src_port, datagram.dst_port)
        hep = decode(datagram.payload)
        assert hep.compressed is True
        assert hep.proto_type == 1
        assert hep.timestamp > 1_400_000_000
        assert abs(hep.timestamp - datagram.timestamp) < 3600
        assert 0 < hep.src_port <= 0xFFFF
        assert 0 < hep.dst_port <= 0xFFFF
        assert 5060 in (hep.src_port, hep.dst_port)
        assert hep.src_ip.startswith("192.168.")
        assert hep.dst_ip.startswith("192.168.")
        packets.append(hep)
    assert Counter(sip_kind(p.payload) for p in packets) == {"REGISTER": 12, "401": 6, "200": 3}


def test_other_captures_hold_no_hep() -> None:
    """Plain SIP captures must be rejected cleanly, never half-decoded."""
    folder = require_shared_data() / "pcaps"
    seen = 0
    for path in sorted(folder.glob("*.pcap*")):
        if path.name.startswith("hepwireshark-"):
            continue
        for _, data in udp_payloads(path):
            seen += 1
            with pytest.raises(HepError):
                decode(data)
    assert seen > 1000
