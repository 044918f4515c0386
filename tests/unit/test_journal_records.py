"""The dialog journal's records byte for byte against their documented layout, however
the appender builds them, and the end-of-turn write queued once a turn."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import struct
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import pytest
from sipcalls import Call, packet
from sipcdr.dialog import Correlator
from sipcdr.dialogstore import MAGIC, DialogStore
from sipcdr.dialogstore import journal as journal_module
from sipcdr.dialogstore.journal import (
    KIND_CLOSED,
    KIND_MESSAGE,
    closed_record,
    decided_record,
    message_record,
    timer_record,
)
from sipcdr.model import Cdr, Packet
from sipcdr.sip import parse

T0 = 1_700_000_000.0


def documented(packet: Packet) -> bytes:
    """A message record as `sipcdr.dialogstore.journal` lays it out: kind, timestamp,
    ports, the four strings' lengths (capture node first), then source, destination,
    transport, capture node and the payload."""
    src = packet.src_ip.encode("utf-8", "surrogatepass")
    dst = packet.dst_ip.encode("utf-8", "surrogatepass")
    proto = packet.transport.encode("utf-8", "surrogatepass")
    node = packet.capture_node.encode("utf-8", "surrogatepass")
    head = struct.pack(
        "<BdHHHBBB",
        1,
        packet.timestamp,
        packet.src_port,
        packet.dst_port,
        len(node),
        len(src),
        len(dst),
        len(proto),
    )
    return head + src + dst + proto + node + packet.payload


def test_message_records_are_the_documented_layout_whatever_the_endpoints() -> None:
    data = Call("layout@x").request("INVITE")
    packets = [
        Packet(T0, "192.0.2.10", 5060, "203.0.113.20", 5061, "udp", data, "node-1"),
        Packet(T0 + 1, "2001:db8::1", 1, "2001:db8::2", 65535, "tcp", data, "ünïcode"),
        # A capture file's name may hold bytes no UTF-8 decoder accepted.
        Packet(T0 + 2, "192.0.2.10", 5060, "203.0.113.20", 5061, "udp", b"", "bad\udcff"),
        # The same endpoints again, and the first ones with another payload.
        Packet(T0 + 3, "2001:db8::1", 1, "2001:db8::2", 65535, "tcp", data, "ünïcode"),
        Packet(T0 + 4, "192.0.2.10", 5060, "203.0.113.20", 5061, "udp", b"x", "node-1"),
    ]
    for each in packets:
        assert message_record(each) == documented(each)


def test_the_endpoint_cache_is_bounded_and_records_stay_exact_across_its_clearing() -> None:
    data = b"OPTIONS sip:x SIP/2.0\r\n\r\n"
    kept = journal_module._ENDPOINTS_KEPT
    for n in range(kept + 10):
        source = f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}"
        each = Packet(T0, source, 5060, "192.0.2.1", 5060, "udp", data, "n")
        assert message_record(each) == documented(each)
        assert len(journal_module._endpoints) <= kept


def test_a_field_the_layout_cannot_hold_gives_no_record() -> None:
    data = b"INVITE sip:x SIP/2.0\r\n\r\n"
    assert message_record(Packet(T0, "a" * 256, 1, "b", 2, "udp", data, "n")) is None
    assert message_record(Packet(T0, "a", 70000, "b", 2, "udp", data, "n")) is None
    # The refusal is not remembered as a record of those endpoints.
    assert message_record(Packet(T0, "a", 1, "b", 2, "udp", data, "n")) is not None


def frames(path: Path) -> list[bytes]:
    """The bodies of a journal file's records, each checked against its frame."""
    data = path.read_bytes()
    assert data.startswith(MAGIC)
    bodies, at = [], len(MAGIC)
    while at < len(data):
        crc, length = struct.unpack_from("<II", data, at)
        body = data[at + 8 : at + 8 + length]
        assert len(body) == length and zlib.crc32(body) == crc
        bodies.append(body)
        at += 8 + length
    return bodies


