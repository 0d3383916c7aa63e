-- The read model: what the query API serves when Redis misses, and the list
-- index. `doc` is the record's complete JSON as served (built once by the
-- projector), so a read is one index lookup and no re-serialisation.

CREATE TABLE IF NOT EXISTS records (
    seq        bigint      PRIMARY KEY,
    id         uuid        NOT NULL UNIQUE,
    kind       text        NOT NULL,
    key        text,
    doc        text        NOT NULL
);

-- Keyset pagination, newest first, for each filter combination of the contract.
CREATE INDEX IF NOT EXISTS records_kind_seq ON records (kind, seq DESC);
CREATE INDEX IF NOT EXISTS records_key_seq ON records (key, seq DESC) WHERE key IS NOT NULL;
CREATE INDEX IF NOT EXISTS records_kind_key_seq ON records (kind, key, seq DESC) WHERE key IS NOT NULL;

-- The projection's watermark: every committed record with seq <= watermark is
-- in this table. Updated after the records it covers, so a streaming replica
-- that shows watermark W also shows every record up to W.
CREATE TABLE IF NOT EXISTS projection_state (
    id        boolean PRIMARY KEY DEFAULT true CHECK (id),
    watermark bigint  NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO projection_state (id, watermark) VALUES (true, 0) ON CONFLICT DO NOTHING;
