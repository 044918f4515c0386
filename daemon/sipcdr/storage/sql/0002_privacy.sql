-- sipcdr schema, version 2: retention classes, legal holds, restriction, a hash-chained
-- audit log and least-privilege roles.
--
-- Applied once, like every migration file; it must never change after release.
--
-- Partition widths (docs/architecture.md says why): every high-volume table keeps its
-- daily UTC partitions; a day partition of `cdrs` is itself LIST-partitioned by
-- `retention_days`, the retention class stamped on each CDR from its trunk's
-- `cdr_retention_days` (0: the configured default), so that trunks with different
-- retention periods are still expired by dropping whole (sub-)partitions.


-- Retention class and restriction flag --------------------------------------------------

ALTER TABLE cdrs ADD COLUMN retention_days smallint NOT NULL DEFAULT 0;
ALTER TABLE cdrs ADD COLUMN restricted boolean NOT NULL DEFAULT false;
ALTER TABLE sip_messages ADD COLUMN restricted boolean NOT NULL DEFAULT false;
ALTER TABLE fraud_alerts ADD COLUMN restricted boolean NOT NULL DEFAULT false;

-- A unique key of a partitioned table must hold every partitioning column, the
-- sub-partitions' too. The class is a function of the trunk, so a re-delivered CDR
-- carries the same one and ON CONFLICT DO NOTHING still finds it.
ALTER TABLE cdrs DROP CONSTRAINT cdrs_pkey;
ALTER TABLE cdrs ADD PRIMARY KEY (cdr_id, start_time, retention_days);

-- Day partitions made ahead by version 1 are plain; the empty ones are dropped here and
-- made again, sub-partitioned, on demand. Partitions that hold rows stay plain and are
-- kept for the longest retention configured (never shorter than a row's class).
DO $$
DECLARE
    part record;
    has_rows boolean;
BEGIN
    FOR part IN
        SELECT child.relname AS name
        FROM pg_inherits
        JOIN pg_class child ON child.oid = pg_inherits.inhrelid
        WHERE pg_inherits.inhparent = 'cdrs'::regclass AND child.relkind = 'r'
    LOOP
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I)', part.name) INTO has_rows;
        IF NOT has_rows THEN
            EXECUTE format('DROP TABLE %I', part.name);
        END IF;
    END LOOP;
END
$$;


-- Legal holds --------------------------------------------------------------------------

-- The 12-month cap now applies to holds on signaling only (a hold on CDRs alone may
-- last as long as a case needs); `[privacy] signaling_hold_max_days` may lower it, and
-- `sipcdr hold add` checks that, saying why it refuses.
ALTER TABLE holds DROP CONSTRAINT holds_expiry_within_12_months;
ALTER TABLE holds ADD COLUMN kind text NOT NULL DEFAULT 'number'
    CHECK (kind IN ('number', 'trunk', 'call_id'));
ALTER TABLE holds ADD COLUMN tables text[] NOT NULL
    DEFAULT '{cdrs,sip_messages,fraud_alerts}';
ALTER TABLE holds ADD COLUMN starts_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE holds ADD COLUMN released_by text;
ALTER TABLE holds ADD CONSTRAINT holds_period CHECK (expires_at > starts_at);
ALTER TABLE holds ADD CONSTRAINT holds_signaling_within_12_months CHECK (
    NOT ('sip_messages' = ANY (tables))
    OR expires_at <= least(created_at, starts_at) + interval '12 months');

-- Rows under a hold, copied out of a partition before it is dropped: one row per record
-- and hold, so releasing one hold leaves what another still holds. Small tables, so rows
-- leave them by DELETE when no active hold names them any more.
CREATE TABLE cdrs_held (LIKE cdrs INCLUDING DEFAULTS, hold_id bigint NOT NULL,
    PRIMARY KEY (cdr_id, hold_id));
CREATE TABLE sip_messages_held (LIKE sip_messages INCLUDING DEFAULTS, hold_id bigint NOT NULL,
    PRIMARY KEY (message_id, hold_id));
CREATE TABLE fraud_alerts_held (LIKE fraud_alerts INCLUDING DEFAULTS, hold_id bigint NOT NULL,
    PRIMARY KEY (alert_id, hold_id));
