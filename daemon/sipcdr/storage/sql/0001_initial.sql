-- sipcdr schema, version 1.
--
-- Applied by `sipcdr db migrate` (and by the daemon's PostgreSQL sink on connect) in
-- one transaction, recorded in schema_migrations with this file's checksum: once
-- applied, this file must never change; later changes go into 0002_*.sql and up.
--
-- The three high-volume tables are range-partitioned by day on their time column, so
-- retention drops whole partitions instead of deleting rows. Partitions are made by
-- sipcdr (storage/partitions.py), named <table>_pYYYYMMDD, with UTC day bounds. There is
-- deliberately no DEFAULT partition: a row there would block creating the proper
-- partition for its day later on.
--
-- Every primary key includes the partition key because PostgreSQL requires it; the id
-- part alone is still unique in practice (a UUID), and inserts use ON CONFLICT DO
-- NOTHING on it so that re-delivered records are harmless.
--
-- IP addresses are text, not inet: the records say "as captured", a link-local IPv6
-- peer arrives with a zone id ("fe80::1%eth0") that inet cannot hold, and a value the
-- server refused would stop the delivery of the whole stream, since a batch is retried
-- as a unit. Subnet queries still work with `src_ip::inet << '192.0.2.0/24'`.


-- CDR record v1 (schemas/cdr.v1.schema.json), one typed column per field, in the
-- record's field order.
CREATE TABLE cdrs (
    cdr_id          uuid         NOT NULL,
    call_id         text         NOT NULL,
    caller          text,
    callee          text,
    from_uri        text         NOT NULL,
    to_uri          text         NOT NULL,
    request_uri     text         NOT NULL,
    src_ip          text         NOT NULL,
    src_port        integer      NOT NULL,
    dst_ip          text         NOT NULL,
    dst_port        integer      NOT NULL,
    trunk           text,
    start_time      timestamptz  NOT NULL,
    ring_time       timestamptz,
    answer_time     timestamptz,
    end_time        timestamptz  NOT NULL,
    duration        numeric(12, 3) NOT NULL,
    billsec         numeric(12, 3) NOT NULL,
    pdd_ms          integer,
    disposition     text         NOT NULL,
    sip_code        integer,
    sip_reason      text,
    q850_cause      integer,
    hangup_by       text,
    end_reason      text         NOT NULL,
    user_agent      text,
    rated           boolean      NOT NULL,
    rate_prefix     text,
    rate_name       text,
    -- numeric without a fixed scale keeps the rate deck's and the rater's decimal
    -- strings exactly, trailing zeros included.
    rate_per_minute numeric,
    billed_seconds  integer,
    cost            numeric,
    currency        text,
    fraud_flags     text[]       NOT NULL DEFAULT '{}',
    capture_node    text         NOT NULL,
    schema_version  smallint     NOT NULL,
    PRIMARY KEY (cdr_id, start_time)
) PARTITION BY RANGE (start_time);

-- Billing and subject-access queries look calls up by number and period, support by
-- Call-ID.
CREATE INDEX cdrs_caller_start_time_idx ON cdrs (caller, start_time);
CREATE INDEX cdrs_callee_start_time_idx ON cdrs (callee, start_time);
CREATE INDEX cdrs_call_id_idx ON cdrs (call_id);


-- One captured SIP message (the signaling record, schema_version 1): the start line and
-- header section as text; the body only when the operator asked to keep SDP.
CREATE TABLE sip_messages (
    message_id      uuid         NOT NULL,
    captured_at     timestamptz  NOT NULL,
    call_id         text         NOT NULL,
    method          text,                    -- request method; NULL for responses
    status_code     integer,                 -- response code; NULL for requests
    cseq_method     text         NOT NULL,
    cseq            bigint,                  -- below 2^31 by RFC 3261, not by every peer
    src_ip          text         NOT NULL,
    src_port        integer      NOT NULL,
    dst_ip          text         NOT NULL,
    dst_port        integer      NOT NULL,
    transport       text         NOT NULL,
    capture_node    text         NOT NULL,
    headers         text         NOT NULL,
    body            text,
    schema_version  smallint     NOT NULL,
    PRIMARY KEY (message_id, captured_at)
) PARTITION BY RANGE (captured_at);

-- Troubleshooting reads one call's ladder diagram.
CREATE INDEX sip_messages_call_id_captured_at_idx ON sip_messages (call_id, captured_at);


-- Fraud alert record v1.
CREATE TABLE fraud_alerts (
    alert_id        uuid         NOT NULL,
    raised_at       timestamptz  NOT NULL,
    detector        text         NOT NULL,
    subject         text         NOT NULL,
    severity        text         NOT NULL,
    window_s        integer      NOT NULL,
    count           bigint       NOT NULL,
    threshold       bigint       NOT NULL,
    cdr_ids         uuid[]       NOT NULL DEFAULT '{}',
    details         jsonb        NOT NULL DEFAULT '{}',
    schema_version  smallint     NOT NULL,
    PRIMARY KEY (alert_id, raised_at)
) PARTITION BY RANGE (raised_at);

-- Analysts ask "what fired for this account lately".
CREATE INDEX fraud_alerts_subject_raised_at_idx ON fraud_alerts (subject, raised_at);


-- Legal holds: rows of a subject under investigation survive retention (moved to a held
-- table before their partition is dropped) until the hold expires or is released.
CREATE TABLE holds (
    hold_id         bigserial    PRIMARY KEY,
    subject         text         NOT NULL,   -- an E.164 number or an account name
    reason          text         NOT NULL,
    created_at      timestamptz  NOT NULL DEFAULT now(),
    expires_at      timestamptz  NOT NULL,
    released_at     timestamptz,
    created_by      text         NOT NULL,
    -- The privacy promise: signaling is kept at most 12 months for an investigation.
    CONSTRAINT holds_expiry_within_12_months
        CHECK (expires_at > created_at AND expires_at <= created_at + interval '12 months'),
    CONSTRAINT holds_released_after_created CHECK (released_at IS NULL OR released_at >= created_at)
);

CREATE INDEX holds_subject_idx ON holds (subject);


-- Every privacy-relevant action (exports, erasures, holds): who, what, about whom.
CREATE TABLE audit_log (
    id              bigserial    PRIMARY KEY,
    at              timestamptz  NOT NULL DEFAULT now(),
    actor           text         NOT NULL,
    action          text         NOT NULL,
    subject         text,
    details         jsonb        NOT NULL DEFAULT '{}'
);

CREATE INDEX audit_log_subject_at_idx ON audit_log (subject, at);
