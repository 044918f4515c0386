"""The restriction list saved in the state folder: private, whole or not at all."""

from __future__ import annotations

from pathlib import Path

from sipcdr.delivery import Delivery
from sipcdr.privacy.outbound import OutboundFilter
from sipcdr.privacy.restriction_file import FILE_NAME, save_restrictions, saved_restrictions


def test_a_saved_list_is_read_back_and_private(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    assert saved_restrictions(tmp_path) is None
    save_restrictions(tmp_path, frozenset({"4940555666", "4930111222"}))
    assert saved_restrictions(tmp_path) == frozenset({"4940555666", "4930111222"})
    assert (tmp_path / FILE_NAME).stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [FILE_NAME]


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