CREATE INDEX cdrs_held_caller_idx ON cdrs_held (caller);
CREATE INDEX cdrs_held_callee_idx ON cdrs_held (callee);
CREATE INDEX cdrs_held_call_id_idx ON cdrs_held (call_id);
CREATE INDEX sip_messages_held_call_id_idx ON sip_messages_held (call_id);


-- Restriction of processing ---------------------------------------------------------------

CREATE TABLE restrictions (
    number          text         PRIMARY KEY,   -- E.164 digits, as in cdrs.caller
    since           timestamptz  NOT NULL DEFAULT now(),
    operator        text         NOT NULL
);


-- Audit log: a hash chain ------------------------------------------------------------------

-- Each row's hash covers its own fields and the previous row's hash, so an edited row
-- no longer matches its hash and a deleted one breaks the next row's link. Rows are
-- appended only through sipcdr_audit_append, which serialises writers.
ALTER TABLE audit_log ADD COLUMN prev_hash bytea;
ALTER TABLE audit_log ADD COLUMN row_hash bytea;

-- Where the chain starts once expiry (sipcdr_audit_expire) removed its oldest rows.
CREATE TABLE audit_horizon (
    singleton       boolean      PRIMARY KEY DEFAULT true CHECK (singleton),
    last_id         bigint       NOT NULL,
    last_hash       bytea        NOT NULL,
    expired_at      timestamptz  NOT NULL DEFAULT now()
);

CREATE FUNCTION sipcdr_audit_hash(
    id bigint, at timestamptz, actor text, action text, subject text, details jsonb,
    prev_hash bytea
) RETURNS bytea LANGUAGE sql IMMUTABLE AS $$
    -- Fields joined with a separator no field contains once escaped by format's %L;
    -- the time in UTC with microseconds, whatever the session's TimeZone or DateStyle.
    SELECT sha256(convert_to(format('%s|%L|%L|%L|%L|%L|%L',
        id,
        to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        actor, action, subject, details::text, encode(prev_hash, 'hex')), 'UTF8'))
$$;

-- Appends hold an advisory lock ("sipcdr" in ASCII, then 3: 0x736970636472_0003).
CREATE FUNCTION sipcdr_audit_append(
    p_actor text, p_action text, p_subject text, p_details jsonb
) RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    previous bytea;
    new_id bigint;
    new_at timestamptz := clock_timestamp();
BEGIN
    PERFORM pg_advisory_xact_lock(8316301759105597443);
    SELECT row_hash INTO previous FROM audit_log ORDER BY id DESC LIMIT 1;
    IF previous IS NULL THEN
        SELECT last_hash INTO previous FROM audit_horizon;
    END IF;
    previous := coalesce(previous, '\x'::bytea);
    new_id := nextval(pg_get_serial_sequence('audit_log', 'id'));
    INSERT INTO audit_log (id, at, actor, action, subject, details, prev_hash, row_hash)
    VALUES (new_id, new_at, p_actor, p_action, p_subject, p_details, previous,
            sipcdr_audit_hash(new_id, new_at, p_actor, p_action, p_subject, p_details,
                              previous));
    RETURN new_id;
END
$$;

-- Removes rows older than `before` (audit retention), keeping where the chain now
-- starts. Refuses to shorten the log below one year, whoever asks.
CREATE FUNCTION sipcdr_audit_expire(before timestamptz) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    last record;
    removed bigint;
BEGIN
    IF before > now() - interval '365 days' THEN
        RAISE EXCEPTION 'audit_log keeps at least 365 days (asked to expire rows before %)', before;
    END IF;
    PERFORM pg_advisory_xact_lock(8316301759105597443);
    SELECT id, row_hash INTO last FROM audit_log WHERE at < before ORDER BY id DESC LIMIT 1;
    IF last.id IS NULL THEN
        RETURN 0;
    END IF;
    INSERT INTO audit_horizon (last_id, last_hash) VALUES (last.id, last.row_hash)
    ON CONFLICT (singleton) DO UPDATE
        SET last_id = excluded.last_id, last_hash = excluded.last_hash, expired_at = now();
    DELETE FROM audit_log WHERE id <= last.id;
    GET DIAGNOSTICS removed = ROW_COUNT;
    RETURN removed;
END
$$;

-- Rows written before this version get their links now, in id order.
DO $$
DECLARE
    r record;
    previous bytea := '\x'::bytea;
