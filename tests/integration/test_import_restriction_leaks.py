"""`sipcdr import` against inputs that could carry a restricted subject past the list:
a saved list that exists but cannot be read, and fraud alerts that name the subject
without being about it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import orjson
import pytest
from kafkabroker import consume_all, unique_topic
from pgserver import run_sync
from sipcalls import Call, write_calls_pcap
from sipcdr.privacy.restriction_file import (
    FILE_NAME,
    MAX_SAVED_SUBJECTS,
    TooManyToSave,
    save_restrictions,
)
from sipcdr.private import private_dir, write_private
from test_import_delivery import run_import
from test_import_restrictions import (
    CONFIG,
    SUBJECT,
    kafka_env,
    restrict_subject,
    write_capture,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def too_long_to_keep(state: Path) -> None:
    """What the daemon leaves when more numbers are restricted than a copy is kept for:
    a note in place of the list."""
    save_restrictions(state, frozenset({SUBJECT}))  # an older list, which must not apply
    numbers = {str(4930_0000_0000 + n) for n in range(MAX_SAVED_SUBJECTS)} | {SUBJECT}
    with pytest.raises(TooManyToSave):
        save_restrictions(state, frozenset(numbers))
    assert b"not_saved" in (state / FILE_NAME).read_bytes()


def cut_short(state: Path) -> None:
    write_private(state / FILE_NAME, orjson.dumps([SUBJECT, "4930111222"])[:-5])


@pytest.mark.parametrize("damage", [too_long_to_keep, cut_short])
def test_a_saved_list_that_cannot_be_read_publishes_nothing_of_the_subject(
    tmp_path: Path, kafka_bootstrap: str, damage: object
) -> None:
    assert callable(damage)
    damage(private_dir(tmp_path / "var"))
    capture = tmp_path / "calls.pcap"
    write_capture(capture)
    (tmp_path / "sipcdr.toml").write_text(CONFIG)
    topic = unique_topic()
    done = run_import(
        tmp_path, capture, "--config", "sipcdr.toml", **kafka_env(kafka_bootstrap, topic)
    )
    assert done.returncode == 1, done.stderr
    assert "cannot be read (damaged, or more than 1,000,000 subjects" in done.stderr
    assert "so nothing was imported" in done.stderr
    received = asyncio.run(consume_all(kafka_bootstrap, topic, 3, timeout=8))
    calls = [orjson.loads(record.value)["call_id"] for record in received]
    assert "restricted@x" not in calls, done.stderr


# Sequential dialing from one caller, the subject's number last: the alert is about the
# caller, and names the subject as the number last dialled.
SEQUENTIAL = (
    CONFIG
    + """
[fraud.sequential_dialing]
per_caller = { warning = 3, critical = 50 }
"""
)
DIALLED = ("4940555664", "4940555665", SUBJECT)


def write_sequential_capture(path: Path) -> None:
    calls = [
        Call(call_id=f"seq{n}@x", callee="+" + number, from_tag=f"s{n}")
        for n, number in enumerate(DIALLED)
    ]
    write_calls_pcap(path, calls, 0.5)


async def alert_rows(dsn: str) -> list[tuple[str, str, bool]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT subject, details::text, restricted FROM fraud_alerts")
    finally:
        await conn.close()
    return [(row[0], row[1], row[2]) for row in rows]


def test_an_alert_naming_a_restricted_number_stays_off_kafka_and_is_flagged(
    tmp_path: Path, pg_dsn: str, kafka_bootstrap: str
) -> None:
    run_sync(lambda: restrict_subject(pg_dsn))
    capture = tmp_path / "calls.pcap"
    write_sequential_capture(capture)
    (tmp_path / "sipcdr.toml").write_text(SEQUENTIAL)
    topic = unique_topic()
    done = run_import(
        tmp_path,
        capture,
        "--config",
        "sipcdr.toml",
        SIPCDR_SINKS__POSTGRES__DSN=pg_dsn,
        **kafka_env(kafka_bootstrap, topic),
    )
    assert done.returncode == 0, done.stderr
    stored = run_sync(lambda: alert_rows(pg_dsn))
    naming = [row for row in stored if SUBJECT in row[1]]
    assert naming, f"the capture raised no alert naming the subject: {stored}"
    published = asyncio.run(consume_all(kafka_bootstrap, f"{topic}.fraud", 1, timeout=8))
    assert [r.value for r in published if SUBJECT.encode() in r.value] == []
    assert all(restricted for _, _, restricted in naming), naming


def test_pseudonymized_alerts_carry_no_number_in_their_key(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    key = tmp_path / "pseudonym.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    capture = tmp_path / "calls.pcap"
    write_sequential_capture(capture)
    (tmp_path / "sipcdr.toml").write_text(SEQUENTIAL)
    topic = unique_topic()
    done = run_import(
        tmp_path,
        capture,
        "--config",
        "sipcdr.toml",
        SIPCDR_SINKS__KAFKA__PSEUDONYMIZE_NUMBERS="true",
        SIPCDR_PRIVACY__PSEUDONYM_KEY_FILE=str(key),
        **kafka_env(kafka_bootstrap, topic),
    )
    assert done.returncode == 0, done.stderr
    published = asyncio.run(consume_all(kafka_bootstrap, f"{topic}.fraud", 1, timeout=15))
    assert published, "the capture raised no alert"
    caller = Call().caller.lstrip("+").encode()
    for record in published:
        assert caller not in record.value, record.value
        assert caller not in (record.key or b""), record.key
