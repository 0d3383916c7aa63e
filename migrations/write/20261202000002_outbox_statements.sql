-- One outbox row per appending statement instead of one per record.
--
-- Measured with pgbench on the benchmark machine: for 1,000-record batches
-- an outbox row per record (its heap tuple, its index entry, its delete by
-- the relay and the vacuum after it) cost about as much as a quarter of the
-- record's own insert. A statement's records are committed together, and
-- the relay publishes and confirms them together, so one row that names
-- their seqs carries the same guarantee: it is written in the same
-- statement as the records and deleted only after RabbitMQ confirmed every
-- one of them.
--
-- `first_seq` (the lowest of `seqs`) is unique because seqs are, and orders
-- the sweep like the old table's `seq` did.
--
-- The per-record `outbox` table stays: a command-api of the previous
-- release still writes to it during a rolling upgrade, and this release's
-- relay sweeps both tables.
CREATE TABLE IF NOT EXISTS outbox_statements (
    first_seq bigint      PRIMARY KEY,
    seqs      bigint[]    NOT NULL CHECK (cardinality(seqs) > 0),
    at        timestamptz NOT NULL DEFAULT now()
);
-- A queue like the per-record outbox: vacuumed eagerly, never truncated
-- (see 20261122000002 and 20261202000001).
ALTER TABLE outbox_statements SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 500,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 500,
    vacuum_truncate = false
);
