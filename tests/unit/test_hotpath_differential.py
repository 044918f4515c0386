"""The compiled hot path and the interpreted one give identical results.

Both run in this process: the modules in use (compiled when the install built them;
test_hotpath.py checks that it did) and copies of the same modules loaded from their
source by `hotpath.load_interpreted`. Compared on every corpus the suite has (RFC 4475,
PROTOS c07-sip, the pjproject seeds, every message and frame of every public capture,
and hypothesis mutations of them):

* the parser: every field it exposes, eager and lazy, every header, the repr, and
  rejections with their reason and detail;
* HEP: every decoded field, or the error's reason and detail;
* frame decoding: every SIP packet found, frame by frame, and every counter;
* the correlator: every CDR, the `changed` flag, the counters, KPIs and the snapshot;
* the pipeline: every call of its hooks, stages and sinks, in order, and its counters.
"""

from __future__ import annotations

import importlib
import io
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pcapdata import require_shared_data, udp_payloads
from sipcdr import hepencode
from sipcdr.hotpath import COMPILED_MODULES, load_interpreted
from sipcdr.model import Packet, replace_cdr

Modules = dict[str, ModuleType]

# Every field a SipMessage exposes, read as a consumer reads it.
EAGER = (
    "is_request",
    "method",
    "request_uri",
    "status_code",
    "reason_phrase",
    "call_id",
    "cseq",
    "cseq_method",
    "from_uri",
    "from_tag",
    "to_uri",
    "to_tag",
    "via_branch",
    "user_agent",
    "content_type",
    "content_length",
    "body",
    "body_start",
    "raw_from",
    "raw_to",
    "raw_pai",
    "raw_reason",
)
LAZY = (
    "via_count",
    "from_user",
    "to_user",
    "p_asserted_identity",
    "from_display",
    "to_display",
    "contact",
    "reason_header",
    "defects",
)
HEP_FIELDS = (
    "version",
    "ip_family",
    "ip_protocol",
    "src_ip",
    "dst_ip",
    "src_port",
    "dst_port",
    "timestamp",
    "proto_type",
    "capture_id",
    "auth_key",
    "payload",
    "correlation_id",
    "node_name",
    "compressed",
)


@pytest.fixture(scope="module")
def compiled() -> Modules:
    return {name: importlib.import_module(name) for name in COMPILED_MODULES}


@pytest.fixture(scope="module")
def interpreted() -> Modules:
    return load_interpreted()


def _raised(exc: BaseException) -> tuple[object, ...]:
    # Classes differ between the two (each has its own), their names and contents not.
    return ("raised", type(exc).__name__, getattr(exc, "reason", None), str(exc))


def _read(record: object, name: str) -> object:
    try:
        return getattr(record, name)
    except Exception as exc:
        return _raised(exc)


def parse_outcome(modules: Modules, data: bytes) -> tuple[object, ...]:
    """Everything a consumer can learn from parsing `data`."""
    try:
        msg: Any = modules["sipcdr.sip.parser"].parse(data)
    except Exception as exc:
        return _raised(exc)
    names = msg.header_names()
    return (
        "parsed",
        tuple(getattr(msg, name) for name in EAGER),
        tuple(_read(msg, name) for name in LAZY),
        tuple((name, msg.header(name), tuple(msg.headers(name))) for name in names),
        msg.header("X-Not-There"),
        repr(msg),
    )


def assert_same_parse(compiled: Modules, interpreted: Modules, data: bytes) -> None:
    assert parse_outcome(compiled, data) == parse_outcome(interpreted, data), data[:200]


def hep_outcome(modules: Modules, data: bytes) -> tuple[object, ...]:
    try:
        packet = modules["sipcdr.hep"].decode(data)
    except Exception as exc:
        return (*_raised(exc), getattr(exc, "detail", None))
    return ("decoded", *(getattr(packet, name) for name in HEP_FIELDS))


# -- corpora ------------------------------------------------------------------------


def rfc4475() -> list[bytes]:
    folder = require_shared_data() / "rfc4475"
    return [path.read_bytes() for path in sorted(folder.rglob("*.dat"))]


def pjproject_seeds() -> list[bytes]:
    folder = require_shared_data() / "malformed" / "pjproject-fuzz-seeds"
    return [path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()]


