"""Every CDR of every shared capture, imported with and without trunks configured, is
byte for byte what it was when the trunk lookup and the number normalisation moved
out of the correlator into the enrich stage: the digests below were taken before.

Regenerate only for a change that means to alter CDRs:
`python tests/unit/test_cdrs_unchanged.py > tests/unit/data/cdr_digests.json`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import sys
from pathlib import Path

import orjson
import pytest
from pcapdata import require_shared_data
from sipcalls import CdrCollector
from sipcdr.config import Config
from sipcdr.config.schema import TrunkConfig
from sipcdr.importer import import_files

DIGESTS = Path(__file__).resolve().parent / "data" / "cdr_digests.json"

# Every address on some trunk, the two halves of IPv4 under different numbering plans,
# so ingress and egress trunks differ and national numbers are rewritten.
TRUNKS = (
    TrunkConfig(
        "low", (ipaddress.ip_network("0.0.0.0/1"),), country_code="49", national_prefix="0"
    ),
    TrunkConfig(
        "high", (ipaddress.ip_network("128.0.0.0/1"),), country_code="1", national_prefix="1"
    ),
    TrunkConfig("v6", (ipaddress.ip_network("::/0"),), country_code="44", national_prefix="0"),
)
CONFIGS = {"plain": Config(), "trunks": Config(trunks=TRUNKS)}


def captures() -> list[Path]:
    return sorted((require_shared_data() / "pcaps").glob("*.pcap*"))


def digest(config: Config, path: Path) -> tuple[int, str]:
    collector = CdrCollector()
    import_files(config, [path], sinks=[collector], progress=False)
    lines = b"".join(orjson.dumps(cdr.to_record()) + b"\n" for cdr in collector.cdrs)
    return len(collector.cdrs), hashlib.sha256(lines).hexdigest()


def expected() -> dict[str, list[int | str]]:
    digests: dict[str, list[int | str]] = json.loads(DIGESTS.read_text())
    return digests


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("path", captures(), ids=lambda path: path.name)
def test_the_cdrs_of_every_capture_are_unchanged(path: Path, config: str) -> None:
    count, value = digest(CONFIGS[config], path)
    assert [count, value] == expected()[f"{config}/{path.name}"]


def test_the_digests_cover_calls_with_trunks() -> None:
    """The comparison has something to compare: trunks change some CDRs."""
    digests = expected()
    assert sum(int(digests[key][0]) for key in digests) >= 100
    changed = [
        name
        for name in (path.name for path in captures())
        if digests[f"plain/{name}"] != digests[f"trunks/{name}"]
    ]
    assert len(changed) >= 5


if __name__ == "__main__":
    table = {
        f"{config}/{path.name}": list(digest(CONFIGS[config], path))
        for path in captures()
        for config in sorted(CONFIGS)
    }
    sys.stdout.write(json.dumps(table, indent=1, sort_keys=True) + "\n")
