"""What each CDR costs after the correlator closes it, against parse + correlate of
its call, in one run: the enrich and rate stages (as the engine runs them, in one copy
of the CDR, and each alone), the CDR record and its JSON.

The traffic and the configuration are `benchmarks/fraud.py`'s (50 trunks with a
country code and a rate plan, 5 % of calls abroad, 7-message flows); the CDRs are
what a bare correlator closes from it. Each figure is the median of `--rounds`
rounds of processor time per CDR; the baseline, parse + correlate of the call's
seven messages, is timed in the same rounds, so a change in this shared machine's
speed falls on both. The copy every changing stage makes of the frozen record
(`replace_cdr`) is timed beside `dataclasses.replace`, which it replaced, on the
same record, and `rfc3339` beside a cache of the last second only, its former form.
The engine's enrich-and-rate stage is timed beside the former chain of the two stages,
each with a copy of its own and the rate stage pricing every call afresh (the former
code, kept here), and must give the same CDRs. The record and its JSON are made as the
spool's writer makes them, each dropped once written: kept, the rounds' thousands of
fresh allocations would be timed as page faults rather than as the work.

    python benchmarks/stages.py [--flows 3000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fraud import Traffic, _config, _Discard
from sipcdr.config import Config, load_config
from sipcdr.dialog import Correlator
from sipcdr.engine import Destinations, build_engine
from sipcdr.enrich import EnrichRateStage, EnrichStage
from sipcdr.model import (
    CDR_SCHEMA_VERSION,
    UNKNOWN_TRUNK,
    Cdr,
    Packet,
    _seconds,
    money_text,
    replace_cdr,
    rfc3339,
)
from sipcdr.rating import RatePlans, RateStage, Rating, Unrated, billed_seconds, cost, margin
from sipcdr.rating.plans import _MAX_DIGITS, _UNRATED, INVALID_NUMBER, NO_PLAN
from sipcdr.sip import parse
from sipcdr.sip.numbers import DEFAULT_PLAN, first_number, to_e164

_last_second: list[object] = [None, ""]


def _rfc3339_one_second(timestamp: float) -> str:
    """The former form: only the last second's text remembered."""
    micros = round(timestamp * 1_000_000)
    second, fraction = divmod(micros, 1_000_000)
    if second != _last_second[0]:
        _last_second[0] = second
        _last_second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_last_second[1]}.{fraction:06d}Z"


def _former_enrich(stage: EnrichStage, cdr: Cdr) -> Cdr:
    """The enrich stage before it shared its copy with the rate stage."""
    if cdr.egress_ip is not None:
        lookup = stage._trunk
        trunk = lookup(cdr.src_ip)
        egress = lookup(cdr.egress_ip)
        country_code = trunk.country_code if trunk else None
        national_prefix = trunk.national_prefix if trunk else None
        cdr = replace_cdr(
            cdr,
            caller=to_e164(cdr.caller, country_code, national_prefix),
            callee=to_e164(cdr.callee, country_code, national_prefix),
            trunk=trunk.name if trunk else None,
            egress_trunk=egress.name if egress else None,
            egress_ip=None,
        )
    stage.count(cdr, cdr.trunk)
    return cdr


def _former_price(
    plans: RatePlans,
    plan: str | None,
    callee: str | None,
    start_time: float,
    billsec: float,
    answered: bool,
) -> Rating | Unrated:
    """`RatePlans.rate` before it remembered prices."""
    name = plan if plan is not None else plans.default_plan
    deck = plans.decks.get(name) if name is not None else None
    if deck is None or name is None:
        return _UNRATED[NO_PLAN]
    if callee is None or len(callee) > _MAX_DIGITS:
        return _UNRATED[INVALID_NUMBER]
    row = deck.index.lookup(callee, start_time)
    if row is None:
        return _UNRATED[deck.index.miss_reason(callee)]
    if not answered:
        return Rating(name, row, 0, Decimal(0).scaleb(-plans.decimals))
    billed = billed_seconds(billsec, row.min_seconds, row.increment_seconds)
    return Rating(name, row, billed, cost(row.rate, row.connect_fee, billed, plans.decimals))


