"""`sipcdr run` delivering to real PostgreSQL and a real Kafka-protocol broker through
outages, a SIGKILL and an overload: every CDR closed arrives, none twice by `cdr_id`.

Calls are sent as plain SIP/UDP to the daemon; the JSONL file is the witness of what
the daemon closed, PostgreSQL and the broker are checked against it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import asyncpg
import orjson
import pytest
from daemonproc import Daemon, start_daemon, wait_for
from kafkabroker import TansuFactory, consume_all, unique_topic
from pgserver import PrivatePg, run_sync
from sipcalls import Call, CdrCollector, answered_call_messages
from sipcdr.config import Config
from sipcdr.engine import Destinations, correlate_events
from sipcdr.model import SipEvent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MESSAGES_PER_CALL = 6


def send_calls(daemon: Daemon, names: Sequence[str], pace_per_s: float = 8000) -> None:
    """Whole calls to the SIP/UDP listener, at most `pace_per_s` messages a second."""
    target = daemon.endpoint("sip_udp")
    started = time.monotonic()
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for name in names:
            for data in answered_call_messages(Call(call_id=f"{name}@e2e", from_tag=f"t-{name}")):
                udp.sendto(data, target)
                sent += 1
            ahead = sent / pace_per_s - (time.monotonic() - started)
            if ahead > 0.01:
                time.sleep(ahead)


def closed_cdrs(daemon: Daemon) -> float:
    return sum(
        float(line.rpartition(" ")[2])
        for line in daemon.metrics().splitlines()
        if line.startswith("sipcdr_cdrs_total{")
    )


async def _query(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


def pg_cdr_ids(dsn: str) -> list[str]:
    try:
        rows = run_sync(lambda: _query(dsn, "SELECT cdr_id::text AS id FROM cdrs"))
    except (OSError, asyncpg.PostgresError):
        return []  # not there yet: the daemon creates the tables on first connect
    return [row["id"] for row in rows]


def pg_count(dsn: str, table: str) -> int:
    try:
        rows = run_sync(lambda: _query(dsn, f"SELECT count(*) AS n FROM {table}"))
    except (OSError, asyncpg.PostgresError):
        return 0
    return int(rows[0]["n"])


def jsonl_ids(daemon: Daemon) -> list[str]:
    return [str(record["cdr_id"]) for record in daemon.cdrs()]


def test_postgres_stopped_mid_stream_loses_nothing(
    tmp_path: Path, private_pg: PrivatePg, daemons: list[Daemon]
) -> None:
    server = private_pg()
    dsn = run_sync(server.start)
    daemon = start_daemon(tmp_path, SIPCDR_SINKS__POSTGRES__DSN=dsn)
    daemons.append(daemon)
    send_calls(daemon, [f"pg-a{n}" for n in range(20)])
    wait_for(lambda: len(pg_cdr_ids(dsn)) == 20, timeout=30)

    run_sync(server.stop)
    send_calls(daemon, [f"pg-b{n}" for n in range(20)])
    wait_for(lambda: len(jsonl_ids(daemon)) == 40, timeout=30)  # the other sink goes on
    labels = {"sink": "postgres", "stream": "records"}
    wait_for(lambda: daemon.metric("sipcdr_sink_failures_total", **labels) >= 1, timeout=20)
    wait_for(lambda: daemon.metric("sipcdr_sink_lag_records", **labels) == 20)
    assert daemon.metric("sipcdr_sink_up", **labels) == 0

    assert run_sync(server.start) == dsn
    wait_for(lambda: len(pg_cdr_ids(dsn)) == 40, timeout=60)
    wait_for(lambda: pg_count(dsn, "sip_messages") == 40 * MESSAGES_PER_CALL, timeout=60)
    ids = pg_cdr_ids(dsn)
    assert len(ids) == len(set(ids)) == 40
    assert set(ids) == set(jsonl_ids(daemon))
    wait_for(lambda: daemon.metric("sipcdr_sink_up", **labels) == 1)
    assert daemon.stop() == 0
    assert pg_count(dsn, "sip_messages") == 40 * MESSAGES_PER_CALL


class TableLock:
    """Holds PostgreSQL table locks from a thread of its own until released: inserts
    into those tables wait, as they would behind a slow or overloaded database."""

    def __init__(self, dsn: str, tables: str) -> None:
        self.dsn = dsn
        self.tables = tables
        self.held = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._hold()), daemon=True)

    async def _hold(self) -> None:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            async with conn.transaction():
                await conn.execute(f"LOCK TABLE {self.tables} IN EXCLUSIVE MODE")
                self.held.set()
                while not self._release.is_set():
                    await asyncio.sleep(0.05)
        finally:
            await conn.close()

    def __enter__(self) -> TableLock:
        self._thread.start()
        wait_for(self.held.is_set, timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._thread.join(timeout=10)


def kafka_env(bootstrap: str, topic: str) -> dict[str, str]:
    return {
        "SIPCDR_SINKS__KAFKA__BOOTSTRAP": bootstrap,
        "SIPCDR_SINKS__KAFKA__IDEMPOTENCE": "false",  # tansu refuses InitProducerId
        "SIPCDR_SINKS__KAFKA__TOPIC_CDRS": topic,
        "SIPCDR_SINKS__KAFKA__TOPIC_FRAUD": f"{topic}.fraud",
        "SIPCDR_SINKS__KAFKA__REQUEST_TIMEOUT_MS": "3000",
    }


def test_sigkill_mid_stream_then_restart_delivers_every_closed_cdr(
    tmp_path: Path, pg_dsn: str, tansu_factory: TansuFactory, daemons: list[Daemon]
) -> None:
    """Both sinks behind at the kill: PostgreSQL waits on a table lock, the broker is
    frozen (SIGSTOP). Every CDR the daemon had closed arrives after the restart."""
    broker = tansu_factory()
    topic = unique_topic("sipcdr.cdrs")
    env = {"SIPCDR_SINKS__POSTGRES__DSN": pg_dsn, **kafka_env(broker.bootstrap, topic)}
    first = start_daemon(tmp_path, **env)
    daemons.append(first)
    send_calls(first, ["kill-warmup"])
    wait_for(lambda: len(pg_cdr_ids(pg_dsn)) == 1, timeout=30)
    assert len(asyncio.run(consume_all(broker.bootstrap, topic, 1, 30))) == 1
    with TableLock(pg_dsn, "cdrs"):
        broker.freeze()
        try:
            send_calls(first, [f"kill-{n}" for n in range(30)])
            wait_for(lambda: closed_cdrs(first) == 31, timeout=30)
            assert len(pg_cdr_ids(pg_dsn)) == 1  # held: nothing new there yet
            first.process.kill()  # SIGKILL: no drain, no shutdown hook
            first.process.wait(timeout=10)
        finally:
            broker.thaw()
    # The JSONL file may or may not have had its turn; the spool has every CDR.
    second = start_daemon(tmp_path, **env)
    daemons.append(second)
    wait_for(lambda: len(pg_cdr_ids(pg_dsn)) == 31, timeout=60)
    wait_for(lambda: len(set(jsonl_ids(second))) == 31, timeout=30)
    labels = {"sink": "kafka", "stream": "records"}
    wait_for(lambda: daemon_lag(second, labels) == 0, timeout=60)
    assert second.stop() == 0
    closed = set(jsonl_ids(second))
    ids = pg_cdr_ids(pg_dsn)
    assert len(ids) == len(set(ids)) == 31
    assert set(ids) == closed
    consumed = asyncio.run(consume_all(broker.bootstrap, topic, 31, 60))
    assert {str(orjson.loads(record.value)["cdr_id"]) for record in consumed} == closed


def daemon_lag(daemon: Daemon, labels: dict[str, str]) -> float:
    text = daemon.metrics()
    series = f'sipcdr_sink_lag_records{{sink="{labels["sink"]}",stream="{labels["stream"]}"}}'
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rpartition(" ")[2])
    return -1.0  # not exported yet


def test_a_full_spool_blocks_intake_counted_and_resumes(
    tmp_path: Path, pg_dsn: str, daemons: list[Daemon]
) -> None:
    """`full_policy = "block"` with a 1 MiB spool and PostgreSQL held: new calls are
    refused (each counted, an ERROR logged), no closed CDR is dropped, and intake
    resumes once the database has caught up."""
    daemon = start_daemon(
        tmp_path,
        SIPCDR_SINKS__POSTGRES__DSN=pg_dsn,
        SIPCDR_SPOOL__MAX_BYTES=str(1024 * 1024),
        SIPCDR_SPOOL__SEGMENT_BYTES=str(64 * 1024),
        SIPCDR_SPOOL__FULL_POLICY="block",
    )
    daemons.append(daemon)
    send_calls(daemon, ["full-warmup"])
    wait_for(lambda: len(pg_cdr_ids(pg_dsn)) == 1, timeout=30)
    with TableLock(pg_dsn, "cdrs"):
        send_calls(daemon, [f"full-a{n}" for n in range(1500)], pace_per_s=3000)
        # The tick pauses intake before it exports the metric that shows the spool full
        # (the 1,500 calls may all be in before that tick: no refusal among them).
        wait_for(lambda: daemon.metric("sipcdr_spool_full", stream="records") == 1, timeout=30)
        before = refused(daemon)
        send_calls(daemon, [f"full-b{n}" for n in range(50)])
        # Each new call's INVITE is refused; its other messages find no call.
        wait_for(lambda: refused(daemon) >= before + 50, timeout=30)
        closed = closed_cdrs(daemon)
        assert daemon.metric("sipcdr_spool_dropped_total", stream="records", reason="full") == 0
    wait_for(lambda: len(pg_cdr_ids(pg_dsn)) == closed, timeout=120)
    wait_for(lambda: daemon.metric("sipcdr_spool_full", stream="records") == 0, timeout=30)
    # Intake resumes once the spool has stayed below its limit for a while.
    wait_for(lambda: daemon.metric("sipcdr_intake_paused") == 0, timeout=30)
    send_calls(daemon, [f"full-c{n}" for n in range(10)])
    wait_for(lambda: len(pg_cdr_ids(pg_dsn)) == closed + 10, timeout=60)
    assert daemon.stop() == 0
    log = daemon.log.read_text()
    assert '"event": "intake_paused"' in log
    assert '"event": "intake_resumed"' in log
    ids = pg_cdr_ids(pg_dsn)
    assert len(ids) == len(set(ids))
    assert set(ids) == set(jsonl_ids(daemon))


def refused(daemon: Daemon) -> float:
    return daemon.metric("sipcdr_calls_refused_total", reason="spool_full")


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_stalled_database_grows_the_spool_not_the_memory(
    tmp_path: Path, pg_dsn: str, daemons: list[Daemon]
) -> None:
    """Both PostgreSQL streams held by table locks while thousands of calls close:
    the backlog goes to disk, the daemon's memory stays flat, and when the locks go
    every record arrives once."""
    calls = 4000
    daemon = start_daemon(tmp_path, SIPCDR_SINKS__POSTGRES__DSN=pg_dsn)
    daemons.append(daemon)
    send_calls(daemon, ["warmup"])
    wait_for(lambda: len(pg_cdr_ids(pg_dsn)) == 1, timeout=30)
    wait_for(lambda: pg_count(pg_dsn, "sip_messages") == MESSAGES_PER_CALL, timeout=30)

    with TableLock(pg_dsn, "cdrs, sip_messages"):
        rss_before = _rss_bytes(daemon.process.pid)
        send_calls(daemon, [f"load-{n}" for n in range(calls)], pace_per_s=6000)
        wait_for(lambda: closed_cdrs(daemon) == calls + 1, timeout=60)
        labels = {"stream": "signaling"}
        wait_for(
            lambda: (
                daemon.metric("sipcdr_sink_lag_records", sink="postgres", **labels)
                == calls * MESSAGES_PER_CALL
            )
        )
        spool_bytes = daemon.metric("sipcdr_spool_bytes", **labels)
        rss_growth = _rss_bytes(daemon.process.pid) - rss_before
        # The records stream also carries the fraud alerts a flood like this raises.
        alerts = daemon.metric("sipcdr_spool_records_total", stream="records", kind="alert")
        lag = daemon.metric("sipcdr_sink_lag_records", sink="postgres", stream="records")
        assert lag == calls + alerts
        assert len(pg_cdr_ids(pg_dsn)) == 1  # nothing got past the locks
    # The backlog is on disk (the messages' headers, ~380 bytes each in this traffic):
    # the daemon holds at most a batch of it in memory.
    assert spool_bytes > calls * MESSAGES_PER_CALL * 300
    assert rss_growth < spool_bytes / 2, (rss_growth, spool_bytes)
    assert daemon.metric("sipcdr_packets_dropped_total", source="sip_udp") == 0
    wait_for(lambda: len(pg_cdr_ids(pg_dsn)) == calls + 1, timeout=120)
    wait_for(
        lambda: pg_count(pg_dsn, "sip_messages") == (calls + 1) * MESSAGES_PER_CALL, timeout=120
    )
    ids = pg_cdr_ids(pg_dsn)
    assert len(set(ids)) == len(ids)
    assert daemon.stop() == 0


def _validator(name: str) -> Callable[[object], None]:
    import jsonschema

    schema = orjson.loads((Path(__file__).resolve().parents[2] / "schemas" / name).read_bytes())
    return jsonschema.Draft202012Validator(schema).validate  # type: ignore[no-any-return]


def test_broker_killed_mid_stream_and_back_every_cdr_reaches_billing(
    tmp_path: Path, pg_dsn: str, tansu_factory: TansuFactory, daemons: list[Daemon]
) -> None:
    """Billing's shape: a consumer group on the CDR topic. The broker dies between two
    waves of calls and comes back empty (memory storage); what the group reads over
    both lifetimes, deduplicated by cdr_id, is every CDR the daemon closed, and
    PostgreSQL, delivered alongside, has each exactly once."""
    broker = tansu_factory()
    topic = unique_topic("sipcdr.cdrs")
    daemon = start_daemon(
        tmp_path,
        SIPCDR_SINKS__POSTGRES__DSN=pg_dsn,
        SIPCDR_SINKS__KAFKA__BOOTSTRAP=broker.bootstrap,
        SIPCDR_SINKS__KAFKA__IDEMPOTENCE="false",  # tansu refuses InitProducerId
        SIPCDR_SINKS__KAFKA__TOPIC_CDRS=topic,
        SIPCDR_SINKS__KAFKA__TOPIC_FRAUD=f"{topic}.fraud",
    )
    daemons.append(daemon)
    labels = {"sink": "kafka", "stream": "records"}

    send_calls(daemon, [f"kafka-a{n}" for n in range(20)])
    before = asyncio.run(consume_all(broker.bootstrap, topic, 20, 30, group_id="billing"))
    assert len({r.value for r in before}) == 20

    broker.kill()
    send_calls(daemon, [f"kafka-b{n}" for n in range(20)])
    wait_for(lambda: len(jsonl_ids(daemon)) == 40, timeout=30)
    wait_for(lambda: daemon.metric("sipcdr_sink_lag_records", **labels) == 20, timeout=30)
    wait_for(lambda: daemon.metric("sipcdr_sink_failures_total", **labels) >= 1, timeout=60)
    assert daemon.metric("sipcdr_sink_up", **labels) == 0

    broker.restart()  # empty: the topic comes back on the producer's first send
    send_calls(daemon, [f"kafka-c{n}" for n in range(20)])
    wait_for(lambda: daemon.metric("sipcdr_sink_lag_records", **labels) == 0, timeout=90)
    after = asyncio.run(consume_all(broker.bootstrap, topic, 40, 60, group_id="billing"))
    assert daemon.stop() == 0

    validate = _validator("cdr.v1.schema.json")
    by_id: dict[str, dict[str, object]] = {}
    for record in [*before, *after]:
        value = orjson.loads(record.value)
        validate(value)
        assert record.key == str(value["call_id"]).encode()
        assert dict(record.headers)["schema_version"] == b"1"
        by_id[str(value["cdr_id"])] = value
    closed = set(jsonl_ids(daemon))
    assert len(closed) == 60
    assert set(by_id) == closed
    ids = pg_cdr_ids(pg_dsn)
    assert len(ids) == len(set(ids)) == 60
    assert set(ids) == closed


def test_the_scale_out_topic_carries_every_parsed_message(
    tmp_path: Path, kafka_bootstrap: str, daemons: list[Daemon]
) -> None:
    """`topic_sip` set and no database: the signaling spool exists for Kafka alone, and
    every message of every call is on the topic, keyed by Call-ID, valid sip_message."""
    topic = unique_topic("sipcdr.cdrs")
    daemon = start_daemon(
        tmp_path,
        **kafka_env(kafka_bootstrap, topic),
        SIPCDR_SINKS__KAFKA__TOPIC_SIP=f"{topic}.sip",
    )
    daemons.append(daemon)
    send_calls(daemon, [f"sip-{n}" for n in range(5)])
    got = asyncio.run(consume_all(kafka_bootstrap, f"{topic}.sip", 5 * MESSAGES_PER_CALL, 60))
    assert daemon.stop() == 0
    validate = _validator("sip_message.v1.schema.json")
    per_call: dict[bytes, int] = {}
    for record in got:
        value = orjson.loads(record.value)
        validate(value)
        assert record.key == str(value["call_id"]).encode()
        assert dict(record.headers)["record_kind"] == b"sip"
        assert value["body"] is None  # SDP is not kept unless asked for
        per_call[record.key] = per_call.get(record.key, 0) + 1
    assert per_call == {f"sip-{n}@e2e".encode(): MESSAGES_PER_CALL for n in range(5)}
    # Every confirmation is counted per topic: a topic missing from the counts raised
    # in the producer's callback, once per record, with a traceback in the log.
    assert "Traceback" not in daemon.log.read_text()
    # The records are correlatable events: a correlator fed from the topic alone
    # closes the daemon's calls with the daemon's CDRs, byte for byte.
    events = sorted(
        (SipEvent.from_record(orjson.loads(record.value)) for record in got),
        key=lambda event: event.captured_ts,
    )
    collector = CdrCollector()
    correlate_events(Config(), events, Destinations([collector]))
    replayed = collector.cdrs
    written = {str(record["cdr_id"]): record for record in daemon.cdrs()}
    assert len(written) == 5
    assert {cdr.cdr_id: orjson.loads(orjson.dumps(cdr.to_record())) for cdr in replayed} == (
        written
    )
