"""The trunk lookup: a source IP to the trunk whose most specific network holds it.

The definitions are the configuration's (`[[trunks]]`); this module only needs each
one's networks and the `Trunk` record it stands for, so it sits below the config and
the correlator (and later the rating stage) can be handed the same lookup.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, TypeAlias

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
