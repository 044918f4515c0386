"""Real SIP peers for integration tests: Kamailio as a tracing proxy, SIPp as UAC and UAS.

Everything runs on loopback on ports the kernel hands out at run time, so the
suite can share a machine with a real SIP server on 5060. Each peer is a child
process in its own session, writes its output to files under a work folder
and is killed (the whole process group) by ``stop``. Every wait is bounded.

The module does not depend on pytest except for ``require_program``, so the
classes can also drive a manual run from a Python prompt.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

__all__ = [
    "LOOPBACK",
    "PEERS_DIR",
    "Address",
    "Kamailio",
    "KamailioFactory",
    "PeerError",
    "PeerProcess",
    "Sipp",
    "SippResult",
    "SippUas",
    "UdpSink",
    "format_logs",
    "free_udp_port",
    "require_program",
]

LOOPBACK: Final = "127.0.0.1"
PEERS_DIR: Final = Path(__file__).resolve().parent / "peers"
KAMAILIO_CFG: Final = PEERS_DIR / "kamailio.cfg"

Address = tuple[str, int]

_LOG_TAIL_CHARS: Final = 4000
_STOP_GRACE: Final = 5.0
# The stats CSV of SIPp is cumulative; these columns hold the totals.
_SIPP_SUCCESSFUL: Final = "SuccessfulCall(C)"
_SIPP_FAILED: Final = "FailedCall(C)"
_SIPP_CREATED: Final = "TotalCallCreated"


class PeerError(RuntimeError):
    """A peer did not start, did not finish in time, or finished badly; carries its logs."""


def require_program(name: str) -> str:
    """Return the path of ``name``; fail under CI, skip elsewhere, when it is not installed.

    A CI run that skips the integration tests would pass without testing
    anything, so a missing program is an error there (``make sysdeps``
    installs them).
    """
    path = shutil.which(name)
    if path is not None:
        return path
    import pytest

    message = f"{name} not found on PATH (make sysdeps installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_udp_port(host: str = LOOPBACK) -> int:
    """A UDP port on ``host`` that was free a moment ago (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _free_udp_port_pair(host: str = LOOPBACK, gap: int = 2, attempts: int = 50) -> int:
    """A free port ``p`` with ``p + gap`` free as well (SIPp binds its media port and +2)."""
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as first:
            first.bind((host, 0))
            port: int = first.getsockname()[1]
            if port + gap > 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as second:
                try:
                    second.bind((host, port + gap))
                except OSError:
                    continue
                return port
    raise PeerError(f"no pair of free UDP ports {gap} apart on {host}")


def udp_port_bound(host: str, port: int) -> bool:
    """Whether some process has ``host:port`` bound for UDP (Linux /proc, IPv4 only).

    Read passively: probing with a bind of our own could take the port from
    under a peer that is about to bind it.
    """
    # The kernel prints the address as a native-order u32 in hex.
    (native,) = struct.unpack("=I", socket.inet_aton(host))
    wanted = f"{native:08X}:{port:04X}"
    try:
        table = Path("/proc/net/udp").read_text(encoding="ascii").splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[1] == wanted for line in table if len(line.split()) > 1)


def _tail(path: Path, limit: int = _LOG_TAIL_CHARS) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "(no file)"
    text = data[-limit:].decode("utf-8", "replace")
    return ("[...]\n" if len(data) > limit else "") + (text or "(empty)")


def format_logs(paths: Iterable[Path]) -> str:
    """The tail of each log file under a header, for failure messages."""
    return "\n".join(f"----- {path} -----\n{_tail(path)}" for path in paths)


