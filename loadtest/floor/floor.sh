#!/usr/bin/env bash
# The floor: a static nginx answering every request with a body the size of
# the real answer, to measure what k6 + loopback cost at a given rate.
#
#   loadtest/floor/floor.sh start    # render + start in the background, wait until it answers
#   loadtest/floor/floor.sh stop     # stop the one started by `start`
#   loadtest/floor/floor.sh run      # render + run in the foreground (Ctrl-C stops)
#   loadtest/floor/floor.sh status
#
# Env: FLOOR_PORT (8099), FLOOR_DIR (loadtest/results/floor), PAYLOAD_BYTES (256),
#      LIMIT (50, list page size), BATCH_SIZE (1000), FLOOR_WORKERS (1).
# Then point any scenario at it: k6 run -e FLOOR=1 loadtest/read_id.js
# (FLOOR=1 implies BASE_URL=http://127.0.0.1:$FLOOR_PORT).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
FLOOR_PORT="${FLOOR_PORT:-8099}"
FLOOR_DIR="${FLOOR_DIR:-$ROOT/loadtest/results/floor}"
mkdir -p "$FLOOR_DIR"
FLOOR_DIR="$(cd "$FLOOR_DIR" && pwd)"
PIDFILE="$FLOOR_DIR/nginx.pid"

find_nginx() {
  for c in "${NGINX:-}" "$(command -v nginx 2>/dev/null || true)" /usr/sbin/nginx /usr/local/sbin/nginx /usr/local/nginx/sbin/nginx; do
    [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}

ensure_nginx() {
  if ! NGINX_BIN="$(find_nginx)"; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "floor: nginx not found; installing nginx-light with apt-get" >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light >/dev/null; }
      NGINX_BIN="$(find_nginx)"
    else
      echo "floor: nginx not found; install it: sudo apt-get install -y nginx-light" >&2
      exit 1
    fi
  fi
}

render() {
  python3 "$HERE/gen.py" --dir "$FLOOR_DIR" --port "$FLOOR_PORT" >&2
}

answers() {
  python3 - "$FLOOR_PORT" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen("http://127.0.0.1:%s/healthz" % sys.argv[1], timeout=1).read()
except Exception:
    sys.exit(1)
PY
}

running_pid() {
  [ -f "$PIDFILE" ] || return 1
  local pid; pid="$(cat "$PIDFILE" 2>/dev/null || true)"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && { echo "$pid"; return 0; }
  return 1
}

case "${1:-start}" in
  start)
    ensure_nginx
    if pid="$(running_pid)"; then echo "floor: already running (pid $pid) on :$FLOOR_PORT" >&2; exit 0; fi
    if answers; then echo "floor: port $FLOOR_PORT is taken by another process" >&2; exit 1; fi
    render
    # daemon off + our own background job: the pid is ours, and so is stopping it.
    nohup "$NGINX_BIN" -p "$FLOOR_DIR" -c "$FLOOR_DIR/nginx.conf" -e "$FLOOR_DIR/logs/error.log" -g 'daemon off;' \
      >"$FLOOR_DIR/logs/stdout.log" 2>&1 &
    for _ in $(seq 1 50); do
      if answers; then echo "floor: nginx pid $(cat "$PIDFILE") answering on http://127.0.0.1:$FLOOR_PORT" >&2; exit 0; fi
      sleep 0.1
    done
    echo "floor: nginx did not come up; see $FLOOR_DIR/logs/error.log" >&2
    cat "$FLOOR_DIR/logs/error.log" "$FLOOR_DIR/logs/stdout.log" >&2 2>/dev/null || true
    exit 1
    ;;
  stop)
    if pid="$(running_pid)"; then
      kill -QUIT "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null || true
      echo "floor: stopped (pid $pid)" >&2
    else
      echo "floor: not running" >&2
    fi
    ;;
  run)
    ensure_nginx
    render
    exec "$NGINX_BIN" -p "$FLOOR_DIR" -c "$FLOOR_DIR/nginx.conf" -e "$FLOOR_DIR/logs/error.log" -g 'daemon off;'
    ;;
  status)
    if pid="$(running_pid)"; then echo "floor: running (pid $pid) on :$FLOOR_PORT"; else echo "floor: not running"; exit 1; fi
    ;;
  *)
    echo "usage: $0 start|stop|run|status" >&2; exit 2 ;;
esac
