"""Real calls through Kamailio arrive at a HEP target as one HEPv3 copy per message per leg.

SIPp UAC -> Kamailio (stateful, record-routing) -> SIPp UAS, all on loopback,
with Kamailio's siptrace mirroring to a plain UDP socket. For every call the
test expects each message on each leg exactly once, with the right direction:
this is the input the daemon's HEP listener will see in later tests.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import pytest
from peers import KamailioFactory, Sipp, UdpSink
from sipcdr.hep import HepPacket, decode

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CAPTURE_ID = 2001
HEP_PROTO_SIP = 1
HOLD_MS = 1000

CALLER, PROXY, CALLEE = "caller", "proxy", "callee"

# One mirrored message: what it is ("INVITE", "180 INVITE") and its leg.
Flow = tuple[str, str, str]


def downstream(label: str) -> list[Flow]:
    """A caller's request as received by the proxy and as relayed to the callee."""
    return [(label, CALLER, PROXY), (label, PROXY, CALLEE)]


def upstream(label: str) -> list[Flow]:
    """A callee's response as received by the proxy and as relayed to the caller."""
    return [(label, CALLEE, PROXY), (label, PROXY, CALLER)]


# tm answers every INVITE with its own 100; the UAS scenarios send none.
TRYING: list[Flow] = [("100 INVITE", PROXY, CALLER)]

ANSWERED = Counter(
    downstream("INVITE")
    + TRYING
    + upstream("180 INVITE")
    + upstream("200 INVITE")
    + downstream("ACK")  # end-to-end ACK, routed by the Record-Route set
    + downstream("BYE")
    + upstream("200 BYE")
)


def rejected(code: int) -> Counter[Flow]:
    # Two ACKs, but not one message relayed: the caller's ACK ends its INVITE
    # transaction at the proxy, which has already ACKed the callee on its own.
    return Counter(
        downstream("INVITE")
        + TRYING
        + upstream(f"{code} INVITE")
        + [("ACK", CALLER, PROXY), ("ACK", PROXY, CALLEE)]
    )


CANCELLED = Counter(
    downstream("INVITE")
    + TRYING
    + upstream("180 INVITE")
    + downstream("CANCEL")  # hop by hop: the proxy builds its own CANCEL
    + [("200 CANCEL", PROXY, CALLER), ("200 CANCEL", CALLEE, PROXY)]
    + upstream("487 INVITE")
    + [("ACK", CALLER, PROXY), ("ACK", PROXY, CALLEE)]
)


@dataclass(frozen=True)
class Case:
    uac: str
    uas: str
    calls: int
    flows: Counter[Flow]
    held: bool = False


CASES = {
    "answered": Case("uac_answered", "uas_answered", 3, ANSWERED, held=True),
    "busy": Case("uac_busy", "uas_busy", 1, rejected(486)),
    "not-found": Case("uac_notfound", "uas_notfound", 1, rejected(404)),
    "cancelled": Case("uac_cancel", "uas_ringing", 1, CANCELLED),
}


def _header(payload: bytes, *names: bytes) -> bytes:
    """Value of the first header called one of ``names`` (lower case, long or compact form)."""
    head = payload.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() in names:
            return value.strip()
    raise AssertionError(f"no {names[0].decode()} header in {payload[:300]!r}")


def classify(payload: bytes) -> tuple[bytes, str]:
    """(Call-ID, label): the method for a request, "<status> <CSeq method>" for a response."""
    first_line = payload.split(b"\r\n", 1)[0]
    call_id = _header(payload, b"call-id", b"i")
    if first_line.startswith(b"SIP/2.0 "):
        status = first_line.split(b" ", 2)[1]
        method = _header(payload, b"cseq").split()[-1]
        return call_id, f"{status.decode()} {method.decode()}"
    return call_id, first_line.split(b" ", 1)[0].decode()


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_call_through_kamailio_is_mirrored_per_leg(
    case: Case, kamailio_hep: KamailioFactory, sipp: Sipp, udp_sink: UdpSink
) -> None:
    uas = sipp.run_uas(case.uas, calls=case.calls, timeout=30)
    proxy = kamailio_hep(udp_sink.address, uas.address)

    uac = sipp.run_uac(
        case.uac, proxy.address, calls=case.calls, rate=10, hold_ms=HOLD_MS, timeout=20
    )
    assert uac.ok, uac.describe()
    served = uas.wait(timeout=10)
    assert served.ok, served.describe()

    packets = [decode(datagram) for datagram in udp_sink.collect(quiet=0.5, timeout=10)]
    roles = {proxy.address: PROXY, uas.address: CALLEE, (sipp.host, uac.port): CALLER}
    assert len(roles) == 3, roles
    calls: defaultdict[bytes, list[tuple[Flow, HepPacket]]] = defaultdict(list)
    for packet in packets:
        header = (packet.version, packet.capture_id, packet.proto_type)
        assert header == (3, CAPTURE_ID, HEP_PROTO_SIP), header
        src = roles.get((packet.src_ip, packet.src_port))
        dst = roles.get((packet.dst_ip, packet.dst_port))
        call_id, label = classify(packet.payload)
        leg = f"{packet.src_ip}:{packet.src_port} -> {packet.dst_ip}:{packet.dst_port}"
        assert src and dst, f"{label} on an unknown leg {leg}"
        calls[call_id].append(((label, src, dst), packet))

    assert len(calls) == case.calls, sorted(calls)
    for call_id, mirrored in calls.items():
        assert Counter(flow for flow, _ in mirrored) == case.flows, call_id

    if case.held:
        # The hold time between ACK and BYE is what a CDR bills; the mirrored
        # timestamps must carry it.
        for call_id, mirrored in calls.items():
            stamps = {flow: packet.timestamp for flow, packet in mirrored}
            held = stamps[("BYE", CALLER, PROXY)] - stamps[("ACK", CALLER, PROXY)]
            assert HOLD_MS / 1000 - 0.05 <= held <= HOLD_MS / 1000 + 1.0, (call_id, held)
