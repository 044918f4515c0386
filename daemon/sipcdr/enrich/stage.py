"""The enrich stage: the first CDR stage of the engine's chain (`sipcdr.stages`).

The correlator's CDR says what the signaling said; this adds what the configuration
knows. The ingress trunk is the one whose networks hold the call's source, the egress
trunk the one that holds where the call left (`Cdr.egress_ip`); `caller` and `callee`
become E.164 digits under the ingress trunk's numbering (`to_e164`'s, by the
faster `sipcdr.fraud.numbering.e164`). Each closed call then counts in its trunk's
KPIs, so the counting sees the trunk the CDR carries.

A CDR that was enriched already (one the spool held in memory over a restart, written
again at start) passes unchanged, and counts again: the KPIs of a process are those of
the CDRs it writes, as the correlator's recount after a recovery has them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from sipcdr.dialog.kpi import Kpi
from sipcdr.enrich.trunks import TrunkDefinition, TrunkLookup
from sipcdr.fraud.numbering import e164
from sipcdr.model import Cdr, cdr_copier
from sipcdr.rating.stage import RATED_FIELDS, RateStage
from sipcdr.stages import PartsFailed


class EnrichStats:
    """Per-trunk KPI totals (`None`: calls from no configured trunk), read by the
    telemetry exporter."""

    __slots__ = ("kpis",)

    def __init__(self) -> None:
        self.kpis: dict[str | None, Kpi] = {}


class EnrichStage:
    """`CdrStage`: trunks and E.164 numbers, then the trunk's KPIs."""

    name = "enrich"

    def __init__(self, trunks: TrunkLookup | Iterable[TrunkDefinition]) -> None:
        """`trunks`: the engine's shared lookup, or the definitions to build one of."""
        self._trunk = trunks if isinstance(trunks, TrunkLookup) else TrunkLookup.of(trunks)
        self.stats = EnrichStats()

    def on_cdr(self, cdr: Cdr) -> Cdr:
        egress_ip = cdr.egress_ip
        if egress_ip is not None:
            cdr = _enriched(cdr, *self.fields(cdr, egress_ip))
        self.count(cdr, cdr.trunk)
        return cdr

    def fields(
        self, cdr: Cdr, egress_ip: str
    ) -> tuple[str | None, str | None, str | None, str | None]:
        """`caller`, `callee`, `trunk` and `egress_trunk` of a CDR not enriched yet."""
        trunk = self._trunk(cdr.src_ip)
        egress = self._trunk(egress_ip)
        if trunk is None:
            country_code = national_prefix = name = None
        else:
            country_code, national_prefix, name = (
                trunk.country_code,
                trunk.national_prefix,
                trunk.name,
            )
        # `to_e164`'s results, the plain forms nearly every carrier sends rewritten in
        # the compiled fraud module (a sixth of `to_e164`'s time), the rest by it.
        return (
            e164(cdr.caller, country_code, national_prefix),
            e164(cdr.callee, country_code, national_prefix),
            name,
            egress.name if egress is not None else None,
        )

    def count(self, cdr: Cdr, trunk: str | None) -> None:
        """The closed call in `trunk`'s KPIs (which read no field enriching changes)."""
        kpis = self.stats.kpis
        kpi = kpis.get(trunk)
        if kpi is None:
            kpi = kpis[trunk] = Kpi()
        kpi.add(cdr)


# The fields the enrich stage sets: the four of `EnrichStage.fields`, and `egress_ip`
# cleared (it is never in a record).
_ENRICHED: Final = ("caller", "callee", "trunk", "egress_trunk")
_enriched_copy: Final = cdr_copier(*_ENRICHED, "egress_ip")


def _enriched(
    cdr: Cdr, caller: str | None, callee: str | None, trunk: str | None, egress: str | None
) -> Cdr:
    return _enriched_copy(cdr, caller, callee, trunk, egress, None)


class EnrichRateStage:
    """`CdrStage`: the enrich stage, then the rate stage, in one copy of the CDR.

    What each adds is the same as when they run one after the other, and so is a
    fault of either: the other's fields are still set and the fault is counted under
    the failing stage's name (`PartsFailed`). Each closed call is copied once instead
    of twice (a copy of the frozen record is most of what either stage costs)."""

    name = "enrich+rate"

    __slots__ = ("enrich", "rate")

    def __init__(self, enrich: EnrichStage, rate: RateStage) -> None:
        self.enrich = enrich
        self.rate = rate

    def on_cdr(self, cdr: Cdr) -> Cdr:
        enrich = self.enrich
        egress_ip = cdr.egress_ip
        caller, callee, trunk, egress = cdr.caller, cdr.callee, cdr.trunk, cdr.egress_trunk
        enriched = False
        failed: list[tuple[str, Exception]] | None = None
        try:
            if egress_ip is not None:
                caller, callee, trunk, egress = enrich.fields(cdr, egress_ip)
                enriched = True
            enrich.count(cdr, trunk)
        except Exception as exc:  # as the stage alone: the CDR goes on unenriched
            caller, callee, trunk, egress = cdr.caller, cdr.callee, cdr.trunk, cdr.egress_trunk
            enriched = False
            failed = [(enrich.name, exc)]
        try:
            priced = self.rate.priced(cdr, trunk, egress, callee)
        except Exception as exc:
            if failed is None:
                failed = []
            failed.append((self.rate.name, exc))
            out = _enriched(cdr, caller, callee, trunk, egress) if enriched else cdr
            raise PartsFailed(out, failed) from exc
        if enriched:
            out = _enriched_rated(cdr, caller, trunk, egress, None, *priced)
        else:
            out = _rated_only(cdr, *priced)
        if failed is not None:
            raise PartsFailed(out, failed)
        return out


# `callee` is the rate stage's (from the enriched one): set once, among its fields.
_enriched_rated: Final = cdr_copier("caller", "trunk", "egress_trunk", "egress_ip", *RATED_FIELDS)
_rated_only: Final = cdr_copier(*RATED_FIELDS)
