"""Both sides of real calls priced: SIPp UAC (the customer trunk) -> Kamailio -> SIPp
UAS (the vendor trunk), Kamailio mirroring both legs as HEPv3 to `sipcdr run`.

Each peer has its own loopback address, so the trunks are told apart by source: the
ingress trunk from the caller's first INVITE, the egress trunk from where Kamailio
forwarded it. The CDRs' cost, vendor cost and margin must be the prices this test
computes from the decks and each CDR's billsec, with its own arithmetic. A SIGHUP
then puts a new vendor deck in force while a broken customer deck is refused and
its predecessor keeps pricing.
"""

from __future__ import annotations

import json
import os
import signal
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import NamedTuple

import pytest
from daemonproc import Daemon, start_daemon, wait_for
from peers import KamailioFactory, Sipp, require_program

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CUSTOMER_HOST = "127.0.0.2"  # SIPp UAC: the customer's trunk sends the calls
VENDOR_HOST = "127.0.0.3"  # SIPp UAS: the vendor's trunk the proxy sends them to
CALLEE = "4930901820"  # E.164 without "+", the form carrier interconnects send
HOLD_MS = 1500
HEADER = (
    "prefix,destination,rate,connect_fee,min_seconds,increment_seconds,"
    "effective_from,effective_to,currency\n"
)
RETAIL = HEADER + "49,Germany,0.0500,0,60,60,2020-01-01,,EUR\n"
RETAIL += "4930,Germany Berlin,0.0150,0.0100,30,6,2020-01-01,,EUR\n"
VENDOR = HEADER + "49,Germany,0.3000,0,1,1,2020-01-01,,EUR\n"
VENDOR_CHEAPER = HEADER + "49,Germany,0.1200,0.0010,1,1,2020-01-01,,EUR\n"
BROKEN = RETAIL + "4989,Germany Munich,-0.01,0,60,60,2020-01-01,,EUR\n"  # negative rate


class Row(NamedTuple):
    """One deck row, as this test reads it."""

    rate: Decimal
    connect_fee: Decimal
    min_seconds: int
    increment_seconds: int


BERLIN = Row(Decimal("0.0150"), Decimal("0.0100"), 30, 6)
VENDOR_ROW = Row(Decimal("0.3000"), Decimal(0), 1, 1)
CHEAPER_ROW = Row(Decimal("0.1200"), Decimal("0.0010"), 1, 1)


def price(row: Row, billsec: object, answered: bool) -> Decimal:
    """The pricing rule of schemas/rate_deck.md, written out again."""
    if not answered:
        return Decimal("0.0000")
    milliseconds = int((Decimal(str(billsec)) * 1000).to_integral_value())
    first, step = row.min_seconds * 1000, row.increment_seconds * 1000
    if milliseconds == 0:
        billed = 0
    elif milliseconds <= first:
        billed = row.min_seconds
    else:
        billed = row.min_seconds + -(-(milliseconds - first) // step) * row.increment_seconds
    exact = row.connect_fee + row.rate * billed / 60
    return exact.quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP)


def run_calls(
    daemon: Daemon,
    kamailio_hep: KamailioFactory,
    uac: Sipp,
    uas_runner: Sipp,
    scenarios: list[tuple[str, str, int]],
) -> None:
    for uac_scenario, uas_scenario, calls in scenarios:
        uas = uas_runner.run_uas(uas_scenario, calls=calls, timeout=30)
        proxy = kamailio_hep(daemon.endpoint("hep_udp"), uas.address)
        result = uac.run_uac(
            uac_scenario,
            proxy.address,
            calls=calls,
            rate=10,
            hold_ms=HOLD_MS,
            service=CALLEE,
            timeout=20,
        )
        assert result.ok, result.describe()
        assert uas.wait(timeout=10).ok
        proxy.stop()


def log_events(daemon: Daemon, event: str) -> list[dict[str, object]]:
    lines = daemon.log.read_text().splitlines()
    return [json.loads(line) for line in lines if f'"event": "{event}"' in line]


