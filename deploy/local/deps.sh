#!/usr/bin/env bash
# Local dependencies (PostgreSQL, Redis, RabbitMQ; nginx for the gateway).
#
#   deploy/local/deps.sh up      make them available, write $LOCAL_DIR/env
#   deploy/local/deps.sh down [postgres|redis|rabbitmq ...]
#                                stop private instances (default: all of them)
#   deploy/local/deps.sh env     print $LOCAL_DIR/env
#   deploy/local/deps.sh status  show the private instances
#
# For each dependency, in order:
#   1. the configured URL answers (DATABASE_URL, REDIS_URL, AMQP_URL from the
#      environment, defaults as in the interface) -> use it;
#   2. else the server binaries are installed -> start a PRIVATE instance under
#      $LOCAL_DIR/<dep>/ on the URL's port when that is not the default one,
#      else on 55432 (PostgreSQL), 56379 (Redis), 55672 (RabbitMQ);
#   3. else install the packages with apt-get (root), or print the command and
#      exit 1.
# Then the databases named in DATABASE_URL and the first READ_DATABASE_URLS
# entry are created when missing. nginx (+ envsubst) is installed when missing
# unless DEPS_NGINX=0; it is not started here.
#
# Environment: LOCAL_DIR (default <repo>/.local), DEPS_WAIT_SECONDS (default 60,
# bound on each start-up wait), DEPS_NGINX (default 1), PG_BINDIR (optional).
# `up` also writes $LOCAL_DIR/deps.started: the instances this call started.
set -euo pipefail

LOG_TAG=deps
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

WAIT="${DEPS_WAIT_SECONDS:-60}"
ENV_FILE="$LOCAL_DIR/env"
STARTED_FILE="$LOCAL_DIR/deps.started"
PG_PRIVATE_PORT=55432
REDIS_PRIVATE_PORT=56379
RABBIT_PRIVATE_PORT=55672

is_root() { [[ $(id -u) -eq 0 ]]; }

# run_as USER CMD...: CMD as USER (when root and USER exists), from cwd /.
run_as() {
    local user="$1"
    shift
    # 9>&-: daemons must not inherit the lock of this script
    if is_root && [[ $user != root ]]; then
        (cd / && runuser -u "$user" -- "$@") 9>&-
    else
        (cd / && "$@") 9>&-
    fi
}

# own_dir USER DIR...: create DIRs owned by USER (when root).
own_dir() {
    local user="$1"
    shift
    mkdir -p "$@"
    if is_root && [[ $user != root ]]; then
        chown -R "$user:" "$@"
    fi
}

# check_access USER DIR: USER can write DIR (every parent must be searchable).
check_access() {
    run_as "$1" test -w "$2" -a -x "$2" ||
        die "user $1 cannot write $2 (a parent directory is not searchable?); set LOCAL_DIR to a path it can reach"
}

is_local_host() {
    case "$1" in
    127.0.0.1 | localhost | '[::1]' | ::1) return 0 ;;
    *) return 1 ;;
    esac
}

# private_port URL DEFAULT_PORT FIXED_PORT
private_port() {
    url_parse "$1" || die "cannot parse URL: $1"
    if [[ -n $U_PORT && $U_PORT != "$2" ]]; then
        printf '%s\n' "$U_PORT"
    else
        printf '%s\n' "$3"
    fi
}

require_free_port() {
    port_free "$1" || die "port $1 (for a private $2) is in use by something else; point the URL at a free port"
}

# ---------------------------------------------------------------- PostgreSQL

pg_bindir() {
    if [[ -n ${PG_BINDIR:-} ]]; then
        printf '%s\n' "$PG_BINDIR"
        return 0
    fi
    local d best
    # the highest version (glob order is lexical: 9 > 16)
    best="$(for d in /usr/lib/postgresql/*/bin; do
        [[ -x $d/initdb && -x $d/pg_ctl ]] && printf '%s\n' "$d"
    done | sort -V | tail -n1)"
    if [[ -z $best ]] && command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        best="$(dirname "$(command -v initdb)")"
    fi
    [[ -n $best ]] || return 1
    printf '%s\n' "$best"
}