def _former_rate(stage: RateStage, cdr: Cdr) -> Cdr:
    """The rate stage before it shared its copy with the enrich stage (counts left out:
    a few dict updates, the same in both forms)."""
    plans = stage.plans
    ingress = stage._trunks.get(cdr.trunk) if cdr.trunk is not None else None
    numbering = ingress.numbering if ingress is not None else DEFAULT_PLAN
    number = first_number((cdr.request_uri, cdr.to_uri), numbering)
    digits = number.value if number.valid else None
    answered = cdr.answer_time is not None
    plan = ingress.trunk.rate_plan if ingress is not None else None
    customer = _former_price(plans, plan, digits, cdr.start_time, cdr.billsec, answered)
    _label = cdr.trunk if cdr.trunk is not None else UNKNOWN_TRUNK
    vendor_cost = None
    call_margin = None
    egress = stage._trunks.get(cdr.egress_trunk) if cdr.egress_trunk is not None else None
    if egress is not None and egress.trunk.cost_plan is not None:
        vendor = _former_price(
            plans, egress.trunk.cost_plan, digits, cdr.start_time, cdr.billsec, answered
        )
        if isinstance(vendor, Rating):
            vendor_cost = vendor.cost
            if isinstance(customer, Rating) and customer.rate.currency == vendor.rate.currency:
                call_margin = margin(customer.cost, vendor.cost)
    callee = digits if ingress is not None and digits is not None else cdr.callee
    return replace_cdr(
        cdr,
        **customer.cdr_fields(),
        callee=callee,
        callee_valid=number.valid,
        vendor_cost=vendor_cost,
        margin=call_margin,
    )


def _rfc3339_former(timestamp: float | None) -> str | None:
    """`rfc3339` before `to_record` wrote it out: the same cache of seconds."""
    if timestamp is None:
        return None
    micros = round(timestamp * 1_000_000)
    second, fraction = divmod(micros, 1_000_000)
    text = _seconds.get(second)
    if text is None:
        text = _seconds[second] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{text}.{fraction:06d}Z"


def _former_record(c: Cdr) -> dict[str, object]:
    """`Cdr.to_record` before it wrote out its helpers: a property or call per time,
    per money field and for duration and billsec."""
    return {
        "cdr_id": c.cdr_id,
        "call_id": c.call_id,
        "caller": c.caller,
        "callee": c.callee,
        "from_uri": c.from_uri,
        "to_uri": c.to_uri,
        "request_uri": c.request_uri,
        "src_ip": c.src_ip,
        "src_port": c.src_port,
        "dst_ip": c.dst_ip,
        "dst_port": c.dst_port,
        "trunk": c.trunk,
        "start_time": _rfc3339_former(c.start_time),
        "ring_time": _rfc3339_former(c.ring_time),
        "answer_time": _rfc3339_former(c.answer_time),
        "end_time": _rfc3339_former(c.end_time),
        "duration": c.duration,
        "billsec": c.billsec,
        "pdd_ms": c.pdd_ms,
        "disposition": c.disposition,
        "sip_code": c.sip_code,
        "sip_reason": c.sip_reason,
        "q850_cause": c.q850_cause,
        "hangup_by": c.hangup_by,
        "end_reason": c.end_reason,
        "user_agent": c.user_agent,
        "rated": c.rated,
        "rate_prefix": c.rate_prefix,
        "rate_name": c.rate_name,
        "rate_per_minute": money_text(c.rate_per_minute),
        "billed_seconds": c.billed_seconds,
        "cost": money_text(c.cost),
        "currency": c.currency,
        "fraud_flags": list(c.fraud_flags),
        "capture_node": c.capture_node,
        "schema_version": CDR_SCHEMA_VERSION,
        "egress_trunk": c.egress_trunk,
        "vendor_cost": money_text(c.vendor_cost),
        "margin": money_text(c.margin),
        "callee_valid": c.callee_valid,
    }


def _timed(step: Callable[[], object]) -> float:
    clock = time.process_time
    started = clock()
    step()
    return clock() - started


