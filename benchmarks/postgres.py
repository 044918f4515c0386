"""PostgreSQL write path: the sink's COPY + INSERT .. ON CONFLICT against row inserts.

Both contenders write the same N CDR records (CDR v1 JSON as the daemon spools it) in
batches of 1000, as the delivery loop hands them over, into a freshly migrated
database, one transaction per batch, idempotent on (cdr_id, start_time):

- sipcdr sink: `PostgresSink.deliver` (JSON decode, COPY straight into the table;
  a batch with rows already there goes through a staging table and
  INSERT .. SELECT .. ON CONFLICT DO NOTHING instead)
- baseline: the same rows through asyncpg's `executemany` of
  INSERT .. VALUES .. ON CONFLICT DO NOTHING, the usual way to write rows

A third run re-delivers the sink's batches (what a restart after a crash does): it
inserts nothing and shows what the fallback costs. The partitions of every day in
the data exist before the clock starts, for both. Figures are medians of several
rounds; ratios are against the baseline of the same round.

With --signaling N it measures instead what the server spends on each `sip_messages`
row: N captured messages (an INVITE, a 200 OK with SDP, a BYE; SDP cut off, as
spooled) COPYed as the sink sends them (binary, batches of 375, a statement each) into
the schema as shipped, and, in a database of the benchmark's own, without the
secondary index on (call_id, captured_at) and without any index (the primary key
dropped too); the backend's CPU time from /proc (10 ms ticks; the server must run on
this machine; the WAL writer's and checkpointer's time is not in it) and the WAL
written per row, medians of the rounds, the variants in a rotating order.

    python benchmarks/postgres.py [--records 20000] [--rounds 3] [--dsn postgresql://...]
    python benchmarks/postgres.py --signaling 60000 [--rounds 5]

Without --dsn an embedded server is started under a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncpg
import orjson
from samples import cdr_values
from signaling import traffic
from sipcdr.sinks.base import KIND_CDR, STREAM_RECORDS, SpoolRecord
from sipcdr.sinks.pgrows import CDRS, SIP_MESSAGES, SipCopy
from sipcdr.sinks.postgres import PostgresSink
from sipcdr.sipevent import spooled
from sipcdr.storage.embedded import EmbeddedPostgres
from sipcdr.storage.migrations import migrate
from sipcdr.storage.partitions import DEFAULT_CLASS, ensure_partitions

BATCH = 1000  # delivery.DEFAULT_BATCH_RECORDS


async def fresh_database(server_dsn: str) -> str:
    name = f"sipcdr_bench_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base, _, query = server_dsn.partition("?")
    head = base.rsplit("/", 1)[0]
    dsn = f"{head}/{name}" + (f"?{query}" if query else "")
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return dsn


async def drop_database(server_dsn: str, dsn: str) -> None:
    name = dsn.partition("?")[0].rsplit("/", 1)[1]
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def batches(values: list[bytes]) -> list[list[SpoolRecord]]:
    records = [SpoolRecord(n, KIND_CDR, b"k", value) for n, value in enumerate(values, 1)]
    return [records[i : i + BATCH] for i in range(0, len(records), BATCH)]


async def run_sink(dsn: str, work: list[list[SpoolRecord]]) -> tuple[float, float]:
    sink = PostgresSink(dsn)
    await sink.prepare()
    await _make_partitions(dsn, work)
    start = time.perf_counter()
    for batch in work:
        await sink.deliver(STREAM_RECORDS, batch)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for batch in work:
        await sink.deliver(STREAM_RECORDS, batch)
    again = time.perf_counter() - start
    await sink.stop()
    return first, again


async def _make_partitions(dsn: str, work: list[list[SpoolRecord]]) -> None:
    """The partitions of every day in the data, made before the clock starts (the sink
    makes a day's partition once, at its first row of that day)."""
    days = {
        CDRS.row(orjson.loads(r.value))[CDRS.day_column].astimezone(UTC).date()
        for batch in work
        for r in batch
    }
    conn = await asyncpg.connect(dsn)
    try:
        await ensure_partitions(conn, "cdrs", days)
    finally:
        await conn.close()


def _as_the_sink_fills_it(value: dict[str, object]) -> dict[str, object]:
    """The columns the sink sets beside the record's own: the retention class and the
    restriction flag."""
    value["retention_days"] = DEFAULT_CLASS
    value["restricted"] = False
    return value


async def run_executemany(dsn: str, work: list[list[SpoolRecord]]) -> float:
    columns = CDRS.columns
    placeholders = ", ".join(f"${n}" for n in range(1, len(columns) + 1))
    sql = f"INSERT INTO cdrs ({', '.join(columns)}) VALUES ({placeholders}) ON CONFLICT DO NOTHING"
    conn = await asyncpg.connect(dsn)
    try:
        await _make_partitions(dsn, work)
        start = time.perf_counter()
        for batch in work:  # decoding is timed too, as it is in the sink
            decoded = [CDRS.row(_as_the_sink_fills_it(orjson.loads(r.value))) for r in batch]
            async with conn.transaction():
                await conn.executemany(sql, decoded)
        elapsed = time.perf_counter() - start
    finally:
        await conn.close()
    return elapsed


def backend_ticks(pid: int) -> int:
    """utime + stime of a process (a server backend), in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


SIP_BATCH = 375  # 25 ms at 15,000 msg/s, as benchmarks/delivery.py
# What each variant drops first, in its own database: never the shipped schema.
SIP_VARIANTS: dict[str, tuple[str, ...]] = {
    "as shipped (primary key + call_id index)": (),
    "without the (call_id, captured_at) index": (
        "DROP INDEX sip_messages_call_id_captured_at_idx",
    ),
    "without any index": (
        "DROP INDEX sip_messages_call_id_captured_at_idx",
        "ALTER TABLE sip_messages DROP CONSTRAINT sip_messages_pkey",
    ),
}


async def copy_signaling(
    server_dsn: str, streams: list[bytes], days: set[date], drops: tuple[str, ...]
) -> tuple[float, int, float]:
    """(backend CPU seconds, WAL bytes, wall seconds) to COPY the batches."""
    dsn = await fresh_database(server_dsn)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            for statement in drops:
                await conn.execute(statement)
            await ensure_partitions(conn, "sip_messages", days)
            pid = conn.get_server_pid()
            lsn = await conn.fetchval("SELECT pg_current_wal_lsn()")
            ticks = backend_ticks(pid)
            start = time.perf_counter()
            for data in streams:
                await conn.copy_to_table(
                    "sip_messages",
                    source=memoryview(data),
                    columns=SIP_MESSAGES.columns,
                    format="binary",
                )
            wall = time.perf_counter() - start
            cpu = (backend_ticks(pid) - ticks) / os.sysconf("SC_CLK_TCK")
            wal = await conn.fetchval("SELECT pg_current_wal_lsn() - $1::pg_lsn", lsn)
        finally:
            await conn.close()
    finally:
        await drop_database(server_dsn, dsn)
    return cpu, int(wal), wall


async def signaling_cost(server_dsn: str, messages: int, rounds: int) -> None:
    values = [spooled(packet, msg, False) for packet, msg in traffic(messages)]
    streams = []
    days: set[date] = set()
    for at in range(0, len(values), SIP_BATCH):
        copy = SipCopy()
        for value in values[at : at + SIP_BATCH]:
            copy.add(value, None)
        streams.append(copy.data())
        days |= copy.dates()
    names = list(SIP_VARIANTS)
    cpu: dict[str, list[float]] = {name: [] for name in names}
    wal: dict[str, list[float]] = {name: [] for name in names}
    for n in range(rounds):
        shift = n % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, written, _wall = await copy_signaling(
                server_dsn, streams, days, SIP_VARIANTS[name]
            )
            cpu[name].append(seconds / messages * 1e6)
            wal[name].append(written / messages)
    med = statistics.median
    print(
        f"{messages:,} sip_messages rows, binary COPY in batches of {SIP_BATCH}, "
        f"{sum(map(len, streams)) / messages:.0f} bytes of COPY a row, median of {rounds} rounds"
    )
    # A short run may see no tick of the server's CPU at all.
    base = med(cpu[names[0]]) or float("nan")
    for name in names:
        print(
            f"  {name:<44}{med(cpu[name]):>6.2f} µs server CPU a row "
            f"({min(cpu[name]):.2f}-{max(cpu[name]):.2f}, {med(cpu[name]) / base:.2f}x)"
            f"{med(wal[name]):>7.0f} bytes of WAL"
        )


async def main_async(args: argparse.Namespace) -> None:
    embedded: EmbeddedPostgres | None = None
    scratch = tempfile.TemporaryDirectory()
    server_dsn = args.dsn
    if not server_dsn:
        embedded = EmbeddedPostgres(Path(scratch.name) / "pg")
        server_dsn = await embedded.start()
    if args.signaling:
        try:
            await signaling_cost(server_dsn, args.signaling, args.rounds)
        finally:
            if embedded is not None:
                await embedded.stop()
            scratch.cleanup()
        return
    work = batches(cdr_values(args.records))
    results: dict[str, list[float]] = {"baseline": [], "sink": [], "redelivery": []}
    try:
        for _ in range(args.rounds):
            dsn = await fresh_database(server_dsn)
            try:
                baseline = await run_executemany(dsn, work)
            finally:
                await drop_database(server_dsn, dsn)
            dsn = await fresh_database(server_dsn)
            try:
                first, again = await run_sink(dsn, work)
            finally:
                await drop_database(server_dsn, dsn)
            results["baseline"].append(args.records / baseline)
            results["sink"].append(args.records / first)
            results["redelivery"].append(args.records / again)
    finally:
        if embedded is not None:
            await embedded.stop()
        scratch.cleanup()
    med = statistics.median
    base = med(results["baseline"])
    print(
        f"{args.records} CDRs in batches of {BATCH}, one transaction each, "
        f"median of {args.rounds} rounds ({'embedded server' if embedded else 'given server'})"
    )
    for label, key in (
        ("executemany INSERT .. ON CONFLICT", "baseline"),
        ("sipcdr sink: COPY + ON CONFLICT", "sink"),
        ("sipcdr sink, same batches again", "redelivery"),
    ):
        rate = med(results[key])
        print(f"  {label:<36}{rate:>10,.0f} rows/s {rate / base:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dsn", default="", help="a server to use instead of an embedded one")
    parser.add_argument(
        "--signaling", type=int, default=0, help="the server's CPU per sip_messages row, N rows"
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
