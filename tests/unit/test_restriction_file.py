"""The restriction list saved in the state folder: private, whole or not at all."""

from __future__ import annotations

import errno
import time
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

import orjson
import pytest
from sipcdr import private
from sipcdr.config import Config
from sipcdr.delivery import Delivery
from sipcdr.privacy import restriction_file
from sipcdr.privacy.outbound import OutboundFilter
from sipcdr.privacy.restriction_file import (
    FILE_NAME,
    MAX_FILE_BYTES,
    MAX_SAVED_SUBJECTS,
    TooManyToSave,
    save_restrictions,
    saved_restrictions,
)
from sipcdr.privacy.stats import PrivacyStats
from sipcdr.privacy.task import PrivacyTask
from structlog.testing import capture_logs


def test_a_saved_list_is_read_back_and_private(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    assert saved_restrictions(tmp_path) is None
    save_restrictions(tmp_path, frozenset({"4940555666", "4930111222"}))
    assert saved_restrictions(tmp_path) == frozenset({"4940555666", "4930111222"})
    assert (tmp_path / FILE_NAME).stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [FILE_NAME]


def test_a_list_of_150000_numbers_is_read_back_whole(tmp_path: Path) -> None:
    """Far past the 1 MiB other state files are read up to: every list the daemon
    saves is one a start (and an import without PostgreSQL) reads back."""
    tmp_path.chmod(0o700)
    numbers = frozenset(str(4930_0000_0000 + n) for n in range(150_000))
    save_restrictions(tmp_path, numbers)
    assert (tmp_path / FILE_NAME).stat().st_size > 2 * 1024 * 1024
    assert saved_restrictions(tmp_path) == numbers


def test_the_largest_list_kept_fits_the_read_limit(tmp_path: Path) -> None:
    """`MAX_SAVED_SUBJECTS` numbers of the longest E.164 form: saved, and read back."""
    tmp_path.chmod(0o700)
    numbers = frozenset(str(100_000_000_000_000 + n * 7) for n in range(MAX_SAVED_SUBJECTS))
    save_restrictions(tmp_path, numbers)
    size = (tmp_path / FILE_NAME).stat().st_size
    assert size <= MAX_FILE_BYTES and size > MAX_FILE_BYTES - 3
    started = time.monotonic()
    assert saved_restrictions(tmp_path) == numbers
    assert time.monotonic() - started < 30  # generous: read at every start


def test_a_list_too_long_to_keep_replaces_the_copy_with_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the limit nothing older stays in force: the file says the list was not
    kept, which reads as no list (a start waits for PostgreSQL, an import with Kafka
    refuses)."""
    tmp_path.chmod(0o700)
    monkeypatch.setattr(restriction_file, "MAX_SAVED_SUBJECTS", 3)
    save_restrictions(tmp_path, frozenset({"4940555666"}))
    with pytest.raises(TooManyToSave, match="4 restricted subjects: a copy is kept for at most 3"):
        save_restrictions(tmp_path, frozenset(str(4930_0000_0000 + n) for n in range(4)))
    assert orjson.loads((tmp_path / FILE_NAME).read_bytes()) == {"not_saved": 4, "limit": 3}
    assert saved_restrictions(tmp_path) is None
    assert (tmp_path / FILE_NAME).stat().st_mode & 0o777 == 0o600


def test_a_file_past_the_read_limit_counts_as_none(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    path = tmp_path / FILE_NAME
    path.write_bytes(b'["' + b"1" * (MAX_FILE_BYTES - 2) + b'"]')
    path.chmod(0o600)
    assert saved_restrictions(tmp_path) is None


def test_the_daemon_says_once_and_shows_while_its_list_is_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp_path.chmod(0o700)
    monkeypatch.setattr(restriction_file, "MAX_SAVED_SUBJECTS", 3)
    config = Config()
    config = replace(config, state=replace(config.state, dir=tmp_path))
    stats = PrivacyStats()
    task = PrivacyTask(config, stats, lambda: None, None)
    many = frozenset(str(4930_0000_0000 + n) for n in range(5))
    with capture_logs() as logs:
        task._save(many)
        task._save(many)
    assert stats.restrictions_unsaved == 1
    refused = [log for log in logs if log["event"] == "restrictions_not_saved"]
    assert len(refused) == 1 and refused[0]["log_level"] == "error"
    assert refused[0]["reason"] == "too_many" and "4930" not in str(refused[0])
    with capture_logs() as logs:
        task._save(frozenset({"4940555666"}))
    assert stats.restrictions_unsaved == 0
    assert [log["event"] for log in logs] == ["restrictions_saved_again"]
    assert saved_restrictions(tmp_path) == frozenset({"4940555666"})


def test_a_list_cut_short_counts_as_none_so_delivery_waits(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    save_restrictions(tmp_path, frozenset({"4940555666"}))
    path = tmp_path / FILE_NAME
    path.write_bytes(path.read_bytes()[:5])
    assert saved_restrictions(tmp_path) is None


def test_the_filter_tells_its_listeners_once_when_a_first_list_is_known() -> None:
    outbound = OutboundFilter(None, pseudonymize=False)
    told: list[int] = []
    outbound.on_known.append(lambda: told.append(1))
    assert not outbound.known
    outbound.set_restricted(frozenset({"4940555666"}))
    outbound.set_restricted(frozenset())
    assert outbound.known and told == [1] and outbound.restricted == frozenset()


def test_the_restriction_hold_and_the_spare_rooms_hold_end_apart() -> None:
    delivery = Delivery({}, [])
    delivery.held |= {("postgres", "records")}  # the spare's room kept for CDRs
    delivery.held_until_restrictions |= {("postgres", "records"), ("kafka", "records")}
    delivery.release_restrictions_hold()
    assert delivery.is_held(("postgres", "records"))
    assert not delivery.is_held(("kafka", "records"))
    delivery.held_until_restrictions |= {("postgres", "records")}
    delivery.held -= {("postgres", "records")}
    assert delivery.is_held(("postgres", "records"))


class _FullDisk:
    """A file object whose every write fails as on a full disk."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *_: object) -> None:
        self._handle.close()

    def write(self, _data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        self._handle.flush()

    def fileno(self) -> int:
        return self._handle.fileno()


def test_a_save_that_fails_leaves_no_older_list_to_start_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk: the older, shorter list left in place would lift the restriction
    added since on a start while PostgreSQL does not answer. It is withdrawn instead
    (emptied, which needs no room), so that start waits for the database and an import
    with Kafka refuses; nothing half-written is left behind."""
    tmp_path.chmod(0o700)
    save_restrictions(tmp_path, frozenset({"4940555666"}))
    real = private.open_private
    monkeypatch.setattr(
        restriction_file, "open_private", lambda path, mode: _FullDisk(real(path, mode))
    )
    with pytest.raises(OSError, match="No space left"):
        save_restrictions(tmp_path, frozenset({"4940555666", "4930111222"}))
    assert saved_restrictions(tmp_path) is None
    assert (tmp_path / FILE_NAME).exists()  # read as a list that cannot be had
    assert (tmp_path / FILE_NAME).stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [FILE_NAME]


def test_a_foreign_file_in_the_way_of_a_save_withdraws_the_older_list(
    tmp_path: Path,
) -> None:
    """The new copy cannot be made (its name taken by a link): as with a full disk,
    the older list is not left in force."""
    tmp_path.chmod(0o700)
    save_restrictions(tmp_path, frozenset({"4940555666"}))
    (tmp_path / (FILE_NAME + ".new")).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError, match="symbolic link"):
        save_restrictions(tmp_path, frozenset({"4940555666", "4930111222"}))
    assert saved_restrictions(tmp_path) is None
    assert not (tmp_path / "elsewhere").exists()


def test_the_daemon_withdraws_its_older_list_when_a_save_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp_path.chmod(0o700)
    config = Config()
    config = replace(config, state=replace(config.state, dir=tmp_path))
    stats = PrivacyStats()
    task = PrivacyTask(config, stats, lambda: None, None)
    task._save(frozenset({"4940555666"}))
    real = private.open_private
    monkeypatch.setattr(
        restriction_file, "open_private", lambda path, mode: _FullDisk(real(path, mode))
    )
    with capture_logs() as logs:
        task._save(frozenset({"4940555666", "4930111222"}))
    assert stats.restrictions_unsaved == 1 and not task._saved
    assert saved_restrictions(tmp_path) is None
    assert [log["event"] for log in logs] == ["restrictions_not_saved"]
    assert "4930" not in str(logs)
    monkeypatch.setattr(restriction_file, "open_private", real)
    task._save(frozenset({"4940555666", "4930111222"}))
    assert saved_restrictions(tmp_path) == frozenset({"4940555666", "4930111222"})
    assert stats.restrictions_unsaved == 0