PROTOS_VALUES = {
    b"<To>": b"bob@biloxi.example.com",
    b"<From>": b"alice@atlanta.example.com",
    b"<From-Address>": b"192.0.2.10",
    b"<From-IP>": b"192.0.2.10",
    b"<Local-Port>": b"5060",
    b"<Branch-ID>": b"1a2b3c",
    b"<Call-ID>": b"a84b4c76e66710",
    b"<CSeq>": b"1",
    b"<Teardown-Method>": b"CANCEL",
}


def protos_pdus() -> Iterator[bytes]:
    """Each case's two PDUs, filled in as a sender would and as written (placeholders
    and all): see malformed/README.txt for the format."""
    folder = require_shared_data() / "malformed" / "protos-c07-sip" / "cases"
    for path in sorted(folder.iterdir()):
        raw = path.read_bytes()
        pos = 0
        while pos < len(raw):
            space = raw.index(b" ", pos)
            end = space + 1 + int(raw[pos:space])
            template = raw[space + 1 : end]
            pos = end
            filled = template
            for placeholder, value in PROTOS_VALUES.items():
                filled = filled.replace(placeholder, value)
            body = filled.find(b"\r\n\r\n")
            length = str(len(filled) - body - 4 if body >= 0 else 0).encode()
            yield filled.replace(b"<Content-Length>", length)
            yield template


def captures() -> list[Path]:
    data = require_shared_data()
    found = sorted((data / "pcaps").glob("*.pcap*")) + sorted(
        (data / "malformed" / "pcaps").glob("*.pcap*")
    )
    assert len(found) >= 17
    return found


def frames(path: Path) -> tuple[int, list[tuple[float, bytes]]]:
    """(link type, every frame with its time) as dpkt reads the file."""
    with path.open("rb") as handle:
        magic = handle.read(4)
        handle.seek(0)
        reader: Any = (
            dpkt.pcapng.Reader(handle) if magic == b"\x0a\x0d\x0d\x0a" else dpkt.pcap.Reader(handle)
        )
        return int(reader.datalink()) & 0xFFFF, [(float(ts), bytes(f)) for ts, f in reader]


def capture_packets(modules: Modules, path: Path) -> list[Packet]:
    linktype, records = frames(path)
    extractor = modules["sipcdr.decode.extract"].SipExtractor(linktype, path.name)
    packets = [packet for ts, frame in records for packet in extractor.feed(ts, frame)]
    extractor.close()
    return packets


# -- the parser ------------------------------------------------------------------------


def test_rfc4475_and_the_pjproject_seeds(compiled: Modules, interpreted: Modules) -> None:
    corpus = rfc4475() + pjproject_seeds()
    assert len(corpus) >= 70
    for data in corpus:
        assert_same_parse(compiled, interpreted, data)


def test_protos_c07_sip(compiled: Modules, interpreted: Modules) -> None:
    count = 0
    for data in protos_pdus():
        assert_same_parse(compiled, interpreted, data)
        count += 1
    assert count == 4 * 4527


def test_every_message_of_every_public_capture(compiled: Modules, interpreted: Modules) -> None:
    count = 0
    for path in captures():
        for packet in capture_packets(compiled, path):
            assert_same_parse(compiled, interpreted, packet.payload)
            count += 1
    assert count > 800


@pytest.fixture(scope="module")
def seeds() -> list[bytes]:
    """Messages to mutate: RFC 4475's and those of the public captures."""
    found = rfc4475()
    for path in captures():
        found.extend(payload for _ts, payload in udp_payloads(path) if b"SIP/2.0" in payload)
    return found