def test_both_sides_of_proxied_calls_are_priced_from_the_decks(
    tmp_path: Path, kamailio_hep: KamailioFactory
) -> None:
    binary = require_program("sipp")
    uac = Sipp(tmp_path / "sipp-customer", binary=binary, host=CUSTOMER_HOST)
    uas = Sipp(tmp_path / "sipp-vendor", binary=binary, host=VENDOR_HOST)
    decks = tmp_path / "decks"
    decks.mkdir()
    (decks / "retail.csv").write_text(RETAIL)
    (decks / "vendor.csv").write_text(VENDOR)
    daemon = start_daemon(
        tmp_path,
        SIPCDR_RATING__DECKS__RETAIL=str(decks / "retail.csv"),
        SIPCDR_RATING__DECKS__VENDOR=str(decks / "vendor.csv"),
        SIPCDR_TRUNKS__0__NAME="customer",
        SIPCDR_TRUNKS__0__SOURCES=f"{CUSTOMER_HOST}/32",
        SIPCDR_TRUNKS__0__RATE_PLAN="retail",
        SIPCDR_TRUNKS__1__NAME="vendor",
        SIPCDR_TRUNKS__1__SOURCES=f"{VENDOR_HOST}/32",
        SIPCDR_TRUNKS__1__COST_PLAN="vendor",
    )
    try:
        assert [e["plan"] for e in log_events(daemon, "rate_deck_loaded")] == [
            "retail",
            "vendor",
        ]
        run_calls(
            daemon,
            kamailio_hep,
            uac,
            uas,
            [("uac_answered", "uas_answered", 3), ("uac_busy", "uas_busy", 1)],
        )
        wait_for(lambda: len(daemon.cdrs()) >= 4, timeout=30)

        # A broken customer deck is refused (the previous one stays), while the
        # vendor's new deck is put in force.
        (decks / "retail.csv").write_text(BROKEN)
        (decks / "vendor.csv").write_text(VENDOR_CHEAPER)
        os.kill(daemon.process.pid, signal.SIGHUP)
        wait_for(lambda: len(log_events(daemon, "rate_deck_loaded")) >= 3, timeout=30)
        (refused,) = log_events(daemon, "rate_deck_refused")
        assert (refused["plan"], refused["kept"]) == ("retail", "previous deck")
        assert "negative" in str(refused["problems"])
        run_calls(daemon, kamailio_hep, uac, uas, [("uac_answered", "uas_answered", 1)])
        wait_for(lambda: len(daemon.cdrs()) >= 5, timeout=30)
    finally:
        assert daemon.stop() == 0
        uac.stop()
        uas.stop()

    records = daemon.cdrs()
    assert len(records) == 5
    assert {r["disposition"] for r in records} == {"answered", "busy"}
    for number, record in enumerate(sorted(records, key=lambda r: str(r["start_time"]))):
        answered = record["disposition"] == "answered"
        vendor_row = VENDOR_ROW if number < 4 else CHEAPER_ROW
        cost = price(BERLIN, record["billsec"], answered)
        vendor_cost = price(vendor_row, record["billsec"], answered)
        assert (record["trunk"], record["egress_trunk"]) == ("customer", "vendor"), record
        assert (record["callee"], record["callee_valid"]) == (CALLEE, True)
        assert (record["rated"], record["rate_prefix"], record["rate_name"]) == (
            True,
            "4930",
            "Germany Berlin",
        )
        assert (record["rate_per_minute"], record["currency"]) == ("0.0150", "EUR")
        assert record["cost"] == str(cost), record
        assert record["vendor_cost"] == str(vendor_cost), record
        assert record["margin"] == str(cost - vendor_cost), record
        if answered:
            assert Decimal(str(record["billsec"])) > 1  # billed past the vendor's first second
            assert cost > 0 and vendor_cost > 0
