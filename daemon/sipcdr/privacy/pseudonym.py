"""Keyed pseudonyms of numbers: HMAC-SHA-256 under a key only the privacy officer (and a
daemon asked to pseudonymize Kafka output) holds.

The same number always gives the same pseudonym under one key, so per-subject totals
and joins still work; without the key a pseudonym cannot be turned back into the
number, nor can a guessed number be checked against it. A pseudonym is `p` and 24 hex
digits (96 bits): it can never be taken for an E.164 number.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import stat
from pathlib import Path
from typing import Final

from sipcdr.private import not_owned

PREFIX: Final = "p"
_DIGITS: Final = 24
# A key shorter than this can be guessed; 32 random bytes is what `sipcdr` documents.
MIN_KEY_BYTES: Final = 16
_KEY_READ_LIMIT: Final = 4096  # a key is a few dozen bytes; more is not a key file


class KeyError_(ValueError):
    """The key file is missing, unreadable, open to others or too short."""


def pseudonym(key: bytes, number: str) -> str:
    return PREFIX + hmac.new(key, number.encode(), hashlib.sha256).hexdigest()[:_DIGITS]


def is_pseudonym(text: str) -> bool:
    return (
        len(text) == len(PREFIX) + _DIGITS
        and text.startswith(PREFIX)
        and all(ch in "0123456789abcdef" for ch in text[len(PREFIX) :])
    )


def key_id(key: bytes) -> str:
    """A short name of the key for the audit log (never the key): which key made a
    pseudonym, so a rotated key shows."""
    return hmac.new(key, b"sipcdr key id", hashlib.sha256).hexdigest()[:12]


def load_key(path: Path | None) -> bytes:
    """The key in `path`: the file's bytes, stripped of surrounding white space. It
    must be a regular file of the running user's, closed to others, like every secret
    sipcdr reads: whoever else owns it could read or replace it, and then reverse every
    pseudonym by trying the numbers. Opened without following a symbolic link, and
    checked on the open descriptor, so the file read is the file checked."""
    if path is None:
        raise KeyError_("no pseudonym key: set [privacy] pseudonym_key_file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeyError_(
                f"pseudonym key {path} is a symbolic link: name the key file itself"
            ) from None
        raise KeyError_(f"pseudonym key {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyError_(f"pseudonym key {path} is not a regular file")
        if info.st_uid != os.geteuid():
            raise KeyError_(f"pseudonym {not_owned('key', path, info.st_uid)}")
        if info.st_mode & 0o077:
            raise KeyError_(
                f"pseudonym key {path} is open to other users (mode {info.st_mode & 0o777:o}): "
                "chmod 600 it"
            )
        data = os.read(fd, _KEY_READ_LIMIT).strip()
    except OSError as exc:
        raise KeyError_(f"pseudonym key {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) < MIN_KEY_BYTES:
        raise KeyError_(f"pseudonym key {path} is shorter than {MIN_KEY_BYTES} bytes")
    return data
