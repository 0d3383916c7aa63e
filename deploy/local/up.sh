#!/usr/bin/env bash
# `make up`: the whole stack on this host, in the foreground.
#
#   deploy/local/up.sh
#
# 1. deploy/local/deps.sh up (PostgreSQL, Redis, RabbitMQ: the configured ones
#    when they answer, else private instances), then sources $LOCAL_DIR/env;
# 2. cargo build --release of the three services (skipped with SKIP_BUILD=1);
# 3. command-api migrate, projector migrate;
# 4. command-api, projector, query-api in the background (logs in
#    $LOCAL_DIR/logs/), each waited for on /readyz;
# 5. the nginx gateway from deploy/gateway/nginx.conf.template (when nginx and
#    the template are there; otherwise it goes on without it);
# 6. prints the endpoints, then waits. Ctrl-C (or SIGTERM) stops exactly what
#    it started: gateway, services, and the private dependency instances this
#    run started. If a service dies, the rest is stopped too (exit 1).
#
# Environment: AUTH_DISABLED (default true here: local development only),
# HTTP_HOST (default 127.0.0.1 here), COMMAND_API_PORT (8080), QUERY_API_PORT
# (8081), PROJECTOR_PORT (8082), GATEWAY_PORT (8000), READY_WAIT_SECONDS (60),
# STOP_WAIT_SECONDS (20), SKIP_BUILD, CARGO_TARGET_DIR, LOCAL_DIR, and
# everything the services and deps.sh read.
set -euo pipefail

LOG_TAG=up
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DEPS="$LIB_DIR/deps.sh"
export LOCAL_DIR
export AUTH_DISABLED="${AUTH_DISABLED:-true}"
export HTTP_HOST="${HTTP_HOST:-127.0.0.1}"
COMMAND_API_PORT="${COMMAND_API_PORT:-8080}"
QUERY_API_PORT="${QUERY_API_PORT:-8081}"
PROJECTOR_PORT="${PROJECTOR_PORT:-8082}"
GATEWAY_PORT="${GATEWAY_PORT:-8000}"
READY_WAIT="${READY_WAIT_SECONDS:-60}"
STOP_WAIT="${STOP_WAIT_SECONDS:-20}"
LOGS="$LOCAL_DIR/logs"
GW_DIR="$LOCAL_DIR/gateway"
TEMPLATE="${GATEWAY_TEMPLATE:-$ROOT_DIR/deploy/gateway/nginx.conf.template}"

NAMES=()    # what this run started, in start order
PIDS=()
DEPS_STARTED=()
CLEANED=0

# ---------------------------------------------------------------- stopping

