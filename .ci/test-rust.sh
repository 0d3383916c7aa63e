#!/usr/bin/env bash
# Runs the Rust test suite against the servers named in the environment
# (DATABASE_URL's server, AMQP_URL, REDIS_URL). Per-test databases (about
# 80, a gigabyte) are dropped after a run that passed; after one that failed
# they are kept to look into, and the next run drops them first.
set -euo pipefail
threads="${1:-6}"
cd "$(dirname "$0")/.."

admin_url="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/cqrs}"
admin_url="${admin_url%/*}/postgres"
drop_test_databases() {
    command -v psql >/dev/null || return 0
    # One connection; \gexec runs each DROP on its own (none in a transaction).
    psql -qAt "$admin_url" >/dev/null 2>&1 <<'SQL' || true
SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE)', datname)
FROM pg_database WHERE datname LIKE 'cqrs\_test\_%' \gexec
SQL
}
drop_test_databases

# The end-to-end tests run the service binaries as processes.
cargo build --workspace --bins
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "cargo-nextest not found; installing it (once)" >&2
    cargo install cargo-nextest --locked
fi
if RUST_LOG="${RUST_LOG:-warn}" cargo nextest run --workspace --test-threads "$threads" --no-fail-fast; then
    drop_test_databases
else
    rc=$?
    echo "the tests' databases (cqrs_test_*) are kept to look into; the next run drops them" >&2
    exit "$rc"
fi
