-- When each outbox row was written. The relay's fast path publishes rows the
-- moment their request commits; the sweep takes only rows older than
-- RELAY_SWEEP_AFTER_MS, so it does not race the fast path for fresh ones.
-- A constant default: adding the column rewrites nothing.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS at timestamptz NOT NULL DEFAULT now();
