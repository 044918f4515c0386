"""What `sipcdr replay` says when a stream replay cannot start or is refused: each
message names the cause in the listener's terms (tests/integration/test_hep_network.py runs the
replays that succeed, and the refused handshakes, against `sipcdr run`)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pcapdata import require_shared_data
from sipcdr import cli
from sipcdr.capture.hepstream import HepStreamServer, StreamLimits
from sipcdr.capture.listeners import AllowList, HepGate
from sipcdr.capture.tls import key_exposed
from sipcdr.config import DEFAULT_ALLOW
from sipcdr.dialog import Correlator, DialogLimits
from sipcdr.pipeline import Pipeline
from tlscerts import Pki, encrypted_key, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def replay(capsys: pytest.CaptureFixture[str], to: str, *options: str | Path) -> tuple[int, str]:
    capture = require_shared_data() / "pcaps" / "zeek-sip-wireshark.pcap"
    argv = [str(part) for part in ("replay", capture, "--to", to, "--hep", "--rate", "max")]
    code = cli.main([*argv, *(str(option) for option in options)])
    return code, capsys.readouterr().err


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("kind", ["--tcp", "--tls"])
def test_a_port_nobody_listens_on_is_not_called_a_reset(
    capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    port = closed_port()
    code, error = replay(capsys, f"127.0.0.1:{port}", kind)
    assert code == 1
    assert f"nothing listens on 127.0.0.1:{port} (connection refused)" in error
    assert "reset" not in error


def test_tls_to_a_hep_tcp_port_says_to_use_tcp(
    capsys: pytest.CaptureFixture[str], pki: Pki
) -> None:
    async def body() -> tuple[int, str]:
        pipeline = Pipeline(Correlator(DialogLimits(), egress=True), ())
        limits = StreamLimits(10, 10, 60.0, 60.0, 65535)
        server = HepStreamServer(
            pipeline, AllowList(DEFAULT_ALLOW), HepGate({}), limits, tcp=[("127.0.0.1", 0)]
        )
        async with server:
            host, port = server.bound["hep_tcp"][0]
            return await asyncio.to_thread(
                replay, capsys, f"{host}:{port}", "--tls", "--ca", pki.ca
            )

    code, error = asyncio.run(body())
    assert code == 1
    assert "reset the connection during the TLS handshake: a HEP/TCP port (use --tcp)" in error


@pytest.mark.parametrize("option", ["--ca", "--cert", "--key"])
def test_a_missing_file_is_named_with_its_option(
    capsys: pytest.CaptureFixture[str], pki: Pki, tmp_path: Path, option: str
) -> None:
    files = {"--ca": pki.ca, "--cert": pki.agent_cert, "--key": pki.agent_key}
    files[option] = tmp_path / "missing.pem"
    options = [part for name, path in files.items() for part in (name, path)]
    code, error = replay(capsys, f"127.0.0.1:{closed_port()}", "--tls", *options)
    assert code == 2
    missing = tmp_path / "missing.pem"
    assert f"{option} {missing}: cannot be read (No such file or directory)" in error


def test_a_ca_file_without_certificates_is_named(
    capsys: pytest.CaptureFixture[str], pki: Pki, tmp_path: Path
) -> None:
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")
    code, error = replay(capsys, f"127.0.0.1:{closed_port()}", "--tls", "--ca", not_pem)
    assert code == 2
    assert f"--ca {not_pem}: holds no certificate; expected a PEM file of CA certificates" in error


def test_an_encrypted_key_is_refused_without_asking_for_a_passphrase(
    pki: Pki, tmp_path: Path
) -> None:
    """In a session of its own, so it has no terminal a passphrase prompt could wait on:
    a prompt would fail differently, and under a terminal it would hang."""
    key = encrypted_key(pki.agent_key, tmp_path / "agent.key", b"passphrase")
    capture = require_shared_data() / "pcaps" / "zeek-sip-wireshark.pcap"
    result = subprocess.run(
        [
            sys.executable, "-m", "sipcdr.cli", "replay", str(capture),
            "--to", f"127.0.0.1:{closed_port()}", "--hep", "--tls",
            "--ca", str(pki.ca), "--cert", str(pki.agent_cert), "--key", str(key),
        ],
        capture_output=True, text=True, timeout=60, check=False, start_new_session=True,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2
    assert "pass phrase" not in result.stderr
    expected = "is encrypted; expected an unencrypted PEM private key matching --cert"
    assert f"--key {key}: {expected}" in result.stderr


def test_a_key_file_others_may_read_is_exposed(tmp_path: Path) -> None:
    key = tmp_path / "server.key"
    key.write_bytes(b"")
    verdicts = {}
    for mode in (0o600, 0o400, 0o640, 0o604, 0o644):
        key.chmod(mode)
        verdicts[oct(mode)] = key_exposed(key)
    assert verdicts == {"0o600": False, "0o400": False, "0o640": True, "0o604": True, "0o644": True}