INSERTS = (b"\r", b"\n", b"\r\n", b" ", b"\t", b"\x00", b":", b";", b",", b"<", b'"', b"\xc3")


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        kind = draw(st.sampled_from(("flip", "delete", "insert", "truncate", "case", "line")))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "insert":
            data[at:at] = draw(st.sampled_from(INSERTS)) * draw(st.integers(1, 3))
        elif kind == "truncate":
            del data[at:]
        elif kind == "case" and data:
            data[at : at + 8] = bytes(data[at : at + 8]).swapcase()
        elif kind == "line":
            lines = bytes(data).split(b"\r\n")
            line = at % len(lines)
            lines.insert(draw(st.integers(0, len(lines))), lines[line])
            data = bytearray(b"\r\n".join(lines))
    return bytes(data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_messages(
    compiled: Modules, interpreted: Modules, seeds: list[bytes], data: st.DataObject
) -> None:
    assert_same_parse(compiled, interpreted, data.draw(mutated(seeds), label="message"))


# -- HEP -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hep_packets(compiled: Modules) -> list[bytes]:
    """HEP from the public captures, and HEPv3 as encode writes it (plain, compressed,
    IPv6, every optional chunk)."""
    data = require_shared_data() / "pcaps"
    found = [
        payload
        for path in sorted(data.glob("hepwireshark-*"))
        for _ts, payload in udp_payloads(path)
    ]
    assert len(found) >= 29
    encode = hepencode.encode
    sip = b"OPTIONS sip:a@b SIP/2.0\r\nCall-ID: x\r\n\r\n"
    found.extend(
        encode(
            src_ip=src,
            dst_ip=dst,
            src_port=5060,
            dst_port=5080,
            timestamp=1_700_000_000.123456,
            payload=sip,
            capture_id=2001,
            auth_key="key",
            correlation_id="corr",
            node_name="node\x00",
            compress=compress,
        )
        for src, dst in (("192.0.2.1", "198.51.100.2"), ("2001:db8::1", "2001:db8::2"))
        for compress in (False, True)
    )
    # HEPv2: the kamailio header, IPv4, the time header, then SIP.
    found.append(
        struct.pack("!BBBBHH", 2, 16, 2, 17, 5060, 5060)
        + bytes((192, 0, 2, 1, 192, 0, 2, 2))
        + struct.pack("<IIH2x", 1_700_000_000, 5, 7)
        + sip
    )
    return found


def test_hep_packets(compiled: Modules, interpreted: Modules, hep_packets: list[bytes]) -> None:
    for packet in hep_packets:
        outcome = hep_outcome(compiled, packet)
        assert outcome[0] == "decoded"
        assert outcome == hep_outcome(interpreted, packet)
        for cut in range(0, len(packet), 7):
            assert hep_outcome(compiled, packet[:cut]) == hep_outcome(interpreted, packet[:cut])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_hep_packets(
    compiled: Modules, interpreted: Modules, hep_packets: list[bytes], data: st.DataObject
) -> None:
    packet = bytearray(data.draw(st.sampled_from(hep_packets), label="packet"))
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        at = data.draw(st.integers(0, len(packet) - 1), label="at")
        packet[at] = data.draw(st.integers(0, 255), label="byte")
    for candidate in (bytes(packet), zlib.compress(bytes(packet))):
        assert hep_outcome(compiled, candidate) == hep_outcome(interpreted, candidate)


# -- frame decoding ----------------------------------------------------------------------


def extract_all(
    modules: Modules, linktype: int, records: list[tuple[float, bytes]], *, prefilter: bool = True
) -> tuple[list[list[Packet]], dict[str, int]]:
    extract = modules["sipcdr.decode.extract"]
    extractor = extract.SipExtractor(linktype, "node", prefilter=prefilter)
    found = [list(extractor.feed(ts, frame)) for ts, frame in records]
    extractor.close()
    return found, extractor.stats.as_dict()


def assert_same_extraction(
    one: tuple[list[list[Packet]], dict[str, int]],
    other: tuple[list[list[Packet]], dict[str, int]],
    name: str,
) -> None:
    assert one[1] == other[1], name
    for index, (mine, theirs) in enumerate(zip(one[0], other[0], strict=True)):
        assert mine == theirs, f"{name} frame {index}"


def test_every_frame_of_every_public_capture(compiled: Modules, interpreted: Modules) -> None:
    for path in captures():
        linktype, records = frames(path)
        fast = extract_all(compiled, linktype, records)
        assert_same_extraction(fast, extract_all(interpreted, linktype, records), path.name)
        # The pre-filter skips media unread and counts it as full decoding would.
        full = extract_all(compiled, linktype, records, prefilter=False)
        assert_same_extraction(fast, full, path.name)


@pytest.fixture(scope="module")
def frame_pool() -> list[tuple[int, float, bytes]]:
    pool: list[tuple[int, float, bytes]] = []
    for path in captures():
        linktype, records = frames(path)
        pool.extend((linktype, ts, frame) for ts, frame in records[:400])
    return pool


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_frames(
    compiled: Modules,
    interpreted: Modules,
    frame_pool: list[tuple[int, float, bytes]],
    data: st.DataObject,
) -> None:
    """Frames with header bytes changed, cut short or lengthened: every layer's checks."""
    picks = data.draw(st.lists(st.sampled_from(frame_pool), min_size=1, max_size=8), label="frames")
    linktype = picks[0][0]
    records = []
    for _linktype, ts, frame in (pick for pick in picks if pick[0] == linktype):
        mutable = bytearray(frame)
        for _ in range(data.draw(st.integers(0, 3), label="mutations")):
            # Mostly the first 80 bytes: where the headers are.
            at = data.draw(st.integers(0, min(len(mutable), 80) - 1), label="at")
            mutable[at] = data.draw(st.integers(0, 255), label="byte")
        if data.draw(st.booleans(), label="cut"):
            del mutable[data.draw(st.integers(0, len(mutable)), label="cut at") :]
        records.append((ts, bytes(mutable)))
    fast = extract_all(compiled, linktype, records)
    assert fast == extract_all(interpreted, linktype, records)
    assert fast == extract_all(compiled, linktype, records, prefilter=False)
    assert fast == extract_all(interpreted, linktype, records, prefilter=False)


# -- the correlator --------------------------------------------------------------------


class Run:
    """One correlator fed as the importer feeds it: parse, timers on capture time, feed."""

    def __init__(self, modules: Modules) -> None:
        self.parse = modules["sipcdr.sip.parser"].parse
        self.error = modules["sipcdr.sip.parser"].SipParseError
        self.correlator = modules["sipcdr.dialog.correlator"].Correlator()
        self.events: list[object] = []
        self.next_expiry = 0.0

    def feed(self, packet: Packet) -> None:
        if packet.timestamp >= self.next_expiry:
            self.events.append(("expired", list(self.correlator.expire(packet.timestamp))))
            self.next_expiry = packet.timestamp + 1.0
        try:
            msg = self.parse(packet.payload)
        except self.error as exc:
            self.events.append(("rejected", exc.reason))
            return
        cdrs = list(self.correlator.feed(packet, msg))
        self.events.append(("fed", cdrs, self.correlator.changed))

    def state(self) -> tuple[object, ...]:
        correlator = self.correlator
        snapshot = correlator.snapshot()
        counters = public_values(correlator.stats)
        return snapshot, counters, correlator.open_dialogs, list(correlator.drain())


def public_values(record: object) -> dict[str, object]:
    """Every public attribute that is not a method (compiled classes keep no __dict__)."""
    values = {name: getattr(record, name) for name in dir(record) if not name.startswith("_")}
    return {name: value for name, value in values.items() if not callable(value)}


def test_every_public_capture_through_the_correlator(
    compiled: Modules, interpreted: Modules
) -> None:
    for path in captures():
        fast, slow = Run(compiled), Run(interpreted)
        for packet in capture_packets(compiled, path):
            fast.feed(packet)
            slow.feed(packet)
        assert fast.events == slow.events, path.name
        assert fast.state() == slow.state(), path.name


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_call_flows_through_the_correlator(
    compiled: Modules, interpreted: Modules, data: st.DataObject
) -> None:
    """A public capture's messages with some mutated, dropped or repeated, at shuffled
    times: every rule of the dialog state machine gets odd input."""
    path = data.draw(st.sampled_from(captures()), label="capture")
    packets = capture_packets(compiled, path)[:60]
    seeds = [packet.payload for packet in packets] or [b""]
    fast, slow = Run(compiled), Run(interpreted)
    for packet in packets:
        payload = packet.payload
        if data.draw(st.integers(0, 3), label="mutate") == 0:
            payload = data.draw(mutated(seeds), label="payload")
        step = data.draw(st.sampled_from((0.0, 0.5, 40.0, 200.0)), label="delay")
        moved = packet._replace(payload=payload, timestamp=packet.timestamp + step)
        for _ in range(data.draw(st.integers(0, 2), label="copies")):
            fast.feed(moved)
            slow.feed(moved)
    assert fast.events == slow.events
    assert fast.state() == slow.state()


# -- the pipeline -------------------------------------------------------------------------


class Chain:
    """A pipeline of `modules` with every hook, a stage that fails on some CDRs and one
    that adds to them, and a sink that refuses some: each call, in order, in `events`."""

    def __init__(self, modules: Modules) -> None:
        self.events: list[tuple[Any, ...]] = []
        pipeline_module = modules["sipcdr.pipeline"]
        correlator = modules["sipcdr.dialog.correlator"].Correlator(
            modules["sipcdr.dialog.correlator"].DialogLimits(max_open_dialogs=3)
        )
        self.pipeline = pipeline_module.Pipeline(
            correlator,
            (_Sink("refusing", self.events, refuse=True), _Sink("kept", self.events)),
            (_Stage("failing", self.events, fail=True), _Stage("marking", self.events)),
            (_Stage("tap", self.events),),
            signaling=lambda packet, msg: self.events.append(("signaling", msg.call_id)),
            journal=lambda packet: self.events.append(("journal", packet.timestamp)),
            decided=lambda cdrs, at: self.events.append(("decided", list(cdrs), at)),
        )

    def feed(self, packet: Packet, paused: bool) -> None:
        self.pipeline.intake.paused = paused
        self.pipeline.process(packet)
        if int(packet.timestamp) % 7 == 0:
            self.pipeline.expire(packet.timestamp)

    def state(self) -> tuple[object, ...]:
        stats = self.pipeline.stats
        return (
            self.events,
            stats.parse_errors,
            stats.messages,
            stats.calls_refused,
            stats.internal_errors,
            stats.cdr_write_failures,
            stats.cdrs_emitted,
        )


class _Stage:
    def __init__(self, name: str, events: list[tuple[Any, ...]], fail: bool = False) -> None:
        self.name = name
        self.events = events
        self.fail = fail

    def on_message(self, packet: Packet, msg: Any) -> None:
        self.events.append((self.name, msg.call_id))
        if len(msg.call_id) % 3 == 0:
            raise ValueError("a message stage's bug")

    def on_cdr(self, cdr: Any) -> Any:
        self.events.append((self.name, cdr.call_id))
        if self.fail and len(cdr.call_id) % 2 == 0:
            raise ValueError("a CDR stage's bug")
        return replace_cdr(cdr, capture_node=f"{cdr.capture_node}+{self.name}")


class _Sink:
    def __init__(self, name: str, events: list[tuple[Any, ...]], refuse: bool = False) -> None:
        self.name = name
        self.events = events
        self.refuse = refuse

    def write(self, cdr: Any) -> None:
        self.events.append((self.name, cdr))
        if self.refuse and len(cdr.call_id) % 5 == 0:
            raise OSError("a sink's fault")

    def flush(self) -> None:
        return None


def test_every_public_capture_through_the_pipeline(compiled: Modules, interpreted: Modules) -> None:
    """Parse errors, intake paused for new calls now and then, evictions (three open
    calls at most), timer closes, faults of stages and sinks: the same calls in the same
    order, the same counts."""
    seen: Counter[str] = Counter()
    for path in captures():
        fast, slow = Chain(compiled), Chain(interpreted)
        for n, packet in enumerate(capture_packets(compiled, path)):
            fast.feed(packet, paused=n % 11 == 5)
            slow.feed(packet, paused=n % 11 == 5)
        assert fast.state() == slow.state(), path.name
        assert fast.pipeline.cdrs_written == slow.pipeline.cdrs_written
        stats = fast.pipeline.stats
        seen.update(
            parse_errors=sum(stats.parse_errors.values()),
            refused=sum(stats.calls_refused.values()),
            stage_faults=sum(stats.internal_errors.values()),
            sink_faults=sum(stats.cdr_write_failures.values()),
            written=stats.cdrs_emitted,
            decided=sum(1 for event in fast.events if event[0] == "decided"),
        )
    # Every path was taken somewhere, or the comparison proves less than it says.
    assert all(
        seen[key] > 0
        for key in ("parse_errors", "refused", "stage_faults", "sink_faults", "written", "decided")
    ), seen


# -- the media pre-filter on built frames ------------------------------------------------

MAC = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02"
FIRST_BYTES = (0x80, 0x00, 0x01, 0x02, 0x0D, 0x16, 0x45, 0x48, 0x49, 0x53, 0xFF)


def ipv4(proto: int, payload: bytes, *, frag: int = 0) -> bytes:
    return (
        struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(payload), 1, frag, 64, proto, 0)
        + bytes((10, 0, 0, 1, 10, 0, 0, 2))
        + payload
    )


