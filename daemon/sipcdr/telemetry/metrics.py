"""The one way sipcdr's counts become Prometheus metrics.

Each component keeps its running totals in a stats object of its own: plain ints and
dicts of ints that only grow, bumped in place (the hot path makes no metric call).
`StatsCollector` reads them when Prometheus scrapes, and writes none of them: no
component's counter is cleared, taken or moved by another. What a family means is in
`families`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from sipcdr.dialog.kpi import Histogram, Kpi
from sipcdr.enrich import EnrichStats
from sipcdr.hotpath import hot_path
from sipcdr.model import UNKNOWN_TRUNK
from sipcdr.sip.parser import KNOWN_METHODS
from sipcdr.telemetry.families import FAMILIES

if TYPE_CHECKING:
    import socket

    from sipcdr.capture.hepstream import HepStreamServer
    from sipcdr.capture.listeners import HepGate, ListenerStats
    from sipcdr.capture.live import LiveCapture
    from sipcdr.capture.mirror import VxlanUdpProtocol
    from sipcdr.decode.extract import CaptureStats
    from sipcdr.dialog import Correlator
    from sipcdr.dialogstore import DialogStore
    from sipcdr.fraud.stage import FraudStage
    from sipcdr.pipeline import Pipeline
    from sipcdr.privacy.outbound import OutboundFilter
    from sipcdr.privacy.stats import PrivacyStats
    from sipcdr.rating.stage import RatingStats
    from sipcdr.sinks.outputs import Outputs
    from sipcdr.spare import SpareSpace
    from sipcdr.telemetry.http import MetricsServer

_TCP_BYTES = {"gap_bytes": "gap", "skipped_bytes": "resync"}
_LIVE_DROPS = (
    ("kernel_drops", "kernel_drop"),
    ("pending_dropped", "backlog_full"),
    ("callback_errors", "callback_error"),
)
_LIVE_EVENTS = ("frames_read", "kernel_packets", "truncated", "outgoing_skipped", "frame_errors")
_POSTGRES_ROWS = (("inserted", "rows_inserted"), ("duplicate", "duplicates_skipped"))
_CAPTURE_EVENTS = ("sip_messages", "hep_packets", "hep_non_sip", "non_sip_payloads", "keepalives")


def method_label(method: str) -> str:
    """Methods are attacker-controlled text: only the known ones become label values."""
    return method if method in KNOWN_METHODS else "other"


@dataclass
class Sources:
    """What the exporter reads; each part is optional (an import has no listeners, a
    test may have only a spool)."""

    pipeline: Pipeline | None = None
    correlator: Correlator | None = None
    enrich: EnrichStats | None = None  # the per-trunk KPIs
    trunks: Sequence[str] = ()  # the configured trunk names: their series exist at 0
    listeners: ListenerStats | None = None
    gate: HepGate | None = None
    hep_stream: HepStreamServer | None = None
    live: Sequence[LiveCapture] = ()
    vxlan: Sequence[VxlanUdpProtocol] = ()
    rating: RatingStats | None = None
    fraud: FraudStage | None = None
    privacy: PrivacyStats | None = None
    outbound: OutboundFilter | None = None
    udp: Sequence[tuple[str, socket.socket]] = ()  # (listener kind, socket)
    udp_drops: Callable[[socket.socket], int | None] | None = None
    outputs: Outputs | None = None
    dialogs: DialogStore | None = None
    spare: SpareSpace | None = None
    metrics_server: MetricsServer | None = None
    delivery_process: Restarting | None = None  # delivery apart (sipcdr.deliverer)


class Restarting(Protocol):
    restarts: int


class _Scrape:
    """One scrape's families, filled from the sources, summing equal label sets."""

    def __init__(self) -> None:
        self.values: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in FAMILIES}
        self.histograms: dict[str, list[tuple[tuple[str, ...], Histogram]]] = {}

    def add(self, name: str, value: float, *labels: str) -> None:
        series = self.values[name]
        series[labels] = series.get(labels, 0) + value

    def set(self, name: str, value: float, *labels: str) -> None:
        self.values[name][labels] = value

    def counts(self, name: str, counts: Mapping[Any, int], *prefix: str) -> None:
        for key, value in dict(counts).items():
            labels = key if isinstance(key, tuple) else (key,)
            self.add(name, value, *prefix, *labels)

    def histogram(self, name: str, histogram: Histogram, *labels: str) -> None:
        self.histograms.setdefault(name, []).append((labels, histogram))

    def families(self) -> Iterator[Metric]:
        for name, spec in FAMILIES.items():
            family: Any = spec.make()
            if isinstance(family, HistogramMetricFamily):
                for labels, histogram in self.histograms.get(name, ()):
                    family.add_metric(list(labels), _buckets(histogram), histogram.total)
            else:
                for labels, value in self.values[name].items():
                    family.add_metric(list(labels), value)
            yield family


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip((*histogram.bounds, float("inf")), histogram.counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    return buckets


class StatsCollector(Collector):
    """Turns the components' stats into metric families at each scrape."""

    def __init__(self, sources: Callable[[], Sources]) -> None:
        self._sources = sources

    def collect(self) -> Iterable[Metric]:
        scrape = _Scrape()
        scrape.set("sipcdr_build_info", 1, hot_path()[0])
        sources = self._sources()
        for read in (
            _capture,
            _live,
            _pipeline,
            _correlator,
            _kpis,
            _outputs,
            _dialogs,
            _rating,
            _fraud,
            _privacy,
            _process,
        ):
            read(scrape, sources)
        return list(scrape.families())


class Metrics:
    """The registry the metrics endpoint serves, with the collector in it."""

    def __init__(
        self,
        sources: Callable[[], Sources] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.collector = StatsCollector(sources or Sources)
        self.registry.register(self.collector)


# -- readers, one per component ---------------------------------------------------------


def _capture(scrape: _Scrape, sources: Sources) -> None:
    listeners = sources.listeners
    if listeners is not None:
        scrape.counts("sipcdr_packets_received", listeners.received)
        scrape.counts("sipcdr_packets_dropped", listeners.dropped)
        scrape.add("sipcdr_hep_timestamp_replaced", listeners.timestamps_replaced, "listener")
    if sources.udp_drops is not None:
        for kind, sock in sources.udp:
            overflows = sources.udp_drops(sock)
            if overflows is not None:
                scrape.add("sipcdr_packets_dropped", overflows, kind, "rcvbuf_overflow")
    for mirror in sources.vxlan:
        for reason, count in mirror.decoded_drops().items():
            scrape.add("sipcdr_packets_dropped", count, mirror.SOURCE, reason)
    if sources.gate is not None:
        scrape.counts("sipcdr_hep_rejected", sources.gate.rejected)
    stream = sources.hep_stream
    if stream is not None:
        scrape.counts("sipcdr_hep_connections_refused", stream.refused)
        scrape.counts("sipcdr_hep_connections_closed", stream.closed)
        scrape.counts("sipcdr_hep_tls_handshake_failures", stream.handshake_failures)
        for source, count in dict(stream.open).items():
            scrape.set("sipcdr_hep_connections", count, source)


def _live(scrape: _Scrape, sources: Sources) -> None:
    for capturer in sources.live:
        interface = capturer.interface
        stats = capturer.stats
        scrape.add("sipcdr_packets_received", stats.sip_packets, "live")
        for attribute, reason in _LIVE_DROPS:
            scrape.add("sipcdr_packets_dropped", getattr(stats, attribute), "live", reason)
        for event in _LIVE_EVENTS:
            scrape.add("sipcdr_live_capture_events", getattr(stats, event), interface, event)
        _decoder(scrape, stats.capture, "live", interface)
        scrape.add("sipcdr_hep_timestamp_replaced", stats.capture.hep_clock_skew, "live")
    for mirror in sources.vxlan:
        for capture in mirror.decoder_stats():
            # Summed over listeners and VNIs: a VNI is sender-chosen, not a label.
            _decoder(scrape, capture, "vxlan")
            scrape.add("sipcdr_hep_timestamp_replaced", capture.hep_clock_skew, "vxlan")


def _decoder(scrape: _Scrape, capture: CaptureStats, family: str, *labels: str) -> None:
    """A decoder's counts into the sipcdr_<family>_* families."""
    for event in _CAPTURE_EVENTS:
        scrape.add(f"sipcdr_{family}_capture_events", getattr(capture, event), *labels, event)
    scrape.counts(f"sipcdr_{family}_hep_errors", capture.hep_errors, *labels)
    for event, value in capture.decap.as_dict().items():
        scrape.add(f"sipcdr_{family}_decap_events", value, *labels, event)
    for event, value in capture.tcp.as_dict().items():
        why = _TCP_BYTES.get(event)
        if why is None:
            scrape.add(f"sipcdr_{family}_tcp_events", value, *labels, event)
        else:
            scrape.add(f"sipcdr_{family}_tcp_skipped_bytes", value, *labels, why)


def _pipeline(scrape: _Scrape, sources: Sources) -> None:
    pipeline = sources.pipeline
    if pipeline is None:
        return
    stats = pipeline.stats
    scrape.counts("sipcdr_sip_parse_errors", stats.parse_errors)
    for (method, kind), count in dict(stats.messages).items():
        scrape.add("sipcdr_sip_messages", count, method_label(method), kind)
    scrape.counts("sipcdr_calls_refused", stats.calls_refused)
    scrape.counts("sipcdr_internal_errors", stats.internal_errors)
    scrape.counts("sipcdr_cdr_write_failures", stats.cdr_write_failures)
    scrape.set("sipcdr_intake_paused", 1 if pipeline.intake.paused else 0)


def _correlator(scrape: _Scrape, sources: Sources) -> None:
    correlator = sources.correlator
    if correlator is None:
        return
    stats = correlator.stats
    for event, value in (
        ("retransmission", stats.retransmissions),
        ("late", stats.late),
        ("orphan", stats.orphans),
        ("unusable", stats.unusable),
        ("evicted", stats.evicted),
        ("restored", stats.dialogs_restored),
        ("conflicting_from_tag", stats.conflicting_from_tag),
    ):
        scrape.add("sipcdr_dialog_events", value, event)
    scrape.counts("sipcdr_sip_non_call_requests", stats.non_call_requests)
    scrape.counts("sipcdr_sip_non_call_responses", stats.non_call_responses)
    scrape.counts("sipcdr_cdrs", stats.cdrs)
    scrape.set("sipcdr_open_dialogs", correlator.open_dialogs)


def _kpis(scrape: _Scrape, sources: Sources) -> None:
    """Counted by the enrich stage, which knows each CDR's trunk."""
    if sources.enrich is None and sources.correlator is None:
        return
    kpis: dict[str | None, Kpi] = {} if sources.enrich is None else dict(sources.enrich.kpis)
    # Every configured trunk has its series from the start: an alert on a rate needs
    # a series to compare, and a trunk that never answered is what it should catch.
    for name in (*sources.trunks, None):
        if name not in kpis:
            kpis[name] = Kpi()
    for trunk, kpi in kpis.items():
        label = UNKNOWN_TRUNK if trunk is None else trunk
        scrape.add("sipcdr_call_attempts", kpi.attempts, label)
        scrape.add("sipcdr_calls_answered", kpi.answered, label)
        scrape.add("sipcdr_calls_network_effective", kpi.network_effective, label)
        scrape.add("sipcdr_calls_failed", kpi.failed, label)
        scrape.histogram("sipcdr_call_pdd_seconds", kpi.pdd, label)
        scrape.histogram("sipcdr_call_duration_seconds", kpi.duration, label)


def _outputs(scrape: _Scrape, sources: Sources) -> None:
    outputs = sources.outputs
    if outputs is None:
        return
    for stream, spool in dict(outputs.spools).items():
        stats = spool.stats
        scrape.set("sipcdr_spool_bytes", spool.size_bytes, stream)
        scrape.set("sipcdr_spool_full", 1 if spool.full else 0, stream)
        scrape.set("sipcdr_spool_reserve_records", spool.reserved, stream)
        scrape.add("sipcdr_spool_reserve_held", stats.held, stream)
        scrape.counts("sipcdr_spool_records", stats.appended, stream)
        scrape.counts("sipcdr_spool_dropped", stats.dropped, stream)
        scrape.add("sipcdr_spool_io_errors", stats.rotation_failures, stream, "rotate")
        scrape.add("sipcdr_spool_io_errors", stats.sync_failures, stream, "sync")
        scrape.add("sipcdr_spool_damaged", stats.torn_tails, stream, "torn_tail")
        scrape.add("sipcdr_spool_torn_bytes", stats.torn_tail_bytes, stream)
    remote = getattr(outputs, "remote", None)  # an import's outputs have none
    if remote is not None:
        # Delivery apart: its counts as it last sent them; the lag against this
        # process's spools, which hold the newest records.
        for loop in remote.loops:
            state, labels = loop.state, (loop.state.sink, loop.state.stream)
            writer = outputs.spools.get(state.stream)
            lag = 0 if writer is None else max(writer.next_seq - loop.confirmed_seq, 0)
            scrape.set("sipcdr_sink_lag_records", lag, *labels)
            scrape.set("sipcdr_sink_up", 1 if state.up else 0, *labels)
            scrape.add("sipcdr_sink_records", state.delivered, *labels)
            scrape.add("sipcdr_sink_failures", state.failures, *labels)
            scrape.add("sipcdr_sink_rejected", state.rejected, *labels)
            scrape.add("sipcdr_spool_cursor_write_failures", loop.cursor_write_failures, *labels)
            scrape.add("sipcdr_spool_corrupt_records", loop.corrupt_records, *labels)
        if remote.jsonl_rotation_failures is not None:
            scrape.add("sipcdr_jsonl_rotation_failures", remote.jsonl_rotation_failures)
        for outcome, rows in remote.postgres_rows.items():
            for table, total in rows.items():
                scrape.add("sipcdr_postgres_rows", total, table, outcome)
    if outputs.delivery is not None:
        for state, reader in outputs.delivery.readers():
            labels = (state.sink, state.stream)
            scrape.set("sipcdr_sink_lag_records", reader.lag_records, *labels)
            scrape.set("sipcdr_sink_up", 1 if state.up else 0, *labels)
            scrape.add("sipcdr_sink_records", state.delivered, *labels)
            scrape.add("sipcdr_sink_failures", state.failures, *labels)
            scrape.add("sipcdr_sink_rejected", state.rejected, *labels)
            scrape.add("sipcdr_spool_cursor_write_failures", reader.cursor_write_failures, *labels)
            scrape.add("sipcdr_spool_corrupt_records", reader.corrupt_records, *labels)
    for sink in outputs.sinks:
        failures = getattr(sink, "rotation_failures", None)
        if failures is not None:
            scrape.add("sipcdr_jsonl_rotation_failures", failures)
        for outcome, attribute in (
            ("inserted", "rows_inserted"),
            ("duplicate", "duplicates_skipped"),
        ):
            for table, total in dict(getattr(sink, attribute, None) or {}).items():
                scrape.add("sipcdr_postgres_rows", total, table, outcome)


def _dialogs(scrape: _Scrape, sources: Sources) -> None:
    dialogs = sources.dialogs
    if dialogs is None:
        return
    stats = dialogs.stats
    scrape.set("sipcdr_dialog_journal_bytes", dialogs.journal_bytes)
    # While the files on disk rebuild the state, the checkpoint or the journal carries
    # every held CDR; once a journal write failed, none of them is sure to be.
    scrape.set("sipcdr_cdrs_at_risk", 0 if dialogs.intact else len(dialogs.held()))
    scrape.add("sipcdr_dialog_journal_replayed_records", stats.replayed_records)
    scrape.add("sipcdr_dialog_journal_torn_bytes", stats.torn_bytes)
    for kind, value in (
        ("message", stats.journal_messages),
        ("close", stats.journal_closes),
        ("decision", stats.journal_decisions),
    ):
        scrape.add("sipcdr_dialog_journal_records", value, kind)
    scrape.add("sipcdr_dialog_checkpoints", stats.checkpoints, "written")
    scrape.add("sipcdr_dialog_checkpoints", stats.checkpoint_failures, "failed")
    for what, value in (
        ("journal_write_error", stats.journal_write_errors),
        ("torn_tail", stats.torn_tails),
        ("bad_record", stats.bad_records),
        ("unreadable_checkpoint", stats.unreadable_checkpoints),
        ("unreadable_journal", stats.unreadable_journals),
        ("internal_error", stats.internal_errors),
    ):
        scrape.add("sipcdr_dialog_state_errors", value, what)


def _rating(scrape: _Scrape, sources: Sources) -> None:
    stats = sources.rating
    if stats is None:
        return
    scrape.counts("sipcdr_cdrs_rated", stats.rated)
    scrape.counts("sipcdr_cdrs_unrated", stats.unrated)
    scrape.counts("sipcdr_cdrs_vendor_rated", stats.vendor_rated)
    scrape.counts("sipcdr_cdrs_vendor_unrated", stats.vendor_unrated)
    scrape.counts("sipcdr_cdrs_margin_unknown", stats.currency_mismatches)
    for plan, count in dict(stats.deck_loads).items():
        scrape.add("sipcdr_rate_deck_loads", count, plan, "loaded")
    for plan, count in dict(stats.deck_refusals).items():
        scrape.add("sipcdr_rate_deck_loads", count, plan, "refused")
    for plan, rows in dict(stats.deck_rows).items():
        scrape.set("sipcdr_rate_deck_rows", rows, plan)


def _fraud(scrape: _Scrape, sources: Sources) -> None:
    stage = sources.fraud
    if stage is None:
        return
    stats = stage.monitor.stats
    scrape.counts("sipcdr_fraud_alerts", stats.alerts)
    scrape.counts("sipcdr_fraud_alerts_suppressed", stats.suppressed)
    scrape.counts("sipcdr_fraud_subjects_evicted", stats.evicted)
    scrape.add("sipcdr_fraud_alert_updates", stats.updates)
    scrape.add("sipcdr_fraud_calls_evicted", stats.calls_evicted)
    scrape.add("sipcdr_fraud_incidents_evicted", stats.incidents_evicted)
    for detector, held in dict(stats.tracked).items():
        scrape.set("sipcdr_fraud_subjects_tracked", held, detector)
    scrape.counts("sipcdr_fraud_errors", stage.stats.errors)
    scrape.add("sipcdr_fraud_alerts_written", stage.stats.alerts_written, "written")
    scrape.add("sipcdr_fraud_alerts_written", stage.stats.alerts_refused, "refused")


def _privacy(scrape: _Scrape, sources: Sources) -> None:
    stats = sources.privacy
    if stats is not None:
        for table, age in stats.oldest_partition_age_days.items():
            scrape.set("sipcdr_retention_oldest_partition_age_days", age, table)
        scrape.counts("sipcdr_retention_bytes_dropped", stats.bytes_dropped)
        scrape.counts("sipcdr_retention_partitions_dropped", stats.partitions_dropped)
        scrape.counts("sipcdr_retention_rows_held", stats.rows_held)
        scrape.counts("sipcdr_retention_runs", stats.runs)
        scrape.set("sipcdr_retention_last_success_timestamp_seconds", stats.last_success)
        scrape.set("sipcdr_restricted_subjects", stats.restricted_subjects)
        scrape.set("sipcdr_restrictions_not_saved", stats.restrictions_unsaved)
    if sources.outbound is not None:
        scrape.counts("sipcdr_kafka_records_withheld", sources.outbound.withheld)
    if sources.outputs is not None:
        waiting = sources.outputs.held_for_restrictions
        scrape.set("sipcdr_delivery_waiting_for_restrictions", 1 if waiting else 0)


def _process(scrape: _Scrape, sources: Sources) -> None:
    if sources.spare is not None:
        scrape.set("sipcdr_spare_bytes", sources.spare.bytes_held)
        scrape.add("sipcdr_spare_released", sources.spare.releases)
    if sources.delivery_process is not None:
        scrape.add("sipcdr_delivery_process_restarts", sources.delivery_process.restarts)
    if sources.metrics_server is not None:
        scrape.add("sipcdr_metrics_connections_refused", sources.metrics_server.refused)
