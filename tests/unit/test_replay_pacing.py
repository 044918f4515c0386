"""`sipcdr replay` at a capture's own pace: long silences shortened to `--max-gap`,
progress reported, and the note on what the daemon's clock guard does to
`--original-times`; at a fixed rate, what each loop sends (Call-IDs renamed in the
header only, HEP frames that decode to the capture), alone or from several senders."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
from pcapdata import require_shared_data
from sipcdr import hep
from sipcdr import replay as replay_module
from sipcdr.capture.pcapfile import iter_packets
from sipcdr.model import Packet
from sipcdr.replay import clock_guard_note, loop_suffix, replay, send_offsets
from sipcdr.sip import parse


def test_gaps_longer_than_the_cap_are_shortened_to_it() -> None:
    stamps = [100.0, 100.2, 3700.2, 3700.7, 3702.7]
    assert send_offsets(stamps, 1.0) == pytest.approx([0.0, 0.2, 1.2, 1.7, 2.7])
    # No cap worth the name: the capture's own spacing.
    assert send_offsets(stamps, 86400.0) == pytest.approx([0.0, 0.2, 3600.2, 3600.7, 3602.7])


def test_a_clock_stepping_back_in_the_capture_never_waits() -> None:
    assert send_offsets([10.0, 9.0, 9.5], 1.0) == pytest.approx([0.0, 0.0, 0.5])


def packet(timestamp: float) -> Packet:
    return Packet(timestamp, "192.0.2.1", 5060, "192.0.2.2", 5060, "udp", b"x", "n")


def test_the_clock_guard_note_is_given_for_old_captures_only() -> None:
    now = 1_800_000_000.0
    assert clock_guard_note([packet(now - 10), packet(now - 5)], now) is None
    note = clock_guard_note([packet(now - 3 * 86400), packet(now - 3 * 86400 + 60)], now)
    assert note is not None
    assert note.startswith("--original-times: the capture's times are 3.0 days from now")
    assert "more than 30 s off its clock by the receive time" in note


def test_progress_is_reported_while_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay_module, "PROGRESS_EVERY_S", 0.0)
    capture = require_shared_data() / "pcaps" / "zeek-sip-wireshark.pcap"
    heard: list[tuple[int, int]] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        result = replay(
            capture,
            receiver.getsockname(),
            original_pace=False,
            loops=2,
            progress=lambda sent, total: heard.append((sent, total)),
        )
    assert result.sent == 162
    assert heard[-1] == (162, 162)
    assert [sent for sent, _total in heard] == sorted(sent for sent, _total in heard)


def receive_replay(
    loops: int, *, as_hep: bool = False, workers: int = 1, original_times: bool = False
) -> tuple[list[bytes], int]:
    """Every datagram a replay of the sample capture sends, read as it arrives."""
    capture = require_shared_data() / "pcaps" / "zeek-sip-wireshark.pcap"
    got: list[bytes] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        # Room for every datagram of a run: on a loaded machine the reader thread can
        # wait tens of milliseconds for a core, and the default buffer holds about a
        # hundred of these before the kernel drops the rest.
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        receiver.settimeout(1.0)

        def drain() -> None:
            with contextlib.suppress(TimeoutError):
                while True:
                    got.append(receiver.recv(65535))

        reader = threading.Thread(target=drain)
        reader.start()
        result = replay(
            capture,
            receiver.getsockname(),
            as_hep=as_hep,
            rate=4000.0,
            loops=loops,
            workers=workers,
            original_times=original_times,
        )
        reader.join()
    return got, result.sent


def call_ids(payloads: list[bytes]) -> list[bytes]:
    return [parse(payload).call_id.encode() for payload in payloads]


def test_each_loop_renames_every_call_id_and_nothing_else() -> None:
    got, sent = receive_replay(3)
    assert sent == len(got) == 243
    original = got[:81]
    for loop in (1, 2):
        renamed = got[81 * loop : 81 * (loop + 1)]
        assert call_ids(renamed) == [c + b"-L%d" % loop for c in call_ids(original)]
        # Only the header changed: undo it and the bytes are the capture's.
        for before, after, call_id in zip(original, renamed, call_ids(original), strict=True):
            assert after.replace(call_id + b"-L%d" % loop, call_id) == before
            assert len(after) == len(before) + 3


def test_the_loop_counter_is_as_wide_for_every_loop_of_a_run() -> None:
    assert [loop_suffix(n, 12) for n in (1, 9, 10, 11)] == [b"-L01", b"-L09", b"-L10", b"-L11"]
    assert loop_suffix(1, 2) == b"-L1"


def test_hep_frames_decode_to_the_capture_with_the_send_time() -> None:
    before = time.time()
    got, sent = receive_replay(2, as_hep=True)
    after = time.time()
    assert sent == len(got) == 162
    capture = require_shared_data() / "pcaps" / "zeek-sip-wireshark.pcap"
    packets = list(iter_packets(capture))
    decoded = [hep.decode(frame) for frame in got]
    plain, _count = receive_replay(2)
    assert [frame.payload for frame in decoded] == plain
    assert [(d.src_ip, d.src_port, d.dst_ip, d.dst_port) for d in decoded[81:]] == [
        (p.src_ip, p.src_port, p.dst_ip, p.dst_port) for p in packets
    ]
    assert all(before - 0.001 <= d.timestamp <= after for d in decoded)


def test_hep_frames_can_carry_the_capture_times_shifted_per_loop() -> None:
    got, _sent = receive_replay(2, as_hep=True, original_times=True)
    capture = require_shared_data() / "pcaps" / "zeek-sip-wireshark.pcap"
    stamps = [p.timestamp for p in iter_packets(capture)]
    span = stamps[-1] - stamps[0] + 1.0
    decoded = [hep.decode(frame).timestamp for frame in got]
    assert decoded == pytest.approx([*stamps, *(s + span for s in stamps)], abs=1e-6)


def test_workers_share_the_loops_and_every_loop_keeps_the_capture_order() -> None:
    got, sent = receive_replay(4, workers=2)
    assert sent == len(got) == 4 * 81
    capture = require_shared_data() / "pcaps" / "zeek-sip-wireshark.pcap"
    original = call_ids([p.payload for p in iter_packets(capture)])
    assert not any(b"-L" in call_id for call_id in original)
    by_loop: dict[bytes, list[bytes]] = {}
    for call_id in call_ids(got):
        name, _, loop = call_id.rpartition(b"-L") if b"-L" in call_id else (call_id, b"", b"0")
        by_loop.setdefault(loop, []).append(name)
    assert sorted(by_loop) == [b"0", b"1", b"2", b"3"]
    assert all(names == original for names in by_loop.values())


def test_several_workers_need_a_rate() -> None:
    capture = require_shared_data() / "pcaps" / "zeek-sip-wireshark.pcap"
    with pytest.raises(ValueError, match="workers"):
        replay(capture, ("127.0.0.1", 9), loops=2, workers=2)
