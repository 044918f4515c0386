"""What keeping signaling costs per SIP message, on each side of the signaling spool:
the JSON record spooled by earlier versions against the captured bytes spooled now.

Capture side (the daemon's hot path, once per parsed message, the parse not counted):

- json (baseline): the 27-field record built and dumped, appended to a buffered spool
  (what `SignalingRecorder` did before)
- binary: `SignalingRecorder` now: the id's digest, the bytes without the SDP, a
  packed header, appended to a buffered spool

and, for scale, `sip.parse` alone, and parse plus each recorder. The binary value
in its former form (tests/support/formerspooled.py: the end of the headers searched
for, every name encoded per message) against the present one, in turns of 500
messages: the value alone, and the recorder with its spool append.

Delivery side (once per record each sink sends; the spool read not counted):

- PostgreSQL rows: `PostgresSink._rows` of a batch of JSON values against one of
  binary values (the bytes re-parsed); no database involved
- the sink's row of a binary value, before (`sip_message_row_unspooled`: the whole
  packet and event read back, `unspool`) and now (`sip_message_row`: the row's fields
  read straight from the value), alternated in every round
- Kafka values: JSON values go out as spooled (nothing to do), binary ones become the
  topic's JSON (`sinks.signaling.published`)

The traffic is an INVITE and a 200 OK with SDP and a BYE (benchmarks/samples.py),
each packet a millisecond after the last, as a call's messages are, from one of 50
trunk addresses (each packet's own address strings, as the receive path makes them). Figures are CPU
microseconds per message (process time: a shared machine's other work is not
counted, its contention for caches and cores is), the median of several rounds; the
ratio is json against binary of the same round, so a busy machine moves both
together.

    python benchmarks/signaling.py [--rounds 7] [--number 30000] [--store-sdp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from formerspooled import former_spooled
from samples import MESSAGES
from sipcdr.model import Packet
from sipcdr.sinks import postgres
from sipcdr.sinks.base import KIND_SIP, STREAM_SIGNALING, SpoolRecord
from sipcdr.sinks.pgrows import sip_message_row, sip_message_row_unspooled
from sipcdr.sinks.postgres import PostgresSink
from sipcdr.sinks.signaling import SignalingRecorder, published
from sipcdr.sip import SipMessage, parse
from sipcdr.sipevent import event_record, spooled
from sipcdr.spool import Spool

BATCH = 1000  # records per delivery batch, as the delivery loop reads them
CHUNK = 500  # messages per turn of the former and the present binary value

Message = tuple[Packet, SipMessage]


def traffic(number: int) -> list[Message]:
    payloads = list(MESSAGES.values())
    pairs = []
    for n in range(number):
        packet = Packet(
            1_795_000_000.1 + n / 1000,
            f"192.0.2.{10 + n % 50}",
            5060,
            "".join(("203.0.113.", "20")),
            5060,
            "".join(("ud", "p")),
            payloads[n % len(payloads)],
            "2001",
        )
        pairs.append((packet, parse(packet.payload)))
    return pairs


class JsonRecorder:
    """The recorder as it was: the record's JSON, built and dumped per message."""

    __slots__ = ("spool", "store_body")

    def __init__(self, spool: Spool, *, store_body: bool = False) -> None:
        self.spool = spool
        self.store_body = store_body

    def __call__(self, packet: Packet, msg: SipMessage) -> None:
        record = event_record(packet, msg, store_body=self.store_body)
        self.spool.append(KIND_SIP, msg.call_id.encode(), orjson.dumps(record))


class FormerRecorder:
    """`SignalingRecorder` with the value in its former form."""

    __slots__ = ("append", "store_body")

    def __init__(self, spool: Spool, *, store_body: bool = False) -> None:
        self.store_body = store_body
        self.append = spool.append

    def __call__(self, packet: Packet, msg: SipMessage) -> None:
        value = former_spooled(packet, msg, self.store_body)
        self.append(KIND_SIP, msg.call_id.encode(), value)


Recorder = Callable[[Packet, SipMessage], None]
Spooler = Callable[[Packet, SipMessage, bool], bytes]


def record_all(
    make: Callable[..., Recorder], pairs: list[Message], directory: Path, store_body: bool
) -> float:
    """Seconds to record every message into a fresh buffered spool."""
    with Spool(directory, ("postgres",), buffered=True) as spool:
        record = make(spool, store_body=store_body)
        start = time.process_time()
        for packet, msg in pairs:
            record(packet, msg)
        spool.flush()
        return time.process_time() - start


def parse_all(pairs: list[Message], record: Recorder | None = None) -> float:
    start = time.process_time()
    for packet, _msg in pairs:
        msg = parse(packet.payload)
        if record is not None:
            record(packet, msg)
    return time.process_time() - start


def batches(values: list[bytes]) -> list[list[SpoolRecord]]:
    records = [SpoolRecord(n, KIND_SIP, b"k", value) for n, value in enumerate(values, 1)]
    return [records[at : at + BATCH] for at in range(0, len(records), BATCH)]


def rows_all(sink: PostgresSink, record_batches: list[list[SpoolRecord]]) -> float:
    start = time.process_time()
    for batch in record_batches:
        sink._rows(STREAM_SIGNALING, batch)
    return time.process_time() - start


def publish_all(record_batches: list[list[SpoolRecord]]) -> float:
    start = time.process_time()
    for batch in record_batches:
        for record in batch:
            published(record.value)
    return time.process_time() - start


