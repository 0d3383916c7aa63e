-- The outbox is a queue: every row is inserted and deleted within
-- milliseconds. Vacuum it eagerly so its index does not fill with dead
-- entries that every relay round would have to step over.
ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 5000
);