# The OS user that owns the private cluster (PostgreSQL refuses root).
pg_os_user() {
    if ! is_root; then
        id -un
    elif id postgres >/dev/null 2>&1; then
        echo postgres
    else
        if ! id cqrs-local >/dev/null 2>&1; then
            useradd --system --no-create-home --shell /usr/sbin/nologin cqrs-local
        fi
        echo cqrs-local
    fi
}

pg_dir() { printf '%s\n' "$LOCAL_DIR/postgres"; }

pg_running() { pid_alive "$(pg_dir)/data/postmaster.pid"; }

pg_stop() {
    local data
    data="$(pg_dir)/data"
    pg_running || return 0
    local bindir owner
    bindir="$(pg_bindir)" || die "pg_ctl not found"
    owner="$(stat -c %U "$data")"
    log "stopping private PostgreSQL ($data)"
    run_as "$owner" "$bindir/pg_ctl" -D "$data" -m fast -w -t "$WAIT" stop >/dev/null ||
        die "pg_ctl stop failed; see $(pg_dir)/postgres.log"
}

# pg_start URL PORT: ensure the private cluster runs on PORT; prints nothing.
# Returns 0 when it started it, 10 when it was already running.
pg_start() {
    local url="$1" port="$2"
    local dir data run logf bindir user superuser
    dir="$(pg_dir)"
    data="$dir/data"
    run="$dir/run"
    logf="$dir/postgres.log"
    bindir="$(pg_bindir)" || die "PostgreSQL server binaries not found"
    url_parse "$url"
    superuser="${U_USER:-postgres}"
    local target
    target="$(url_with_host_port "$url" 127.0.0.1 "$port")"

    if pg_running; then
        if [[ $(sed -n 4p "$data/postmaster.pid") == "$port" ]] && pg_answers "$target"; then
            log "private PostgreSQL already running on 127.0.0.1:$port"
            return 10
        fi
        pg_stop
    fi
    require_free_port "$port" PostgreSQL

    user="$(pg_os_user)"
    own_dir "$user" "$dir" "$run"
    chmod 755 "$dir"
    check_access "$user" "$dir"
    local ver
    ver="$("$bindir/postgres" --version | sed -E 's/.* ([0-9]+)(\.[0-9]+)*.*/\1/')"
    if [[ -f $data/PG_VERSION && $(cat "$data/PG_VERSION") != "$ver" ]]; then
        die "$data was made by PostgreSQL $(cat "$data/PG_VERSION"), the server is $ver: remove $dir"
    fi
    if [[ ! -f $data/PG_VERSION ]]; then
        log "initdb $data (superuser $superuser, owner $user)"
        rm -rf "$data"
        own_dir "$user" "$data"
        chmod 700 "$data"
        run_as "$user" "$bindir/initdb" -D "$data" -U "$superuser" -A trust -E UTF8 --no-locale \
            >"$dir/initdb.log" 2>&1 || {
            tail -n 20 "$dir/initdb.log" >&2
            die "initdb failed (log: $dir/initdb.log)"
        }
        echo "include_if_exists = 'cqrs-local.conf'" >>"$data/postgresql.conf"
    fi
    cat >"$data/cqrs-local.conf" <<EOF
# written by deploy/local/deps.sh
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$run'
max_connections = 200
# The default (1/32 of shared_buffers: 4MB) kept the seed's COPY waiting on
# WAL writes; 64MB seeded a fifth faster (loadtest/RUNS.md, nineteenth run).
wal_buffers = 64MB
EOF
    is_root && chown "$user:" "$data/cqrs-local.conf"
    touch "$logf"
    is_root && chown "$user:" "$logf"
    log "starting private PostgreSQL on 127.0.0.1:$port ($data)"
    if ! run_as "$user" "$bindir/pg_ctl" -D "$data" -l "$logf" -w -t "$WAIT" start >/dev/null; then
        tail -n 20 "$logf" >&2
        die "private PostgreSQL did not start within ${WAIT}s (log: $logf)"
    fi
    wait_until "$WAIT" "PostgreSQL on port $port" pg_answers "$target" ||
        die "private PostgreSQL does not answer (log: $logf)"
    return 0
}

