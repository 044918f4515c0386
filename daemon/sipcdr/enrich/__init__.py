"""Enrichment: what a CDR learns beyond its signaling, looked up from runtime tables the
configuration defines (the trunk a source address belongs to)."""
