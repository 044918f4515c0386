"""The pseudonym key is a secret of the user sipcdr runs as: a key file another user
owns (who could read it, or change it, and then reverse every pseudonym by trying the
numbers) is refused, whatever its mode. The suite runs as root, which may chown."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest
from sipcdr.privacy.pseudonym import KeyError_, load_key

KEY = b"k" * 44


def key_file(path: Path) -> Path:
    path.write_bytes(KEY)
    path.chmod(0o600)
    return path


def test_a_key_of_the_running_user_closed_to_others_is_read(tmp_path: Path) -> None:
    assert load_key(key_file(tmp_path / "key")) == KEY


def test_a_key_another_user_owns_is_refused_whatever_its_mode(tmp_path: Path) -> None:
    key = key_file(tmp_path / "key")
    os.chown(key, pwd.getpwnam("nobody").pw_uid, -1)
    with pytest.raises(KeyError_):
        load_key(key)


def test_a_symbolic_link_to_a_key_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(key_file(tmp_path / "key"))
    with pytest.raises(KeyError_, match="symbolic link"):
        load_key(link)


def test_a_key_open_to_others_is_refused(tmp_path: Path) -> None:
    key = key_file(tmp_path / "key")
    key.chmod(0o640)
    with pytest.raises(KeyError_, match="chmod 600"):
        load_key(key)