stop_pid() { # stop_pid NAME PID: SIGTERM, bounded wait, then SIGKILL
    local name="$1" pid="$2" deadline
    kill -0 "$pid" 2>/dev/null || return 0
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || return 0
    deadline=$((SECONDS + STOP_WAIT))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "$name did not stop within ${STOP_WAIT}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    ((CLEANED)) && return 0
    CLEANED=1
    trap '' INT TERM # a second Ctrl-C must not cut the clean-up short
    local i
    # reverse start order: gateway, query-api, projector, command-api
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${NAMES[i]}" "${PIDS[i]}"
    done
    if ((${#DEPS_STARTED[@]})); then
        "$DEPS" down "${DEPS_STARTED[@]}" || log "deps.sh down failed"
    fi
    log "stopped"
}

on_exit() {
    local rc=$?
    cleanup
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- helpers

http_ok() { # http_ok URL: a 2xx answer
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null -m 2 "$1" 2>/dev/null
    else
        url_parse "$1" || return 1
        local line
        # shellcheck disable=SC2016 # expanded by the inner bash
        line="$(timeout 3 bash -c '
            exec 3<>"/dev/tcp/$0/$1" || exit 1
            printf "GET /%s HTTP/1.0\r\nHost: %s\r\n\r\n" "$2" "$0" >&3
            IFS= read -r line <&3 && printf "%s" "$line"
        ' "$U_HOST" "$U_PORT" "$U_PATH" 2>/dev/null)" || return 1
        [[ $line =~ ^HTTP/[0-9.]+\ 2 ]]
    fi
}

# start_bg NAME LOGFILE CMD...: run CMD in the background, remember it.
start_bg() {
    local name="$1" logf="$2"
    shift 2
    "$@" >>"$logf" 2>&1 &
    NAMES+=("$name")
    PIDS+=("$!")
}

# wait_ready NAME PID URL: until URL answers 2xx; fails when PID dies.
wait_ready() {
    local name="$1" pid="$2" url="$3" deadline=$((SECONDS + READY_WAIT))
    until http_ok "$url"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$LOGS/$name.log" >&2 || true
            die "$name exited during start-up (log: $LOGS/$name.log)"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 30 "$LOGS/$name.log" >&2 || true
            curl -sS -m 2 "$url" >&2 2>/dev/null || true
            die "$name not ready within ${READY_WAIT}s at $url (log: $LOGS/$name.log)"
        fi
        sleep 0.5
    done
    log "$name ready ($url)"
}

target_dir() {
    local t="${CARGO_TARGET_DIR:-}"
    if [[ -z $t ]]; then
        t="$(cd "$ROOT_DIR" && cargo metadata --no-deps --format-version 1 2>/dev/null |
            sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')" || true
        [[ -n $t ]] || t="$ROOT_DIR/target"
    fi
    case "$t" in /*) ;; *) t="$ROOT_DIR/$t" ;; esac
    printf '%s\n' "$t"
}

nginx_bin() {
    command -v nginx 2>/dev/null && return 0
    [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx
}

GATEWAY_UP=0
start_gateway() {
    local nginx
    if ! nginx="$(nginx_bin)"; then
        log "nginx is not installed: continuing WITHOUT the gateway on :$GATEWAY_PORT"
        return 0
    fi
    if ! command -v envsubst >/dev/null 2>&1; then
        log "envsubst (package gettext-base) is missing: continuing WITHOUT the gateway"
        return 0
    fi
    if [[ ! -f $TEMPLATE ]]; then
        log "$TEMPLATE not found: continuing WITHOUT the gateway"
        return 0
    fi
    if ! port_free "$GATEWAY_PORT"; then
        log "port $GATEWAY_PORT is in use: continuing WITHOUT the gateway"
        return 0
    fi
    mkdir -p "$GW_DIR/logs" "$GW_DIR/temp"
    # shellcheck disable=SC2016 # envsubst's list of variables, literally
    GATEWAY_PORT="$GATEWAY_PORT" \
        COMMAND_API_UPSTREAM="127.0.0.1:$COMMAND_API_PORT" \
        QUERY_API_UPSTREAM="127.0.0.1:$QUERY_API_PORT" \
        envsubst '$GATEWAY_PORT $COMMAND_API_UPSTREAM $QUERY_API_UPSTREAM' \
        <"$TEMPLATE" >"$GW_DIR/nginx.conf"
    local args=(-p "$GW_DIR/" -c "$GW_DIR/nginx.conf" -e "$GW_DIR/logs/error.log" -g 'daemon off;')
    local out
    if ! out="$("$nginx" -t -q "${args[@]}" 2>&1)"; then
        printf '%s\n' "$out" >&2
        log "nginx rejects $GW_DIR/nginx.conf: continuing WITHOUT the gateway"
        return 0
    fi
    start_bg gateway "$LOGS/gateway.log" "$nginx" "${args[@]}"
    local pid="${PIDS[-1]}"
    if ! wait_until 10 "nginx on :$GATEWAY_PORT" port_open 127.0.0.1 "$GATEWAY_PORT" ||
        ! kill -0 "$pid" 2>/dev/null; then
        tail -n 20 "$LOGS/gateway.log" "$GW_DIR/logs/error.log" >&2 2>/dev/null || true
        stop_pid gateway "$pid"
        unset 'PIDS[-1]' 'NAMES[-1]'
        log "nginx did not start: continuing WITHOUT the gateway"
        return 0
    fi
    GATEWAY_UP=1
    log "gateway ready (http://127.0.0.1:$GATEWAY_PORT, config $GW_DIR/nginx.conf)"
}

auth_warning() {
    [[ ${AUTH_DISABLED,,} == true || $AUTH_DISABLED == 1 ]] || return 0
    cat >&2 <<'EOF'

!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  WARNING: AUTH_DISABLED=true -- AUTHENTICATION IS OFF.              !!
!!  Anyone who can reach these ports can read and write every record.  !!
!!  For local development only. NEVER run like this anywhere else.    !!
!!  (set AUTH_DISABLED=false and JWT_* to test with auth)             !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!

EOF
}

banner() {
    local w r h=127.0.0.1
    if ((GATEWAY_UP)); then
        w="http://$h:$GATEWAY_PORT"
        r="$w"
    else
        w="http://$h:$COMMAND_API_PORT"
        r="http://$h:$QUERY_API_PORT"
    fi
    cat <<EOF

==== CQRS stack is up ====
  gateway      $(if ((GATEWAY_UP)); then echo "http://$h:$GATEWAY_PORT   POST /data, POST /data/batch, GET /data, GET /data/{id}"; else echo "NOT RUNNING (no nginx or no template)"; fi)
  command-api  http://$h:$COMMAND_API_PORT   POST /data, POST /data/batch, /openapi.json
  query-api    http://$h:$QUERY_API_PORT   GET /data/{id}, GET /data, /openapi.json
  projector    http://$h:$PROJECTOR_PORT   (ops only)
  every service: /healthz /readyz /metrics (Prometheus), e.g. http://$h:$COMMAND_API_PORT/metrics
  dependencies: $(sed -n 's/^export //p' "$LOCAL_DIR/env" | tr '\n' ' ')
  logs: $LOGS/{command-api,projector,query-api,gateway}.log

Try:
  curl -si -X POST $w/data -H 'Content-Type: application/json' \\
       -d '{"kind":"order","key":"order-123","payload":{"total":42}}'
  curl -si -X POST $w/data/batch -H 'Content-Type: application/json' \\
       -d '[{"kind":"order","payload":{"n":1}},{"kind":"order","payload":{"n":2}}]'
  curl -si "$r/data/<id>?min_seq=<seq>"     # read your own write
  curl -si "$r/data?kind=order&limit=10"    # newest first; follow next_cursor
  curl -s  http://$h:$QUERY_API_PORT/metrics | head

Ctrl-C stops everything this run started.
EOF
}

# ---------------------------------------------------------------- main

for p in "$COMMAND_API_PORT" "$QUERY_API_PORT" "$PROJECTOR_PORT"; do
    port_free "$p" || die "port $p is in use (another 'make up' running?)"
done
mkdir -p "$LOGS"
for f in command-api projector query-api gateway migrate; do
    [[ -f $LOGS/$f.log ]] && mv -f "$LOGS/$f.log" "$LOGS/$f.log.prev"
done

"$DEPS" up
read -r -a DEPS_STARTED <"$LOCAL_DIR/deps.started" || DEPS_STARTED=()
# shellcheck disable=SC1091
. "$LOCAL_DIR/env"

BIN="$(target_dir)/release"
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "cargo build --release -p command-api -p query-api -p projector"
    (cd "$ROOT_DIR" && cargo build --release -p command-api -p query-api -p projector)
fi
for b in command-api projector query-api; do
    [[ -x $BIN/$b ]] || die "$BIN/$b not found (build it: cargo build --release --bins)"
done

log "migrations"
"$BIN/command-api" migrate 2>&1 | tee -a "$LOGS/migrate.log"
"$BIN/projector" migrate 2>&1 | tee -a "$LOGS/migrate.log"

start_bg command-api "$LOGS/command-api.log" env HTTP_PORT="$COMMAND_API_PORT" "$BIN/command-api"
start_bg projector "$LOGS/projector.log" env HTTP_PORT="$PROJECTOR_PORT" "$BIN/projector"
start_bg query-api "$LOGS/query-api.log" env HTTP_PORT="$QUERY_API_PORT" "$BIN/query-api"
wait_ready command-api "${PIDS[0]}" "http://127.0.0.1:$COMMAND_API_PORT/readyz"
wait_ready projector "${PIDS[1]}" "http://127.0.0.1:$PROJECTOR_PORT/readyz"
wait_ready query-api "${PIDS[2]}" "http://127.0.0.1:$QUERY_API_PORT/readyz"

start_gateway
banner
auth_warning

# Wait; a child that exits on its own takes the stack down with it.
while true; do
    rc=0
    wait -n "${PIDS[@]}" || rc=$?
    for i in "${!PIDS[@]}"; do
        if ! kill -0 "${PIDS[i]}" 2>/dev/null; then
            log "${NAMES[i]} exited (status $rc): stopping the stack"
            tail -n 20 "$LOGS/${NAMES[i]}.log" >&2 2>/dev/null || true
            exit 1
        fi
    done
done
