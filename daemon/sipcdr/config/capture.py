"""The `[capture]` section: listeners, HEP/TCP limits, TLS files, agent keys, live capture."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Final

from sipcdr.capture import tls
from sipcdr.config.reading import Table, endpoints, join, networks
from sipcdr.config.schema import (
    DEFAULT_ALLOW,
    DEFAULT_HEP_KEYS,
    DEFAULT_HEP_TCP,
    DEFAULT_HEP_TCP_FRAME_TIMEOUT_S,
    DEFAULT_HEP_TCP_IDLE_TIMEOUT_S,
    DEFAULT_HEP_TCP_MAX_BUFFER_BYTES,
    DEFAULT_HEP_TCP_MAX_CONNECTIONS,
    DEFAULT_HEP_TCP_MAX_PER_SOURCE,
    DEFAULT_HEP_TLS,
    DEFAULT_HEP_UDP,
    DEFAULT_LIVE_ENGINE,
    DEFAULT_PROMISCUOUS,
    DEFAULT_RCVBUF_BYTES,
    DEFAULT_SIP_UDP,
    LIVE_ENGINES,
    CaptureConfig,
    Endpoint,
)

_HEP_MAX_FRAME: Final = 65535
_HEP_MIN_BUFFER: Final = 1024  # below this even a bare INVITE would not fit
# Below this the HEP/TCP deadlines only cut off working agents, and the sweep that
# enforces them (four times per timeout) would spin.
_HEP_MIN_TIMEOUT_S: Final = 0.1
_MAX_CAPTURE_ID: Final = 0xFFFFFFFF  # HEPv3 chunk 0x000c is an unsigned 32-bit integer


def capture_section(table: Table, base_dir: Path) -> CaptureConfig:
    hep_keys: dict[int, str] = {}
    for capture_id, key in table.entries("hep_keys").items():
        entry = join(table.key("hep_keys"), capture_id)
        if not (capture_id.isascii() and capture_id.isdigit()):
            expected = f"a capture id: an integer 0-{_MAX_CAPTURE_ID}"
            raise table.context.problem(entry, capture_id, "not a capture id", expected)
        number = int(capture_id)
        if number > _MAX_CAPTURE_ID:
            expected = f"a capture id: an integer 0-{_MAX_CAPTURE_ID}"
            raise table.context.problem(entry, capture_id, "out of range", expected)
        if number in hep_keys:
            raise table.context.problem(
                entry, capture_id, f"capture id {number} is given twice", "one key per capture id"
            )
        if not isinstance(key, str) or not key:
            raise table.context.invalid(entry, key, "a non-empty string")
        hep_keys[number] = str(key)
    interfaces: list[str] = []
    for key, name in table.strings("interfaces") or ():
        if any(char.isspace() or char == "," for char in name):
            raise table.context.invalid(key, name, "an interface name (no spaces or commas)")
        if name in interfaces:
            raise table.context.problem(key, name, "listed twice", "each interface once")
        interfaces.append(name)
    live_engine = table.string("live_engine", DEFAULT_LIVE_ENGINE)
    if live_engine not in LIVE_ENGINES:
        raise table.invalid("live_engine", live_engine, " or ".join(LIVE_ENGINES))
    hep_tls = endpoints(table, "hep_tls", DEFAULT_HEP_TLS)
    tls_files = _tls_files(table, base_dir, hep_tls)
    max_buffer = table.integer(
        "hep_tcp_max_buffer_bytes", DEFAULT_HEP_TCP_MAX_BUFFER_BYTES, minimum=_HEP_MIN_BUFFER
    )
    if max_buffer > _HEP_MAX_FRAME:
        raise table.problem(
            "hep_tcp_max_buffer_bytes",
            max_buffer,
            f"larger than the largest HEPv3 frame ({_HEP_MAX_FRAME} bytes)",
            f"an integer from {_HEP_MIN_BUFFER} to {_HEP_MAX_FRAME}",
        )
    return CaptureConfig(
        sip_udp=endpoints(table, "sip_udp", DEFAULT_SIP_UDP),
        hep_udp=endpoints(table, "hep_udp", DEFAULT_HEP_UDP),
        hep_tcp=endpoints(table, "hep_tcp", DEFAULT_HEP_TCP),
        hep_tls=hep_tls,
        tls_cert=tls_files.get("tls_cert"),
        tls_key=tls_files.get("tls_key"),
        tls_client_ca=tls_files.get("tls_client_ca"),
        hep_tcp_max_connections=table.integer(
            "hep_tcp_max_connections", DEFAULT_HEP_TCP_MAX_CONNECTIONS, minimum=1
        ),
        hep_tcp_max_per_source=table.integer(
            "hep_tcp_max_per_source", DEFAULT_HEP_TCP_MAX_PER_SOURCE, minimum=1
        ),
        hep_tcp_idle_timeout_s=table.positive_number(
            "hep_tcp_idle_timeout_s", DEFAULT_HEP_TCP_IDLE_TIMEOUT_S, minimum=_HEP_MIN_TIMEOUT_S
        ),
        hep_tcp_frame_timeout_s=table.positive_number(
            "hep_tcp_frame_timeout_s", DEFAULT_HEP_TCP_FRAME_TIMEOUT_S, minimum=_HEP_MIN_TIMEOUT_S
        ),
        hep_tcp_max_buffer_bytes=max_buffer,
        allow=networks(table, "allow", DEFAULT_ALLOW),
        rcvbuf_bytes=table.integer("rcvbuf_bytes", DEFAULT_RCVBUF_BYTES, minimum=1),
        hep_keys=MappingProxyType(hep_keys) if hep_keys else DEFAULT_HEP_KEYS,
        interfaces=tuple(interfaces),
        live_engine=live_engine,
        bpf_filter=table.string("bpf_filter", "") if table.has("bpf_filter") else None,
        promiscuous=table.boolean("promiscuous", DEFAULT_PROMISCUOUS),
    )


_TLS_FILE_KEYS: Final = ("tls_cert", "tls_key", "tls_client_ca")


def _tls_files(table: Table, base_dir: Path, hep_tls: tuple[Endpoint, ...]) -> dict[str, Path]:
    """The TLS files, checked by loading them the way the listener will, so a bad
    certificate stops the start here, naming its key. Read only when hep_tls lists a
    listener: until then they are not used."""
    given = {name: table.optional_string(name) for name in _TLS_FILE_KEYS}
    files = {name: base_dir / text for name, text in given.items() if text is not None}
    if not hep_tls:
        return files
    for name in ("tls_cert", "tls_key"):
        if name not in files:
            expected = "a PEM file path: capture.hep_tls needs a certificate and its key"
            raise table.context.problem(table.key(name), None, "missing", expected)
    try:
        tls.server_context(files["tls_cert"], files["tls_key"], files.get("tls_client_ca"))
    except tls.TlsSetupError as exc:
        raise table.problem(exc.setting, given[exc.setting], exc.problem, exc.expected) from None
    return files
