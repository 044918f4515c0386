"""The trunk lookup: the trunks the config defines, looked up by source address."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import NamedTuple

from sipcdr.config import Config, TrunkConfig, load_config
from sipcdr.engine import Destinations, build_engine
from sipcdr.enrich.trunks import TrunkLookup, trunk_resolver
from sipcdr.fraud import FraudSettings
from sipcdr.fraud.stage import FraudStage
from sipcdr.model import FraudAlert, Trunk


class _Definition(NamedTuple):
    sources: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    def to_trunk(self) -> Trunk:
        return Trunk("pop", None, None, None)


TRUNKS = """
[[trunks]]
name = "region"
sources = ["10.1.0.0/16", "2001:db8::/32"]
country_code = "49"
national_prefix = "0"

[[trunks]]
name = "pop"
sources = ["10.1.2.0/24", "2001:db8:5::/48"]
rate_plan = "retail"

[[trunks]]
name = "everyone"
sources = ["0.0.0.0/0"]
"""


def test_trunk_resolver_longest_prefix(tmp_path: Path) -> None:
    config_file = tmp_path / "sipcdr.toml"
    config_file.write_text(TRUNKS)
    resolve = trunk_resolver(load_config(config_file, {}).trunks)
    assert resolve("10.1.2.3") == Trunk("pop", None, None, "retail")
    assert resolve("10.1.3.3") == Trunk("region", "49", "0", None)
    assert resolve("192.0.2.1") == Trunk("everyone", None, None, None)
    assert resolve("2001:db8:5::1") == Trunk("pop", None, None, "retail")
    assert resolve("2001:db8:6::1") == Trunk("region", "49", "0", None)
    assert resolve("::ffff:10.1.2.9") == Trunk("pop", None, None, "retail")
    assert resolve("2001:db9::1") is None
    assert resolve("not-an-address") is None


def test_trunk_resolver_without_trunks() -> None:
    resolve = trunk_resolver(Config().trunks)
    assert resolve("10.1.2.3") is None
    assert resolve("::1") is None


def test_trunk_resolver_takes_definitions_without_a_config() -> None:
    """Anything with `sources` and `to_trunk()` defines a trunk: the lookup does not
    depend on the config's loader."""
    resolve = trunk_resolver([_Definition((ipaddress.ip_network("198.51.100.0/24"),))])
    assert resolve("198.51.100.7") == Trunk("pop", None, None, None)
    assert resolve("198.51.101.7") is None


def test_the_shared_lookup_resolves_each_address_once_for_every_stage() -> None:
    lookups: list[str] = []
    trunk = Trunk("carrier-a", "49", "0", None)

    def resolve(source: str) -> Trunk | None:
        lookups.append(source)
        return trunk if source == "192.0.2.7" else None

    shared = TrunkLookup(resolve)
    fraud = FraudStage(FraudSettings(), _NoAlerts(), shared)
    assert fraud.trunk_name("192.0.2.7") == "carrier-a"
    assert shared("192.0.2.7") is trunk  # as the enrich stage asks it
    assert fraud.trunk_name("198.51.100.1") is None
    assert shared("198.51.100.1") is None
    assert lookups == ["192.0.2.7", "198.51.100.1"]
    assert TrunkLookup(None)("192.0.2.7") is None


def test_the_engine_hands_one_lookup_to_the_enrich_and_fraud_stages() -> None:
    config = Config(trunks=(TrunkConfig("pbx", (ipaddress.ip_network("192.0.2.0/24"),)),))
    engine = build_engine(config, Destinations((), alerts=_NoAlerts()))
    assert engine.fraud is not None
    assert engine.enrich._trunk is engine.fraud._trunk_of


class _NoAlerts:
    def write_alert(self, alert: FraudAlert) -> bool:
        return True
