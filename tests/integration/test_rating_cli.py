"""`sipcdr rates check` as a user runs it: a subprocess, its exit code and its output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEADER = (
    "prefix,destination,rate,connect_fee,min_seconds,increment_seconds,"
    "effective_from,effective_to,currency,change\n"
)
GOOD_ROWS = (
    "49,Germany,0.0100,0,60,60,2025-01-01,,EUR,\n"
    "4930,Germany Berlin,0.0120,0,30,6,2025-01-01,,EUR,\n"
    "4930,Germany Berlin,0.0150,0,30,6,2026-01-01,,EUR,increase\n"
)
COMMAND_TIMEOUT_S = 30.0  # starting Python and reading a few lines


def rates_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sipcdr.cli", "rates", "check", *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def test_a_good_deck_exits_0_with_a_summary(tmp_path: Path) -> None:
    deck = tmp_path / "wholesale.csv"
    deck.write_text(HEADER + GOOD_ROWS)
    result = rates_check(str(deck))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{deck}: ok: 3 rows (3 valid), 2 prefixes, 0 errors, 0 warnings\n"
    assert result.stderr == ""


def test_every_problem_is_one_line_with_its_line_number(tmp_path: Path) -> None:
    deck = tmp_path / "bad.csv"
    deck.write_text(
        HEADER
        + GOOD_ROWS
        + "4940,Germany Hamburg,0.01O,0,30,6,2025-01-01,,EUR,\n"  # line 5
        + "\n"
        + "4930,Germany Berlin,0.0130,0,30,6,2026-01-01,,EUR,\n"  # line 7: duplicate of 4
        + "44,UK,0.01,0,1,1,2024-01-01,2025-01-01,EUR,\n"  # line 8: expired
    )
    result = rates_check(str(deck))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{deck}:5: error: rate '0.01O' is not a plain decimal number "
        "(digits and one '.', at most 24 digits) [bad_number]",
        f"{deck}:7: error: prefix 4930 already has a row from this effective_from (line 4) "
        "[duplicate]",
        f"{deck}:8: warning: expired: effective_to '2025-01-01' has passed [expired]",
        f"{deck}: refused: 6 rows (5 valid), 3 prefixes, 2 errors, 1 warnings",
    ]


def test_warnings_alone_do_not_fail_the_check(tmp_path: Path) -> None:
    deck = tmp_path / "old.csv"
    deck.write_text(HEADER + "44,UK,0.01,0,1,1,2024-01-01,2025-01-01,EUR,\n")
    result = rates_check(str(deck))
    assert result.returncode == 0
    assert "[expired]" in result.stdout


def test_json_report_shape(tmp_path: Path) -> None:
    deck = tmp_path / "bad.csv"
    deck.write_text(HEADER + GOOD_ROWS + "4940,Hamburg,0.01,0,30,0,2025-01-01,,EUR,\n")
    result = rates_check(str(deck), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report == {
        "file": str(deck),
        "ok": False,
        "rows": 4,
        "valid_rows": 3,
        "prefixes": 2,
        "errors": 1,
        "warnings": 0,
        "problems": [
            {
                "line": 5,
                "severity": "error",
                "reason": "zero_increment",
                "message": "increment_seconds is 0: no call could be billed",
            }
        ],
    }
    good = tmp_path / "good.csv"
    good.write_text(HEADER + GOOD_ROWS)
    ok = rates_check("--json", str(good))
    assert ok.returncode == 0
    assert json.loads(ok.stdout)["ok"] is True


def test_a_missing_file_is_one_clear_line_not_a_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.csv"
    result = rates_check(str(missing))
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == (
        f"{missing}: error: cannot read the file: No such file or directory [unreadable]"
    )
    assert "Traceback" not in result.stderr
    as_json = json.loads(rates_check(str(missing), "--json").stdout)
    assert as_json["problems"][0]["reason"] == "unreadable"
    assert as_json["problems"][0]["line"] is None


def test_a_directory_and_a_binary_file_are_refused_plainly(tmp_path: Path) -> None:
    result = rates_check(str(tmp_path))
    assert result.returncode == 1
    assert "[unreadable]" in result.stdout
    binary = tmp_path / "capture.pcap"
    binary.write_bytes(b"\xd4\xc3\xb2\xa1\x02\x00\x04\x00" + bytes(range(256)))
    result = rates_check(str(binary))
    assert result.returncode == 1
    assert f"{binary}:1: error: not UTF-8 text" in result.stdout
    assert result.stderr == ""


def test_a_file_that_is_not_a_deck(tmp_path: Path) -> None:
    other = tmp_path / "sipcdr.toml"
    other.write_text('[rating]\ndefault_plan = "wholesale"\n')
    result = rates_check(str(other))
    assert result.returncode == 1
    assert f"{other}:1: error: the header has no 'prefix' column [missing_column]" in result.stdout


def test_usage_errors_exit_2() -> None:
    assert rates_check().returncode == 2
    result = subprocess.run(
        [sys.executable, "-m", "sipcdr.cli", "rates"],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 2