def ipv6(proto: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB", 6 << 28, len(payload), proto, 64) + bytes(32) + payload


@st.composite
def layered_frames(draw: st.DrawFn) -> tuple[int, bytes]:
    """A UDP datagram (media or signalling by its first byte, to any port, tunnels'
    included) in IP, maybe in GRE, ERSPAN II/III or IP-in-IP, behind a link header."""
    first = draw(st.sampled_from(FIRST_BYTES))
    dport = draw(st.sampled_from((5060, 30000, 4789, 2152, 6081, 37008)))
    body = bytes((first,)) + draw(st.binary(max_size=24))
    packet = struct.pack("!HHHH", 40000, dport, 8 + len(body), 0) + body
    packet = draw(st.sampled_from((ipv4, ipv6)))(17, packet)
    for _ in range(draw(st.integers(0, 2))):
        inner = MAC + (b"\x08\x00" if packet[0] >> 4 == 4 else b"\x86\xdd") + packet
        kind = draw(st.sampled_from(("erspan2", "erspan3", "erspan1", "gre", "bridged", "ipip")))
        if kind == "erspan2":
            gre = struct.pack("!HHI", 0x1000, 0x88BE, 7) + struct.pack("!II", 1 << 28, 0) + inner
        elif kind == "erspan3":
            gre = struct.pack("!HHI", 0x1000, 0x22EB, 7) + struct.pack("!IIIH", 2 << 28, 0, 0, 0)
            gre = gre[:-2] + struct.pack("!H", draw(st.sampled_from((0, 1, 2 << 10)))) + inner
        elif kind == "erspan1":
            gre = struct.pack("!HH", 0, 0x88BE) + inner
        elif kind == "gre":
            gre = struct.pack("!HH", draw(st.sampled_from((0, 0x2000, 0x8000))), 0x0800)
            gre += bytes(4 if len(gre) and gre[0] else 0) + ipv4(17, packet[20:])
        elif kind == "bridged":
            gre = struct.pack("!HH", 0, 0x6558) + inner
        else:
            packet = ipv4(4 if packet[0] >> 4 == 4 else 41, packet)
            continue
        packet = ipv4(47, gre)
    etype = b"\x08\x00" if packet[0] >> 4 == 4 else b"\x86\xdd"
    link = draw(st.sampled_from((1, 1, 113, 276, 101)))
    if link == 1:
        tags = b"\x81\x00\x00\x0a" * draw(st.integers(0, 2))
        return 1, MAC + tags + etype + packet
    if link == 113:
        return 113, bytes(14) + etype + packet
    if link == 276:
        return 276, etype + bytes(18) + packet
    return 101, packet


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_prefilter_on_built_frames(
    compiled: Modules, interpreted: Modules, data: st.DataObject
) -> None:
    """Every layer the pre-filter walks, with its header bytes changed or cut: skipped
    frames are exactly those full decoding drops as non-SIP, counted the same."""
    linktype, frame = data.draw(layered_frames(), label="frame")
    mutable = bytearray(frame)
    for _ in range(data.draw(st.integers(0, 2), label="mutations")):
        at = data.draw(st.integers(0, len(mutable) - 1), label="at")
        mutable[at] = data.draw(st.integers(0, 255), label="byte")
    if data.draw(st.booleans(), label="cut"):
        del mutable[data.draw(st.integers(0, len(mutable)), label="cut at") :]
    records = [(1.0, bytes(mutable))]
    reference = extract_all(interpreted, linktype, records, prefilter=False)
    assert extract_all(compiled, linktype, records) == reference
    assert extract_all(interpreted, linktype, records) == reference


# -- pcap files: the chunked reader against dpkt's --------------------------------------


def read_with_dpkt(modules: Modules, data: bytes) -> tuple[object, ...]:
    """What capture files gave before the chunked readers: dpkt's records, each fed."""
    handle = io.BytesIO(data)
    reader: Any = (
        dpkt.pcapng.Reader(handle) if data[:4] == b"\x0a\x0d\x0d\x0a" else dpkt.pcap.Reader(handle)
    )
    extractor = modules["sipcdr.decode.extract"].SipExtractor(reader.datalink() & 0xFFFF, "n")
    packets: list[Packet] = []
    truncated = False
    records = iter(reader)
    while True:
        try:
            ts, frame = next(records)
        except StopIteration:
            break
        except (dpkt.UnpackError, struct.error, ValueError):
            truncated = True
            break
        packets.extend(extractor.feed(float(ts), frame))
    extractor.close()
    return packets, extractor.stats.as_dict(), truncated


def read_in_chunks(modules: Modules, data: bytes, chunk: int) -> tuple[object, ...]:
    capfile = modules["sipcdr.decode.capfile"]
    reader = capfile.PcapReader(data[:24])
    extractor = modules["sipcdr.decode.extract"].SipExtractor(reader.linktype, "n")
    packets: list[Packet] = []
    pos = 24
    while pos < len(data):
        size = max(chunk, reader.wanted())
        packets.extend(reader.feed(data[pos : pos + size], extractor))
        pos += size
    packets.extend(reader.finish(extractor))
    extractor.close()
    return packets, extractor.stats.as_dict(), reader.truncated


def nanoseconds_big_endian(data: bytes) -> bytes:
    """The same capture as a big-endian file with nanosecond times."""
    out = bytearray(
        b"\xa1\xb2\x3c\x4d" + struct.pack(">HHiIII", *struct.unpack_from("<HHiIII", data, 4))
    )
    pos = 24
    while pos + 16 <= len(data):
        seconds, micro, captured, length = struct.unpack_from("<IIII", data, pos)
        out += struct.pack(">IIII", seconds, micro * 1000 + 999, captured, length)
        out += data[pos + 16 : pos + 16 + captured]
        pos += 16 + captured
    return bytes(out)


def pcap_files() -> list[tuple[str, bytes]]:
    found = []
    for path in captures():
        data = path.read_bytes()
        if data[:4] == b"\xd4\xc3\xb2\xa1":
            found.append((path.name, data))
            found.append((path.name + " (ns, big-endian)", nanoseconds_big_endian(data)))
    assert len(found) >= 20
    return found


def test_pcap_files_read_in_chunks_as_dpkt_reads_them(
    compiled: Modules, interpreted: Modules
) -> None:
    for name, data in pcap_files():
        expected = read_with_dpkt(interpreted, data)
        for chunk in (1 << 20, 4096, 997):
            assert read_in_chunks(compiled, data, chunk) == expected, (name, chunk)
        assert read_in_chunks(interpreted, data, 4096) == expected, name


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_cut_pcap_files_end_as_dpkt_ends_them(
    compiled: Modules, interpreted: Modules, data: st.DataObject
) -> None:
    """Files cut anywhere (in a record header, in a frame) and read in chunks of any
    size: the same records, the same frame cut short, the same truncation."""
    _name, whole = data.draw(st.sampled_from([f for f in pcap_files() if len(f[1]) < 60000]))
    cut = whole[: data.draw(st.integers(24, len(whole)), label="cut at")]
    chunk = data.draw(st.integers(1, 5000), label="chunk")
    expected = read_with_dpkt(interpreted, cut)
    assert read_in_chunks(compiled, cut, chunk) == expected
    assert read_in_chunks(interpreted, cut, chunk) == expected


def read_pcapng_in_chunks(modules: Modules, data: bytes, chunk: int) -> tuple[object, ...]:
    """As capture.pcapfile reads a pcapng file: dpkt the section header and first
    interface description, PcapngBlocks every block after them, in chunks."""
    handle = io.BytesIO(data)
    reader: Any = dpkt.pcapng.Reader(handle)
    extractor = modules["sipcdr.decode.extract"].SipExtractor(reader.datalink() & 0xFFFF, "n")
    little = data[8:12] == b"\x4d\x3c\x2b\x1a"
    blocks = modules["sipcdr.decode.capfile"].PcapngBlocks(
        little, reader._divisor, reader._tsoffset, handle.tell()
    )
    packets: list[Packet] = []
    while not blocks.stopped and (piece := handle.read(max(chunk, blocks.wanted()))):
        packets.extend(blocks.feed(piece, extractor))
    blocks.finish()
    extractor.close()
    return packets, extractor.stats.as_dict(), blocks.stopped


def block_ends(data: bytes) -> set[int]:
    """The offsets where the blocks of a whole pcapng file end."""
    order = "<" if data[8:12] == b"\x4d\x3c\x2b\x1a" else ">"
    ends = set()
    pos = 0
    while pos + 8 <= len(data):
        pos += struct.unpack_from(order + "I", data, pos + 4)[0]
        ends.add(pos)
    return ends


def pcapng_files() -> list[tuple[str, bytes]]:
    found = [(path.name, path.read_bytes()) for path in captures() if path.suffix == ".pcapng"]
    # A capture with an option on every packet block, and a big-endian one with
    # nanosecond times: what writers other than dumpcap's defaults produce.
    linktype, records = frames(require_shared_data() / "pcaps" / "zeek-sip-wireshark.pcap")
    for endian, resolution in (("<", None), (">", 9)):
        out = io.BytesIO()
        writer = pcapng_writer(out, linktype, endian, resolution)
        for index, (ts, frame) in enumerate(records):
            writer(ts, frame, index % 3 == 0 and endian == "<")
        found.append((f"written {endian} {resolution}", out.getvalue()))
    assert len(found) >= 5
    return found


def pcapng_writer(
    out: io.BytesIO, linktype: int, endian: str, resolution: int | None
) -> Callable[[float, bytes, bool], None]:
    """A minimal pcapng writer: section header, one interface (with a time resolution
    option when given), Enhanced Packet Blocks (with a comment option when asked) and,
    every seventh packet, a Name Resolution Block for the reader to skip."""

    def block(kind: int, body: bytes) -> bytes:
        length = 12 + len(body)
        return struct.pack(endian + "II", kind, length) + body + struct.pack(endian + "I", length)

    out.write(block(0x0A0D0D0A, struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1)))
    options = b""
    if resolution is not None:
        options = struct.pack(endian + "HHB3x", 9, 1, resolution) + bytes(4)
    out.write(block(1, struct.pack(endian + "HHI", linktype, 0, 65535) + options))
    divisor = 10 ** (resolution or 6)
    count = 0

    def write(ts: float, frame: bytes, with_option: bool) -> None:
        nonlocal count
        ticks = round(ts * divisor)
        body = struct.pack(
            endian + "5I", 0, ticks >> 32, ticks & 0xFFFFFFFF, len(frame), len(frame)
        )
        body += frame + bytes(-len(frame) % 4)
        if with_option:
            body += struct.pack(endian + "HH", 1, 4) + b"note" + bytes(4)
        out.write(block(6, body))
        count += 1
        if count % 7 == 0:
            out.write(block(4, struct.pack(endian + "HH", 0, 0)))

    return write


