"""The exporter: every count a component keeps reaches a metric, a scrape changes no
count, and the per-trunk KPIs come out as counters and cumulative histograms."""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sipcdr.capture.hepstream import HepStreamServer, StreamLimits
from sipcdr.capture.listeners import AllowList, HepGate, ListenerStats
from sipcdr.capture.live import LiveStats
from sipcdr.capture.mirror import VxlanUdpProtocol
from sipcdr.config import DEFAULT_ALLOW
from sipcdr.decode.extract import CaptureStats
from sipcdr.delivery import LoopState
from sipcdr.dialog import Correlator
from sipcdr.dialog.correlator import CorrelatorStats
from sipcdr.dialog.kpi import DURATION_BUCKETS_S, PDD_BUCKETS_S, Kpi
from sipcdr.dialogstore import DialogStoreStats
from sipcdr.enrich import EnrichStats
from sipcdr.fraud.incidents import FraudStats
from sipcdr.fraud.stage import FraudStageStats
from sipcdr.model import UNKNOWN_TRUNK
from sipcdr.pipeline import Pipeline, PipelineStats
from sipcdr.privacy.stats import PrivacyStats
from sipcdr.rating.stage import RatingStats
from sipcdr.spool import Spool
from sipcdr.telemetry.families import FAMILIES
from sipcdr.telemetry.metrics import Metrics, Sources

# Counts no metric carries, and why.
NOT_EXPORTED = {
    # Every message fed to the correlator is in sipcdr_sip_messages_total already.
    (CorrelatorStats, "messages"),
    # The CDRs handed to the spool: the sum of sipcdr_cdrs_total.
    (PipelineStats, "cdrs_emitted"),
    # pcapng packet blocks a capture file could not read: never set live, and named in
    # the import's warning for the file.
    (CaptureStats, "unknown_interface"),
    (CaptureStats, "unsupported_link"),
    (CaptureStats, "bad_time"),
}
# Fields of the stats objects that are not counts.
NOT_COUNTS = {
    (LiveStats, "capture"),
    (CaptureStats, "decap"),
    (CaptureStats, "tcp"),
    (CaptureStats, "truncated_file"),  # a capture file's flag, never set live
    (CaptureStats, "truncated_at"),  # and where in the file: an offset
    (LoopState, "sink"),
    (LoopState, "stream"),
    (LoopState, "set_aside"),
    (LoopState, "up"),
    (LoopState, "down_since"),
    (LoopState, "last_error"),
    (LoopState, "tried"),  # a flag: a first delivery was tried (for /readyz)
    (FraudStats, "inactive"),  # detector -> why it cannot run: logged at start
}


class Filler:
    """Gives every count of a stats object a value of its own, to find it again among
    the exported samples."""

    def __init__(self) -> None:
        self._next = itertools.count(10_001)
        self.expected: dict[str, int] = {}  # "Class.field" -> value

    def fill(self, stats: object, prefix: str = "") -> None:
        cls = type(stats)
        for name in _fields(stats):
            if (cls, name) in NOT_COUNTS or (cls, name) in NOT_EXPORTED:
                continue
            value = next(self._next)
            current = getattr(stats, name)
            if isinstance(current, dict):
                current.clear()
                current[_key(cls, name)] = value
            else:
                assert isinstance(current, int | float), (cls, name)
                setattr(stats, name, value)
            self.expected[f"{prefix}{cls.__name__}.{name}"] = value


def _fields(stats: object) -> list[str]:
    """The attributes of a stats object: a compiled class names them in
    __mypyc_attrs__, an interpreted one in __slots__ or its dataclass fields."""
    if dataclasses.is_dataclass(stats):
        return [field.name for field in dataclasses.fields(stats)]
    compiled = getattr(type(stats), "__mypyc_attrs__", None)
    if compiled is not None:
        return [name for name in compiled if not name.startswith("_")]
    slots: list[str] = []
    for cls in type(stats).__mro__:
        slots.extend(getattr(cls, "__slots__", ()))
    assert slots, type(stats)
    return slots


def _key(cls: type, name: str) -> object:
    """A key of the shape each dict of counts has."""
    pairs: dict[tuple[type, str], object] = {
        (PipelineStats, "messages"): ("INVITE", "request"),
        (ListenerStats, "dropped"): ("sip_udp", "not_allowed"),
        (RatingStats, "unrated"): ("carrier-a", "no_prefix"),
        (RatingStats, "vendor_unrated"): ("carrier-b", "no_plan"),
        (CorrelatorStats, "non_call_responses"): ("OPTIONS", "2xx"),
        (FraudStats, "alerts"): ("scanner", "warning"),
    }
    return pairs.get((cls, name), "some_key")


