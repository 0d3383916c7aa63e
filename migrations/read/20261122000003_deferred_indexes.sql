-- Secondary indexes of the read model that a large `projector seed` dropped
-- to build them once at the end (one sort instead of millions of inserts).
-- The next seed (even `projector seed --count 0`) rebuilds whatever is listed
-- here, so a seed that died half-way is healed by running it again.
CREATE TABLE IF NOT EXISTS deferred_indexes (
    name       text PRIMARY KEY,
    definition text NOT NULL
);
