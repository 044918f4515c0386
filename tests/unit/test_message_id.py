"""The message id is the UUID v5-style digest it always was: of the namespace, capture
time and ports, the addresses and the captured bytes, however the hash is set up."""

from __future__ import annotations

import hashlib
import struct
import uuid

from sipcdr.model import Packet
from sipcdr.sipevent import _NAMESPACE, message_id, spooled, unspool
from test_signaling_spool import MESSAGES


def _expected(packet: Packet) -> str:
    name = b"".join(
        (
            _NAMESPACE,
            struct.pack("<dHH", packet.timestamp, packet.src_port, packet.dst_port),
            packet.src_ip.encode(),
            b"|",
            packet.dst_ip.encode(),
            b"|",
            packet.payload,
        )
    )
    digest = bytearray(hashlib.sha1(name).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # the RFC 9562 variant
    return str(uuid.UUID(bytes=bytes(digest)))


def test_the_id_is_the_digest_of_namespace_time_ports_addresses_and_bytes() -> None:
    assert len(MESSAGES) > 100
    for packet, msg in MESSAGES:
        assert message_id(packet) == _expected(packet)
        assert unspool(spooled(packet, msg, False)).message_id == _expected(packet)


def test_one_id_as_pinned() -> None:
    """As the former code, hashing namespace and fields in one piece, gave it."""
    packet = Packet(
        1_795_000_000.25, "192.0.2.10", 5060, "203.0.113.20", 5062, "udp", b"BYE x", "n1"
    )
    assert message_id(packet) == "119e023e-3798-5844-8a08-e2f531bd2435"


def test_ids_taken_in_turn_do_not_share_a_hash() -> None:
    first, second = (packet for packet, _msg in MESSAGES[:2])
    one, two = message_id(first), message_id(second)
    assert one != two
    assert message_id(first) == one