def former_and_now(
    pairs: list[Message], directory: Path, store_body: bool
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(former, now) seconds of the binary value alone and of the recorder into its
    own buffered spool, taken in turns over chunks of `CHUNK` messages, the first
    in each turn alternating: a busy machine slows both alike."""
    forms: dict[str, tuple[Spooler, Callable[..., Recorder]]] = {
        "former": (former_spooled, FormerRecorder),
        "now": (spooled, SignalingRecorder),
    }
    values = dict.fromkeys(forms, 0.0)
    records = dict.fromkeys(forms, 0.0)
    with (
        Spool(directory / "former", ("postgres",), buffered=True) as former_spool,
        Spool(directory / "now", ("postgres",), buffered=True) as now_spool,
    ):
        spools = {"former": former_spool, "now": now_spool}
        recorders = {
            name: make(spools[name], store_body=store_body) for name, (_, make) in forms.items()
        }
        for turn, at in enumerate(range(0, len(pairs), CHUNK)):
            chunk = pairs[at : at + CHUNK]
            for name in ("now", "former") if turn % 2 else ("former", "now"):
                spool_value = forms[name][0]
                start = time.process_time()
                for packet, msg in chunk:
                    spool_value(packet, msg, store_body)
                middle = time.process_time()
                record = recorders[name]
                for packet, msg in chunk:
                    record(packet, msg)
                records[name] += time.process_time() - middle
                values[name] += middle - start
        for name, spool in spools.items():
            start = time.process_time()
            spool.flush()
            records[name] += time.process_time() - start
    return (values["former"], values["now"]), (records["former"], records["now"])


def one_round(pairs: list[Message], store_body: bool) -> dict[str, tuple[float, float]]:
    """Per contender: (json seconds, binary seconds) for every message of `pairs`,
    or (former, now) for the binary value's two forms."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        capture = (
            record_all(JsonRecorder, pairs, directory / "json", store_body),
            record_all(SignalingRecorder, pairs, directory / "binary", store_body),
        )
        value_forms, recorder_forms = former_and_now(pairs, directory, store_body)
        with Spool(directory / "p", ("postgres",), buffered=True) as spool:
            with_parse = (
                parse_all(pairs, JsonRecorder(spool, store_body=store_body)),
                parse_all(pairs, SignalingRecorder(spool, store_body=store_body)),
            )
    json_values = [
        orjson.dumps(event_record(packet, msg, store_body=store_body)) for packet, msg in pairs
    ]
    binary_values = [spooled(packet, msg, store_body) for packet, msg in pairs]
    json_batches, binary_batches = batches(json_values), batches(binary_values)
    sink = PostgresSink("postgresql://benchmark/none")
    parsed = parse_all(pairs)
    return {
        "sip.parse alone": (parsed, parsed),
        "capture: signaling record": capture,
        "capture: parse + record": with_parse,
        "delivery: PostgreSQL rows": (
            rows_all(sink, json_batches),
            rows_all(sink, binary_batches),
        ),
        "delivery: Kafka values": (publish_all(json_batches), publish_all(binary_batches)),
        "delivery: row, before | now": rows_before_and_now(sink, binary_batches),
        "capture: value, former | now": value_forms,
        "capture: record, former | now": recorder_forms,
    }


def rows_before_and_now(
    sink: PostgresSink, record_batches: list[list[SpoolRecord]]
) -> tuple[float, float]:
    """`PostgresSink._rows` of the binary values with the row as it was built before
    (the whole value read back by `unspool`, the flagging rule called per row) and as
    it is now."""

    def before(value: bytes, _names: object) -> tuple[object, ...]:
        return sip_message_row_unspooled(value, sink._names)

    setattr(postgres, "sip_message_row", before)  # noqa: B010
    try:
        old = rows_all(sink, record_batches)
    finally:
        setattr(postgres, "sip_message_row", sip_message_row)  # noqa: B010
    return old, rows_all(sink, record_batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=30_000)
    parser.add_argument("--store-sdp", action="store_true", help="keep the bodies (SDP)")
    args = parser.parse_args()
    pairs = traffic(args.number)
    sizes = (
        statistics.mean(
            len(orjson.dumps(event_record(p, m, store_body=args.store_sdp))) for p, m in pairs
        ),
        statistics.mean(len(spooled(p, m, args.store_sdp)) for p, m in pairs),
    )
    per_message: dict[str, tuple[list[float], list[float], list[float]]] = {}
    for _ in range(args.rounds):
        for name, (json_s, binary_s) in one_round(pairs, args.store_sdp).items():
            json_us, binary_us, ratios = per_message.setdefault(name, ([], [], []))
            json_us.append(json_s / args.number * 1e6)
            binary_us.append(binary_s / args.number * 1e6)
            ratios.append(json_s / binary_s if binary_s else float("inf"))
    print(
        f"{args.number} messages (INVITE, 200 OK with SDP, BYE), SDP "
        f"{'kept' if args.store_sdp else 'dropped'}, median of {args.rounds} rounds"
        f" (load {os.getloadavg()[0]:.1f})"
    )
    print(f"spooled bytes per message: json {sizes[0]:.0f}, binary {sizes[1]:.0f}")
    print(f"{'µs per message':<30}{'json':>10}{'binary':>10}{'json/binary':>13}")
    print("(the last three lines: before | now, both binary, before/now)")
    for name, (json_us, binary_us, ratios) in per_message.items():
        ratio = statistics.median(ratios)
        shown = f"{ratio:>12.2f}x" if ratio != float("inf") else f"{'-':>13}"
        print(
            f"{name:<30}{statistics.median(json_us):>10.2f}"
            f"{statistics.median(binary_us):>10.2f}{shown}"
        )


if __name__ == "__main__":
    main()