async def test_the_end_of_turn_write_is_queued_once_a_turn_whatever_was_written_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The barrier and the close records write what waits at once; the records after
    them in the same turn are written by the one callback queued at the turn's first
    record, at its end, in order."""
    store = DialogStore(tmp_path, Correlator(), batch_writes=True)
    store.recover()
    await store.start()
    loop = asyncio.get_running_loop()
    queued: list[Any] = []
    real_call_soon = loop.call_soon

    def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(callback, "__self__", None) is store:
            queued.append(callback)
        return real_call_soon(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon", counting)
    (journal,) = tmp_path.glob("*.journal")
    calls = [Call(f"turn-{n}@x", from_tag=f"t{n}") for n in range(4)]
    packets = [packet(T0 + n, call.request("INVITE")) for n, call in enumerate(calls)]
    cdr = a_cdr()
    store.message(packets[0])
    store.barrier.write(cdr)  # a CDR of the turn: what waits is written first
    store.closed(cdr)  # and its close record right after it
    written = frames(journal)
    closing = closed_record(cdr, max(cdr.end_time, store.correlator.now))
    assert written == [message_record(packets[0]), closing]
    store.message(packets[1])
    store.message(packets[2])
    assert frames(journal) == written  # held for the end of the turn
    assert len(queued) == 1
    await asyncio.sleep(0)
    assert frames(journal) == [*written, message_record(packets[1]), message_record(packets[2])]
    store.message(packets[3])  # the next turn queues its own
    assert len(queued) == 2
    await asyncio.sleep(0)
    assert frames(journal)[-1] == message_record(packets[3])
    stats = store.stats
    assert (stats.journal_messages, stats.journal_closes, stats.journal_write_errors) == (4, 1, 0)
    await store.stop()


def a_cdr() -> Cdr:
    """The CDR of an answered call, closed by its BYE."""
    correlator = Correlator()
    call = Call("closed@x", from_tag="c")
    flow = (
        call.request("INVITE"),
        call.response(200, "OK"),
        call.request("BYE", 2, "z9hG4bK-bye", to_tag="callee-tag"),
    )
    closed: list[Cdr] = []
    for at, data in enumerate(flow):
        closed += correlator.feed(packet(T0 + at, data), parse(data))
    (cdr,) = closed
    return cdr


def test_without_an_event_loop_nothing_is_queued(tmp_path: Path) -> None:
    store = DialogStore(tmp_path, Correlator(), batch_writes=True)
    store.recover()
    store._fd = os.open(tmp_path / "j", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        store.message(packet(T0, Call("now@x").request("INVITE")))
        assert not store._turn_end_queued
        assert store.stats.journal_messages == 1
    finally:
        os.close(store._fd)


def test_a_spray_of_long_capture_node_names_keeps_little_memory() -> None:
    """Distinct long names (a HEP agent's node name, up to 64 KB; one too long for the
    layout too) must not each stay kept: 4,096 of them would hold gigabytes."""
    data = Call("spray@x").request("INVITE")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(200):
            node = f"{n:05d}" + ("n" if n % 2 else "\ufffd") * 60_000
            each = Packet(T0, "192.0.2.10", 5060, "203.0.113.20", 5061, "udp", data, node)
            record = message_record(each)
            assert record is None if n % 2 == 0 else record == documented(each)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 2_000_000


@pytest.mark.parametrize("seed", range(6))
async def test_failed_writes_lose_whole_records_in_order_and_count_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Batched, with writes refused (a full disk, an I/O error) or cut short at random:
    the journal holds whole records in the order they came, each counted written or
    failed; nothing waits once the barrier or a close record has written; a close
    record is the last one written when it was written at all."""
    rng = random.Random(seed)
    real_writev = os.writev
    made_room = [0]

    def make_room() -> bool:
        made_room[0] += 1
        return made_room[0] % 2 == 1

    store = DialogStore(tmp_path, Correlator(), batch_writes=True, on_no_space=make_room)
    store.recover()
    await store.start()
    (journal,) = tmp_path.glob("*.journal")
    journal_fd = store._fd

    def failing(fd: int, buffers: list[bytes]) -> int:
        if fd != journal_fd:
            return real_writev(fd, buffers)
        draw = rng.random()
        if draw < 0.1:
            raise OSError(errno.ENOSPC, "no space")
        if draw < 0.15:
            raise OSError(errno.EIO, "i/o")
        if draw < 0.3:
            data = b"".join(buffers)
            return real_writev(fd, [data[: rng.randrange(1, len(data) + 1)]])
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", failing)
    cdr = a_cdr()
    calls = [Call(f"fail-{n}@x", from_tag=f"f{n}") for n in range(20)]
    came: list[bytes] = []
    for step in range(300):
        op = rng.random()
        if op < 0.5:
            each = packet(T0 + step, rng.choice(calls).request("INVITE"))
            store.message(each)
            came.append(message_record(each) or b"")
        elif op < 0.6:
            store.barrier.write(cdr)
        elif op < 0.7:
            store.closed(cdr)
            closing = closed_record(cdr, max(cdr.end_time, store.correlator.now))
            came.append(closing)
            written = frames(journal)
            assert written[-1:] == [closing] or store.stats.journal_write_errors
        elif op < 0.75:
            store.decided([cdr], T0 + step)
            now = store.correlator.now
            came += [decided_record(cdr, now), timer_record(T0 + step)]
        else:
            await asyncio.sleep(0)
        if op >= 0.5 and op < 0.7:
            assert not store._pending
        written = frames(journal)
        it = iter(came)
        assert all(any(body == candidate for candidate in it) for body in written)
        stats = store.stats
        waiting = len(store._pending) // 2
        counted = stats.journal_messages + stats.journal_closes + stats.journal_decisions
        assert counted == len(written)
        assert counted + stats.journal_write_errors + waiting == len(came)
        kinds = [body[0] for body in written]
        assert stats.journal_closes == kinds.count(KIND_CLOSED)
        assert stats.journal_messages == kinds.count(KIND_MESSAGE)
    monkeypatch.setattr(os, "writev", real_writev)
    assert store.stats.journal_write_errors > 0 and not store.intact
    await store.stop()


