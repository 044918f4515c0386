"""PostgreSQL sink: CDRs, fraud alerts and captured signaling into their partitioned
tables, by COPY, idempotent on each table's key.

The database may be down when the daemon starts or at any time after: `start` does not
connect, `deliver` connects when it needs to, and every failure raises out of `deliver`
with the connection thrown away, so that the delivery loop's next attempt (after its
backoff) starts from a fresh connection. Meanwhile the records wait in the spool.

On each new connection the sink applies pending migrations (so a fresh database, or an
empty one after a failover, gets its tables) and makes the partitions from yesterday to
`partitions_ahead_days` ahead; it repeats the latter when the UTC day changes. Records
of other days (a pcap from 2005, a late CDR) get their partition on demand.

A batch goes in one transaction per call (a batch of one COPY, in one of its own):
COPY straight into the real table. When that violates the key (a re-delivery, normal
after a crash or a failed commit), the transaction is rolled back and the rows go
through a session-private staging table and `INSERT ... SELECT ... ON CONFLICT DO
NOTHING` instead, so nothing is inserted twice, and the counters say how many rows
were new and how many were already there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import asyncpg
import orjson

from sipcdr.privacy.naming import alert_names_any, names_any
from sipcdr.privacy.outbound import RestrictedCalls
from sipcdr.sinks.base import (
    KIND_SIP,
    STREAM_RECORDS,
    STREAM_SIGNALING,
    AsyncLifecycle,
    RecordsRejected,
    SpoolRecord,
)
from sipcdr.sinks.pgrows import (
    CDRS,
    FRAUD_ALERTS,
    SIP_MESSAGES,
    TABLE_OF_KIND,
    TABLES,
    Row,
    SipCopy,
    Table,
    sip_message_row,
)
from sipcdr.sinks.signaling import is_spooled
from sipcdr.storage.migrations import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DatabaseUnavailable,
    connect,
    migrate,
)
from sipcdr.storage.partitions import (
    DEFAULT_CLASS,
    DEFAULT_PARTITIONS_AHEAD_DAYS,
    ensure_ahead,
    ensure_partitions,
)

# A statement running longer than this is a stuck server or network, not a big batch:
# giving up lets the delivery loop retry on a new connection.
DEFAULT_COMMAND_TIMEOUT_S: Final = 60.0
# Closing waits this long for the server's goodbye before cutting the socket.
CLOSE_TIMEOUT_S: Final = 2.0


# SQLSTATE classes 22 and 23: the values themselves are refused, on any retry.
_CONTENT_ERRORS: Final = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.IntegrityConstraintViolationError,
    # The driver's own: a value it cannot encode for its column, before any round trip.
    asyncpg.exceptions._base.DataError,
)


# Server errors that mean it does not serve now: a connection failure (class 08), a
# server starting up or shutting down (class 57, "cannot connect now" among them).
_NOT_ANSWERING: Final = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)


# The signaling of calls whose CDR was just written as a restricted subject's: a
# message in national format names no E.164 number, but belongs to its call.
_FLAG_CALLS: Final = (
    "UPDATE sip_messages SET restricted = true WHERE call_id = ANY($1::text[]) AND NOT restricted"
)


# A re-delivered message flagged now whose row is there unflagged: stored before its
# subject was known restricted, and the session lost before its call's flag (or a
# restriction added in between). A flag only ever rises.
_FLAG_REDELIVERED: Final = (
    f"UPDATE sip_messages AS m SET restricted = true FROM {SIP_MESSAGES.staging} AS s "
    "WHERE s.restricted AND NOT m.restricted "
    "AND m.message_id = s.message_id AND m.captured_at = s.captured_at"
)


# Rows of a table as the sink writes them: tuples, or `sip_messages` rows encoded for
# a binary COPY already.
TableRows = list[Row] | SipCopy


async def _copy_records(
    connection: asyncpg.Connection, table: str, rows: TableRows, columns: Sequence[str]
) -> None:
    """COPY `rows` into `table`, ended as soon as the session is: asyncpg's COPY, when
    it waits for the socket to take more, does not notice the session lost meanwhile,
    and would hold the batch until the delivery loop's timeout (a minute)."""
    lost = False
    copying = True
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(None) as deadline:

            def ended(_connection: object) -> None:
                nonlocal lost
                if copying:  # called soon after the loss: the COPY may have ended since
                    lost = True
                    deadline.reschedule(loop.time())

            connection.add_termination_listener(ended)
            try:
                if isinstance(rows, SipCopy):
                    # A view: asyncpg would take bytes for a file's path.
                    await connection.copy_to_table(
                        table, source=memoryview(rows.data()), columns=columns, format="binary"
                    )
                else:
                    await connection.copy_records_to_table(table, records=rows, columns=columns)
            finally:
                copying = False
                connection.remove_termination_listener(ended)
    except TimeoutError:
        if not lost:
            raise
        raise ConnectionResetError(f"the session ended during the COPY into {table}") from None