# pg_ensure_db URL: create URL's database when missing.
pg_ensure_db() {
    local url="$1" admin db
    url_parse "$url" || die "cannot parse URL: $url"
    db="${U_PATH%%/*}"
    [[ -n $db ]] || return 0
    admin="$(pg_admin_url "$url")"
    local lit="${db//\'/\'\'}" ident="${db//\"/\"\"}" exists
    exists="$(PGCONNECT_TIMEOUT=5 psql "$admin" -XqtA -v ON_ERROR_STOP=1 \
        -c "SELECT 1 FROM pg_database WHERE datname = '$lit'" 2>&1)" ||
        die "cannot query $admin: $exists"
    if [[ $exists != 1 ]]; then
        log "creating database $db"
        local out
        out="$(psql "$admin" -Xq -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$ident\"" 2>&1)" ||
            [[ $out == *"already exists"* ]] || die "CREATE DATABASE $db failed: $out"
    fi
}

# ---------------------------------------------------------------- Redis

redis_dir() { printf '%s\n' "$LOCAL_DIR/redis"; }

redis_running() { pid_alive "$(redis_dir)/redis.pid"; }

stop_pidfile() { # stop_pidfile PIDFILE NAME
    local pidf="$1" name="$2" pid
    pid_alive "$pidf" || return 0
    pid="$(head -n1 "$pidf")"
    log "stopping private $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + WAIT))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "$name did not stop within ${WAIT}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    rm -f "$pidf"
}

redis_stop() { stop_pidfile "$(redis_dir)/redis.pid" Redis; }

redis_start() {
    local url="$1" port="$2"
    local dir pidf target user=root
    dir="$(redis_dir)"
    pidf="$dir/redis.pid"
    target="$(url_with_host_port "$url" 127.0.0.1 "$port")"
    url_parse "$url"
    local pass="$U_PASS"

    if redis_running; then
        if [[ $(cat "$dir/port" 2>/dev/null) == "$port" ]] && redis_answers "$target"; then
            log "private Redis already running on 127.0.0.1:$port"
            return 10
        fi
        redis_stop
    fi
    require_free_port "$port" Redis
    command -v redis-server >/dev/null 2>&1 || die "redis-server not found"
    if is_root && id redis >/dev/null 2>&1; then user=redis; fi
    own_dir "$user" "$dir"
    chmod 755 "$dir"
    check_access "$user" "$dir"
    rm -f "$pidf"
    local args=(--port "$port" --bind 127.0.0.1 --daemonize yes --pidfile "$pidf"
        --logfile "$dir/redis.log" --dir "$dir" --save "" --appendonly no
        --maxmemory 256mb --maxmemory-policy allkeys-lru)
    [[ -n $pass ]] && args+=(--requirepass "$pass")
    log "starting private Redis on 127.0.0.1:$port ($dir)"
    run_as "$user" redis-server "${args[@]}" || die "redis-server failed (log: $dir/redis.log)"
    echo "$port" >"$dir/port"
    wait_until "$WAIT" "Redis on port $port" redis_answers "$target" || {
        tail -n 20 "$dir/redis.log" >&2 || true
        die "private Redis does not answer (log: $dir/redis.log)"
    }
    wait_until 10 "Redis pidfile" test -s "$pidf" || die "Redis wrote no pidfile $pidf"
    return 0
}

# ---------------------------------------------------------------- RabbitMQ

rabbit_dir() { printf '%s\n' "$LOCAL_DIR/rabbitmq"; }

rabbit_running() { pid_alive "$(rabbit_dir)/rabbitmq.pid"; }

