"""The enrich stage: the first CDR stage of the engine's chain (`sipcdr.stages`)."""

from __future__ import annotations

from collections.abc import Iterable

from sipcdr.enrich.trunks import TrunkDefinition
from sipcdr.model import Cdr


class EnrichStage:
    name = "enrich"

    def __init__(self, trunks: Iterable[TrunkDefinition]) -> None:
        self.trunks = tuple(trunks)

    def on_cdr(self, cdr: Cdr) -> Cdr:
        return cdr
