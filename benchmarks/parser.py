"""Parser throughput against a floor loop and two peer parsers, measured in one run.

Every contender reads the same fields from the same three messages: those a CDR is
built from (Call-ID, CSeq number and method, From/To URI, tag and user part, top Via
branch, request URI or status and reason, User-Agent/Server, P-Asserted-Identity, the
Reason header's Q.850 cause) and the body the signaling store keeps. Figures are the median
of several rounds; ratios are against contenders timed in the same process, so a noisy
machine moves all of them together.

sipcdr runs twice: as installed (compiled when a compiler was there at install time),
and interpreted, from the same source (`sipcdr.hotpath.load_interpreted`).

    python benchmarks/parser.py [--rounds 7] [--number 20000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dpkt
import sipmessage
from samples import MESSAGES
from sipcdr import hep, hepencode, hotpath
from sipcdr.sip import parse
from sipcdr.sip import parser as parser_module

Reader = Callable[[bytes], object]
# The targets the compiled hot path was built for (issue: compiled hot path).
TARGET_INVITES_PER_S = 150_000
TARGET_VS_DPKT = 2.5
TARGET_HEP_PER_S = 100_000


def floor(data: bytes) -> object:
    return data.find(b"\r\n\r\n")


def sipcdr_fields(data: bytes, parse: Callable[[bytes], Any] = parse) -> object:
    m = parse(data)
    return (
        m.call_id,
        m.cseq,
        m.cseq_method,
        m.from_uri,
        m.from_user,
        m.from_tag,
        m.to_uri,
        m.to_user,
        m.to_tag,
        m.via_branch,
        m.request_uri if m.is_request else m.status_code,
        m.method or m.reason_phrase,
        m.user_agent,
        m.p_asserted_identity,
        m.reason_header,
        m.body,
    )


def _tag(value: str) -> str | None:
    i = value.find(";tag=")
    return value[i + 5 :].split(";", 1)[0] if i >= 0 else None


def _bracketed(value: str) -> str:
    lt = value.find("<")
    return value[lt + 1 : value.find(">", lt)] if lt >= 0 else value.split(";", 1)[0]


def _user(uri: str) -> str | None:
    at = uri.find("@")
    return uri[uri.find(":") + 1 : at] if at >= 0 else None


def _first(value: Any) -> str:
    return value[0] if isinstance(value, list) else str(value)


def _q850(value: str | None) -> int | None:
    if not value:
        return None
    i = value.find("Q.850;cause=")
    return int(value[i + 12 :].split(";", 1)[0]) if i >= 0 else None


def dpkt_fields(data: bytes) -> object:
    response = data.startswith(b"SIP/")
    msg: Any = dpkt.sip.Response(data) if response else dpkt.sip.Request(data)
    h = msg.headers
    via = h["via"]
    top = via[0] if isinstance(via, list) else via
    bi = top.find(";branch=")
    number, method = h["cseq"].split()
    from_uri = _bracketed(h["from"])
    to_uri = _bracketed(h["to"])
    pai = h.get("p-asserted-identity")
    return (
        h["call-id"],
        int(number),
        method,
        from_uri,
        _user(from_uri),
        _tag(h["from"]),
        to_uri,
        _user(to_uri),
        _tag(h["to"]),
        top[bi + 8 :].split(";", 1)[0] if bi >= 0 else None,
        int(msg.status) if response else msg.uri,
        msg.reason if response else msg.method,
        h.get("user-agent") or h.get("server"),
        _bracketed(_first(pai)) if pai else None,
        _q850(h.get("reason")),
        msg.body,
    )


def sipmessage_fields(data: bytes) -> object:
    m: Any = sipmessage.Message.parse(data)
    from_uri = str(m.from_address.uri)
    to_uri = str(m.to_address.uri)
    pai = m.headers.get("P-Asserted-Identity")
    response = data.startswith(b"SIP/")
    return (
        m.call_id,
        m.cseq.sequence,
        m.cseq.method,
        from_uri,
        _user(from_uri),
        m.from_address.parameters.get("tag"),
        to_uri,
        _user(to_uri),
        m.to_address.parameters.get("tag"),
        m.via[0].parameters.get("branch"),
        m.code if response else str(m.uri),
        m.phrase if response else m.method,
        m.user_agent or m.server,
        _bracketed(pai) if pai else None,
        _q850(m.headers.get("Reason")),
        m.body,
    )


def _hep_packets() -> list[bytes]:
    return [
        hepencode.encode(
            src_ip="198.51.100.10",
            dst_ip="203.0.113.5",
            src_port=5060,
            dst_port=5060,
            timestamp=1_700_000_000.25,
            payload=payload,
            capture_id=2001,
            node_name="sbc-1",
        )
        for payload in MESSAGES.values()
    ]


def hep_then_sipcdr(packet: bytes) -> object:
    return sipcdr_fields(hep.decode(packet).payload)


NO_SCANNER = "sipcdr without the C scanner, INVITE"


@contextmanager
def scanner_off(off: bool) -> Iterator[None]:
    """The installed parser with its header loop in Python (compiled, when it is): the
    C scanner's share. The parser reads `_scan_head` from its module on every call."""
    saved = parser_module._scan_head
    if off:
        parser_module._scan_head = None
    try:
        yield
    finally:
        parser_module._scan_head = saved


