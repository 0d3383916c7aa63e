-- The write log: append-only, one row per record, never updated.
--
-- `payload` is `json`, not `jsonb`: `json` keeps the text exactly as received, so
-- numbers keep every digit and their spelling (`1e300` stays `1e300`, a 30-digit
-- integer is not rounded) on every read path, as the contract requires. `jsonb`
-- would rewrite `1e300` as 1 followed by 300 zeros.

CREATE SEQUENCE IF NOT EXISTS records_seq AS bigint;

-- A writer must hold a transaction id *before* it takes a sequence value: the
-- projector's watermark (every committed seq <= W applied) relies on
-- "all transactions that could still commit a seq <= L are in the snapshot taken
-- after reading L". Taking the xid first makes that true.
CREATE OR REPLACE FUNCTION next_record_seq() RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_current_xact_id();
    RETURN nextval('records_seq');
END
$$;

CREATE TABLE IF NOT EXISTS records (
    seq        bigint      PRIMARY KEY DEFAULT next_record_seq(),
    id         uuid        NOT NULL UNIQUE,
    kind       text        NOT NULL,
    key        text,
    payload    json        NOT NULL,
    created_at timestamptz NOT NULL
);
ALTER SEQUENCE records_seq OWNED BY records.seq;

-- Replays and catch-up read by seq ranges (the primary key); the read side
-- filters by kind/key on its own model, so the write log needs no more indexes.

-- Transactional outbox: one row per committed record not yet confirmed by
-- RabbitMQ. Written in the same transaction as the record, deleted by the relay
-- only after the broker confirmed the message carrying it.
CREATE TABLE IF NOT EXISTS outbox (
    seq bigint PRIMARY KEY
);

-- Idempotency keys, scoped to the caller, valid 24 h. `record_ids` are chosen
-- before the insert (UUIDv7 from the API), so the claim and the records are
-- written by one statement.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    caller       text        NOT NULL,
    key          text        NOT NULL,
    request_hash bytea       NOT NULL,
    record_ids   uuid[]      NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (caller, key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_created_at ON idempotency_keys (created_at);