class RecordError(RecordsRejected):
    """A spool record that cannot be turned into a row; names its stream position."""


class PostgresSink(AsyncLifecycle):
    """The `Sink` of sinks.base for PostgreSQL; one connection per stream, so that the
    records and signaling streams deliver concurrently."""

    name = "postgres"

    def __init__(
        self,
        dsn: str,
        *,
        store_signaling: bool = True,
        partitions_ahead_days: int = DEFAULT_PARTITIONS_AHEAD_DAYS,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
        retention_classes: Mapping[str, int] | None = None,
        restricted: Callable[[str | None], bool] | None = None,
        restricted_calls: RestrictedCalls | None = None,
    ) -> None:
        """`retention_classes`: trunk name -> its `cdr_retention_days`, the class a CDR
        of that trunk is stored under (others: the default class). `restricted`: whether
        a number's processing is restricted, to flag its rows; `restricted_calls`: the
        calls known to be restricted subjects' (shared with the Kafka filter)."""
        if partitions_ahead_days < 0:
            raise ValueError(f"partitions_ahead_days must be >= 0, got {partitions_ahead_days}")
        self.dsn = dsn
        self.streams: tuple[str, ...] = (
            (STREAM_RECORDS, STREAM_SIGNALING) if store_signaling else (STREAM_RECORDS,)
        )
        self.partitions_ahead_days = partitions_ahead_days
        self.connect_timeout_s = connect_timeout_s
        self.command_timeout_s = command_timeout_s
        self._clock = clock
        self.retention_classes = dict(retention_classes or {})
        self._restricted = restricted or _never
        if restricted_calls is None:
            restricted_calls = RestrictedCalls(any_restricted=restricted is not None)
        self._restricted_calls = restricted_calls
        # For metrics: rows new to each table, and rows that were already there.
        self.rows_inserted: dict[str, int] = {table.name: 0 for table in TABLES}
        self.duplicates_skipped: dict[str, int] = {table.name: 0 for table in TABLES}
        # Records of a kind this sink has no table for (a newer producer), by kind: they
        # are confirmed without being written, rather than blocking the stream.
        self.records_ignored: dict[str, int] = {}
        self._connections: dict[str, asyncpg.Connection] = {}
        self._known_partitions: set[tuple[str, date]] = set()
        self._known_classes: set[tuple[date, int]] = set()
        self._ahead_day: date | None = None
        # Schema work of the two streams' connections runs one at a time.
        self._schema_lock = asyncio.Lock()

    async def start(self) -> None:
        """Nothing to do: the first `deliver` connects, so a database that is down does
        not keep the daemon from starting."""

    async def prepare(self) -> None:
        """Connect the records stream: migrations and partitions are in place before
        the first CDR, and a wrong DSN shows at start rather than at the first call."""
        await self._connection(STREAM_RECORDS)

    async def probe(self) -> None:
        """Returns when the server answers a login on a connection of its own (closed
        at once): it lets us in, or refuses with an error of its own (a wrong password,
        an unknown role or database, too many clients). Such a refusal is not an outage
        that ends by itself in a second: the delivery loop then waits its whole backoff
        instead of logging in every second.

        Raises DatabaseUnavailable when it does not answer: no connection, a timeout, a
        connection lost midway, or a server starting up or shutting down."""
        try:
            connection = await connect(self.dsn, self.connect_timeout_s)
        except DatabaseUnavailable as exc:
            if isinstance(exc.__cause__, asyncpg.PostgresError) and not isinstance(
                exc.__cause__, _NOT_ANSWERING
            ):
                return
            raise
        await _close(connection)

    async def flush(self) -> None:
        """Nothing buffered: every `deliver` that returned has committed."""

    async def stop(self) -> None:
        connections, self._connections = self._connections, {}
        for connection in connections.values():
            await _close(connection)
        self._forget_schema_state()

    async def deliver(self, stream: str, records: Sequence[SpoolRecord]) -> None:
        """Write every record or raise; on return the records are committed."""
        rows = self._encoded(stream, records)
        if not rows:
            return
        connection = await self._connection(stream)
        try:
            await self._ensure_partitions(connection, rows)
            calls = self._calls_of(rows, CDRS)
            try:
                inserted = await self._write(connection, rows, calls, direct=True)
            except asyncpg.exceptions.UniqueViolationError:
                # Rows already there: a re-delivery (after a crash or a failed attempt),
                # rolled back whole and written again row by row, skipping those.
                inserted = await self._write(connection, rows, calls, direct=False)
            # A message committed while its call's restricted CDR was being written (on
            # the other stream's connection) missed both flags: the call is known now.
            if late := self._calls_of(rows, SIP_MESSAGES):
                await connection.execute(_FLAG_CALLS, late)
        except BaseException as exc:
            # The connection may be mid-protocol or dead, and a cached partition may
            # have been dropped by retention: the next attempt starts afresh.
            self._connections.pop(stream, None)
            connection.terminate()
            self._forget_schema_state()
            if isinstance(exc, _CONTENT_ERRORS):
                raise RecordsRejected(f"{type(exc).__name__}: {exc}") from exc
            raise
        for table, table_rows in rows.items():
            self.rows_inserted[table.name] += inserted[table.name]
            self.duplicates_skipped[table.name] += len(table_rows) - inserted[table.name]

    async def _write(
        self,
        connection: asyncpg.Connection,
        rows: dict[Table, TableRows],
        calls: list[str],
        *,
        direct: bool,
    ) -> dict[str, int]:
        """Write a batch in one transaction; rows inserted by table. `direct`: COPY
        straight into each table, which a batch delivered for the first time (nearly
        always) passes in one pass, and which raises UniqueViolationError, the whole
        transaction rolled back, when rows are already there; otherwise through the
        staging table (`_insert`). A batch of one COPY and nothing else (signaling, or
        CDRs of no restricted subject) needs no transaction of its own: a statement is
        one, and BEGIN and COMMIT were two of its round trips."""
        inserted: dict[str, int] = {}
        if direct and len(rows) == 1 and not calls:
            ((table, table_rows),) = rows.items()
            if table.latest is None:
                await self._copy(connection, table, table_rows)
                return {table.name: len(table_rows)}
        async with connection.transaction():
            for table, table_rows in rows.items():
                if direct and table.latest is None:
                    await self._copy(connection, table, table_rows)
                    inserted[table.name] = len(table_rows)
                else:
                    inserted[table.name] = await self._insert(connection, table, table_rows)
            if calls:
                await connection.execute(_FLAG_CALLS, calls)
        return inserted

    @staticmethod
    async def _copy(connection: asyncpg.Connection, table: Table, table_rows: TableRows) -> None:
        await _copy_records(connection, table.name, table_rows, table.columns)

    async def _insert(
        self, connection: asyncpg.Connection, table: Table, table_rows: TableRows
    ) -> int:
        """The rows through the staging table and INSERT .. ON CONFLICT DO NOTHING, in
        the caller's transaction: those already there (a re-delivery) are skipped.
        Returns rows inserted."""
        if table.latest is not None:
            assert isinstance(table_rows, list)  # only `sip_messages` rows come encoded
            return await self._upsert(connection, table, table_rows)
        await _copy_records(connection, table.staging, table_rows, table.columns)
        columns = ", ".join(table.columns)
        status = await connection.execute(
            f"INSERT INTO {table.name} ({columns}) "
            f"SELECT {columns} FROM {table.staging} ON CONFLICT DO NOTHING"
        )
        if table is SIP_MESSAGES:
            await connection.execute(_FLAG_REDELIVERED)
        return int(status.rsplit(" ", 1)[-1])

    async def _upsert(
        self, connection: asyncpg.Connection, table: Table, table_rows: list[Row]
    ) -> int:
        """Rows that replace an older version of themselves (an alert's updates): only
        the highest `latest` per key in the batch goes in (one statement may not touch a
        row twice), and it replaces a row already there only when it is higher. Updates
        are rare next to CDRs, so they always go through the staging table. Returns the
        rows inserted or replaced; the rest were already there as new or newer."""
        latest = table.columns.index(table.latest or "")
        keys = [table.columns.index(column) for column in table.key]
        newest: dict[tuple[Any, ...], Row] = {}
        for row in table_rows:
            key = tuple(row[i] for i in keys)
            kept = newest.get(key)
            if kept is None or row[latest] > kept[latest]:
                newest[key] = row
        await _copy_records(connection, table.staging, list(newest.values()), table.columns)
        columns = ", ".join(table.columns)
        updates = ", ".join(
            f"{column} = EXCLUDED.{column}" for column in table.columns if column not in table.key
        )
        status = await connection.execute(
            f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM {table.staging} "
            f"ON CONFLICT ({', '.join(table.key)}) DO UPDATE SET {updates} "
            f"WHERE {table.name}.{table.latest} < EXCLUDED.{table.latest}"
        )
        return int(status.rsplit(" ", 1)[-1])

    def _encoded(self, stream: str, records: Sequence[SpoolRecord]) -> dict[Table, TableRows]:
        """The batch's rows by table; a batch of spooled SIP messages only (the
        signaling stream's, but for JSON values left by an earlier version) as one
        binary COPY, its rows encoded as they are read (`SipCopy`): the same rows as
        `_rows`, without a tuple of Python values for the driver to encode again."""
        names = self._names if self._restricted_calls.any_restricted else None
        copy = SipCopy()
        add = copy.add
        for record in records:
            value = record.value
            if record.kind != KIND_SIP or not is_spooled(value):
                return dict(self._rows(stream, records))
            try:
                add(value, names)
            except ValueError as exc:
                raise RecordError(
                    f"{stream} record {record.seq} ({record.kind}) cannot be stored in "
                    f"{SIP_MESSAGES.name}: {type(exc).__name__}: {exc}"
                ) from exc
        if not copy:
            return {}
        return {SIP_MESSAGES: copy}

    def _rows(self, stream: str, records: Sequence[SpoolRecord]) -> dict[Table, list[Row]]:
        rows: dict[Table, list[Row]] = {}
        # Read once a batch: a restriction list that arrives meanwhile is taken at the
        # next one, as a row built a moment earlier would have been.
        names = self._names if self._restricted_calls.any_restricted else None
        for record in records:
            table = TABLE_OF_KIND.get(record.kind)
            if table is None:
                self.records_ignored[record.kind] = self.records_ignored.get(record.kind, 0) + 1
                continue
            try:
                if table is SIP_MESSAGES and is_spooled(record.value):
                    # Built from the captured bytes, not from JSON.
                    rows.setdefault(table, []).append(sip_message_row(record.value, names))
                    continue
                value = orjson.loads(record.value)
                if table is CDRS:
                    value["retention_days"] = self.retention_classes.get(
                        value.get("trunk"), DEFAULT_CLASS
                    )
                    value["restricted"] = self._restricted_calls.note(value, self._restricted)
                elif table is FRAUD_ALERTS:
                    value["restricted"] = alert_names_any(value, self._restricted)
                else:
                    value["restricted"] = self._names(value.get("call_id"), value.get("headers"))
                row = table.row(value)
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
                raise RecordError(
                    f"{stream} record {record.seq} ({record.kind}) cannot be stored in "
                    f"{table.name}: {type(exc).__name__}: {exc}"
                ) from exc
            if row[table.day_column] is None:
                raise RecordError(
                    f"{stream} record {record.seq} ({record.kind}) has no "
                    f"{table.columns[table.day_column]}, the key of {table.name}'s partitions"
                )
            rows.setdefault(table, []).append(row)
        return rows

    def _names(self, call_id: object, headers: object) -> bool:
        """Whether a message belongs to a restricted subject: its call is one, or its
        headers name one (`sipcdr.privacy.naming`, the rule Kafka and `restrict` use)."""
        calls = self._restricted_calls
        return calls.any_restricted and (call_id in calls or names_any(headers, self._restricted))

    def _calls_of(self, rows: dict[Table, TableRows], table: Table) -> list[str]:
        """The calls of restricted CDRs, or of messages left unflagged in a restricted
        call: their signaling is flagged by Call-ID (`_FLAG_CALLS`)."""
        call_id, flag = table.columns.index("call_id"), table.columns.index("restricted")
        calls = self._restricted_calls
        table_rows = rows.get(table, [])
        if isinstance(table_rows, SipCopy):
            # Its Call-IDs are those of the rows left unflagged already.
            return sorted({call for call in table_rows.calls if call in calls}) if calls else []
        if table is CDRS:
            return sorted({r[call_id] for r in table_rows if r[flag]})
        if not calls:
            return []  # no restricted call known: each message's look-up would find none
        return sorted({r[call_id] for r in table_rows if not r[flag] and r[call_id] in calls})

    async def _connection(self, stream: str) -> asyncpg.Connection:
        connection = self._connections.get(stream)
        if connection is not None and not connection.is_closed():
            if self._today() != self._ahead_day:
                try:
                    await self._make_ahead(connection)
                except BaseException:
                    self._connections.pop(stream, None)
                    connection.terminate()
                    self._forget_schema_state()
                    raise
            return connection
        connection = await connect(self.dsn, self.connect_timeout_s, self.command_timeout_s)
        try:
            async with self._schema_lock:
                await migrate(connection)
            await self._make_ahead(connection)
            for table in TABLES:
                # LIKE copies the columns and defaults but not the partitioning, the
                # keys or the indexes: COPY into it is cheap and never conflicts.
                await connection.execute(
                    f"CREATE TEMP TABLE IF NOT EXISTS {table.staging} "
                    f"(LIKE {table.name} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                )
        except BaseException:
            connection.terminate()
            self._forget_schema_state()
            raise
        self._connections[stream] = connection
        return connection

    async def _make_ahead(self, connection: asyncpg.Connection) -> None:
        async with self._schema_lock:
            today = self._today()
            if today == self._ahead_day:
                return  # the other stream's connection just did it
            classes = self._classes()
            await ensure_ahead(connection, today, self.partitions_ahead_days, classes)
            self._ahead_day = today
            days = [today + timedelta(days=n) for n in range(-1, self.partitions_ahead_days + 1)]
            self._known_partitions.update((table.name, day) for table in TABLES for day in days)
            self._known_classes.update((day, c) for day in days for c in classes)

    def _forget_schema_state(self) -> None:
        # After a failure the server may be another one (a failover, a fresh embedded
        # data directory) or retention may have dropped a cached partition: the next
        # connection checks the schema and the partitions again.
        self._known_partitions.clear()
        self._known_classes.clear()
        self._ahead_day = None

    async def _ensure_partitions(
        self, connection: asyncpg.Connection, rows: dict[Table, TableRows]
    ) -> None:
        for table, table_rows in rows.items():
            if isinstance(table_rows, SipCopy):
                days = table_rows.dates()
            else:
                days = {row[table.day_column].astimezone(UTC).date() for row in table_rows}
            missing = {day for day in days if (table.name, day) not in self._known_partitions}
            if missing:
                await ensure_partitions(connection, table.name, missing, self._classes())
                self._known_partitions.update((table.name, day) for day in missing)
            if table is CDRS:
                assert isinstance(table_rows, list)
                column = table.columns.index("retention_days")
                pairs = {
                    (row[table.day_column].astimezone(UTC).date(), row[column])
                    for row in table_rows
                }
                new = pairs - self._known_classes
                for day, retention_days in sorted(new):
                    await ensure_partitions(connection, table.name, [day], [retention_days])
                self._known_classes.update(new)

    def _classes(self) -> tuple[int, ...]:
        return tuple(sorted({DEFAULT_CLASS, *self.retention_classes.values()}))

    def _today(self) -> date:
        return datetime.fromtimestamp(self._clock(), UTC).date()


def _never(number: str | None) -> bool:
    return False


async def _close(connection: asyncpg.Connection) -> None:
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await connection.close()
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        connection.terminate()