def interpreted_readers() -> tuple[Reader, Reader]:
    """The two sipcdr readers above, on the modules loaded from source."""
    modules = hotpath.load_interpreted()
    slow_parse = modules["sipcdr.sip.parser"].parse
    slow_decode = modules["sipcdr.hep"].decode

    def fields(data: bytes) -> object:
        return sipcdr_fields(data, slow_parse)

    def hep_fields(packet: bytes) -> object:
        return sipcdr_fields(slow_decode(packet).payload, slow_parse)

    return fields, hep_fields


def rate(reader: Reader, inputs: list[bytes], number: int) -> float:
    """Messages per second for `number` passes over `inputs`."""
    started = time.perf_counter()
    for _ in range(number):
        for data in inputs:
            reader(data)
    elapsed = time.perf_counter() - started
    return number * len(inputs) / elapsed


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--rounds", type=int, default=7)
    args.add_argument("--number", type=int, default=20000, help="messages per contender per round")
    opts = args.parse_args(argv)

    invite = [MESSAGES["INVITE"]]
    mixed = list(MESSAGES.values())
    slow_fields, slow_hep = interpreted_readers()
    contenders: list[tuple[str, Reader, list[bytes]]] = [
        ("floor: find(CRLFCRLF), INVITE", floor, invite),
        ("sipcdr.sip.parse, INVITE", sipcdr_fields, invite),
        ("sipcdr interpreted, INVITE", slow_fields, invite),
        (NO_SCANNER, sipcdr_fields, invite),
        ("dpkt.sip, INVITE", dpkt_fields, invite),
        ("sipmessage, INVITE", sipmessage_fields, invite),
        ("sipcdr.sip.parse, INVITE+200+BYE", sipcdr_fields, mixed),
        ("dpkt.sip, INVITE+200+BYE", dpkt_fields, mixed),
        ("HEPv3 decode + parse, INVITE+200+BYE", hep_then_sipcdr, _hep_packets()),
        ("HEPv3 + parse interpreted, I+200+BYE", slow_hep, _hep_packets()),
    ]
    for _name, reader, inputs in contenders:
        for data in inputs:
            reader(data)  # every contender must accept every input before timing starts

    samples: dict[str, list[float]] = {name: [] for name, _r, _i in contenders}
    for _ in range(opts.rounds):
        # Interleaved rounds: a burst of noise hits every contender, not just one.
        for name, reader, inputs in contenders:
            with scanner_off(name == NO_SCANNER):
                samples[name].append(rate(reader, inputs, max(1, opts.number // len(inputs))))
    median = {name: statistics.median(values) for name, values in samples.items()}

    kind, why = hotpath.hot_path()
    print(f"hot path: {kind}{f' ({why})' if why else ''}")
    print(f"median of {opts.rounds} rounds, {opts.number} messages each")
    for name, _reader, _inputs in contenders:
        print(f"  {name:<40} {median[name]:>12,.0f} msg/s")
    ours = median["sipcdr.sip.parse, INVITE"]
    print("ratios (same run):")
    print(f"  sipcdr / dpkt.sip, INVITE            {ours / median['dpkt.sip, INVITE']:6.2f}x")
    print(
        "  sipcdr / dpkt.sip, INVITE+200+BYE    "
        f"{median['sipcdr.sip.parse, INVITE+200+BYE'] / median['dpkt.sip, INVITE+200+BYE']:6.2f}x"
    )
    print(f"  sipcdr / sipmessage, INVITE          {ours / median['sipmessage, INVITE']:6.2f}x")
    print(f"  floor  / sipcdr, INVITE              {median[contenders[0][0]] / ours:6.2f}x")
    slow = median["sipcdr interpreted, INVITE"]
    print(f"  sipcdr / sipcdr interpreted, INVITE  {ours / slow:6.2f}x")
    print(f"  sipcdr / sipcdr no C scanner, INVITE {ours / median[NO_SCANNER]:6.2f}x")
    print(f"  interpreted / dpkt.sip, INVITE       {slow / median['dpkt.sip, INVITE']:6.2f}x")
    hep_rate = median["HEPv3 decode + parse, INVITE+200+BYE"]
    print(f"  HEPv3 + parse / interpreted          {hep_rate / median[contenders[-1][0]]:6.2f}x")
    print("targets:")
    for what, value, target in (
        ("INVITE/s, every CDR field read", ours, TARGET_INVITES_PER_S),
        ("x dpkt.sip, INVITE", ours / median["dpkt.sip, INVITE"], TARGET_VS_DPKT),
        ("HEPv3 decode + parse /s", hep_rate, TARGET_HEP_PER_S),
    ):
        verdict = "met" if value >= target else "NOT met"
        print(f"  {what:<36} {value:>12,.2f}  target {target:>10,}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
