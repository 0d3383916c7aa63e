-- `(key, seq DESC)` took each new record at its key's place in an index
-- over the whole read model: 100,000 keys spread at random, so every insert
-- touched a random leaf page of an index that outgrows memory, and every
-- page touched after a checkpoint went to the WAL whole.
--
-- Leading the index with the record's range of 2^22 seqs keeps those
-- inserts inside the newest range's part of the index (at most about 4 M
-- entries), as partitioning the key's lookup by seq would, without a
-- second table for the projector, the seed and the rebuild to fill.
-- Measured with pgbench on the benchmark machine (session 53), the
-- projector's 1,000-record inserts into 24-45 M records, alternated:
-- 129 and 122 thousand rows/s with this index, 59 and 47 thousand with
-- `(key, seq DESC)`. A list by key reads the ranges newest first and stops
-- when its page is full (query-api's `list_sql`): 0.32 ms either way, warm.
-- seq ascending within a key, read backwards, so that pages split where
-- the key's newest entry goes and stay full, as `records_kind_seq` does.
--
-- Built beside the old index (writes wait, reads do not): no statement
-- timeout, as for `records_kind_seq`.
SET LOCAL statement_timeout = 0;

-- A seed that died with the index deferred: build the new one instead.
DELETE FROM deferred_indexes WHERE name = 'records_key_seq';

CREATE INDEX records_range_key_seq ON records ((seq >> 22), key, seq)
    WITH (deduplicate_items = off) WHERE key IS NOT NULL;
DROP INDEX IF EXISTS records_key_seq;
