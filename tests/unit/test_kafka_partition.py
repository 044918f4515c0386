"""The sink's partitioner picks, for every key, the partition aiokafka's
DefaultPartitioner (the Java client's murmur2 default) picks: consumers and other
producers rely on a key's partition."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from sipcdr.sinks.kafka import KafkaSink
from sipcdr.sinks.kafkapartition import KeyPartitioner, murmur2


def keys(count: int, seed: int = 5) -> list[bytes]:
    rng = random.Random(seed)
    made = [b"", b"a", b"ab", b"abc", b"abcd", bytes(range(256)), b"\xff" * 37]
    made += [rng.randbytes(rng.randrange(0, 96)) for _ in range(count)]
    # Call-IDs as they come: text, an @host, lengths of every remainder mod 4.
    made += [f"{rng.getrandbits(64):016x}-{n}@198.51.100.{n % 250}".encode() for n in range(count)]
    return made


def test_murmur2_is_aiokafkas_for_every_length_and_byte() -> None:
    for key in keys(3000):
        assert murmur2(key) == aiokafka_murmur2(key), key


def test_the_java_clients_known_hashes() -> None:
    # From the Java client's UtilsTest.testMurmur2 (as signed 32-bit numbers there).
    known = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    for key, signed in known.items():
        assert murmur2(key) == signed & 0xFFFFFFFF, key


def test_partition_is_the_default_partitioners_as_partitions_are_added() -> None:
    partitioner = KeyPartitioner()
    default = DefaultPartitioner()
    sample = keys(1500, seed=9)
    # Each key asked again with other partition counts (a topic that gained
    # partitions, or topics of different sizes) after its hash was kept.
    for count in (1, 3, 6, 7, 12, 64, 6):
        partitions = list(range(count))
        available = partitions[: max(1, count // 2)]  # aiokafka ignores it for a key
        for key in sample:
            expected = default(key, partitions, available)
            assert partitioner(key, partitions, available) == expected, (key, count)
    picked = {partitioner(key, list(range(12)), []) for key in sample}
    assert picked == set(range(12))  # the comparison ran over every partition


def test_partitions_numbered_unlike_their_positions() -> None:
    partitioner = KeyPartitioner()
    partitions = [0, 2, 5, 9]
    for key in keys(500, seed=3):
        assert partitioner(key, partitions, partitions) == DefaultPartitioner()(
            key, partitions, partitions
        )


def test_no_key_goes_to_an_available_partition_as_aiokafka_sends_it() -> None:
    partitioner = KeyPartitioner()
    for _ in range(50):
        assert partitioner(None, [0, 1, 2, 3], [2]) == 2
        assert partitioner(None, [0, 1, 2, 3], []) in {0, 1, 2, 3}


def test_the_kept_hashes_are_bounded() -> None:
    partitioner = KeyPartitioner(max_keys=100)
    partitions = list(range(6))
    sample = keys(400, seed=11)
    for key in sample:
        assert partitioner(key, partitions, partitions) == DefaultPartitioner()(
            key, partitions, partitions
        )
        assert len(partitioner._hashes) <= 100
    # Hashed again after the table was dropped: still the same partitions.
    for key in sample:
        assert partitioner(key, partitions, partitions) == DefaultPartitioner()(
            key, partitions, partitions
        )


def test_the_sinks_producer_is_given_the_partitioner() -> None:
    sink = KafkaSink("127.0.0.1:1", create_topics=False)
    assert isinstance(sink._options["partitioner"], KeyPartitioner)


def test_the_kept_hashes_are_bounded_in_bytes_whatever_the_keys_length() -> None:
    """A Call-ID is the peer's to choose, up to a datagram's 64 KB: the table of kept
    hashes must not grow to gigabytes (32,768 such keys) in the delivery process."""
    partitioner = KeyPartitioner()
    partitions = list(range(6))
    rng = random.Random(13)
    long_keys = [rng.randbytes(60_000) for _ in range(64)]
    for key in long_keys * 2:  # asked again: still aiokafka's partition, not kept
        assert partitioner(key, partitions, partitions) == DefaultPartitioner()(
            key, partitions, partitions
        )
    assert sum(len(key) for key in partitioner._hashes) <= 64 * 256
    # Keys as Call-IDs come are kept all the same.
    call_ids = keys(200, seed=17)[7:]
    for key in call_ids:
        partitioner(key, partitions, partitions)
    assert all(key in partitioner._hashes for key in call_ids if len(key) <= 256)