rabbit_user() {
    if is_root && id rabbitmq >/dev/null 2>&1; then echo rabbitmq; else id -un; fi
}

rabbit_bin() { # rabbit_bin NAME: the real script, not Debian's su wrapper
    if [[ -x /usr/lib/rabbitmq/bin/$1 ]]; then
        echo "/usr/lib/rabbitmq/bin/$1"
    else
        command -v "$1"
    fi
}

# rabbit_run SECONDS CMD ARGS...: a RabbitMQ script (bounded in time) as the
# broker's user with the private instance's environment.
rabbit_run() {
    local limit="$1" dir user home bin
    shift
    dir="$(rabbit_dir)"
    user="$(rabbit_user)"
    home="$(getent passwd "$user" | cut -d: -f6)"
    bin="$(rabbit_bin "$1")" || die "$1 not found"
    shift
    run_as "$user" timeout "$limit" env HOME="$home" \
        RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" "$bin" "$@"
}

rabbit_node() { cat "$(rabbit_dir)/node" 2>/dev/null; }

# rabbit_registered NODE: the node is known to epmd (it may not have written
# its pidfile yet when an earlier `up` was killed early).
rabbit_registered() {
    [[ -n $1 ]] && command -v epmd >/dev/null 2>&1 &&
        epmd -names 2>/dev/null | grep -q "^name ${1%@*} at port"
}

rabbit_stop() {
    local dir pidf node
    dir="$(rabbit_dir)"
    pidf="$dir/rabbitmq.pid"
    node="$(rabbit_node)"
    if rabbit_running; then
        log "stopping private RabbitMQ ($node)"
        rabbit_run "$WAIT" rabbitmqctl -q -n "$node" stop "$pidf" >/dev/null 2>&1 || true
        stop_pidfile "$pidf" RabbitMQ
    elif rabbit_registered "$node"; then
        log "stopping private RabbitMQ ($node, no pidfile)"
        rabbit_run "$WAIT" rabbitmqctl -q -n "$node" stop >/dev/null 2>&1 || true
    fi
}

