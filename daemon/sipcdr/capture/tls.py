"""TLS for HEP agents: the server context built from `[capture] tls_cert`, `tls_key` and
`tls_client_ca`, and the fixed reasons a failed handshake is counted under. The
certificate and key loading is shared with `sipcdr replay --tls`, whose agent files
get the same clear errors.

Kept apart from the listeners so the configuration check can load the same context
the listener will, without importing the capture path. Nothing here reads or logs a
key's contents: errors name the file and what is wrong with it.
"""

from __future__ import annotations

import ssl
import stat
from pathlib import Path
from typing import Final

# TLS 1.0/1.1 are deprecated (RFC 8996); every agent that speaks TLS at all speaks 1.2.
MINIMUM_VERSION: Final = ssl.TLSVersion.TLSv1_2

# The reasons `handshake_failure` returns: a fixed set, so they can be metric labels.
HANDSHAKE_FAILURES: Final = (
    "no_client_cert",  # tls_client_ca is set and the agent sent no certificate
    "unknown_ca",  # the agent's certificate is not signed by tls_client_ca
    "bad_client_cert",  # signed, but not acceptable (expired, wrong usage, ...)
    "agent_alert",  # the agent gave up, typically because it does not trust ours
    "not_tls",  # the first bytes were not a TLS handshake (plain HEP, HTTP, a scanner)
    "timeout",  # not finished within hep_tcp_frame_timeout_s
    "eof",  # the agent closed the connection during the handshake
    "other",
)

# OpenSSL's X509_V_ERR_* codes that mean "no trusted issuer found".
_UNTRUSTED_ISSUER: Final = frozenset({2, 18, 19, 20, 21})
_NOT_TLS: Final = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "HTTP_REQUEST",
        "HTTPS_PROXY_REQUEST",
        "UNKNOWN_PROTOCOL",
        "PACKET_LENGTH_TOO_LONG",
        "RECORD_LENGTH_MISMATCH",
        "UNEXPECTED_RECORD",
        "UNEXPECTED_MESSAGE",
    }
)


class TlsSetupError(ValueError):
    """A certificate or key that cannot be used. `setting` names the one at fault
    (`tls_cert`, `tls_key` or `tls_client_ca`; replay's `--cert`, `--key`, `--ca`),
    `expected` what would work."""

    def __init__(self, setting: str, path: Path, problem: str, expected: str) -> None:
        super().__init__(f"{setting} {path}: {problem}; expected {expected}")
        self.setting = setting
        self.path = path
        self.problem = problem
        self.expected = expected


class _PassphraseNeeded(Exception):
    """Raised from OpenSSL's passphrase callback: a daemon cannot ask for one."""


def _refuse_passphrase() -> bytes:
    raise _PassphraseNeeded


def _check_readable(setting: str, path: Path, expected: str) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise TlsSetupError(setting, path, f"cannot be read ({exc.strerror})", expected) from None


_PEM_CERT: Final = "a PEM certificate (chain)"
_PEM_CA: Final = "a PEM file of CA certificates"


def load_key_pair(
    context: ssl.SSLContext,
    cert: Path,
    key: Path | None,
    settings: tuple[str, str] = ("tls_cert", "tls_key"),
) -> None:
    """Load `cert` and its `key` (None: the key is in `cert`) into `context`; an
    encrypted key is refused rather than asked a passphrase for on the terminal.
    Raises TlsSetupError naming the setting at fault (`settings`: the names of the
    certificate's and the key's)."""
    cert_setting, key_setting = settings
    pem_key = f"an unencrypted PEM private key matching {cert_setting}"
    _check_readable(cert_setting, cert, _PEM_CERT)
    if key is None:
        key_setting, key = cert_setting, cert
    else:
        _check_readable(key_setting, key, pem_key)
    # Loading the certificate on its own first tells a bad certificate from a bad key,
    # which load_cert_chain's "PEM lib" error does not.
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        probe.load_verify_locations(cafile=str(cert))
    except ssl.SSLError:
        raise TlsSetupError(cert_setting, cert, "holds no certificate", _PEM_CERT) from None
    try:
        context.load_cert_chain(str(cert), str(key), password=_refuse_passphrase)
    except _PassphraseNeeded:
        raise TlsSetupError(key_setting, key, "is encrypted", pem_key) from None
    except ssl.SSLError as exc:
        problem = (
            f"does not match the certificate in {cert_setting}"
            if exc.reason == "KEY_VALUES_MISMATCH"
            else "holds no usable private key"
        )
        raise TlsSetupError(key_setting, key, problem, pem_key) from None


def check_cas(path: Path, setting: str) -> None:
    """Raise TlsSetupError unless `path` is a readable PEM file of certificates."""
    _check_readable(setting, path, _PEM_CA)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
    except ssl.SSLError:
        raise TlsSetupError(setting, path, "holds no certificate", _PEM_CA) from None


def key_exposed(key: Path) -> bool:
    """Whether users other than the key file's owner may read it (group or others)."""
    try:
        mode = key.stat().st_mode
    except OSError:
        return False  # loading it has just succeeded or will say what is wrong
    return bool(mode & (stat.S_IRGRP | stat.S_IROTH))


def server_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """The context for HEP/TLS listeners; with `client_ca`, agents must present a
    certificate it signed. Raises TlsSetupError naming the file at fault."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    # Agents send and never renegotiate; refusing it closes a known CPU-exhaustion path.
    context.options |= ssl.OP_NO_RENEGOTIATION
    load_key_pair(context, cert, key)
    if client_ca is not None:
        check_cas(client_ca, "tls_client_ca")
        context.load_verify_locations(cafile=str(client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def handshake_failure(exc: BaseException) -> str:
    """The reason (one of HANDSHAKE_FAILURES) a server-side handshake raised `exc`."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "unknown_ca" if exc.verify_code in _UNTRUSTED_ISSUER else "bad_client_cert"
    if isinstance(exc, ssl.SSLEOFError):
        return "eof"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_REQUIRED"):
            return "no_client_cert"
        if reason in _NOT_TLS:
            return "not_tls"
        if reason.startswith(("TLSV1_ALERT_", "SSLV3_ALERT_", "TLSV13_ALERT_")):
            return "agent_alert"
    return "other"
