-- `(kind, seq DESC)` took each new record at the left end of its kind's
-- range. B-tree pages split there in halves (only the rightmost page of an
-- index is split to leave it full), so the projector grew the index with
-- pages half empty: 1 M records inserted 1,000 at a time left 6,847 leaf
-- pages at 50.6% density, against 3,835 at 90% for `(kind, seq)`, whose
-- new entries go to the right end of the kind's range and are recognised
-- as such (loadtest/RUNS.md, the thirty-seventh run). Lists read it
-- backwards: the query orders by `kind DESC, seq DESC` to match.
--
-- The new index is built beside the old one (writes wait, reads do not);
-- the old one is dropped and the new one renamed only at the end, so
-- readers wait only for the commit. 1.0 s at 1 M records on the
-- benchmark machine (so about ten at 10 M), hence no statement timeout.
SET LOCAL statement_timeout = 0;

-- A seed that died with the index deferred: build it now, ascending.
DELETE FROM deferred_indexes WHERE name = 'records_kind_seq';

CREATE INDEX records_kind_seq_ascending ON records (kind, seq) WITH (deduplicate_items = off);
DROP INDEX IF EXISTS records_kind_seq;
ALTER INDEX records_kind_seq_ascending RENAME TO records_kind_seq;