def _round(config: Config, packets: list[Packet], swap: bool) -> tuple[dict[str, float], int]:
    """Each step once over the traffic's CDRs, in order: its processor seconds."""
    engine = build_engine(config, Destinations(cdrs=(_Discard(),)))
    enrich, rate = engine.enrich, engine.rates.stage
    both = EnrichRateStage(enrich, rate)
    feed = Correlator(config.dialog, egress=bool(config.trunks)).feed
    closed: list[Cdr] = []
    enriched: list[Cdr] = []
    rated: list[Cdr] = []
    once: list[Cdr] = []
    former: list[Cdr] = []

    def records() -> None:
        for cdr in rated:
            cdr.to_record()

    def former_records() -> None:
        for cdr in rated:
            _former_record(cdr)

    def records_json() -> None:
        dumps = orjson.dumps
        for cdr in rated:
            dumps(cdr.to_record())

    def correlate() -> None:
        for packet in packets:
            closed.extend(feed(packet, parse(packet.payload)))

    def times(fmt: Callable[[float], str | None]) -> None:
        for cdr in rated:
            fmt(cdr.start_time), fmt(cdr.ring_time or 0.0)
            fmt(cdr.answer_time or 0.0), fmt(cdr.end_time)

    steps: dict[str, Callable[[], object]] = {
        BASELINE: correlate,
        NEW_BOTH: lambda: once.extend(map(both.on_cdr, closed)),
        OLD_BOTH: lambda: former.extend(
            _former_rate(rate, _former_enrich(enrich, c)) for c in closed
        ),
        "enrich stage alone": lambda: enriched.extend(map(enrich.on_cdr, closed)),
        "rate stage alone": lambda: rated.extend(map(rate.on_cdr, enriched)),
        NEW_RECORD: records,
        OLD_RECORD: former_records,
        "record + JSON (the writer's)": records_json,
        NEW_COPY: lambda: [replace_cdr(c, caller="1", egress_ip=None) for c in rated],
        OLD_COPY: lambda: [dataclasses.replace(c, caller="1", egress_ip=None) for c in rated],
        NEW_TIMES: lambda: times(rfc3339),
        OLD_TIMES: lambda: times(_rfc3339_one_second),
    }
    if swap:  # each pair of forms in the other order every other round
        for first, second in ((NEW_BOTH, OLD_BOTH), (NEW_RECORD, OLD_RECORD)):
            order = list(steps)
            i, j = order.index(first), order.index(second)
            order[i], order[j] = order[j], order[i]
            steps = {name: steps[name] for name in order}
    gc.collect()
    gc.disable()
    try:
        seconds = {name: _timed(step) for name, step in steps.items()}
    finally:
        gc.enable()
    if [c.to_record() for c in once] != [c.to_record() for c in former] or once != rated:
        sys.exit("the enrich-and-rate stage gave other CDRs than the former two stages")
    if [orjson.dumps(c.to_record()) for c in rated] != [
        orjson.dumps(_former_record(c)) for c in rated
    ]:
        sys.exit("to_record gave other bytes than its former form")
    return seconds, len(rated)


BASELINE = "parse + correlate (baseline)"
NEW_BOTH = "enrich+rate: one copy"
OLD_BOTH = "enrich, rate: former, 2 copies"
NEW_RECORD = "CDR record (to_record)"
OLD_RECORD = "CDR record: former form"
NEW_COPY = "copy: replace_cdr"
OLD_COPY = "copy: dataclasses.replace"
NEW_TIMES = "4 times: rfc3339"
OLD_TIMES = "4 times: last second only"


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--flows", type=int, default=3000)
    args.add_argument("--rounds", type=int, default=7)
    opts = args.parse_args(argv)
    packets = [packet for packet, _trunk in Traffic(opts.flows).items]
    figures: dict[str, list[float]] = {}
    count = 0
    # The config names its rate deck by a path in this folder, read when each round's
    # engine is built: the folder lives as long as the rounds do.
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(_config(Path(folder), False), {})
        for index in range(opts.rounds):
            seconds, count = _round(config, packets, swap=index % 2 == 1)
            for name, value in seconds.items():
                figures.setdefault(name, []).append(value)
    base = statistics.median(figures[BASELINE])
    print(
        f"median of {opts.rounds} rounds, {count:,} CDRs ({len(packets):,} messages),"
        " processor time per CDR; the machine may be shared, the ratios are same-run"
        f" (load {os.getloadavg()[0]:.1f})"
    )
    for name, seconds_of in figures.items():
        median = statistics.median(seconds_of)
        print(f"  {name:32} {median / count * 1e6:8.2f} us   {median / base:6.1%} of baseline")
    ratio = statistics.median(figures[NEW_BOTH]) / statistics.median(figures[OLD_BOTH])
    print(f"enrich and rate cost {ratio:.0%} of their former form")
    ratio = statistics.median(figures[NEW_RECORD]) / statistics.median(figures[OLD_RECORD])
    print(f"to_record costs {ratio:.0%} of its former form")
    ratio = statistics.median(figures[NEW_COPY]) / statistics.median(figures[OLD_COPY])
    print(f"replace_cdr costs {ratio:.0%} of dataclasses.replace")
    ratio = statistics.median(figures[NEW_TIMES]) / statistics.median(figures[OLD_TIMES])
    print(f"rfc3339 costs {ratio:.0%} of its one-second form")
    return 0


if __name__ == "__main__":
    sys.exit(main())
