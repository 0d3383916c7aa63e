-- One row, for ever: tell the planner, so that joins against it are costed
-- as the single-row lookups they are.
ANALYZE projection_state;
