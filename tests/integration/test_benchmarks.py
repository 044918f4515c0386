"""The benchmarks still run: tiny counts, exit 0 and every report line present.
Their figures are read by people, never asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("parser.py", ["--rounds", "1", "--number", "60"], "sipcdr / dpkt.sip, INVITE"),
        ("dialogs.py", ["--calls", "300", "--rounds", "1", "--flows", "30"], "bytes per open"),
        ("receive.py", ["--quick"], "sipcdr receive path"),
        ("capture_path.py", ["--quick"], "former against current"),
        ("hep_listener.py", ["--rounds", "1", "--repeat", "2", "--calls", "20"], "current/former"),
        ("decode.py", ["--rounds", "1", "--number", "200"], "dpkt/sipcdr"),
        ("import_captures.py", ["--rounds", "1", "--scale", "0.002"], "x tshark"),
        ("import_postgres.py", ["--rounds", "1", "--frames", "2000"], "delivery apart"),
        ("connections.py", ["--quick"], "KiB server RSS per connection"),
        ("spool.py", ["--rounds", "1", "--number", "2000"], "reader alone, one by one"),
        ("signaling.py", ["--rounds", "1", "--number", "300"], "delivery: row, before | now"),
        ("restricted_calls.py", ["--rounds", "1", "--number", "2000"], "at the bound"),
        ("journal.py", ["--rounds", "1", "--flows", "30", "--open", "300"], "write per record"),
        ("kafka.py", ["--records", "1000", "--rounds", "1"], "records/s"),
        ("postgres.py", ["--records", "2000", "--rounds", "1"], "COPY + ON CONFLICT"),
        ("postgres.py", ["--signaling", "1500", "--rounds", "1"], "without any index"),
        ("delivery.py", ["--messages", "1200", "--rounds", "2"], "tuples"),
        ("delivery_overhead.py", ["--batches", "40", "--rounds", "2"], "now/before"),
        ("replay.py", ["--quick"], "replay offers"),
        ("e2e.py", ["--quick"], "highest offered rate without loss:"),
        (
            "capture.py",
            ["--rates", "2000", "--seconds", "1", "--rounds", "1"],
            "capture process CPU per message",
        ),
        (
            "rating.py",
            [
                *("--prefixes", "3000", "--lookups", "3000"),
                *("--cdrs", "300", "--flows", "30", "--rounds", "1"),
            ],
            "look-ups, prefix dict",
        ),
        ("stages.py", ["--flows", "100", "--rounds", "2"], "enrich and rate cost"),
        ("enrich_numbers.py", ["--flows", "100", "--rounds", "2"], "the enrich stage costs"),
        ("signaling_digest.py", ["--number", "300", "--rounds", "2"], "spooled costs"),
        ("cdr_init.py", ["--flows", "100", "--rounds", "2"], "the record alone costs"),
        (
            "fraud.py",
            ["--flows", "100", "--rounds", "1", "--spray", "2000"],
            "B. the capture pipeline",
        ),
    ],
)
def test_benchmark_runs(script: str, args: list[str], expected: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert expected in done.stdout
