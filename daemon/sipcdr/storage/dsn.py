"""PostgreSQL DSNs: checked the way the driver will read them, and shown with their
passwords masked."""

from __future__ import annotations

import inspect
import ipaddress
import re
import socket
import urllib.parse
from typing import Final

# What a secret is replaced with wherever it would show: a DSN's passwords here, every
# secret in the config's logged view and error messages.
SECRET_MASK: Final = "***"
# A host name label, as the resolver takes it.
HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
DSN_SCHEMES: Final = ("postgresql://", "postgres://")
# Parameters with a fixed set of values, as asyncpg takes them (libpq's names; the
# tests compare them with the driver's).
_DSN_CHOICES: Final = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "sslnegotiation": ("postgres", "direct"),
    "target_session_attrs": (
        "any",
        "primary",
        "standby",
        "prefer-standby",
        "read-write",
        "read-only",
    ),
    "gsslib": ("gssapi", "sspi"),
    "ssl_min_protocol_version": ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"),
    "ssl_max_protocol_version": ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"),
}
DSN_FORM: Final = (
    '"embedded", "" (disabled), or a URL '
    "postgresql://[user[:password]@][host][:port][,host[:port]...][/dbname][?key=value&...] "
    "with reserved characters percent-encoded"
)
URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# A parameter's name and its "=", in the URL's query or the key=value form.
_DSN_PARAMETER = re.compile(r"(?:^|[?&\s])([^=?&\s]+)\s*=")
_DSN_SECRET_PARAMETERS: Final = frozenset({"password", "sslpassword"})
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def redact_dsn(dsn: str) -> str:
    """The DSN with its passwords masked: the URL's userinfo, and everything from the
    first `password=` or `sslpassword=` parameter to the end (also in the `key=value`
    form), so that no unescaped separator (`&`, `#`, a space) in a password can leave a
    piece of it showing.

    Takes the last `@` as the end of the userinfo, because passwords are often written
    unescaped; when that guesses wrong it masks too much, never too little.
    """
    scheme = URL_SCHEME.match(dsn)
    head, rest = (dsn[: scheme.end()], dsn[scheme.end() :]) if scheme else ("", dsn)
    at = rest.rfind("@")
    if scheme and at >= 0 and ":" in rest[:at]:
        user = rest[:at].split(":", 1)[0]
        rest = f"{user}:{SECRET_MASK}@{rest[at + 1 :]}"
    for match in _DSN_PARAMETER.finditer(rest):
        # The driver decodes parameter names: pass%77ord is a password too.
        name = urllib.parse.unquote_plus(match.group(1)).strip().lower()
        if name in _DSN_SECRET_PARAMETERS:
            return head + rest[: match.end()] + SECRET_MASK
    return head + rest


def dsn_problem(dsn: str) -> str | None:
    """What keeps the PostgreSQL driver from using `dsn`, a postgresql:// URL, as it was
    meant, or None.

    The driver's own parser runs on it (so a value it refuses at every connect, such
    as `target_session_attrs=bogus` or more ports than hosts, is refused here), after
    checks for what it takes silently but wrongly: an unescaped `@`, `#`, `/` or `?` in
    a password shifts the parts after it into the host, the port or the database name.
    The answer quotes no part of the DSN: an unescaped password can end up in any of
    them.
    """
    scheme, separator, rest = dsn.partition("://")
    if not separator or scheme.lower() not in ("postgresql", "postgres"):
        return "the scheme is neither postgresql:// nor postgres://"
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in dsn):
        return "it holds a control character (percent-encode it)"
    if "#" in rest:
        # The driver drops everything from a '#' on, a password's remainder included.
        return "it holds a '#' (percent-encode it as %23, in a password too)"
    try:
        parts = urllib.parse.urlsplit(dsn)
    except ValueError:
        netloc = re.split(r"[/?]", rest, maxsplit=1)[0]
        if "[" in netloc.rpartition("@")[0] or "]" in netloc.rpartition("@")[0]:
            return "a user name or password holds '[' or ']' (percent-encode them as %5B, %5D)"
        return "its host part is malformed (an IPv6 host is written [2001:db8::1]:5432)"
    hostspec = parts.netloc.partition("@")[2] if "@" in parts.netloc else parts.netloc
    if "@" in hostspec:
        return "it holds a second '@' before the host (percent-encode it as %40)"
    if "@" in parts.path:
        return (
            "it holds an '@' after the host: a '/' or '?' in a password must be "
            "percent-encoded (%2F, %3F), and an '@' in the database name as %40"
        )
    try:
        query = {
            key: values[-1]
            for key, values in urllib.parse.parse_qs(parts.query, strict_parsing=True).items()
        }
    except ValueError:
        return (
            "the part after '?' is not key=value pairs joined by '&' (a '?' in a password "
            "must be percent-encoded as %3F)"
        )
    try:
        hosts = _dsn_hosts(hostspec, encoded=True) if hostspec else 0
        query_hosts = _dsn_hosts(query["host"], encoded=False) if "host" in query else 0
        ports = [_dsn_port(port) for port in query["port"].split(",")] if "port" in query else []
    except ValueError as exc:
        return str(exc)
    if not hosts and query_hosts and len(ports) > 1 and len(ports) != query_hosts:
        return f"its host parameter names {query_hosts} hosts, its port parameter {len(ports)}"
    for name, allowed in _DSN_CHOICES.items():
        if name in query and query[name] not in allowed:
            return f"its {name} is not one of {', '.join(allowed)}"
    return _driver_problem(dsn)