def test_a_failed_cut_back_ends_writing_to_that_journal_counted(tmp_path: Path) -> None:
    """A write cut short whose cut-back fails leaves half a record, at which replay
    stops: records after it would be counted as journaled and never replayed. They are
    refused and counted instead, until the next journal (the next checkpoint's)."""
    path = tmp_path / "dialogs.1.journal"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.write(fd, MAGIC)
    store = DialogStore(tmp_path, Correlator())
    store.use_journal(fd, len(MAGIC))
    real_writev, real_ftruncate = os.writev, os.ftruncate
    faults = {"short": 1, "full": 1, "ftruncate": 1}

    def writev(fd: int, buffers: Any) -> int:
        if faults["short"]:
            faults["short"] -= 1
            return os.write(fd, b"".join(buffers)[:20])  # the disk fills mid-record
        if faults["full"]:
            faults["full"] -= 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_writev(fd, buffers)

    def ftruncate(fd: int, length: int) -> None:
        if faults["ftruncate"]:
            faults["ftruncate"] -= 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_ftruncate(fd, length)

    calls = [Call(f"torn-{n}@x") for n in range(6)]
    try:
        store.message(packet(T0, calls[0].request("INVITE")))  # whole
        whole = path.stat().st_size
        os.writev, os.ftruncate = writev, ftruncate
        try:
            store.message(packet(T0, calls[1].request("INVITE")))  # torn, not cut back
        finally:
            os.writev, os.ftruncate = real_writev, real_ftruncate
        for call in calls[2:4]:
            store.message(packet(T0, call.request("INVITE")))
        stats = store.stats
        assert (stats.journal_messages, stats.journal_write_errors) == (1, 3)
        assert not store._intact
        assert path.stat().st_size == whole + 20  # nothing after the torn bytes
    finally:
        os.close(fd)
    fresh = tmp_path / "dialogs.2.journal"
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.write(fd, MAGIC)
    try:
        store.use_journal(fd, len(MAGIC))  # as a checkpoint switches to the next one
        store.message(packet(T0, calls[4].request("INVITE")))
        assert store.stats.journal_messages == 2
    finally:
        os.close(fd)
