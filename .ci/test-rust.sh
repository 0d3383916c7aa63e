#!/usr/bin/env bash
# Runs the Rust test suite against the servers named in the environment
# (DATABASE_URL's server, AMQP_URL, REDIS_URL). Leftover per-test databases
# from earlier runs are dropped first, so reruns on a dirty machine stay lean.
set -euo pipefail
threads="${1:-6}"
cd "$(dirname "$0")/.."

admin_url="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/cqrs}"
admin_url="${admin_url%/*}/postgres"
if command -v psql >/dev/null; then
    psql -qAt "$admin_url" -c "SELECT datname FROM pg_database WHERE datname LIKE 'cqrs\_test\_%'" 2>/dev/null |
        while read -r db; do
            psql -q "$admin_url" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true
        done
fi

# The end-to-end tests run the service binaries as processes.
cargo build --workspace --bins
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "cargo-nextest not found; installing it (once)" >&2
    cargo install cargo-nextest --locked
fi
RUST_LOG="${RUST_LOG:-warn}" cargo nextest run --workspace --test-threads "$threads" --no-fail-fast
