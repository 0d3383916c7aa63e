#!/usr/bin/env bash
# Seeds COUNT records into empty databases with two `projector` binaries in
# turn, ROUNDS times each, and prints every run and the medians: how a change
# to the seed is measured (loadtest/RUNS.md). The order alternates by round
# (A B, B A, A B, ...), so a machine that slows down over the runs does not
# favour one side.
#
#   cargo build --release -p projector && cp target/release/projector /tmp/projector-new
#   git stash && cargo build --release -p projector && cp target/release/projector /tmp/projector-old && git stash pop
#   loadtest/seed-ab.sh /tmp/projector-old /tmp/projector-new
#
# Env (defaults):
#   COUNT=3000000   records per seed
#   ROUNDS=3        seeds per binary
#   SEED_ARGS=""    extra arguments for both, e.g. "--streams 3"
#   AB_SERVER       the PostgreSQL server, as a URL without a database (default: DATABASE_URL's
#                   server, from .local/env when `make deps` wrote it, else
#                   postgres://postgres@127.0.0.1:5432)
#   AB_DB=seed_ab   the server's databases AB_DB_write and AB_DB_read are dropped and created
#                   before each seed, and dropped at the end
# Nothing else may run on the machine meanwhile: the figures are records a second.
set -euo pipefail

if [ "$#" -ne 2 ] || [ ! -x "$1" ] || [ ! -x "$2" ]; then
  echo "usage: $0 OLD_PROJECTOR NEW_PROJECTOR (two executable projector binaries)" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${AB_SERVER:-}" ] && [ -z "${DATABASE_URL:-}" ] && [ -f "$ROOT/.local/env" ]; then
  # shellcheck disable=SC1091
  . "$ROOT/.local/env"
fi
url="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/cqrs}"
server="${AB_SERVER:-${url%/*}}"
COUNT="${COUNT:-3000000}"
ROUNDS="${ROUNDS:-3}"
db="${AB_DB:-seed_ab}"
read -r -a extra <<< "${SEED_ARGS:-}"
bins=("$1" "$2")
names=(A B)

admin() { psql -qAt "$server/postgres" -v ON_ERROR_STOP=1 "$@"; }
drop() {
  admin -c "DROP DATABASE IF EXISTS ${db}_write WITH (FORCE)" \
    -c "DROP DATABASE IF EXISTS ${db}_read WITH (FORCE)" 2>/dev/null
}
trap drop EXIT

# Each side's figures, space-separated.
declare -A totals copies
echo "A = $1"
echo "B = $2"
echo "$COUNT records a seed, $ROUNDS seeds a side${SEED_ARGS:+, seed args: $SEED_ARGS}"
for round in $(seq 1 "$ROUNDS"); do
  order=(0 1)
  if [ $((round % 2)) -eq 0 ]; then order=(1 0); fi
  for i in "${order[@]}"; do
    drop
    admin -c "CREATE DATABASE ${db}_write" -c "CREATE DATABASE ${db}_read" -c "CHECKPOINT"
    out="$(DATABASE_URL="$server/${db}_write" READ_DATABASE_URLS="$server/${db}_read" \
      RUST_LOG=error "${bins[$i]}" seed --count "$COUNT" "${extra[@]}")"
    # "seeded N records in S s (R/s), ...; copy S s (C/s)..."
    total="$(sed -n 's/^seeded [0-9]* records in [0-9.]* s (\([0-9]*\)\/s).*/\1/p' <<< "$out")"
    copy="$(sed -n 's/.*; copy [0-9.]* s (\([0-9]*\)\/s).*/\1/p' <<< "$out")"
    if [ -z "$total" ] || [ -z "$copy" ]; then
      echo "could not read the seed's output: $out" >&2
      exit 1
    fi
    n="${names[$i]}"
    totals[$n]+="$total "
    copies[$n]+="$copy "
    echo "round $round $n: $total records/s (copy $copy/s)"
  done
done

median() { tr ' ' '\n' <<< "$1" | sed '/^$/d' | sort -n | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
for n in "${names[@]}"; do
  echo "median $n: $(median "${totals[$n]}") records/s (copy $(median "${copies[$n]}")/s)"
done
