"""The trunk lookup: a source IP to the trunk whose most specific network holds it.

The definitions are the configuration's (`[[trunks]]`); this module only needs each
one's networks and the `Trunk` record it stands for, so it sits below the config and
the correlator (and later the rating stage) can be handed the same lookup.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from typing import Final, Protocol, TypeAlias

from sipcdr.model import Trunk

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrunkDefinition(Protocol):
    """A configured trunk: the networks its signaling comes from, and its record."""

    @property
    def sources(self) -> Sequence[Network]: ...

    def to_trunk(self) -> Trunk: ...


def trunk_resolver(trunks: Iterable[TrunkDefinition]) -> Callable[[str], Trunk | None]:
    """A function from a source IP to the trunk whose most specific network holds it.

    Networks are grouped by prefix length, so a lookup is one dict probe per distinct
    length, longest first. IPv4-mapped IPv6 sources match IPv4 networks, since dual-stack
    sockets report IPv4 peers that way. Anything that is not an IP address gives None.
    """
    groups: dict[tuple[int, int], dict[int, Trunk]] = {}
    for definition in trunks:
        trunk = definition.to_trunk()
        for network in definition.sources:
            shift = network.max_prefixlen - network.prefixlen
            table = groups.setdefault((network.version, network.prefixlen), {})
            table[int(network.network_address) >> shift] = trunk

    def by_length(version: int, bits: int) -> tuple[tuple[int, dict[int, Trunk]], ...]:
        lengths = sorted((length for v, length in groups if v == version), reverse=True)
        return tuple((bits - length, groups[version, length]) for length in lengths)

    ipv4 = by_length(4, 32)
    ipv6 = by_length(6, 128)

    def resolve(source: str) -> Trunk | None:
        try:
            address = ipaddress.ip_address(source)
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        value = int(address)
        for shift, table in ipv4 if address.version == 4 else ipv6:
            trunk = table.get(value >> shift)
            if trunk is not None:
                return trunk
        return None

    return resolve


# Distinct addresses whose trunk is remembered: HEP and mirrored sources are the
# sender's to choose, so the cache is cleared rather than grown past this.
TRUNK_CACHE_LIMIT: Final = 65536
_UNRESOLVED: Final = Trunk("", None, None, None)


class TrunkLookup:
    """The trunk of a source address, remembered per address. The engine builds one
    and hands it to the enrich and the fraud stage, so both see the same trunk and an
    address is resolved once for both."""

    __slots__ = ("_cache", "_resolve")

    def __init__(self, resolve: Callable[[str], Trunk | None] | None) -> None:
        self._resolve = resolve
        self._cache: dict[str, Trunk | None] = {}

    @classmethod
    def of(cls, trunks: Iterable[TrunkDefinition]) -> TrunkLookup:
        """The lookup of the configured trunks (none: every address is on no trunk)."""
        definitions = tuple(trunks)
        return cls(trunk_resolver(definitions) if definitions else None)

    def __call__(self, source: str) -> Trunk | None:
        if self._resolve is None:
            return None
        trunk = self._cache.get(source, _UNRESOLVED)
        if trunk is _UNRESOLVED:
            if len(self._cache) >= TRUNK_CACHE_LIMIT:
                self._cache.clear()
            trunk = self._cache[source] = self._resolve(source)
        return trunk
