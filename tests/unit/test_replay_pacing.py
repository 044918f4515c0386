"""`sipcdr replay` at a capture's own pace: long silences shortened to `--max-gap`,
progress reported, and the note on what the daemon's clock guard does to
`--original-times`."""

from __future__ import annotations

import socket

import pytest
from pcapdata import require_shared_data
from sipcdr import replay as replay_module
from sipcdr.model import Packet
from sipcdr.replay import clock_guard_note, replay, send_offsets


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
