"""What the config never shows: the secrets' mask, which keys hold secrets, and how a
value is quoted in an error message."""

from __future__ import annotations

from typing import Final

from sipcdr.storage.dsn import SECRET_MASK, URL_SCHEME

SECRET_KEYS: Final = frozenset({"sinks.kafka.sasl_password", "capture.hep_keys"})


def is_secret(key: str) -> bool:
    return key in SECRET_KEYS or key.startswith("capture.hep_keys.")


def shown_value(key: str, value: object) -> str:
    if is_secret(key):
        return SECRET_MASK
    if key == "sinks.postgres.dsn" and isinstance(value, str):
        # A refused DSN is shown by its scheme alone: where its password ends is
        # exactly what may be wrong with it.
        scheme = URL_SCHEME.match(value)
        return repr(f"{scheme.group()}..." if scheme else "...")
    text = repr(str(value)) if isinstance(value, str) else repr(value)
    return text if len(text) <= 200 else text[:197] + "..."
