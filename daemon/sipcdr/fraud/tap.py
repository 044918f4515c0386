"""The fraud stage's step for each message, compiled with the detectors: the engine
hands every parsed message to it (`FraudStage.tap`), so the messages the monitor
ignores cost a few field reads of compiled code rather than a call of interpreted
code each."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from sipcdr.fraud.monitor import FraudMonitor
from sipcdr.model import FraudAlert, Packet, Trunk
from sipcdr.sip import SipMessage


class Judge(Protocol):
    """What the tap hands messages to: `FraudMonitor.on_message`."""

    def on_message(
        self, msg: SipMessage, packet: Packet, now: float, trunk: str | None
    ) -> Sequence[FraudAlert]: ...


class MessageTap:
    """A `MessageStage`: each message the monitor judges goes to it with its trunk;
    what it finds goes to `found`, a fault to `failed` (never into the chain)."""

    name: str

    def __init__(
        self,
        monitor: Judge,
        trunk_of: Callable[[str], Trunk | None] | None,
        found: Callable[[Sequence[FraudAlert]], None],
        failed: Callable[[str], None],
    ) -> None:
        self.name = "fraud"
        self.monitor = monitor
        # The daemon's monitor, called as compiled code calls compiled code (no lookup
        # of the method by name, no boxing of the time); a test's goes by the protocol.
        self._native = monitor if isinstance(monitor, FraudMonitor) else None
        self._trunk_of = trunk_of
        self._found = found
        self._failed = failed

    def on_message(self, packet: Packet, msg: SipMessage) -> None:
        # The monitor ignores requests inside a dialog (ACK, BYE, re-INVITE) and
        # provisional responses, five of a call's seven messages: they are not even
        # handed to it. Only a request outside a dialog (a new call, a REGISTER, an
        # OPTIONS) is judged by its own source's trunk: a response is judged by its
        # call's, or by the requester's it goes to (the monitor looks that one up).
        source: str | None = None
        if msg.is_request:
            if msg.to_tag is not None:
                return
            source = packet.src_ip
        elif msg.status_code < 200:
            return
        try:
            name: str | None = None
            trunk_of = self._trunk_of
            if source is not None and trunk_of is not None:
                trunk = trunk_of(source)
                if trunk is not None:
                    name = trunk.name
            native = self._native
            if native is not None:
                alerts = native.on_message(msg, packet, packet.timestamp, name)
            else:
                alerts = self.monitor.on_message(msg, packet, packet.timestamp, name)
        except Exception:
            self._failed("message")
            return
        if alerts:
            self._found(alerts)
