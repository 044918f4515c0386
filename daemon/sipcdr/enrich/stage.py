"""The enrich stage: the first CDR stage of the engine's chain (`sipcdr.stages`).

The correlator's CDR says what the signaling said; this adds what the configuration
knows. The ingress trunk is the one whose networks hold the call's source, the egress
trunk the one that holds where the call left (`Cdr.egress_ip`); `caller` and `callee`
become E.164 digits under the ingress trunk's numbering (`to_e164`). Each closed call
then counts in its trunk's KPIs, so the counting sees the trunk the CDR carries.

A CDR that was enriched already (one the spool held in memory over a restart, written
again at start) passes unchanged, and counts again: the KPIs of a process are those of
the CDRs it writes, as the correlator's recount after a recovery has them.
"""

from __future__ import annotations

from collections.abc import Iterable

from sipcdr.dialog.kpi import Kpi
from sipcdr.enrich.trunks import TrunkDefinition, TrunkLookup
from sipcdr.model import Cdr, replace_cdr
from sipcdr.sip.numbers import to_e164


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
        if cdr.egress_ip is not None:
            cdr = self._enriched(cdr, cdr.egress_ip)
        kpis = self.stats.kpis
        kpi = kpis.get(cdr.trunk)
        if kpi is None:
            kpi = kpis[cdr.trunk] = Kpi()
        kpi.add(cdr)
        return cdr

    def _enriched(self, cdr: Cdr, egress_ip: str) -> Cdr:
        trunk = self._trunk(cdr.src_ip)
        egress = self._trunk(egress_ip)
        country_code = trunk.country_code if trunk else None
        national_prefix = trunk.national_prefix if trunk else None
        return replace_cdr(
            cdr,
            caller=to_e164(cdr.caller, country_code, national_prefix),
            callee=to_e164(cdr.callee, country_code, national_prefix),
            trunk=trunk.name if trunk else None,
            egress_trunk=egress.name if egress else None,
            egress_ip=None,
        )