class PeerProcess:
    """A child process in its own session with stdout and stderr in files."""

    def __init__(self, name: str, argv: Sequence[str], workdir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.workdir = workdir
        self.stdout_path = workdir / f"{name}.stdout.log"
        self.stderr_path = workdir / f"{name}.stderr.log"
        workdir.mkdir(parents=True, exist_ok=True)
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            # A new session makes the process a group leader, so stop() also
            # reaches the children it forks (Kamailio's workers).
            self.popen: subprocess.Popen[bytes] = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=workdir,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def log_files(self) -> list[Path]:
        return [self.stdout_path, self.stderr_path]

    def describe(self) -> str:
        state = "running" if self.returncode is None else f"exit code {self.returncode}"
        command = " ".join(self.argv)
        return f"{self.name} (pid {self.pid}, {state}): {command}\n" + format_logs(self.log_files())

    def wait(self, timeout: float) -> int:
        """Exit code; kills the process and raises PeerError when it outlives ``timeout``."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise PeerError(
                f"{self.name} still running after {timeout:.1f} s\n" + self.describe()
            ) from None

    def stop(self, grace: float = _STOP_GRACE) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds; idempotent.

        The leader is left unreaped until its group has been killed: while it
        is a zombie its pid cannot be reused, so the group id still names only
        processes started here. A leader already reaped (it exited and was
        waited for) is not signalled at all.
        """
        if self.popen.returncode is not None:
            return
        self._signal_group(signal.SIGTERM)
        if not self._exited(grace):
            self._signal_group(signal.SIGKILL)
            self._exited(grace)
        # Workers that outlived their leader still belong to its group.
        self._signal_group(signal.SIGKILL)
        self.popen.wait(timeout=grace)

    def _exited(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the leader to exit, without reaping it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return True
            if info is not None:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)


class KamailioFactory(Protocol):
    """Starts a tracing Kamailio in front of ``uas`` that mirrors to ``hep_target``."""

    def __call__(self, hep_target: Address, uas: Address) -> Kamailio: ...


class Kamailio:
    """Kamailio as a record-routing stateful proxy that mirrors its SIP traffic as HEPv3.

    ``tests/support/peers/kamailio.cfg`` documents what is traced. The config is
    copied into the work folder so that a failed run leaves the exact file
    next to the logs.
    """

    def __init__(self, workdir: Path, binary: str = "kamailio") -> None:
        self.workdir = workdir
        self.binary = binary
        self.process: PeerProcess | None = None
        self.listen: Address = (LOOPBACK, 0)
        self.uas: Address = (LOOPBACK, 0)
        self.hep_target: Address = (LOOPBACK, 0)

    @property
    def address(self) -> Address:
        return self.listen

    def start(
        self,
        uas: Address,
        hep_target: Address,
        listen_port: int | None = None,
        cfg: Path = KAMAILIO_CFG,
        timeout: float = 10.0,
    ) -> None:
        """Start and wait until an OPTIONS to the listen port is answered."""
        if self.process is not None:
            raise PeerError("kamailio already started")
        host = LOOPBACK
        port = free_udp_port(host) if listen_port is None else listen_port
        self.listen, self.uas, self.hep_target = (host, port), uas, hep_target
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg_copy = self.workdir / "kamailio.cfg"
        shutil.copyfile(cfg, cfg_copy)
        rundir = self.workdir / "run"
        rundir.mkdir(exist_ok=True)
        argv = [
            self.binary,
            "-DD",  # stay in the foreground, still fork the workers
            "-E",  # log to stderr, captured in a file
            "-f", str(cfg_copy),
            "-l", f"udp:{host}:{port}",
            "-T",  # no TCP: only the UDP port was checked to be free
            "-S",
            "-a", "no",
            "-Y", str(rundir),
            "-w", str(self.workdir),
            "-m", "32",
            "-M", "4",
            "-A", f'UAS_HOST="{uas[0]}"',
            "-A", f"UAS_PORT={uas[1]}",
            "-A", f'HEP_URI="sip:{hep_target[0]}:{hep_target[1]}"',
        ]  # fmt: skip
        self.process = PeerProcess("kamailio", argv, self.workdir)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        host, port = self.listen
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((host, 0))
            sock.settimeout(0.2)
            local_port = sock.getsockname()[1]
            while time.monotonic() < deadline:
                if self.process.returncode is not None:
                    raise PeerError("kamailio exited during start-up\n" + self.process.describe())
                # kamailio.cfg keeps Call-IDs with this prefix out of the trace.
                call_id = f"sipcdr-probe-{uuid.uuid4().hex}"
                branch = f"z9hG4bK{uuid.uuid4().hex}"
                probe = (
                    f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
                    f"Via: SIP/2.0/UDP {host}:{local_port};branch={branch};rport\r\n"
                    "Max-Forwards: 70\r\n"
                    f"From: <sip:probe@{host}:{local_port}>;tag={uuid.uuid4().hex[:10]}\r\n"
                    f"To: <sip:{host}:{port}>\r\n"
                    f"Call-ID: {call_id}\r\n"
                    "CSeq: 1 OPTIONS\r\n"
                    "Content-Length: 0\r\n\r\n"
                ).encode()
                sock.sendto(probe, self.listen)
                try:
                    while True:
                        reply = sock.recv(65535)
                        if call_id.encode() in reply and reply.startswith(b"SIP/2.0 200"):
                            return
                except (TimeoutError, ConnectionRefusedError):
                    # Refused: nothing bound yet, the ICMP error lands on the socket.
                    time.sleep(0.05)
        self.stop()
        raise PeerError(
            f"kamailio not answering on {host}:{port} after {timeout:.1f} s\n"
            + self.process.describe()
        )

    def log_files(self) -> list[Path]:
        return [] if self.process is None else self.process.log_files()

    def describe(self) -> str:
        return "kamailio: not started" if self.process is None else self.process.describe()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@dataclass
class SippResult:
    """Outcome of one SIPp run: exit code and the final totals of its stats file."""

    name: str
    argv: list[str]
    port: int
    returncode: int
    calls: int
    successful: int
    failed: int
    created: int
    log_paths: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.failed == 0 and self.successful == self.calls

    def describe(self) -> str:
        head = (
            f"{self.name}: exit code {self.returncode}, {self.successful}/{self.calls} calls "
            f"successful, {self.failed} failed, {self.created} created\n{' '.join(self.argv)}\n"
        )
        return head + format_logs(self.log_paths)

    def check(self) -> SippResult:
        if not self.ok:
            raise PeerError(self.describe())
        return self


class SippUas:
    """A SIPp UAS running in the background until its ``calls`` calls are done."""

    def __init__(self, sipp: Sipp, name: str, argv: list[str], calls: int, port: int) -> None:
        self._sipp = sipp
        self.name = name
        self.calls = calls
        self.address: Address = (sipp.host, port)
        self.process = PeerProcess(name, argv, sipp.workdir)

    def wait_bound(self, timeout: float = 5.0) -> None:
        """Return once the SIP port is bound, so that nothing sent to it is refused."""
        deadline = time.monotonic() + timeout
        while not udp_port_bound(*self.address):
            if self.process.returncode is not None:
                raise PeerError(f"{self.name} exited during start-up\n" + self.process.describe())
            if time.monotonic() > deadline:
                self.stop()
                raise PeerError(
                    f"{self.name} did not bind {self.address} in {timeout:.1f} s\n"
                    + self.process.describe()
                )
            time.sleep(0.02)

    def wait(self, timeout: float = 10.0) -> SippResult:
        """Result once all calls are done; kills SIPp and raises PeerError after ``timeout``."""
        returncode = self.process.wait(timeout)
        return self._sipp.result(self.name, self.process, returncode, self.calls, self.address[1])

    def stop(self) -> None:
        self.process.stop()


class Sipp:
    """Runs SIPp scenarios on loopback with every local port chosen at run time.

    A scenario is a file name under ``tests/support/peers`` without ``.xml``
    (``"uac_answered"``), a path to an XML file, or else a built-in SIPp
    scenario (``"uac"``, ``"uas"``). The built-in ones ignore Record-Route, so
    behind the proxy their ACK and BYE are not routed: use the files there.
    """

    def __init__(self, workdir: Path, binary: str = "sipp", host: str = LOOPBACK) -> None:
        self.workdir = workdir
        self.binary = binary
        self.host = host
        self.processes: list[PeerProcess] = []
        self._runs = 0
        workdir.mkdir(parents=True, exist_ok=True)

    def run_uas(
        self,
        scenario: str | Path,
        port: int | None = None,
        calls: int = 1,
        timeout: float = 30.0,
        extra_args: Sequence[str] = (),
    ) -> SippUas:
        """Start a UAS in the background, return once it listens; ``wait`` for its result."""
        port = free_udp_port(self.host) if port is None else port
        name = self._name(scenario)
        argv = self._argv(name, scenario, port, calls, timeout) + list(extra_args)
        uas = SippUas(self, name, argv, calls, port)
        self.processes.append(uas.process)
        uas.wait_bound()
        return uas

    def run_uac(
        self,
        scenario: str | Path,
        target: Address,
        calls: int = 1,
        rate: float = 10.0,
        limit: int | None = None,
        hold_ms: int = 0,
        service: str = "callee",
        timeout: float = 30.0,
        extra_args: Sequence[str] = (),
    ) -> SippResult:
        """Place ``calls`` calls at ``rate`` per second, at most ``limit`` at once; wait for them.

        ``hold_ms`` is SIPp's ``-d``, the length of the scenario's bare ``<pause/>``.
        """
        port = free_udp_port(self.host)
        name = self._name(scenario)
        argv = self._argv(name, scenario, port, calls, timeout)
        argv.insert(1, f"{target[0]}:{target[1]}")
        argv += [
            "-s", service,
            "-r", f"{rate:g}",
            "-l", str(calls if limit is None else limit),
            "-d", str(hold_ms),
            *extra_args,
        ]  # fmt: skip
        process = PeerProcess(name, argv, self.workdir)
        self.processes.append(process)
        # SIPp's own -timeout ends the run first; the margin only covers a hang.
        returncode = process.wait(timeout + 10.0)
        return self.result(name, process, returncode, calls, port)

    def result(
        self, name: str, process: PeerProcess, returncode: int, calls: int, port: int
    ) -> SippResult:
        stats = self._final_stats(self.workdir / f"{name}.stats.csv")
        return SippResult(
            name=name,
            argv=process.argv,
            port=port,
            returncode=returncode,
            calls=calls,
            successful=stats.get(_SIPP_SUCCESSFUL, 0),
            failed=stats.get(_SIPP_FAILED, 0),
            created=stats.get(_SIPP_CREATED, 0),
            log_paths=[*self.log_files(name), *process.log_files()],
        )

    def log_files(self, name: str) -> list[Path]:
        return [self.workdir / f"{name}.{kind}" for kind in ("errors.log", "screen.log", "msg.log")]

    def all_log_files(self) -> list[Path]:
        paths: list[Path] = []
        for process in self.processes:
            paths += self.log_files(process.name) + process.log_files()
        return paths

    def stop(self) -> None:
        for process in self.processes:
            process.stop()

    def _name(self, scenario: str | Path) -> str:
        self._runs += 1
        return f"sipp{self._runs:02d}-{Path(scenario).stem}"

    def _scenario_args(self, scenario: str | Path) -> list[str]:
        if isinstance(scenario, Path) or scenario.endswith(".xml"):
            return ["-sf", str(scenario)]
        path = PEERS_DIR / f"{scenario}.xml"
        return ["-sf", str(path)] if path.is_file() else ["-sn", scenario]

    def _argv(
        self, name: str, scenario: str | Path, port: int, calls: int, timeout: float
    ) -> list[str]:
        files = self.workdir / name
        return [
            self.binary,
            *self._scenario_args(scenario),
            "-i", self.host,
            "-p", str(port),
            "-bind_local",
            # Explicit media and control ports: the defaults (6000, 8888) may
            # be taken, and with an explicit port a clash is an error, not a
            # silent move to some other port.
            "-mp", str(_free_udp_port_pair(self.host)),
            "-cp", str(free_udp_port()),
            "-m", str(calls),
            "-nostdin",
            "-timeout", f"{timeout:g}s",
            "-timeout_error",
            # A call stuck waiting for a message fails instead of idling until -timeout.
            "-recv_timeout", "10000",
            "-trace_stat", "-stf", f"{files}.stats.csv", "-fd", "1",
            "-trace_err", "-error_file", f"{files}.errors.log",
            "-trace_screen", "-screen_file", f"{files}.screen.log",
            "-trace_msg", "-message_file", f"{files}.msg.log",
        ]  # fmt: skip

    @staticmethod
    def _final_stats(path: Path) -> dict[str, int]:
        """Totals from the last row of SIPp's ``-trace_stat`` CSV (semicolon separated)."""
        try:
            with path.open(newline="", encoding="utf-8", errors="replace") as handle:
                rows = [row for row in csv.reader(handle, delimiter=";") if row]
        except FileNotFoundError:
            return {}
        if len(rows) < 2:
            return {}
        totals: dict[str, int] = {}
        for key, value in zip(rows[0], rows[-1], strict=False):
            if value.strip().isdigit():
                totals[key] = int(value)
        return totals


class UdpSink:
    """A bound UDP socket that collects datagrams, e.g. as the HEP target of Kamailio."""

    def __init__(self, host: str = LOOPBACK) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # Room for a burst of mirrored messages while the test is busy elsewhere.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind((host, 0))
        self.address: Address = self.sock.getsockname()

    def collect(self, quiet: float = 0.5, timeout: float = 10.0) -> list[bytes]:
        """Datagrams received until none came for ``quiet`` seconds (``timeout`` at most)."""
        deadline = time.monotonic() + timeout
        datagrams: list[bytes] = []
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(min(quiet, left))
            try:
                datagrams.append(self.sock.recv(65535))
            except TimeoutError:
                break
        return datagrams

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> UdpSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
