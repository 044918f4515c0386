"""Enrichment: what a CDR learns beyond its signaling, looked up from runtime tables the
configuration defines (the trunk a source address belongs to)."""

from sipcdr.enrich.stage import EnrichStage

__all__ = ["EnrichStage"]
