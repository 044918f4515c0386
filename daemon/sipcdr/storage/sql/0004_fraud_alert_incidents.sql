-- Fraud alerts as incidents: every field of fraud alert record v1, and one row per
-- incident. An incident's updates carry the same alert_id and raised_at (the key) and a
-- higher revision; the sink replaces the row with the highest revision it has seen, so
-- the table holds each incident as it stands now. Rows written before this migration
-- keep NULL in the columns their record did not have.
ALTER TABLE fraud_alerts
    ADD COLUMN subject_kind     text,
    ADD COLUMN revision         integer      NOT NULL DEFAULT 0,
    ADD COLUMN observed         numeric,
    ADD COLUMN threshold_value  numeric,
    ADD COLUMN first_seen       timestamptz,
    ADD COLUMN last_seen        timestamptz,
    ADD COLUMN call_ids         text[]       NOT NULL DEFAULT '{}';

-- The fraud desk's view: what is firing now, by detector.
CREATE INDEX fraud_alerts_detector_last_seen_idx ON fraud_alerts (detector, last_seen);

-- Rows a legal hold keeps past their partition have every column of the table.
ALTER TABLE fraud_alerts_held
    ADD COLUMN subject_kind     text,
    ADD COLUMN revision         integer      NOT NULL DEFAULT 0,
    ADD COLUMN observed         numeric,
    ADD COLUMN threshold_value  numeric,
    ADD COLUMN first_seen       timestamptz,
    ADD COLUMN last_seen        timestamptz,
    ADD COLUMN call_ids         text[]       NOT NULL DEFAULT '{}';
