# shellcheck shell=bash
# Helpers shared by deploy/local/*.sh. Source it; it defines functions and a
# few variables and has no side effects.
# The bash -c snippets below are single-quoted on purpose (args via $0 $1 ...).
# shellcheck disable=SC2016

# Project root and local state dir (LOCAL_DIR overrides the default .local).
LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT_DIR="$(cd "$LIB_DIR/../.." && pwd)"
LOCAL_DIR="${LOCAL_DIR:-$ROOT_DIR/.local}"
# An absolute path: the private servers run as other users from another cwd.
case "$LOCAL_DIR" in /*) ;; *) LOCAL_DIR="$PWD/$LOCAL_DIR" ;; esac

# shellcheck disable=SC2034 # used by the scripts that source this file
DEFAULT_DATABASE_URL='postgres://postgres@127.0.0.1:5432/cqrs'
# shellcheck disable=SC2034
DEFAULT_READ_DATABASE_URLS='postgres://postgres@127.0.0.1:5432/cqrs_read'
# shellcheck disable=SC2034
DEFAULT_AMQP_URL='amqp://guest:guest@127.0.0.1:5672/%2f'
# shellcheck disable=SC2034
DEFAULT_REDIS_URL='redis://127.0.0.1:6379/0'

log() { printf '[%s] %s\n' "${LOG_TAG:-local}" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "${LOG_TAG:-local}" "$*" >&2; exit 1; }

# url_parse URL: sets U_SCHEME U_USER U_PASS U_HOST U_PORT U_PATH U_QUERY
# (U_PORT empty when the URL has none; U_PATH without the leading slash).
url_parse() {
    local re='^([a-zA-Z][a-zA-Z0-9+.-]*)://(([^:@/]*)(:([^@/]*))?@)?(\[[^]/]+\]|[^:/?]*)(:([0-9]+))?(/([^?]*))?(\?(.*))?$'
    if [[ ! $1 =~ $re ]]; then
        return 1
    fi
    U_SCHEME="${BASH_REMATCH[1]}"
    U_USER="${BASH_REMATCH[3]}"
    U_PASS="${BASH_REMATCH[5]}"
    U_HOST="${BASH_REMATCH[6]}"
    U_PORT="${BASH_REMATCH[8]}"
    U_PATH="${BASH_REMATCH[10]}"
    U_QUERY="${BASH_REMATCH[12]}"
    [[ -n $U_HOST ]] || U_HOST=127.0.0.1
}

# url_build: the inverse of url_parse, from the U_* variables.
url_build() {
    local auth=''
    if [[ -n $U_USER || -n $U_PASS ]]; then
        auth="$U_USER"
        [[ -n $U_PASS ]] && auth+=":$U_PASS"
        auth+='@'
    fi
    local s="$U_SCHEME://$auth$U_HOST"
    [[ -n $U_PORT ]] && s+=":$U_PORT"
    s+="/$U_PATH"
    [[ -n $U_QUERY ]] && s+="?$U_QUERY"
    printf '%s\n' "$s"
}

# url_with_host_port URL HOST PORT: the URL pointed at another server.
url_with_host_port() {
    url_parse "$1" || return 1
    U_HOST="$2"
    U_PORT="$3"
    url_build
}

# Strip IPv6 brackets for /dev/tcp.
tcp_host() { local h="${1#[}"; printf '%s\n' "${h%]}"; }

# port_open HOST PORT: something accepts TCP connections there.
port_open() {
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$(tcp_host "$1")" "$2" 2>/dev/null
}

# port_free PORT: nothing listens on 127.0.0.1:PORT (nor on the wildcard).
port_free() {
    local p="$1"
    if command -v ss >/dev/null 2>&1; then
        [[ -z "$(ss -Htln "sport = :$p" 2>/dev/null)" ]] || return 1
    fi
    ! port_open 127.0.0.1 "$p"
}

# pg_answers URL: the PostgreSQL server of URL accepts connections.
pg_answers() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -t 3 -d "$1" >/dev/null 2>&1
    elif command -v psql >/dev/null 2>&1; then
        PGCONNECT_TIMEOUT=3 psql "$(pg_admin_url "$1")" -XqtAc 'SELECT 1' >/dev/null 2>&1
    else
        return 1
    fi
}

# url_with_db URL NAME: the same server, user and options, database NAME.
url_with_db() {
    url_parse "$1" || return 1
    U_PATH="$2"
    url_build
}

# pg_admin_url URL: the same server's `postgres` database.
pg_admin_url() { url_with_db "$1" postgres; }

# redis_answers URL: PING answers PONG.
redis_answers() {
    local out
    if command -v redis-cli >/dev/null 2>&1; then
        out="$(timeout 5 redis-cli -u "$1" --no-auth-warning ping 2>/dev/null)" || return 1
        [[ $out == PONG ]]
    else
        url_parse "$1" || return 1
        out="$(timeout 3 bash -c '
            exec 3<>"/dev/tcp/$0/$1" || exit 1
            if [[ -n $2 ]]; then
                printf "AUTH %s\r\n" "$2" >&3
                IFS= read -r -t 2 line <&3 || exit 1
            fi
            printf "PING\r\n" >&3
            IFS= read -r -t 2 line <&3 || exit 1
            printf "%s" "${line%$'"'"'\r'"'"'}"
        ' "$(tcp_host "$U_HOST")" "${U_PORT:-6379}" "$U_PASS" 2>/dev/null)" || return 1
        [[ $out == +PONG ]]
    fi
}

# amqp_answers URL: the port speaks AMQP 0-9-1 (the protocol header is answered
# with a method frame on channel 0: connection.start).
amqp_answers() {
    url_parse "$1" || return 1
    local out
    out="$(timeout 4 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "AMQP\0\0\x09\x01" >&3
        head -c 3 <&3 | od -An -tx1
    ' "$(tcp_host "$U_HOST")" "${U_PORT:-5672}" 2>/dev/null)" || return 1
    [[ ${out//[[:space:]]/} == 010000 ]]
}

# wait_until SECONDS DESCRIPTION CMD...: poll CMD every 0.5 s.
wait_until() {
    local limit="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@"; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${limit}s waiting for $what"
            return 1
        fi
        sleep 0.5
    done
}

# pid_alive PIDFILE: the process named in the file's first line runs.
pid_alive() {
    local pid
    [[ -s $1 ]] || return 1
    pid="$(head -n1 "$1" 2>/dev/null)"
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

# shell_quote VALUE: a single-quoted shell word.
shell_quote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }
