"""HEP/TCP connections that send only frames the daemon rejects (a wrong agent key, no
chunks at all) are not agents at work: they must not hold the connection slots that
an agent with the right key needs, however steadily they send."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest
from daemonproc import start_daemon, wait_for
from sipcalls import Call, answered_call_messages
from sipcdr import hepencode

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def frame(payload: bytes, key: str) -> bytes:
    return hepencode.encode(
        src_ip="192.0.2.10", dst_ip="203.0.113.20", src_port=5060, dst_port=5060,
        timestamp=time.time(), payload=payload, capture_id=2001, auth_key=key,
    )  # fmt: skip


def test_connections_sending_only_rejected_frames_do_not_keep_an_agent_out(
    tmp_path: Path,
) -> None:
    daemon = start_daemon(
        tmp_path,
        SIPCDR_CAPTURE__HEP_TCP_MAX_CONNECTIONS="8",
        SIPCDR_CAPTURE__HEP_TCP_MAX_PER_SOURCE="4",
        SIPCDR_CAPTURE__HEP_TCP_IDLE_TIMEOUT_S="2",
        SIPCDR_CAPTURE__HEP_KEYS__2001="s3cret",
    )
    endpoint = daemon.endpoint("hep_tcp")
    squatters = [
        socket.create_connection(endpoint, timeout=5, source_address=(source, 0))
        for source in ("127.0.0.2", "127.0.0.3")
        for _ in range(4)
    ]
    halt = threading.Event()

    def squat() -> None:
        wrong_key = frame(b"OPTIONS sip:x SIP/2.0\r\n\r\n", "wrong")
        empty = b"HEP3\x00\x06"  # a whole frame without a chunk
        while not halt.is_set():
            for index, sock in enumerate(squatters):
                with contextlib.suppress(OSError):
                    sock.sendall(wrong_key if index % 2 else empty)
            halt.wait(0.5)

    squatter = threading.Thread(target=squat)
    squatter.start()
    try:
        time.sleep(4)  # twice the idle timeout of rejected frames only
        call = Call(call_id="agent@x", from_tag="agent")
        data = b"".join(frame(m, "s3cret") for m in answered_call_messages(call))
        agent_source = ("127.0.0.1", 0)
        with socket.create_connection(endpoint, timeout=5, source_address=agent_source) as agent:
            agent.sendall(data)
            wait_for(lambda: [c["call_id"] for c in daemon.cdrs()] == ["agent@x"], timeout=10)
    finally:
        halt.set()
        squatter.join(timeout=10)
        for sock in squatters:
            sock.close()
        assert daemon.stop() == 0
