"""The delivery process's CPU per SIP message for PostgreSQL, before and now, in one run.

A spool on disk holds N captured messages (the signaling stream: an INVITE, a 200 OK
with SDP and a BYE, as the capture side spools them, SDP cut off) and one CDR per six
messages (the records stream). A `SpoolTail` reads it as the delivery process does
and a `PostgresSink` writes it into a fresh database, batch by batch, each batch read,
delivered and committed as a delivery loop does; the batches are what 25 ms of traffic
at 15,000 msg/s gives (375 messages, 62 CDRs), as under load.

- before: each record read with a seek and two reads of its own, each `sip_messages`
  row built by way of `unspool` (the whole packet and event read back), and each
  batch's COPY inside BEGIN, a SAVEPOINT, RELEASE and COMMIT
- tuples (the build before 2026-12-05's encoded COPY): the segment read a window at a
  time, a tuple of Python values read straight from the value for each row, which
  asyncpg's `copy_records_to_table` encodes for its binary COPY; a batch of one COPY
  sent as that one statement
- now: as tuples, but each `sip_messages` row encoded for the binary COPY as it is
  read (`SipCopy`), the batch sent by `copy_to_table` as it is

Figures are the CPU time of this process (what the delivery process spends) per SIP
message, and the CPU time of the server's two backends serving it (from /proc: the
server must run on this machine; its clock ticks are 10 ms), medians of the rounds,
the contenders in a rotating order within each round on a database of their own.

    python benchmarks/delivery.py [--messages 60000] [--rounds 5] [--dsn postgresql://...]

Without --dsn an embedded server is started under a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncpg
from postgres import backend_ticks, drop_database, fresh_database
from samples import cdr_values
from signaling import traffic
from sipcdr.sinks import postgres
from sipcdr.sinks.base import KIND_CDR, KIND_SIP, STREAM_RECORDS, STREAM_SIGNALING, SpoolRecord
from sipcdr.sinks.pgrows import Row, Table, sip_message_row, sip_message_row_unspooled
from sipcdr.sinks.postgres import PostgresSink, TableRows
from sipcdr.sipevent import spooled
from sipcdr.spool import Spool
from sipcdr.spool import reader as spool_reader
from sipcdr.spool.tail import SpoolTail
from sipcdr.storage.embedded import EmbeddedPostgres

# 25 ms of traffic at 15,000 msg/s, 6-message calls: what a loop takes a batch under load.
BATCH = {STREAM_SIGNALING: 375, STREAM_RECORDS: 62}


class TupleSink(PostgresSink):
    """Every batch's rows as tuples of Python values, encoded by the driver."""

    def _encoded(self, stream: str, records: Sequence[SpoolRecord]) -> dict[Table, TableRows]:
        return dict(self._rows(stream, records))


class SavepointSink(TupleSink):
    """The sink's writes as they were: every batch in a transaction, each table's COPY
    in a savepoint of its own."""

    async def _write(
        self,
        connection: asyncpg.Connection,
        rows: dict[Table, TableRows],
        calls: list[str],
        *,
        direct: bool,
    ) -> dict[str, int]:
        inserted: dict[str, int] = {}
        async with connection.transaction():
            for table, table_rows in rows.items():
                if table.latest is not None:
                    inserted[table.name] = await self._insert(connection, table, table_rows)
                    continue
                try:
                    async with connection.transaction():
                        await self._copy(connection, table, table_rows)
                    inserted[table.name] = len(table_rows)
                except asyncpg.exceptions.UniqueViolationError:
                    inserted[table.name] = await self._insert(connection, table, table_rows)
            if calls:
                await connection.execute(postgres._FLAG_CALLS, calls)
        return inserted


@contextlib.contextmanager
def before_build(sink: PostgresSink) -> Iterator[None]:
    """Records read one at a time, rows by way of `unspool`."""

    def unspooled_row(value: bytes, _names: Any) -> Row:
        return sip_message_row_unspooled(value, sink._names)

    window = spool_reader._WINDOW_BYTES
    setattr(spool_reader, "_WINDOW_BYTES", 1)  # noqa: B010
    setattr(postgres, "sip_message_row", unspooled_row)  # noqa: B010
    try:
        yield
    finally:
        setattr(spool_reader, "_WINDOW_BYTES", window)  # noqa: B010
        setattr(postgres, "sip_message_row", sip_message_row)  # noqa: B010


