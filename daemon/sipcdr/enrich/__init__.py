"""Enrichment: what a CDR learns beyond its signaling, looked up from runtime tables the
configuration defines (the trunk an address belongs to, the trunk's numbering), and
the per-trunk KPIs counted from the enriched CDR."""

from sipcdr.enrich.stage import EnrichRateStage, EnrichStage, EnrichStats

__all__ = ["EnrichRateStage", "EnrichStage", "EnrichStats"]