def test_pcapng_files_read_in_chunks_as_dpkt_reads_them(
    compiled: Modules, interpreted: Modules
) -> None:
    for name, data in pcapng_files():
        expected = read_with_dpkt(interpreted, data)
        for chunk in (1 << 20, 4096, 997):
            assert read_pcapng_in_chunks(compiled, data, chunk) == expected, (name, chunk)
        assert read_pcapng_in_chunks(interpreted, data, 4096) == expected, name


def test_public_pcapng_files_are_read_without_dpkt_after_their_headers(
    compiled: Modules,
) -> None:
    for name, data in pcapng_files()[:3]:
        handle = io.BytesIO(data)
        reader: Any = dpkt.pcapng.Reader(handle)
        blocks = compiled["sipcdr.decode.capfile"].PcapngBlocks(
            data[8:12] == b"\x4d\x3c\x2b\x1a", reader._divisor, reader._tsoffset, handle.tell()
        )
        extractor = compiled["sipcdr.decode.extract"].SipExtractor(reader.datalink(), "n")
        assert blocks.feed(handle.read(), extractor), name
        blocks.finish()
        assert (blocks.stopped, blocks.position) == (False, len(data)), name


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_cut_and_damaged_pcapng_files_end_alike(
    compiled: Modules, interpreted: Modules, data: st.DataObject
) -> None:
    """pcapng files cut anywhere, or with a byte changed, read in chunks of any size:
    compiled and interpreted alike, as when read whole; a file cut (not damaged) gives
    dpkt's packets and counters, and is truncated unless cut between blocks."""
    _name, whole = data.draw(st.sampled_from(pcapng_files()), label="file")
    length = data.draw(st.integers(0, len(whole)), label="cut at")
    damaged = bytearray(whole[:length])
    damage = len(damaged) > 200 and data.draw(st.booleans(), label="damage")
    if damage:
        at = data.draw(st.integers(100, len(damaged) - 1), label="at")
        damaged[at] = data.draw(st.integers(0, 255), label="byte")
    cut = bytes(damaged)
    try:
        expected = read_with_dpkt(interpreted, cut)
    except (ValueError, dpkt.UnpackError, struct.error):
        return  # the header blocks themselves are unreadable: not a capture file
    chunk = data.draw(st.integers(1, 5000), label="chunk")
    whole_read = read_pcapng_in_chunks(interpreted, cut, len(cut) + 1)
    assert read_pcapng_in_chunks(compiled, cut, chunk) == whole_read
    assert read_pcapng_in_chunks(interpreted, cut, chunk) == whole_read
    if not damage:
        packets, counters, truncated = whole_read
        assert (packets, counters) == expected[:2]
        assert truncated == (length not in block_ends(whole))
