"""Every Prometheus metric sipcdr exports, in one place.

Labels stay low-cardinality: reasons are the parsers' fixed reason codes, methods are
folded to the known SIP methods (anything else is "other"), capture ids are the
configured agents only. The hot path never touches these objects: it counts into
plain ints and `Pipeline.flush_metrics` adds the deltas about once a second.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics

from sipcdr.hotpath import hot_path
from sipcdr.sip.parser import KNOWN_METHODS

# The *_created series double every counter and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]


def method_label(method: str) -> str:
    """Methods are attacker-controlled text: only the known ones become label values."""
    return method if method in KNOWN_METHODS else "other"


class Metrics:
    """The metric objects, registered in their own registry (tests make many)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.build_info = Gauge(
            "sipcdr_build_info",
            "1, labelled with the hot path that runs: compiled at install, or interpreted",
            ["hot_path"],
            registry=r,
        )
        self.build_info.labels(hot_path=hot_path()[0]).set(1)
        self.packets_received = Counter(
            "sipcdr_packets_received_total",
            "Datagrams, stream frames or capture records taken in, by listener kind",
            ["source"],
            registry=r,
        )
        self.packets_dropped = Counter(
            "sipcdr_packets_dropped_total",
            "Input dropped before parsing, by source and reason "
            "(not_allowed, bad_hep, bad_key, not_sip, oversize, truncated, rcvbuf_overflow, "
            "internal_error; intake: spool_full, write_error)",
            ["source", "reason"],
            registry=r,
        )
        self.hep_rejected = Counter(
            "sipcdr_hep_rejected_total",
            "HEP packets dropped for a wrong or missing agent key, by capture id",
            ["capture_id"],
            registry=r,
        )
        self.hep_connections = Gauge(
            "sipcdr_hep_connections",
            "HEP agent connections open now, by listener kind (hep_tcp, hep_tls)",
            ["source"],
            registry=r,
        )
        self.hep_connections_refused = Counter(
            "sipcdr_hep_connections_refused_total",
            "HEP/TCP and HEP/TLS connections refused on arrival, by listener kind and "
            "reason (not_allowed, max_connections, max_per_source, gone: reset by the agent "
            "before it was taken)",
            ["source", "reason"],
            registry=r,
        )
        self.hep_connections_closed = Counter(
            "sipcdr_hep_connections_closed_total",
            "HEP/TCP and HEP/TLS connections the daemon closed, by listener kind and "
            "reason (idle_timeout, frame_timeout, bad_framing, tls_error, write_backlog)",
            ["source", "reason"],
            registry=r,
        )
        self.hep_tls_handshake_failures = Counter(
            "sipcdr_hep_tls_handshake_failures_total",
            "HEP/TLS handshakes that failed, by reason (no_client_cert, unknown_ca, "
            "bad_client_cert, agent_alert, not_tls, timeout, eof, other)",
            ["reason"],
            registry=r,
        )
        self.hep_clock_skew = Counter(
            "sipcdr_hep_timestamp_replaced_total",
            "HEP packets whose agent clock was off by more than 30 s: receive time used",
            registry=r,
        )
        self.parse_errors = Counter(
            "sipcdr_sip_parse_errors_total",
            "Messages the SIP parser rejected, by parser reason",
            ["reason"],
            registry=r,
        )
        self.sip_messages = Counter(
            "sipcdr_sip_messages_total",
            "Parsed SIP messages, by method (requests) or CSeq method (responses) and kind",
            ["method", "kind"],
            registry=r,
        )
        self.dialog_events = Counter(
            "sipcdr_dialog_events_total",
            "Correlator events: retransmission, late, orphan, unusable, evicted, restored",
            ["event"],
            registry=r,
        )
        self.cdrs = Counter(
            "sipcdr_cdrs_total",
            "CDRs closed, by disposition",
            ["disposition"],
            registry=r,
        )
        self.open_dialogs = Gauge(
            "sipcdr_open_dialogs", "Calls currently open in the correlator", registry=r
        )
        self.dialog_journal_records = Counter(
            "sipcdr_dialog_journal_records_total",
            "Records journaled so open calls survive a crash: message (one that changed a "
            "call), decision (a close by a timer or an eviction, or a timer run), close (a "
            "CDR in the spool file)",
            ["kind"],
            registry=r,
        )
        self.dialog_journal_bytes = Gauge(
            "sipcdr_dialog_journal_bytes",
            "Bytes in the dialog journals since the last good checkpoint (replayed at start)",
            registry=r,
        )
        self.dialog_checkpoints = Counter(
            "sipcdr_dialog_checkpoints_total",
            "Checkpoints of the open calls, by outcome (written, failed: the older "
            "checkpoint and the journal still rebuild the calls)",
            ["outcome"],
            registry=r,
        )
        self.dialog_state_errors = Counter(
            "sipcdr_dialog_state_errors_total",
            "Dialog state that a crash would not rebuild: journal_write_error, torn_tail "
            "and bad_record (found at start), unreadable_checkpoint and unreadable_journal "
            "(renamed aside), internal_error (a failed step of the store's own task)",
            ["what"],
            registry=r,
        )
        self.sink_written = Counter(
            "sipcdr_sink_records_total",
            "Records the sink confirmed written, by sink and spool stream",
            ["sink", "stream"],
            registry=r,
        )
        self.sink_failures = Counter(
            "sipcdr_sink_failures_total",
            "Delivery attempts that failed and will be retried (records wait in the spool)",
            ["sink", "stream"],
            registry=r,
        )
        self.sink_rejected = Counter(
            "sipcdr_sink_rejected_total",
            "Records the destination refuses for their content, set aside in the spool's "
            "rejected/ directory",
            ["sink", "stream"],
            registry=r,
        )
        self.postgres_rows = Counter(
            "sipcdr_postgres_rows_total",
            "Rows written to PostgreSQL by table: inserted, or duplicate (already there: "
            "a re-delivery)",
            ["table", "outcome"],
            registry=r,
        )
        self.sink_lag = Gauge(
            "sipcdr_sink_lag_records",
            "Records in the spool the sink has not confirmed yet",
            ["sink", "stream"],
            registry=r,
        )
        self.sink_up = Gauge(
            "sipcdr_sink_up",
            "1 when the sink's last delivery succeeded, 0 while it is failing",
            ["sink", "stream"],
            registry=r,
        )
        self.spool_bytes = Gauge(
            "sipcdr_spool_bytes", "Bytes in the spool's segment files", ["stream"], registry=r
        )
        self.spool_full = Gauge(
            "sipcdr_spool_full",
            "1 while the spool is at its size limit (block: intake refused; drop_newest: "
            "records refused)",
            ["stream"],
            registry=r,
        )
        self.spool_appended = Counter(
            "sipcdr_spool_records_total",
            "Records appended to the spool, by stream and kind",
            ["stream", "kind"],
            registry=r,
        )
        self.spool_dropped = Counter(
            "sipcdr_spool_dropped_total",
            "Records the spool refused, by stream and reason (full, write_error, too_large, "
            "disk_floor)",
            ["stream", "reason"],
            registry=r,
        )
        self.spool_reserve = Gauge(
            "sipcdr_spool_reserve_records",
            "Records the disk refused, held in memory until it takes them (block: new calls "
            "refused meanwhile)",
            ["stream"],
            registry=r,
        )
        self.spool_cursor_failures = Counter(
            "sipcdr_spool_cursor_write_failures_total",
            "Cursor saves that failed; the position stays in memory, and only a crash "
            "before the next save delivers records again",
            ["sink", "stream"],
            registry=r,
        )
        self.spool_io_errors = Counter(
            "sipcdr_spool_io_errors_total",
            "Spool file operations that failed: rotate (no new segment: the active one "
            "grows), sync (an fsync: what was written since the last good one may be lost "
            "to a power loss, or is already lost to an I/O error)",
            ["stream", "op"],
            registry=r,
        )
        self.jsonl_rotation_failures = Counter(
            "sipcdr_jsonl_rotation_failures_total",
            "JSONL rotations that failed after their batch was written; the file grows "
            "until one succeeds",
            registry=r,
        )
        self.spare_bytes = Gauge(
            "sipcdr_spare_bytes",
            "Bytes of the spare file kept on the state disk for a full disk (0 while it "
            "is given up or could not be allocated)",
            registry=r,
        )
        self.spare_released = Counter(
            "sipcdr_spare_released_total",
            "Times the spare file was given up because the state disk refused a write",
            registry=r,
        )
        self.intake_paused = Gauge(
            "sipcdr_intake_paused",
            "1 while new calls are refused (the CDR spool is full or its disk refuses "
            "writes, under the block policy)",
            registry=r,
        )
        self.spool_damaged = Counter(
            "sipcdr_spool_damaged_total",
            "Spool damage found after a crash or on disk: torn_tail (cut off at open), "
            "corrupt_record (skipped by a reader)",
            ["stream", "what"],
            registry=r,
        )
        self.metrics_connections_refused = Counter(
            "sipcdr_metrics_connections_refused_total",
            "Connections to the metrics endpoint closed on arrival because its connection "
            "cap was reached (a flood, or clients that never finish their request)",
            registry=r,
        )
        self.asr = Gauge(
            "sipcdr_asr", "Answer-seizure ratio of closed calls", ["trunk"], registry=r
        )
        self.ner = Gauge(
            "sipcdr_ner", "Network effectiveness ratio of closed calls", ["trunk"], registry=r
        )
        self.acd = Gauge(
            "sipcdr_acd_seconds", "Average duration of answered calls", ["trunk"], registry=r
        )
        self.pdd = Gauge("sipcdr_pdd_seconds", "Mean post-dial delay", ["trunk"], registry=r)
        self.fraud_alerts = Counter(
            "sipcdr_fraud_alerts_total",
            "Fraud alerts raised, by detector and severity (an escalation to critical "
            "counts once more under critical)",
            ["detector", "severity"],
            registry=r,
        )
        self.fraud_alerts_suppressed = Counter(
            "sipcdr_fraud_alerts_suppressed_total",
            "New fraud incidents not sent, over the per-detector rate limit",
            ["detector"],
            registry=r,
        )
        self.fraud_subjects_evicted = Counter(
            "sipcdr_fraud_subjects_evicted_total",
            "Subjects a fraud detector forgot at its max_subjects cap, idlest first",
            ["detector"],
            registry=r,
        )
        self.fraud_errors = Counter(
            "sipcdr_fraud_errors_total",
            "Fraud checks skipped by a fault in a detector, by step (message, cdr, tick, "
            "write); the message or CDR itself went on",
            ["step"],
            registry=r,
        )
        self.fraud_subjects_tracked = Gauge(
            "sipcdr_fraud_subjects_tracked",
            "Subjects (addresses, numbers, trunks) a fraud detector holds now",
            ["detector"],
            registry=r,
        )