def _samples(metrics: Metrics) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in metrics.registry.collect()
        for sample in family.samples
    ]


def _sources(tmp_path: Path, filler: Filler) -> Sources:
    pipeline = Pipeline(Correlator(), ())
    filler.fill(pipeline.stats)
    correlator = pipeline.correlator
    filler.fill(correlator.stats)
    listeners = ListenerStats()
    filler.fill(listeners)
    gate = HepGate({1: "key"})
    gate.rejected["1"] = next(filler._next)
    filler.expected["HepGate.rejected"] = gate.rejected["1"]
    stream = HepStreamServer(
        pipeline, AllowList(DEFAULT_ALLOW), gate, StreamLimits(1, 1, 1.0, 1.0, 1024)
    )
    for name in ("refused", "closed", "handshake_failures"):
        key: Any = ("hep_tcp", "some_reason") if name != "handshake_failures" else "eof"
        value = next(filler._next)
        getattr(stream, name)[key] = value
        filler.expected[f"HepStreamServer.{name}"] = value
    capture = CaptureStats()
    live = LiveStats(capture)
    for stats in (live, capture, capture.decap, capture.tcp):
        filler.fill(stats)
    capturer = SimpleNamespace(interface="eth1", stats=live)
    mirror = VxlanUdpProtocol(pipeline, AllowList(DEFAULT_ALLOW), listeners)
    vni = mirror.extractor(7)
    assert vni is not None
    for stats in (vni.stats, vni.stats.decap, vni.stats.tcp):
        filler.fill(stats, "vxlan:")
    spool = Spool(tmp_path / "records", ("jsonl",))
    spool.open()
    filler.fill(spool.stats)
    state = LoopState("jsonl", "records")
    filler.fill(state)
    reader = SimpleNamespace(
        lag_records=3,
        cursor_write_failures=next(filler._next),
        corrupt_records=next(filler._next),
    )
    filler.expected["SpoolReader.cursor_write_failures"] = reader.cursor_write_failures
    filler.expected["SpoolReader.corrupt_records"] = reader.corrupt_records
    fraud_stats = FraudStageStats()
    filler.fill(fraud_stats)
    monitor_stats = FraudStats()
    filler.fill(monitor_stats)
    fraud = SimpleNamespace(stats=fraud_stats, monitor=SimpleNamespace(stats=monitor_stats))
    jsonl = SimpleNamespace(rotation_failures=next(filler._next))
    filler.expected["JsonlSink.rotation_failures"] = jsonl.rotation_failures
    postgres = SimpleNamespace(
        rows_inserted={"cdrs": next(filler._next)}, duplicates_skipped={"cdrs": next(filler._next)}
    )
    filler.expected["PostgresSink.rows_inserted"] = postgres.rows_inserted["cdrs"]
    filler.expected["PostgresSink.duplicates_skipped"] = postgres.duplicates_skipped["cdrs"]
    outputs = SimpleNamespace(
        spools={"records": spool},
        delivery=SimpleNamespace(readers=lambda: [(state, reader)]),
        sinks=[jsonl, postgres],
        held_for_restrictions=False,
    )
    dialog_stats = DialogStoreStats()
    filler.fill(dialog_stats)
    dialogs = SimpleNamespace(
        stats=dialog_stats, journal_bytes=4096, intact=False, held=lambda: [object()] * 2
    )
    spare = SimpleNamespace(bytes_held=1 << 20, releases=next(filler._next))
    filler.expected["SpareSpace.releases"] = spare.releases
    server = SimpleNamespace(refused=next(filler._next))
    filler.expected["MetricsServer.refused"] = server.refused
    rating = RatingStats()
    filler.fill(rating)
    privacy = PrivacyStats()
    filler.fill(privacy)
    outbound = SimpleNamespace(withheld={"cdr": next(filler._next)})
    filler.expected["OutboundFilter.withheld"] = outbound.withheld["cdr"]
    return Sources(
        pipeline=pipeline,
        correlator=correlator,
        listeners=listeners,
        gate=gate,
        hep_stream=stream,
        live=[capturer],  # type: ignore[list-item]
        vxlan=[mirror],
        outputs=outputs,  # type: ignore[arg-type]
        dialogs=dialogs,  # type: ignore[arg-type]
        spare=spare,  # type: ignore[arg-type]
        metrics_server=server,  # type: ignore[arg-type]
        rating=rating,
        privacy=privacy,
        outbound=outbound,  # type: ignore[arg-type]
        fraud=fraud,  # type: ignore[arg-type]
    )