BEGIN
    FOR r IN SELECT * FROM audit_log ORDER BY id LOOP
        UPDATE audit_log SET prev_hash = previous,
            row_hash = sipcdr_audit_hash(r.id, r.at, r.actor, r.action, r.subject, r.details,
                                         previous)
        WHERE id = r.id
        RETURNING row_hash INTO previous;
    END LOOP;
END
$$;
ALTER TABLE audit_log ALTER COLUMN prev_hash SET NOT NULL;
ALTER TABLE audit_log ALTER COLUMN row_hash SET NOT NULL;


-- Least-privilege roles ---------------------------------------------------------------------

-- Group roles (NOLOGIN): an operator grants them to login roles. Roles belong to the
-- whole server, so another database may have made them already.
DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['sipcdr_writer', 'sipcdr_analyst', 'sipcdr_privacy'] LOOP
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', name);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END LOOP;
END
$$;

-- The writer owns the record tables: only an owner may create a partition of a table or
-- drop one, which the daemon does (partitions ahead, retention).
DO $$
DECLARE
    rel record;
BEGIN
    FOR rel IN
        SELECT c.relname FROM pg_class c
        WHERE c.relname IN ('cdrs', 'sip_messages', 'fraud_alerts',
                            'cdrs_held', 'sip_messages_held', 'fraud_alerts_held')
           OR c.oid IN (SELECT inhrelid FROM pg_inherits
                        WHERE inhparent IN ('cdrs'::regclass, 'sip_messages'::regclass,
                                            'fraud_alerts'::regclass))
    LOOP
        EXECUTE format('ALTER TABLE %I OWNER TO sipcdr_writer', rel.relname);
    END LOOP;
END
$$;

-- New partitions are tables of the schema the record tables live in.
DO $$
BEGIN
    EXECUTE format('GRANT USAGE, CREATE ON SCHEMA %I TO sipcdr_writer', current_schema());
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO sipcdr_analyst, sipcdr_privacy',
                   current_schema());
END
$$;

-- Nobody but the roles below sees personal data or the log.
REVOKE ALL ON cdrs, sip_messages, fraud_alerts, cdrs_held, sip_messages_held,
    fraud_alerts_held, holds, restrictions, audit_log, audit_horizon FROM PUBLIC;
REVOKE ALL ON FUNCTION sipcdr_audit_append(text, text, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION sipcdr_audit_expire(timestamptz) FROM PUBLIC;

-- The daemon: writes records, reads holds (retention moves held rows) and restrictions
-- (restricted subjects are not published), appends to the audit log and expires it.
-- It cannot read the audit log, nor change or delete a row of it.
GRANT SELECT ON holds, restrictions TO sipcdr_writer;
GRANT EXECUTE ON FUNCTION sipcdr_audit_append(text, text, text, jsonb) TO sipcdr_writer;
GRANT EXECUTE ON FUNCTION sipcdr_audit_expire(timestamptz) TO sipcdr_writer;

-- Analysts: read-only on the records.
GRANT SELECT ON cdrs, sip_messages, fraud_alerts TO sipcdr_analyst;

-- The privacy officer: export, erase, restrict, holds; reads the audit log.
GRANT SELECT ON cdrs, sip_messages, fraud_alerts, cdrs_held, sip_messages_held,
    fraud_alerts_held TO sipcdr_privacy;
GRANT UPDATE (caller, callee, from_uri, to_uri, request_uri, restricted) ON cdrs, cdrs_held
    TO sipcdr_privacy;
GRANT UPDATE (subject, details, restricted) ON fraud_alerts, fraud_alerts_held
    TO sipcdr_privacy;
GRANT UPDATE (restricted) ON sip_messages, sip_messages_held TO sipcdr_privacy;
GRANT DELETE ON sip_messages, sip_messages_held TO sipcdr_privacy;
GRANT SELECT, INSERT, UPDATE ON holds TO sipcdr_privacy;
GRANT USAGE ON SEQUENCE holds_hold_id_seq TO sipcdr_privacy;
GRANT SELECT, INSERT, DELETE ON restrictions TO sipcdr_privacy;
GRANT SELECT ON audit_log, audit_horizon TO sipcdr_privacy;
GRANT EXECUTE ON FUNCTION sipcdr_audit_append(text, text, text, jsonb) TO sipcdr_privacy;
