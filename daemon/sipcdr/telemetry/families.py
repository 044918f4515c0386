"""The name, type, help text and labels of every metric sipcdr exports.

Labels stay low-cardinality: reasons are the code's fixed reason codes, methods are
folded to the known SIP methods (anything else is "other"), capture ids are the
configured agents only, trunks are the configured trunk names and "unknown",
interfaces the configured ones. Help texts list the label values the code produces.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)


class Family(NamedTuple):
    kind: str  # "counter", "gauge" or "histogram"
    name: str  # without the _total of a counter
    help: str
    labels: tuple[str, ...] = ()

    def make(self) -> Metric:
        labels = list(self.labels)
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.help, labels=labels)
        if self.kind == "gauge":
            return GaugeMetricFamily(self.name, self.help, labels=labels)
        return HistogramMetricFamily(self.name, self.help, labels=labels)


def _c(name: str, help_text: str, *labels: str) -> Family:
    return Family("counter", name, help_text, labels)


def _g(name: str, help_text: str, *labels: str) -> Family:
    return Family("gauge", name, help_text, labels)


def _h(name: str, help_text: str, *labels: str) -> Family:
    return Family("histogram", name, help_text, labels)


# fmt: off
FAMILIES: Final = {f.name: f for f in (
    _g("sipcdr_build_info",
       "1, labelled with the hot path that runs: compiled at install, or interpreted",
       "hot_path"),
    # -- capture ---------------------------------------------------------------------
    _c("sipcdr_packets_received",
       "Datagrams, stream frames or captured SIP messages taken in, by listener kind "
       "(sip_udp, hep_udp, hep_tcp, hep_tls, vxlan_udp, live)",
       "source"),
    _c("sipcdr_packets_dropped",
       "Input dropped before parsing, by listener kind (sip_udp, hep_udp, hep_tcp, "
       "hep_tls, vxlan_udp, live) and reason (not_allowed, bad_hep, bad_key, not_sip, "
       "oversize, truncated, rcvbuf_overflow, kernel_drop, backlog_full, "
       "callback_error, bad_vxlan, too_many_vnis, non_ip, unsupported_tunnel, "
       "malformed)",
       "source", "reason"),
    _c("sipcdr_hep_rejected",
       "HEP packets dropped for a wrong or missing agent key, by capture id",
       "capture_id"),
    _g("sipcdr_hep_connections",
       "HEP agent connections open now, by listener kind (hep_tcp, hep_tls)",
       "source"),
    _c("sipcdr_hep_connections_refused",
       "HEP/TCP and HEP/TLS connections refused on arrival, by listener kind and "
       "reason (not_allowed, max_connections, max_per_source, gone: reset by the agent "
       "before it was taken)",
       "source", "reason"),
    _c("sipcdr_hep_connections_closed",
       "HEP/TCP and HEP/TLS connections the daemon closed, by listener kind and "
       "reason (idle_timeout, frame_timeout, bad_framing, rejected_frames, tls_error, "
       "write_backlog)",
       "source", "reason"),
    _c("sipcdr_hep_tls_handshake_failures",
       "HEP/TLS handshakes that failed, by reason (no_client_cert, unknown_ca, "
       "bad_client_cert, agent_alert, not_tls, timeout, eof, other)",
       "reason"),
    _c("sipcdr_hep_timestamp_replaced",
       "HEP packets whose capture time was more than 30 s off this host's clock (the "
       "receive time, or a live frame's time, used instead), by where they came in "
       "(listener: the HEP listeners; live: HEP found by a live capture; vxlan: HEP "
       "in VXLAN-mirrored frames)",
       "input"),
    _c("sipcdr_live_capture_events",
       "What a live capture did with the frames it read, by interface and event "
       "(frames_read, kernel_packets: frames that passed the filter, truncated: longer "
       "than the snap length, outgoing_skipped: loopback copies, frame_errors: frames "
       "the decoder failed on, sip_messages: SIP messages extracted, hep_packets, "
       "hep_non_sip, non_sip_payloads, keepalives)",
       "interface", "event"),
    _c("sipcdr_live_hep_errors",
       "HEP packets sniffed live that did not decode, by interface and reason",
       "interface", "reason"),
    _c("sipcdr_live_decap_events",
       "The live capture's link, tunnel and IP layer decoder, by interface and event "
       "(frames; skipped: non_ip, truncated, malformed, other_protocol, "
       "unsupported_tunnel, too_deep; layers removed: tunnelled, pppoe, mpls, gtpu, "
       "vxlan, geneve, tzsp; fragments, reassembled, frag_expired, frag_evicted, "
       "frag_dropped; payloads: udp, tcp, sctp; sctp_pieces, sctp_reassembled, "
       "sctp_dropped)",
       "interface", "event"),
    _c("sipcdr_live_tcp_events",
       "The live capture's TCP and WebSocket reassembly, by interface and event "
       "(segments, streams, released, expired, evicted, incomplete, duplicates, "
       "overlaps, out_of_order, gaps, resyncs, overflows, keepalives, "
       "bad_content_length, missing_content_length, messages, ws_upgrades, ws_messages, "
       "ws_non_sip, ws_control, ws_bad_deflate)",
       "interface", "event"),
    _c("sipcdr_live_tcp_skipped_bytes",
       "TCP stream bytes the live capture could not read as SIP, by interface and why "
       "(gap: never captured, resync: passed over to find a start line)",
       "interface", "why"),
    _c("sipcdr_vxlan_capture_events",
       "What the VXLAN mirror listeners' decoders found in the mirrored frames, summed "
       "over listeners and VNIs, by event (sip_messages, hep_packets, hep_non_sip, "
       "non_sip_payloads, keepalives)",
       "event"),
    _c("sipcdr_vxlan_hep_errors",
       "HEP packets in mirrored frames that did not decode, by reason",
       "reason"),
    _c("sipcdr_vxlan_decap_events",
       "The VXLAN listeners' link, tunnel and IP layer decoder, summed over listeners "
       "and VNIs, by event (the events of sipcdr_live_decap_events)",
       "event"),
    _c("sipcdr_vxlan_tcp_events",
       "The VXLAN listeners' TCP and WebSocket reassembly, summed over listeners and "
       "VNIs, by event (the events of sipcdr_live_tcp_events)",
       "event"),
    _c("sipcdr_vxlan_tcp_skipped_bytes",
       "TCP stream bytes in mirrored frames that could not be read as SIP, by why "
       "(gap: never captured, resync: passed over to find a start line)",
       "why"),
    # -- parsing and correlation -------------------------------------------------------
    _c("sipcdr_sip_parse_errors", "Messages the SIP parser rejected, by parser reason",
       "reason"),
    _c("sipcdr_sip_messages",
       "Parsed SIP messages, by method (requests) or CSeq method (responses) and kind",
       "method", "kind"),
    _c("sipcdr_calls_refused",
       "New calls (initial INVITEs) refused while intake is paused, by reason "
       "(spool_full, write_error)",
       "reason"),
    _c("sipcdr_internal_errors",
       "Messages and CDRs a bug cost, by stage (correlator: the message did not reach "
       "its call; signaling: its signaling record was not written; enrich, rate: a "
       "stage's work on a CDR, which went on without it; the fraud stage counts its "
       "own faults in sipcdr_fraud_errors); the first few are logged",
       "stage"),
    _c("sipcdr_cdr_write_failures",
       "CDRs a sink raised on when handed over, by sink (spool); the first few are "
       "logged",
       "sink"),
    _c("sipcdr_dialog_events",
       "Correlator events, by event (retransmission, late, orphan, unusable, evicted, "
       "restored, conflicting_from_tag)",
       "event"),
    _c("sipcdr_sip_non_call_requests",
       "Requests outside calls (REGISTER, OPTIONS, SUBSCRIBE...), counted and not "
       "held, by method",
       "method"),
    _c("sipcdr_sip_non_call_responses",
       "Responses to requests outside calls, by CSeq method and status class",
       "method", "status_class"),
    _c("sipcdr_cdrs", "CDRs closed, by disposition", "disposition"),
    _g("sipcdr_open_dialogs", "Calls currently open in the correlator"),
    # -- carrier KPIs --------------------------------------------------------------------
    _c("sipcdr_call_attempts",
       "Calls closed, by trunk (configured trunk names, unknown): the denominator of "
       "ASR and NER",
       "trunk"),
    _c("sipcdr_calls_answered", "Calls answered, by trunk", "trunk"),
    _c("sipcdr_calls_network_effective",
       "Calls the network delivered (answered, busy, no_answer, rejected, cancelled: "
       "GSMA IR.42), by trunk",
       "trunk"),
    _c("sipcdr_calls_failed",
       "Calls the network or the far end failed (failed, timeout), by trunk",
       "trunk"),
    _h("sipcdr_call_pdd_seconds",
       "Post-dial delay (INVITE to first response) of closed calls, by trunk",
       "trunk"),
    _h("sipcdr_call_duration_seconds",
       "Duration (answer to end) of answered calls, by trunk",
       "trunk"),
    # -- dialog state --------------------------------------------------------------------
    _c("sipcdr_dialog_journal_records",
       "Records journaled so open calls survive a crash: message (one that changed a "
       "call), decision (a close by a timer or an eviction, or a timer run), close (a "
       "CDR in the spool file)",
       "kind"),
    _g("sipcdr_dialog_journal_bytes",
       "Bytes in the dialog journals since the last good checkpoint (replayed at start)"),
    _c("sipcdr_dialog_journal_replayed_records",
       "Journal records replayed at start to rebuild the open calls"),
    _c("sipcdr_dialog_journal_torn_bytes",
       "Bytes cut off damaged journal tails at start"),
    _c("sipcdr_dialog_checkpoints",
       "Checkpoints of the open calls, by outcome (written, failed: the older "
       "checkpoint and the journal still rebuild the calls)",
       "outcome"),
    _g("sipcdr_cdrs_at_risk",
       "CDRs the disk refused, held in memory, that no checkpoint or journal on disk "
       "is sure to carry: a crash now would lose them (its last value outlives the "
       "process in Prometheus)"),
    _c("sipcdr_dialog_state_errors",
       "Dialog state that a crash would not rebuild: journal_write_error, torn_tail "
       "and bad_record (found at start), unreadable_checkpoint and unreadable_journal "
       "(renamed aside), internal_error (a failed step of the store's own task)",
       "what"),
    # -- spool and delivery --------------------------------------------------------------
    _c("sipcdr_sink_records",
       "Records the sink confirmed written, by sink and spool stream",
       "sink", "stream"),
    _c("sipcdr_sink_failures",
       "Delivery attempts that failed and will be retried (records wait in the spool)",
       "sink", "stream"),
    _c("sipcdr_sink_rejected",
       "Records the destination refuses for their content, set aside in the spool's "
       "rejected/ directory",
       "sink", "stream"),
    _c("sipcdr_postgres_rows",
       "Rows written to PostgreSQL by table: inserted, or duplicate (already there: "
       "a re-delivery)",
       "table", "outcome"),
    _g("sipcdr_sink_lag_records", "Records in the spool the sink has not confirmed yet",
       "sink", "stream"),
    _g("sipcdr_sink_up", "1 when the sink's last delivery succeeded, 0 while it is failing",
       "sink", "stream"),
    _g("sipcdr_spool_bytes", "Bytes in the spool's segment files", "stream"),
    _g("sipcdr_spool_full",
       "1 while the spool is at its size limit (block: intake refused; drop_newest: "
       "records refused)",
       "stream"),
    _c("sipcdr_spool_records", "Records appended to the spool, by stream and kind",
       "stream", "kind"),
    _c("sipcdr_spool_dropped",
       "Records the spool refused, by stream and reason (full, write_error, too_large, "
       "disk_floor; retention: expired while waiting for a sink)",
       "stream", "reason"),
    _g("sipcdr_spool_reserve_records",
       "Records the disk refused, held in memory until it takes them (block: new calls "
       "refused meanwhile)",
       "stream"),
    _c("sipcdr_spool_reserve_held",
       "Records the disk refused that went to the in-memory reserve (each once)",
       "stream"),
    _c("sipcdr_spool_cursor_write_failures",
       "Cursor saves that failed; the position stays in memory, and only a crash "
       "before the next save delivers records again",
       "sink", "stream"),
    _c("sipcdr_spool_io_errors",
       "Spool file operations that failed: rotate (no new segment: the active one "
       "grows), sync (an fsync: what was written since the last good one may be lost "
       "to a power loss, or is already lost to an I/O error)",
       "stream", "op"),
    _c("sipcdr_spool_damaged",
       "Spool damage found after a crash: torn_tail (cut off at open; records damaged "
       "on disk are sipcdr_spool_corrupt_records)",
       "stream", "what"),
    _c("sipcdr_spool_corrupt_records",
       "Records a sink's spool reader found damaged or missing on disk and skipped "
       "(lost to that sink), by sink and stream",
       "sink", "stream"),
    _c("sipcdr_spool_torn_bytes", "Bytes cut off the spool's newest segment at open",
       "stream"),
    _c("sipcdr_jsonl_rotation_failures",
       "JSONL rotations that failed after their batch was written; the file grows "
       "until one succeeds"),
    # -- disk and process ----------------------------------------------------------------
    _g("sipcdr_spare_bytes",
       "Bytes of the spare file kept on the state disk for a full disk (0 while it "
       "is given up or could not be allocated)"),
    _c("sipcdr_delivery_process_restarts",
       "Times the delivery process ended unasked and was started again (its records "
       "waited in the spool meanwhile)"),
    _c("sipcdr_spare_released",
       "Times the spare file was given up because the state disk refused a write"),
    _g("sipcdr_intake_paused",
       "1 while new calls are refused (the CDR spool is full or its disk refuses "
       "writes, under the block policy)"),
    _c("sipcdr_metrics_connections_refused",
       "Connections to the metrics endpoint refused on arrival (8 already open from its "
       "address, or all 32 being answered), or closed before their request ended to "
       "make room for a new one (a flood, or clients that never finish their request)"),
    # -- rating -----------------------------------------------------------------------------
    _c("sipcdr_cdrs_rated", "CDRs priced by their ingress trunk's plan, by trunk", "trunk"),
    _c("sipcdr_cdrs_unrated",
       "CDRs left unpriced, by ingress trunk and reason (no_plan, no_prefix, "
       "not_effective, invalid_number)",
       "trunk", "reason"),
    _c("sipcdr_cdrs_vendor_rated",
       "CDRs given a vendor cost by their egress trunk's cost plan, by trunk", "trunk"),
    _c("sipcdr_cdrs_vendor_unrated",
       "CDRs with an egress trunk left without a vendor cost, by trunk and reason",
       "trunk", "reason"),
    _c("sipcdr_cdrs_margin_unknown",
       "CDRs priced on both sides in different currencies: no margin, by egress trunk",
       "trunk"),
    _c("sipcdr_rate_deck_loads",
       "Rate decks read and checked, by plan and result (loaded: in force; refused: "
       "the previous deck stays)",
       "plan", "result"),
    _g("sipcdr_rate_deck_rows", "Rows of the rate deck in force, by plan", "plan"),
    # -- fraud ------------------------------------------------------------------------------
    _c("sipcdr_fraud_alerts",
       "Fraud alerts raised, by detector and severity (an escalation to critical "
       "counts once more under critical)",
       "detector", "severity"),
    _c("sipcdr_fraud_alerts_suppressed",
       "New fraud incidents not sent, over the per-detector rate limit", "detector"),
    _c("sipcdr_fraud_subjects_evicted",
       "Subjects a fraud detector forgot at its max_subjects cap, idlest first", "detector"),
    _c("sipcdr_fraud_alert_updates",
       "Alert records that updated an open incident's alert (a new peak, an escalation, "
       "its close), sent at most once per update_interval_s per incident"),
    _c("sipcdr_fraud_calls_evicted",
       "Calls the fraud monitor forgot before their CDR, oldest first, at "
       "max_tracked_calls: their concurrency ends early and their CDR gets no flags"),
    _c("sipcdr_fraud_incidents_evicted",
       "Open fraud incidents forgotten at the cap on open incidents, idlest first: a "
       "later report of the subject opens a new alert"),
    _c("sipcdr_fraud_alerts_written",
       "Alert records (new and updated) handed to the spool, by outcome (written; "
       "refused: the spool was full, the alert is lost)",
       "outcome"),
    _c("sipcdr_fraud_errors",
       "Fraud checks skipped by a fault in a detector, by step (message, cdr, tick, "
       "write); the message or CDR itself went on",
       "step"),
    _g("sipcdr_fraud_subjects_tracked",
       "Subjects (addresses, numbers, trunks) a fraud detector holds now", "detector"),
    # -- retention and restriction --------------------------------------------------------
    _g("sipcdr_retention_oldest_partition_age_days",
       "Age in days of the oldest partition of each table after the last retention "
       "run: above the table's retention (plus a day) means retention is not working",
       "table"),
    _c("sipcdr_retention_bytes_dropped",
       "Bytes freed by dropping partitions past retention, by table", "table"),
    _c("sipcdr_retention_partitions_dropped",
       "Partitions dropped past retention, by table", "table"),
    _c("sipcdr_retention_rows_held",
       "Rows copied to the held tables before their partition was dropped", "table"),
    _c("sipcdr_retention_runs", "Retention runs of the daemon, by outcome (ok, failed)",
       "outcome"),
    _g("sipcdr_retention_last_success_timestamp_seconds",
       "When retention last completed (Unix time; 0: not yet)"),
    _c("sipcdr_kafka_records_withheld",
       "Records not published to Kafka, by record kind: their subject's processing "
       "is restricted, or (with pseudonymize_numbers) the record could not be read",
       "kind"),
    _g("sipcdr_restricted_subjects",
       "Numbers whose processing is restricted, as last read from PostgreSQL (or saved "
       "by the last run, until the database answers)"),
    _g("sipcdr_restrictions_not_saved",
       "1 while the restriction list in force is not the one saved in the state folder "
       "(more subjects than a copy is kept for, or the write failed and the older copy "
       "was emptied): a restart while PostgreSQL does not answer then waits for it"),
    _g("sipcdr_delivery_waiting_for_restrictions",
       "1 while Kafka and PostgreSQL delivery waits for a first restriction list (a "
       "start with no saved list and PostgreSQL not answering): records wait in the "
       "spool"),
)}
# fmt: on