def test_every_count_a_component_keeps_reaches_a_metric(tmp_path: Path) -> None:
    filler = Filler()
    sources = _sources(tmp_path, filler)
    metrics = Metrics(lambda: sources)
    exported = {value for _name, _labels, value in _samples(metrics)}
    missing = {field: value for field, value in filler.expected.items() if value not in exported}
    assert len(filler.expected) > 100
    assert missing == {}


def test_a_scrape_changes_no_count_and_two_scrapes_agree(tmp_path: Path) -> None:
    filler = Filler()
    sources = _sources(tmp_path, filler)
    assert sources.pipeline is not None and sources.listeners is not None
    before = (dict(sources.listeners.received), dict(sources.pipeline.stats.parse_errors))
    metrics = Metrics(lambda: sources)
    first, second = _samples(metrics), _samples(metrics)
    assert first == second
    after = (dict(sources.listeners.received), dict(sources.pipeline.stats.parse_errors))
    assert before == after


def test_every_family_is_exported_even_with_nothing_to_read() -> None:
    names = {family.name for family in Metrics().registry.collect()}
    assert names == set(FAMILIES)


def test_kpis_are_counters_and_cumulative_histograms_per_trunk() -> None:
    enrich = EnrichStats()
    kpi = Kpi()
    kpi.attempts, kpi.answered, kpi.network_effective, kpi.failed = 10, 4, 7, 2
    for pdd in (0.4, 0.4, 2.5, 40.0):
        kpi.pdd.observe(pdd)
    for duration in (12.0, 600.0):
        kpi.duration.observe(duration)
    enrich.kpis["carrier-a"] = kpi
    metrics = Metrics(lambda: Sources(enrich=enrich, trunks=["carrier-a", "carrier-b"]))
    value = metrics.registry.get_sample_value
    assert value("sipcdr_call_attempts_total", {"trunk": "carrier-a"}) == 10
    assert value("sipcdr_calls_answered_total", {"trunk": "carrier-a"}) == 4
    assert value("sipcdr_calls_network_effective_total", {"trunk": "carrier-a"}) == 7
    assert value("sipcdr_calls_failed_total", {"trunk": "carrier-a"}) == 2
    # A configured trunk with no call yet, and the calls of no trunk, exist at 0.
    for trunk in ("carrier-b", UNKNOWN_TRUNK):
        assert value("sipcdr_call_attempts_total", {"trunk": trunk}) == 0
        assert value("sipcdr_call_pdd_seconds_count", {"trunk": trunk}) == 0
    buckets = {
        float(bound): value("sipcdr_call_pdd_seconds_bucket", {"trunk": "carrier-a", "le": le})
        for bound, le in [(b, repr(b)) for b in PDD_BUCKETS_S] + [(float("inf"), "+Inf")]
    }
    assert buckets[0.25] == 0
    assert buckets[0.5] == 2
    assert buckets[3.0] == 3
    assert buckets[30.0] == 3
    assert buckets[float("inf")] == 4
    assert value("sipcdr_call_pdd_seconds_sum", {"trunk": "carrier-a"}) == 43.3
    assert value("sipcdr_call_duration_seconds_count", {"trunk": "carrier-a"}) == 2
    le_15 = repr(DURATION_BUCKETS_S[1])
    assert value("sipcdr_call_duration_seconds_bucket", {"trunk": "carrier-a", "le": le_15}) == 1


def test_help_texts_list_the_reasons_the_code_produces() -> None:
    """The reasons in parentheses of the families whose reasons come from one place
    in the code match that place."""
    from sipcdr.dialog import state

    def listed(name: str) -> set[str]:
        *_, last = re.findall(r"\(([^)]*)\)", FAMILIES[name].help)
        return {part.split(":")[0].strip() for part in last.split(",")}

    assert listed("sipcdr_calls_failed") == {state.FAILED, state.TIMEOUT}
    from sipcdr.dialog.kpi import NETWORK_EFFECTIVE

    assert listed("sipcdr_calls_network_effective") == set(NETWORK_EFFECTIVE)
    assert listed("sipcdr_calls_refused") == {"spool_full", "write_error"}
