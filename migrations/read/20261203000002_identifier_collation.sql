-- `kind` and `key` are identifiers: compared for equality, never sorted for
-- a reader (lists are ordered by seq). With the database's locale every
-- comparison in their indexes went through the locale's collation, and
-- PostgreSQL sorts such text without abbreviated keys. Byte order ("C")
-- gives the same equality and lets a sort compare most keys as integers.
-- Measured on the benchmark machine (10 M records, both indexes built side
-- by side, as `projector seed` does): 24-35 s before, 19-20 s after, with
-- `(key, seq DESC)` alone built in 10-14 s instead of 20-24 s.
--
-- Deduplication never finds anything to merge in these two indexes (seq is
-- unique), but a build and every full leaf page paid for looking.
--
-- Changing a column's collation rewrites no rows, but it rebuilds the two
-- indexes while the table is locked: 12.7 s at 10 M records on the
-- benchmark machine, during which the read model is neither read nor
-- written. Hence no statement timeout here (the services' pools set one).
SET LOCAL statement_timeout = 0;
ALTER INDEX IF EXISTS records_kind_seq SET (deduplicate_items = off);
ALTER INDEX IF EXISTS records_key_seq SET (deduplicate_items = off);
ALTER TABLE records
    ALTER COLUMN kind TYPE text COLLATE "C",
    ALTER COLUMN key TYPE text COLLATE "C";
