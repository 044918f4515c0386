"""Real calls, real proxy, real daemon: SIPp UAC -> Kamailio -> SIPp UAS, with
Kamailio's siptrace mirroring every message of both legs as HEPv3 to `sipcdr run`.

The CDRs must be what SIPp says happened: one per call, no duplicates although every
message arrives twice (once per leg), the right disposition and SIP code, and billsec
within 100 ms of the hold time SIPp paused between ACK and BYE.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from daemonproc import start_daemon, wait_for
from peers import KamailioFactory, Sipp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HOLD_MS = 1000
# (uac scenario, uas scenario, calls, disposition, sip_code, HEP messages per call)
SCENARIOS = [
    ("uac_answered", "uas_answered", 3, "answered", 200, 13),
    ("uac_busy", "uas_busy", 1, "busy", 486, 7),
    ("uac_notfound", "uas_notfound", 1, "failed", 404, 7),
    ("uac_cancel", "uas_ringing", 1, "cancelled", 487, 13),
]


def test_sipp_calls_through_kamailio_become_correct_cdrs(
    tmp_path: Path, kamailio_hep: KamailioFactory, sipp: Sipp
) -> None:
    daemon = start_daemon(tmp_path)
    try:
        expected_messages = 0
        for uac_scenario, uas_scenario, calls, _disposition, _code, per_call in SCENARIOS:
            uas = sipp.run_uas(uas_scenario, calls=calls, timeout=30)
            proxy = kamailio_hep(daemon.endpoint("hep_udp"), uas.address)
            uac = sipp.run_uac(
                uac_scenario, proxy.address, calls=calls, rate=10, hold_ms=HOLD_MS, timeout=20
            )
            assert uac.ok, uac.describe()
            assert uas.wait(timeout=10).ok
            proxy.stop()
            expected_messages += calls * per_call

        total_calls = sum(calls for _u, _s, calls, *_rest in SCENARIOS)
        wait_for(lambda: len(daemon.cdrs()) >= total_calls, timeout=30)
        wait_for(
            lambda: (
                daemon.metric("sipcdr_packets_received_total", source="hep_udp")
                >= expected_messages
            )
        )
        # Every mirrored message arrived and parsed; none was dropped or rejected.
        assert daemon.metric("sipcdr_packets_received_total", source="hep_udp") == expected_messages
        parsed = sum(
            daemon.metric("sipcdr_sip_messages_total", method=method, kind=kind)
            for method in ("INVITE", "ACK", "BYE", "CANCEL")
            for kind in ("request", "response")
        )
        assert parsed == expected_messages
        assert "sipcdr_sip_parse_errors_total{" not in daemon.metrics()
    finally:
        assert daemon.stop() == 0

    records = daemon.cdrs()
    assert len(records) == total_calls
    assert len({r["cdr_id"] for r in records}) == total_calls
    assert len({r["call_id"] for r in records}) == total_calls
    outcomes = Counter((r["disposition"], r["sip_code"]) for r in records)
    assert outcomes == Counter(
        {(disposition, code): calls for _u, _s, calls, disposition, code, _m in SCENARIOS}
    )
    for record in records:
        assert record["capture_node"] == "2001"
        if record["disposition"] == "answered":
            assert abs(float(str(record["billsec"])) - HOLD_MS / 1000) <= 0.1, record
            assert record["hangup_by"] == "caller"
            assert record["end_reason"] == "bye"
        elif record["disposition"] == "cancelled":
            assert record["end_reason"] == "cancel"
            assert record["hangup_by"] == "caller"
        else:
            assert record["end_reason"] == "final_response"
            assert record["billsec"] == 0.0
