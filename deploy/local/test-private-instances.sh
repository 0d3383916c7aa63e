#!/usr/bin/env bash
# Proves deps.sh's private-instance path: with every URL pointed at a free
# port, `deps.sh up` must start private PostgreSQL, Redis and RabbitMQ under a
# separate state dir, they must answer, and `deps.sh down` must stop them.
# The services on the default ports are neither used nor touched.
#
#   deploy/local/test-private-instances.sh
#
# Environment: PRIVATE_TEST_DIR (state dir, default <repo>/.local/private-test;
# wiped at start, removed after a clean pass, kept with its logs on failure).
# Needs root (or a user that may run the servers) and the server binaries, or
# apt-get to install them, like deps.sh. Takes ~15-20 s (RabbitMQ's start).
# Last line: "private-instances: N passed, M failed".
set -euo pipefail

LOG_TAG=private-test
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DEPS="$LIB_DIR/deps.sh"
TEST_DIR="${PRIVATE_TEST_DIR:-$ROOT_DIR/.local/private-test}"
case "$TEST_DIR" in /*) ;; *) TEST_DIR="$PWD/$TEST_DIR" ;; esac
export LOCAL_DIR="$TEST_DIR" DEPS_NGINX=0 DEPS_WAIT_SECONDS="${DEPS_WAIT_SECONDS:-60}"

PASSED=0
FAILED=0
check() { # check NAME CMD...
    local name="$1"
    shift
    if "$@" >/dev/null 2>&1; then
        PASSED=$((PASSED + 1))
        printf 'ok   %s\n' "$name"
    else
        FAILED=$((FAILED + 1))
        printf 'FAIL %s\n' "$name"
    fi
}
finish() {
    local rc=$?
    trap - EXIT INT TERM
    # never leave instances behind, whatever happened
    "$DEPS" down >/dev/null 2>&1 || true
    ((rc == 0)) || FAILED=$((FAILED + 1))
    # keep the state dir (logs) only when something failed
    ((FAILED)) || rm -rf "$TEST_DIR"
    echo "private-instances: $PASSED passed, $FAILED failed"
    ((FAILED == 0))
}

# A free port (not a default one); random start so parallel runs rarely meet.
# (deps.sh finds RabbitMQ's distribution port itself.)
pick_port() {
    local p=$((20000 + RANDOM % 9000)) n
    for ((n = 0; n < 2000; n++)); do
        p=$((p + 1))
        ((p < 29990)) || p=20001
        case " $* " in *" $p "*) continue ;; esac
        if port_free "$p"; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# Clean the state dir of an earlier run (stopping what it left running).
if [[ -d $TEST_DIR ]]; then
    "$DEPS" down >/dev/null 2>&1 || true
    rm -rf "$TEST_DIR"
fi
mkdir -p "$TEST_DIR"
trap finish EXIT
trap 'exit 130' INT TERM

PG_PORT="$(pick_port)"
REDIS_PORT="$(pick_port "$PG_PORT")"
AMQP_PORT="$(pick_port "$PG_PORT" "$REDIS_PORT")"
export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/cqrs_pt"
export READ_DATABASE_URLS="postgres://postgres@127.0.0.1:$PG_PORT/cqrs_pt_read"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
export AMQP_URL="amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f"
echo "free ports: postgres $PG_PORT, redis $REDIS_PORT, rabbitmq $AMQP_PORT; state in $TEST_DIR"

DEFAULTS_BEFORE=0
pg_answers "$DEFAULT_DATABASE_URL" && redis_answers "$DEFAULT_REDIS_URL" &&
    amqp_answers "$DEFAULT_AMQP_URL" && DEFAULTS_BEFORE=1

t0=$SECONDS
check "deps.sh up starts private instances" "$DEPS" up
echo "  (up took $((SECONDS - t0)) s)"
check "started all three" grep -qx 'postgres redis rabbitmq' "$TEST_DIR/deps.started"
env_has() {
    (
        # shellcheck disable=SC1091
        . "$TEST_DIR/env"
        [[ $DATABASE_URL == *":$PG_PORT/cqrs_pt" &&
            $READ_DATABASE_URLS == *":$PG_PORT/cqrs_pt_read" &&
            $REDIS_URL == *":$REDIS_PORT/0" && $AMQP_URL == *":$AMQP_PORT/%2f" ]]
    )
}
check "env file names the private ports" env_has
check "postgres: SELECT 1 on $DATABASE_URL" \
    psql "$DATABASE_URL" -XqtA -v ON_ERROR_STOP=1 -c 'SELECT 1'
check "postgres: SELECT 1 on $READ_DATABASE_URLS" \
    psql "$READ_DATABASE_URLS" -XqtA -v ON_ERROR_STOP=1 -c 'SELECT 1'
pg_is_private() {
    local d
    d="$(psql "$DATABASE_URL" -XqtA -c 'SHOW data_directory')"
    [[ $d == "$TEST_DIR/"* ]]
}
check "postgres: data directory is under the state dir" pg_is_private
check "redis: PING" redis_answers "$REDIS_URL"
redis_bounded() {
    [[ $(redis-cli -u "$REDIS_URL" config get maxmemory-policy | tail -n1) == allkeys-lru ]]
}
check "redis: allkeys-lru memory bound" redis_bounded
check "rabbitmq: AMQP 0-9-1 handshake" amqp_answers "$AMQP_URL"
check "deps.sh up again (idempotent)" "$DEPS" up

check "deps.sh down" "$DEPS" down
closed() { ! port_open 127.0.0.1 "$1"; }
check "postgres stopped" closed "$PG_PORT"
check "redis stopped" closed "$REDIS_PORT"
check "rabbitmq stopped" closed "$AMQP_PORT"
no_leftovers() { ! pgrep -f -- "$TEST_DIR" >/dev/null; }
check "no process left running from the state dir" no_leftovers
if ((DEFAULTS_BEFORE)); then
    defaults_answer() {
        pg_answers "$DEFAULT_DATABASE_URL" && redis_answers "$DEFAULT_REDIS_URL" &&
            amqp_answers "$DEFAULT_AMQP_URL"
    }
    check "services on the default ports untouched" defaults_answer
fi
