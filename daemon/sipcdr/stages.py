"""The contract between the engine's stages.

The engine runs one chain, the same for `run`, `import` and a correlator fed from
the `sipcdr.sip` topic:

    parse → message stages (signaling tap, fraud) → correlate
          → CDR stages (enrich → rate → fraud) → spool

Every stage is built whole, with what it needs handed to its constructor; nothing is
wired in afterwards. A message stage sees each parsed message in arrival order before
the correlator does. A CDR stage takes each closed call in turn and returns it (a new
record when it adds fields: records are frozen), so the next stage sees what this one
added; a stage made of several raises `PartsFailed` with what its sound parts added
when one of them fails). Stages that keep time-bound state also take the once-a-second tick.

Stages keep their counts in their own stats objects, read by the telemetry exporter;
they never log or touch metrics per message.
"""

from __future__ import annotations

from typing import Protocol

from sipcdr.model import Cdr, Packet
from sipcdr.sip import SipMessage


class MessageStage(Protocol):
    name: str

    def on_message(self, packet: Packet, msg: SipMessage) -> None: ...


class CdrStage(Protocol):
    name: str

    def on_cdr(self, cdr: Cdr) -> Cdr: ...


class PartsFailed(Exception):
    """Raised by a CDR stage made of several (enrich and rate in one copy) when some of
    its parts failed: `cdr` carries what the others added, and each fault is counted
    under its part's name, as if the parts were stages of their own."""

    def __init__(self, cdr: Cdr, failures: list[tuple[str, Exception]]) -> None:
        super().__init__(", ".join(f"{name}: {exc!r}" for name, exc in failures))
        self.cdr = cdr
        self.failures = failures


class TimedStage(Protocol):
    name: str

    def tick(self, now: float) -> None: ...
