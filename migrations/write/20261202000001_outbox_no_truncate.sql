-- The outbox is a queue that grows under a burst (a batch backlog reached
-- 440,000 rows on the benchmark machine) and empties again. A VACUUM that
-- finds its tail pages empty truncates the file, and truncation holds an
-- ACCESS EXCLUSIVE lock on the table: every append (each one inserts its
-- outbox rows) and every relay DELETE waits behind it, for seconds when the
-- disk is slow (the relay's DELETE hit its 5 s statement timeout there, in
-- the DataFileTruncate wait). The space is needed again at the next burst,
-- so it is kept.
ALTER TABLE outbox SET (vacuum_truncate = false);