def write_spool(folder: Path, messages: int) -> None:
    pairs = traffic(messages)
    with Spool(folder / STREAM_SIGNALING, ("postgres",), buffered=True) as spool:
        for packet, msg in pairs:
            spool.append(KIND_SIP, msg.call_id.encode(), spooled(packet, msg, False))
    with Spool(folder / STREAM_RECORDS, ("postgres",), buffered=True) as spool:
        for value in cdr_values(messages // 6):
            spool.append(KIND_CDR, b"call", value)


async def deliver_all(folder: Path, sink: PostgresSink) -> tuple[float, float]:
    """CPU seconds to deliver both streams from the start of the spool: this process's
    and the server's backends'."""
    tails = {}
    for stream in (STREAM_SIGNALING, STREAM_RECORDS):
        for cursor in (folder / stream / "cursors").glob("*"):
            cursor.unlink()  # every contender reads the whole spool
        tail = SpoolTail(folder / stream, ("postgres",))
        tail.open()
        tails[stream] = tail
    await sink.prepare()
    # The connections and the partitions of the data's days, made before the clock
    # starts: a stream's first record delivered.
    for stream, tail in tails.items():
        reader = tail.reader("postgres")
        await sink.deliver(stream, reader.read(1, 1 << 20))
        reader.commit()
    backends = [connection.get_server_pid() for connection in sink._connections.values()]
    ticks = sum(backend_ticks(pid) for pid in backends)
    start = time.process_time()
    for stream, tail in tails.items():
        reader = tail.reader("postgres")
        while batch := reader.read(BATCH[stream], 4 << 20):
            await sink.deliver(stream, batch)
            reader.commit()
    spent = time.process_time() - start
    server = (sum(backend_ticks(pid) for pid in backends) - ticks) / os.sysconf("SC_CLK_TCK")
    for tail in tails.values():
        tail.close()
    await sink.stop()
    return spent, server


CONTENDERS = ("before", "tuples", "now")


async def one(server_dsn: str, folder: Path, contender: str) -> tuple[float, float]:
    dsn = await fresh_database(server_dsn)
    try:
        if contender == "now":
            return await deliver_all(folder, PostgresSink(dsn))
        if contender == "tuples":
            return await deliver_all(folder, TupleSink(dsn))
        sink = SavepointSink(dsn)
        with before_build(sink):
            return await deliver_all(folder, sink)
    finally:
        await drop_database(server_dsn, dsn)


async def main_async(args: argparse.Namespace) -> None:
    embedded: EmbeddedPostgres | None = None
    scratch = tempfile.TemporaryDirectory()
    server_dsn = args.dsn
    if not server_dsn:
        embedded = EmbeddedPostgres(Path(scratch.name) / "pg")
        server_dsn = await embedded.start()
    folder = Path(scratch.name) / "spool"
    write_spool(folder, args.messages)
    spent: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    served: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    ratios: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    try:
        for n in range(args.rounds):
            shift = n % len(CONTENDERS)
            order = CONTENDERS[shift:] + CONTENDERS[:shift]
            got = {name: await one(server_dsn, folder, name) for name in order}
            for name, (seconds, server) in got.items():
                spent[name].append(seconds / args.messages * 1e6)
                served[name].append(server / args.messages * 1e6)
                ratios[name].append(seconds / got["now"][0])
    finally:
        if embedded is not None:
            await embedded.stop()
        scratch.cleanup()
    med = statistics.median
    print(
        f"{args.messages:,} SIP messages and {args.messages // 6:,} CDRs from the spool into "
        f"PostgreSQL, batches of {BATCH[STREAM_SIGNALING]} and {BATCH[STREAM_RECORDS]}, "
        f"median of {args.rounds} rounds"
    )
    print(f"  {'CPU per SIP message':<22}{'delivery':>10}{'server':>10}   delivery against now")
    for name in CONTENDERS:
        low, high = min(ratios[name]), max(ratios[name])
        print(
            f"  {name:<22}{med(spent[name]):>8.2f} µs{med(served[name]):>7.2f} µs"
            f"   {med(ratios[name]):.2f}x (rounds {low:.2f}-{high:.2f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dsn", default="", help="a server to use instead of an embedded one")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