# rabbit_dist_port AMQP_PORT: the Erlang distribution port for a private node.
# port+20000 like RabbitMQ's default (5672 -> 25672) when that is usable,
# else the first usable one from 20000 + (its last four digits) up. Never in
# the kernel's ephemeral range (an outgoing connection may hold such a port
# by the time the node binds it, and the node then fails to start), nor in
# the CLI's own range 35672-35682.
rabbit_dist_port() {
    local amqp="$1" lo=32768 hi=60999 p
    read -r lo hi </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
    usable() {
        (($1 >= 1024 && $1 <= 65535 && $1 != amqp)) &&
            ! (($1 >= lo && $1 <= hi)) && ! (($1 >= 35672 && $1 <= 35682)) && port_free "$1"
    }
    p=$((amqp + 20000))
    if usable "$p"; then
        echo "$p"
        return 0
    fi
    # Started from the AMQP port's last four digits, so two nodes set up side
    # by side (the tests) rarely look at the same ports.
    local start=$((20000 + amqp % 10000)) i
    for ((i = 0; i < 64512; i++)); do
        p=$((1024 + (start - 1024 + i) % 64512))
        if usable "$p"; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

rabbit_start() {
    local url="$1" port="$2"
    local dir target user node dist
    dir="$(rabbit_dir)"
    target="$(url_with_host_port "$url" 127.0.0.1 "$port")"
    node="cqrs-$port@localhost"

    if rabbit_running; then
        if [[ $(rabbit_node) == "$node" ]] && amqp_answers "$target"; then
            log "private RabbitMQ already running on 127.0.0.1:$port ($node)"
            return 10
        fi
        rabbit_stop
    fi
    require_free_port "$port" RabbitMQ
    [[ -n $(rabbit_bin rabbitmq-server) ]] || die "rabbitmq-server not found"

    dist="$(rabbit_dist_port "$port")" || die "no free port for RabbitMQ's Erlang distribution"

    user="$(rabbit_user)"
    own_dir "$user" "$dir" "$dir/mnesia" "$dir/log"
    chmod 755 "$dir"
    check_access "$user" "$dir"
    url_parse "$url"
    local vhost="${U_PATH//%2[fF]//}"
    [[ -n $vhost ]] || vhost=/
    cat >"$dir/rabbitmq-env.conf" <<EOF
# written by deploy/local/deps.sh (replaces /etc/rabbitmq/rabbitmq-env.conf)
NODENAME=$node
NODE_IP_ADDRESS=127.0.0.1
NODE_PORT=$port
DIST_PORT=$dist
MNESIA_BASE=$dir/mnesia
LOG_BASE=$dir/log
CONFIG_FILE=$dir/rabbitmq.conf
ADVANCED_CONFIG_FILE=$dir/advanced.config
ENABLED_PLUGINS_FILE=$dir/enabled_plugins
PID_FILE=$dir/rabbitmq.pid
ERL_EPMD_ADDRESS=127.0.0.1
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
    cat >"$dir/rabbitmq.conf" <<EOF
# written by deploy/local/deps.sh
default_user = ${U_USER:-guest}
default_pass = ${U_PASS:-guest}
default_vhost = $vhost
log.file.level = info
log.console = false
EOF
    # no plugins: the management UI would take 15672 from the system broker
    echo '[].' >"$dir/enabled_plugins"
    echo '[].' >"$dir/advanced.config"
    is_root && chown "$user:" "$dir"/*.conf "$dir/enabled_plugins" "$dir/advanced.config"
    echo "$node" >"$dir/node"
    rm -f "$dir/rabbitmq.pid"

    log "starting private RabbitMQ on 127.0.0.1:$port (node $node, dist port $dist, $dir)"
    (
        export RABBITMQ_NODENAME="$node" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
            RABBITMQ_NODE_PORT="$port" RABBITMQ_DIST_PORT="$dist" \
            RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
            RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
            RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
            RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
            RABBITMQ_PID_FILE="$dir/rabbitmq.pid"
        rabbit_run 30 rabbitmq-server -detached
    ) >"$dir/start.log" 2>&1 || {
        cat "$dir/start.log" >&2
        die "rabbitmq-server failed to start (logs: $dir/log)"
    }
    local deadline=$((SECONDS + WAIT))
    until rabbit_run 15 rabbitmqctl -q -n "$node" await_startup --timeout 10 >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            tail -n 20 "$dir/log/$node.log" >&2 2>/dev/null || cat "$dir/start.log" >&2
            die "private RabbitMQ did not start within ${WAIT}s (logs: $dir/log)"
        fi
        sleep 1
    done
    wait_until "$WAIT" "AMQP on port $port" amqp_answers "$target" ||
        die "private RabbitMQ does not answer AMQP on $port (logs: $dir/log)"
    wait_until 10 "RabbitMQ pidfile" test -s "$dir/rabbitmq.pid" || die "RabbitMQ wrote no pidfile"
    return 0
}

# ---------------------------------------------------------------- commands

have_pg_server() { pg_bindir >/dev/null 2>&1; }
have_nginx() { command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]]; }

# install PKG...: apt-get when root, else print the command and exit 1.
install_pkgs() {
    local cmd="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $*"
    if ! command -v apt-get >/dev/null 2>&1; then
        die "missing: $*; install them with your package manager and rerun"
    fi
    if ! is_root; then
        log "missing packages: $*"
        printf 'run as root:\n  sudo sh -c %s\n' "$(shell_quote "$cmd")" >&2
        exit 1
    fi
    log "installing: $*"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null ||
        die "apt-get install $* failed"
}

# started NAME RC: record NAME when the start function returned 0.
record_start() {
    if [[ $2 -eq 0 ]]; then
        STARTED+=("$1")
    elif [[ $2 -ne 10 ]]; then
        die "starting $1 failed"
    fi
}

cmd_up() {
    local db_url="${DATABASE_URL:-$DEFAULT_DATABASE_URL}"
    local read_urls="${READ_DATABASE_URLS:-$DEFAULT_READ_DATABASE_URLS}"
    local amqp_url="${AMQP_URL:-$DEFAULT_AMQP_URL}"
    local redis_url="${REDIS_URL:-$DEFAULT_REDIS_URL}"
    local u
    for u in "$db_url" "$amqp_url" "$redis_url" ${read_urls//,/ }; do
        url_parse "$u" || die "cannot parse URL: $u"
    done

    local pg_ok=0 redis_ok=0 amqp_ok=0
    pg_answers "$db_url" && pg_ok=1
    redis_answers "$redis_url" && redis_ok=1
    amqp_answers "$amqp_url" && amqp_ok=1

    local pkgs=()
    if ((!pg_ok)) && ! have_pg_server; then
        pkgs+=(postgresql)
    elif ! command -v psql >/dev/null 2>&1 || ! command -v pg_isready >/dev/null 2>&1; then
        pkgs+=(postgresql-client)
    fi
    if ((!redis_ok)) && ! command -v redis-server >/dev/null 2>&1; then pkgs+=(redis-server); fi
    if ((!amqp_ok)) && [[ -z $(rabbit_bin rabbitmq-server 2>/dev/null) ]]; then pkgs+=(rabbitmq-server); fi
    if [[ ${DEPS_NGINX:-1} != 0 ]]; then
        have_nginx || pkgs+=(nginx)
        command -v envsubst >/dev/null 2>&1 || pkgs+=(gettext-base)
    fi
    if ((${#pkgs[@]})); then
        install_pkgs "${pkgs[@]}"
        # a package's post-install may have started the system service
        ((pg_ok)) || ! pg_answers "$db_url" || pg_ok=1
        ((redis_ok)) || ! redis_answers "$redis_url" || redis_ok=1
        ((amqp_ok)) || ! amqp_answers "$amqp_url" || amqp_ok=1
    fi

    STARTED=()
    # on failure, stop what this call started
    trap 'up_failed $?' EXIT
    local rc port
    local orig_db_url="$db_url"
    if ((pg_ok)); then
        log "PostgreSQL answers at $(url_parse "$db_url"; echo "$U_HOST:${U_PORT:-5432}"): using it"
    else
        port="$(private_port "$db_url" 5432 "$PG_PRIVATE_PORT")"
        rc=0
        pg_start "$db_url" "$port" || rc=$?
        record_start postgres "$rc"
        db_url="$(url_with_host_port "$db_url" 127.0.0.1 "$port")"
    fi
    # Read URLs on the write URL's server follow it; others must answer.
    url_parse "$orig_db_url"
    local orig_hp="$U_HOST:${U_PORT:-5432}" new_read='' r hp
    is_local_host "$U_HOST" && orig_hp="local:${U_PORT:-5432}"
    url_parse "$db_url"
    local final_host="$U_HOST" final_port="${U_PORT:-5432}"
    IFS=',' read -r -a reads <<<"$read_urls"
    for r in "${reads[@]}"; do
        r="${r#"${r%%[![:space:]]*}"}"
        r="${r%"${r##*[![:space:]]}"}"
        [[ -n $r ]] || continue
        url_parse "$r"
        hp="$U_HOST:${U_PORT:-5432}"
        is_local_host "$U_HOST" && hp="local:${U_PORT:-5432}"
        if [[ $hp == "$orig_hp" ]]; then
            r="$(url_with_host_port "$r" "$final_host" "$final_port")"
        elif ! pg_answers "$r"; then
            die "read database server $U_HOST:${U_PORT:-5432} does not answer (only DATABASE_URL's server is started privately)"
        fi
        new_read+="${new_read:+,}$r"
    done
    read_urls="$new_read"
    [[ -n $read_urls ]] || die "READ_DATABASE_URLS is empty"

    if ((redis_ok)); then
        log "Redis answers at $(url_parse "$redis_url"; echo "$U_HOST:${U_PORT:-6379}"): using it"
    else
        port="$(private_port "$redis_url" 6379 "$REDIS_PRIVATE_PORT")"
        rc=0
        redis_start "$redis_url" "$port" || rc=$?
        record_start redis "$rc"
        redis_url="$(url_with_host_port "$redis_url" 127.0.0.1 "$port")"
    fi

    if ((amqp_ok)); then
        log "RabbitMQ answers at $(url_parse "$amqp_url"; echo "$U_HOST:${U_PORT:-5672}"): using it"
    else
        port="$(private_port "$amqp_url" 5672 "$RABBIT_PRIVATE_PORT")"
        rc=0
        rabbit_start "$amqp_url" "$port" || rc=$?
        record_start rabbitmq "$rc"
        amqp_url="$(url_with_host_port "$amqp_url" 127.0.0.1 "$port")"
    fi

    pg_ensure_db "$db_url"
    pg_ensure_db "${read_urls%%,*}"

    local tmp="$ENV_FILE.tmp.$$"
    {
        echo "# written by deploy/local/deps.sh up on $(date -u +%FT%TZ); source it"
        echo "# private instances in $LOCAL_DIR: $(
            cmd_status_short
        )"
        echo "export DATABASE_URL=$(shell_quote "$db_url")"
        echo "export READ_DATABASE_URLS=$(shell_quote "$read_urls")"
        echo "export AMQP_URL=$(shell_quote "$amqp_url")"
        echo "export REDIS_URL=$(shell_quote "$redis_url")"
    } >"$tmp"
    mv -f "$tmp" "$ENV_FILE"
    echo "${STARTED[*]}" >"$STARTED_FILE"
    if [[ ${DEPS_NGINX:-1} != 0 ]] && ! have_nginx; then
        log "nginx is not available: the gateway will not run"
    fi
    log "wrote $ENV_FILE${STARTED[*]:+ (started: ${STARTED[*]})}"
    trap - EXIT
}

up_failed() {
    local rc="$1"
    trap - EXIT
    if ((rc != 0 && ${#STARTED[@]})); then
        log "failed: stopping what this call started: ${STARTED[*]}"
        cmd_down "${STARTED[@]}" || true
    fi
    exit "$rc"
}

cmd_status_short() {
    local s=()
    pg_running && s+=("postgres:$(sed -n 4p "$(pg_dir)/data/postmaster.pid")")
    redis_running && s+=("redis:$(cat "$(redis_dir)/port" 2>/dev/null)")
    rabbit_running && s+=("rabbitmq:$(rabbit_node)")
    if ((${#s[@]})); then echo "${s[*]}"; else echo none; fi
}

cmd_down() {
    local targets=("$@") t
    ((${#targets[@]})) || targets=(rabbitmq redis postgres)
    for t in "${targets[@]}"; do
        case "$t" in
        postgres | postgresql | pg) pg_stop ;;
        redis) redis_stop ;;
        rabbitmq | rabbit | amqp) rabbit_stop ;;
        *) die "unknown dependency: $t (postgres, redis, rabbitmq)" ;;
        esac
    done
}

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//' >&2
    exit 2
}

main() {
    [[ $# -ge 1 ]] || usage
    local cmd="$1"
    shift
    mkdir -p "$LOCAL_DIR"
    case "$cmd" in
    up | down)
        # one deps.sh at a time per state dir
        exec 9>"$LOCAL_DIR/.deps.lock"
        flock -w 300 9 || die "another deps.sh holds $LOCAL_DIR/.deps.lock"
        "cmd_$cmd" "$@"
        ;;
    env)
        [[ -f $ENV_FILE ]] || die "$ENV_FILE does not exist: run $0 up"
        cat "$ENV_FILE"
        ;;
    status)
        echo "private instances in $LOCAL_DIR: $(cmd_status_short)"
        ;;
    -h | --help | help) usage ;;
    *) usage ;;
    esac
}

main "$@"
