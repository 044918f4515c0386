"""The engine's CDR work in its former form, kept as it was: the enrich and rate stages
one after the other (a copy of the CDR each, every call priced afresh) and the record
built through a call per time and money field. The unit tests hold the present forms
to these byte for byte; `benchmarks/stages.py` times the two side by side.
"""

from __future__ import annotations

import time
from decimal import Decimal

from sipcdr.dialog.kpi import Kpi
from sipcdr.enrich import EnrichStage
from sipcdr.model import CDR_SCHEMA_VERSION, UNKNOWN_TRUNK, Cdr, _seconds, replace_cdr
from sipcdr.rating import RatePlans, RateStage, Rating, Unrated, margin
from sipcdr.rating.plans import _MAX_DIGITS, _UNRATED, INVALID_NUMBER, NO_PLAN
from sipcdr.rating.pricing import billed_seconds, cost
from sipcdr.sip.numbers import DEFAULT_PLAN, first_number, to_e164


def former_enrich(stage: EnrichStage, cdr: Cdr) -> Cdr:
    if cdr.egress_ip is not None:
        trunk = stage._trunk(cdr.src_ip)
        egress = stage._trunk(cdr.egress_ip)
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
    kpis = stage.stats.kpis
    kpi = kpis.get(cdr.trunk)
    if kpi is None:
        kpi = kpis[cdr.trunk] = Kpi()
    kpi.add(cdr)
    return cdr


def former_price(
    plans: RatePlans,
    plan: str | None,
    callee: str | None,
    start: float,
    billsec: float,
    answered: bool,
) -> Rating | Unrated:
    name = plan if plan is not None else plans.default_plan
    deck = plans.decks.get(name) if name is not None else None
    if deck is None or name is None:
        return _UNRATED[NO_PLAN]
    if callee is None or len(callee) > _MAX_DIGITS:
        return _UNRATED[INVALID_NUMBER]
    row = deck.index.lookup(callee, start)
    if row is None:
        return _UNRATED[deck.index.miss_reason(callee)]
    if not answered:
        return Rating(name, row, 0, Decimal(0).scaleb(-plans.decimals))
    billed = billed_seconds(billsec, row.min_seconds, row.increment_seconds)
    return Rating(name, row, billed, cost(row.rate, row.connect_fee, billed, plans.decimals))


def former_rate(stage: RateStage, cdr: Cdr, counts: dict[str, int] | None = None) -> Cdr:
    plans = stage.plans
    ingress = stage._trunks.get(cdr.trunk) if cdr.trunk is not None else None
    numbering = ingress.numbering if ingress is not None else DEFAULT_PLAN
    number = first_number((cdr.request_uri, cdr.to_uri), numbering)
    digits = number.value if number.valid else None
    answered = cdr.answer_time is not None
    plan = ingress.trunk.rate_plan if ingress is not None else None
    customer = former_price(plans, plan, digits, cdr.start_time, cdr.billsec, answered)
    label = cdr.trunk if cdr.trunk is not None else UNKNOWN_TRUNK
    if counts is not None:
        key = label if isinstance(customer, Rating) else f"{label}/{customer.reason}"
        counts[key] = counts.get(key, 0) + 1
    vendor_cost = None
    call_margin = None
    egress = stage._trunks.get(cdr.egress_trunk) if cdr.egress_trunk is not None else None
    if egress is not None:
        cost_plan = egress.trunk.cost_plan
        vendor = (
            former_price(plans, cost_plan, digits, cdr.start_time, cdr.billsec, answered)
            if cost_plan is not None
            else Unrated(NO_PLAN)
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


def former_rfc3339(timestamp: float | None) -> str | None:
    """With the cache of seconds the former form kept, so that timing it is fair."""
    if timestamp is None:
        return None
    micros = round(timestamp * 1_000_000)
    second, fraction = divmod(micros, 1_000_000)
    text = _seconds.get(second)
    if text is None:
        text = _seconds[second] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{text}.{fraction:06d}Z"


def former_money(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")


def former_record(c: Cdr) -> dict[str, object]:
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
        "start_time": former_rfc3339(c.start_time),
        "ring_time": former_rfc3339(c.ring_time),
        "answer_time": former_rfc3339(c.answer_time),
        "end_time": former_rfc3339(c.end_time),
        "duration": round(c.end_time - c.start_time, 3),
        "billsec": 0.0 if c.answer_time is None else round(max(0.0, c.end_time - c.answer_time), 3),
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
        "rate_per_minute": former_money(c.rate_per_minute),
        "billed_seconds": c.billed_seconds,
        "cost": former_money(c.cost),
        "currency": c.currency,
        "fraud_flags": list(c.fraud_flags),
        "capture_node": c.capture_node,
        "schema_version": CDR_SCHEMA_VERSION,
        "egress_trunk": c.egress_trunk,
        "vendor_cost": former_money(c.vendor_cost),
        "margin": former_money(c.margin),
        "callee_valid": c.callee_valid,
    }
