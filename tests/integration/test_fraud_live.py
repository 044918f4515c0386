"""The fraud detectors on a running daemon, with real peers: ordinary SIPp calls through
Kamailio (mirrored as HEP) raise no alert; a SIPp scanner sweep (SIPVicious' default
User-Agent, OPTIONS and INVITEs to hundreds of extensions, on the mirrored-SIP
listener) becomes one `scanner` alert in PostgreSQL while the sweep is the newest
thing the daemon saw, the same alert updated rather than one per request."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from daemonproc import Daemon, start_daemon, wait_for
from peers import KamailioFactory, Sipp
from pgserver import run_sync

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SWEEP_STEPS = 150  # each an OPTIONS and an INVITE: 300 requests, 300 distinct users
ORDINARY_CALLS = 5


def alerts(dsn: str) -> list[asyncpg.Record]:
    async def fetch() -> list[asyncpg.Record]:
        connection = await asyncpg.connect(dsn)
        try:
            if not await connection.fetchval("SELECT to_regclass('fraud_alerts') IS NOT NULL"):
                return []
            return list(await connection.fetch("SELECT * FROM fraud_alerts ORDER BY raised_at"))
        finally:
            await connection.close()

    return run_sync(fetch)


def delivered_cdrs(daemon: Daemon) -> float:
    return daemon.metric("sipcdr_sink_records_total", sink="postgres", stream="records")


def test_a_scanner_sweep_is_one_alert_in_postgres_and_ordinary_calls_none(
    tmp_path: Path,
    pg_dsn: str,
    kamailio_hep: KamailioFactory,
    sipp: Sipp,
) -> None:
    daemon = start_daemon(tmp_path, SIPCDR_SINKS__POSTGRES__DSN=pg_dsn)
    try:
        # Ordinary traffic first: answered calls through the tracing proxy.
        uas = sipp.run_uas("uas_answered", calls=ORDINARY_CALLS, timeout=30)
        proxy = kamailio_hep(daemon.endpoint("hep_udp"), uas.address)
        uac = sipp.run_uac(
            "uac_answered", proxy.address, calls=ORDINARY_CALLS, rate=10, hold_ms=200, timeout=20
        )
        assert uac.ok, uac.describe()
        assert uas.wait(timeout=10).ok
        proxy.stop()
        # Every CDR is in PostgreSQL: whatever the calls raised would be there too.
        wait_for(lambda: delivered_cdrs(daemon) >= ORDINARY_CALLS, timeout=30)
        assert alerts(pg_dsn) == []
        assert "sipcdr_fraud_alerts_total{" not in daemon.metrics()

        sweep = sipp.run_uac(
            "scanner_sweep",
            daemon.endpoint("sip_udp"),
            calls=SWEEP_STEPS,
            rate=100,
            service="100",
            timeout=20,
        )
        assert sweep.ok, sweep.describe()
        wait_for(lambda: len(alerts(pg_dsn)) >= 1, timeout=15)
        # The sweep passed the critical level (100 requests in 5 min) at once: the same
        # incident escalated, not a second alert.
        wait_for(lambda: alerts(pg_dsn)[0]["severity"] == "critical", timeout=15)
        # Counted as raised, then as escalated; exported once a second.
        for severity in ("warning", "critical"):
            wait_for(
                lambda severity=severity: (
                    daemon.metric(  # type: ignore[misc]
                        "sipcdr_fraud_alerts_total", detector="scanner", severity=severity
                    )
                    >= 1
                )
            )
        metrics = daemon.metrics()
    finally:
        assert daemon.stop() == 0

    [alert] = alerts(pg_dsn)
    assert alert["detector"] == "scanner"
    assert alert["subject_kind"] == "source_ip"
    assert alert["subject"] == "127.0.0.1"
    assert alert["revision"] >= 1
    assert alert["count"] >= 100
    assert alert["call_ids"]
    assert "friendly-scanner" in str(alert["details"])
    assert 'sipcdr_fraud_alerts_total{detector="scanner",severity="warning"} 1.0' in metrics
    assert 'sipcdr_fraud_alerts_total{detector="scanner",severity="critical"} 1.0' in metrics
    # PostgreSQL keeps the alerts: the JSONL file beside it stays CDRs only.
    assert daemon.alerts() == []