def _driver_problem(dsn: str) -> str | None:
    """Why asyncpg's own parser refuses `dsn` (with the PG* environment variables and
    the files it reads: passfile, certificates), in words that quote none of it."""
    # Here, not at the top: the driver is a tenth of every start's imports, and only a
    # configured DSN needs it (an import into JSONL never does).
    from asyncpg import connect_utils  # noqa: PLC0415

    parse = getattr(connect_utils, "_parse_connect_dsn_and_args", None)
    if parse is None:  # a driver without it: what it refuses shows at the first connect
        return None
    arguments: dict[str, object] = dict.fromkeys(inspect.signature(parse).parameters)
    arguments["dsn"] = dsn
    try:
        parse(**arguments)
    except Exception as exc:
        return (
            f"the PostgreSQL driver refuses it, or the PG* environment variables and "
            f"files it reads ({_driver_reason(exc)})"
        )
    return None


def _driver_reason(exc: Exception) -> str:
    name = type(exc).__name__
    if isinstance(exc, OSError):
        return f"{name}: {exc.strerror}" if exc.strerror else name
    if type(exc).__name__ != "ClientConfigurationError":
        return name  # a parse error's message (a ValueError of int()) quotes the text
    # Its messages end with the value they refuse (", got 'x'"), or quote a path.
    reason = str(exc).splitlines()[0].partition(", got ")[0]
    return f"{name}: {re.sub(_QUOTED, '...', reason)}"


def _dsn_hosts(hostlist: str, *, encoded: bool) -> int:
    """How many hosts a DSN's comma-separated host list names; ValueError otherwise."""
    specs = hostlist.split(",")
    for spec in specs:
        if spec.startswith("["):
            address, closed, after = spec[1:].partition("]")
            if not closed or (after and not after.startswith(":")):
                raise ValueError("an IPv6 host is malformed (written [2001:db8::1]:5432)")
            try:
                ipaddress.IPv6Address(urllib.parse.unquote(address))
            except ValueError:
                raise ValueError("an IPv6 host in brackets is not a valid IPv6 address") from None
            port = after[1:] if after else None
        elif spec.startswith("/") and not encoded:
            continue  # a socket directory, in the host parameter
        else:
            host, colon, port_text = spec.partition(":")
            port = port_text if colon else None
            if encoded:
                host = urllib.parse.unquote(host)
            if port is not None and ":" in port:
                raise ValueError("an IPv6 host is not in brackets (written [2001:db8::1]:5432)")
            if not host:
                raise ValueError("a host in its host list is empty")
            if not host.startswith("/") and not _dsn_host_ok(host):
                # (else a percent-encoded socket directory)
                raise ValueError("a host is neither a host name nor an IP address")
        if port:  # an empty port ("db:") is the default port, as for the driver
            _dsn_port(urllib.parse.unquote(port) if encoded else port)
    return len(specs)


def _dsn_host_ok(host: str) -> bool:
    """Whether the resolver takes `host` as the driver hands it over: an IPv4 address
    in any form inet_aton reads (127.1 included) or a host name, international ones
    included. A dotted number it cannot read (999.1.2.3) is a typo, not a name."""
    try:
        socket.inet_aton(host)
        return True
    except OSError:
        pass
    if host.replace(".", "").isdigit():
        return False
    try:
        ascii_name = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    labels = ascii_name.removesuffix(".").split(".")
    return len(ascii_name) <= 253 and all(HOST_LABEL.fullmatch(label) for label in labels)


def _dsn_port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise ValueError("a port is not a number from 1 to 65535")
    return int(text)
