-- Both sides of a call's price, added within CDR record v1: the trunk the call left
-- through, what that trunk charges for it (its cost plan) and the margin (cost minus
-- vendor cost), each NULL when not known; and whether the callee was a number.
--
-- Columns added last, in the record's order. On the partitioned table the columns
-- reach every partition, present and future; adding nullable columns without a
-- default rewrites no row. Rows written before this migration read NULL.

ALTER TABLE cdrs
    ADD COLUMN egress_trunk text,
    -- numeric without a fixed scale, like cost: the rater's decimal strings exactly.
    ADD COLUMN vendor_cost  numeric,
    ADD COLUMN margin       numeric,
    ADD COLUMN callee_valid boolean;

-- Rows a legal hold keeps past their partition have every column of the table.
ALTER TABLE cdrs_held
    ADD COLUMN egress_trunk text,
    ADD COLUMN vendor_cost  numeric,
    ADD COLUMN margin       numeric,
    ADD COLUMN callee_valid boolean;
