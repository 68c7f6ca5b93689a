#!/usr/bin/env bash
# A local PostgreSQL for development and tests (Debian's `postgresql` package).
#
#   storage/postgres.sh start    initdb once, start, print the URL (last stdout line)
#   storage/postgres.sh stop     stop the server
#   storage/postgres.sh status   exit 0 if it accepts connections, 3 if not
#   storage/postgres.sh url      print the URL
#
# Settings (env): MTBERT_PG_DIR (data dir, default storage/pg), MTBERT_PG_PORT (5433),
# MTBERT_PG_PASSWORD (local-dev-Qx7). Listens on 127.0.0.1 only; role and database `mtbert`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PORT="${MTBERT_PG_PORT:-5433}"
PASSWORD="${MTBERT_PG_PASSWORD:-local-dev-Qx7}"  # not a word that appears in logs: the secret filter masks it
DIR="${MTBERT_PG_DIR:-$here/pg}"
SOCKDIR=/tmp   # short path: unix socket names are limited to ~100 bytes

die() { echo "postgres.sh: $*" >&2; exit 1; }
note() { echo "postgres.sh: $*" >&2; }

# Run a command as the cluster owner: `postgres` when we are root (postgres refuses root).
as_pg() {
    if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_bin() {
    local bin
    bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    [[ -n $bin && -x $bin/pg_ctl ]] ||
        die "PostgreSQL server binaries not found — apt-get install postgresql"
    echo "$bin"
}

url() {
    local pw
    pw="$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' \
        "$PASSWORD" 2>/dev/null || echo "$PASSWORD")"
    echo "postgresql://mtbert:${pw}@127.0.0.1:${PORT}/mtbert"
}

ready() { "$(pg_bin)/pg_isready" -q -h 127.0.0.1 -p "$PORT"; }

# The data dir, which the cluster owner must be able to reach; else a fallback under /tmp.
data_dir() {
    local up
    up="$(dirname "$DIR")"
    while [[ ! -e $up ]]; do up="$(dirname "$up")"; done   # nearest existing ancestor
    if [[ $EUID -eq 0 ]] && ! runuser -u postgres -- test -x "$up" 2>/dev/null; then
        local alt
        alt="/tmp/mtbert-pg-$(echo -n "$DIR" | md5sum | cut -c1-8)"
        note "user postgres cannot reach $up; using $alt instead"
        DIR="$alt"
    fi
    echo "$DIR"
}

start() {
    local bin dir log
    bin="$(pg_bin)"
    log="$(mktemp)"
    id postgres >/dev/null 2>&1 || [[ $EUID -ne 0 ]] || die "no OS user postgres — apt-get install postgresql"
    dir="$(data_dir)"
    if [[ ! -s $dir/PG_VERSION ]]; then
        note "initdb $dir"
        mkdir -p "$dir"
        [[ $EUID -ne 0 ]] || chown postgres: "$dir"
        chmod 700 "$dir"
        as_pg "$bin/initdb" -D "$dir" -E UTF8 --locale=C.UTF-8 \
            --auth-local=peer --auth-host=scram-sha-256 >/dev/null 2>"$log" ||
            { cat "$log" >&2; rm -f "$log"; die "initdb failed"; }
        rm -f "$log"
        cat >>"$dir/postgresql.conf" <<EOF
# mtbert-search
listen_addresses = '127.0.0.1'
unix_socket_directories = '$SOCKDIR'
password_encryption = 'scram-sha-256'
max_connections = 200
EOF
    fi
    if ! ready; then
        as_pg "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -o "-p $PORT" -w -t 60 start >/dev/null ||
            { tail -n 20 "$dir/server.log" >&2; die "pg_ctl start failed (log: $dir/server.log)"; }
        for _ in $(seq 60); do ready && break; sleep 0.5; done
        ready || die "server did not become ready on 127.0.0.1:$PORT"
        # Role and database (idempotent; also resets the password to MTBERT_PG_PASSWORD).
        as_pg "$bin/psql" -q -X -v ON_ERROR_STOP=1 -h "$SOCKDIR" -p "$PORT" -d postgres \
            -v pw="$PASSWORD" >/dev/null <<'SQL'
SELECT 'CREATE ROLE mtbert' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mtbert') \gexec
ALTER ROLE mtbert WITH LOGIN CREATEDB PASSWORD :'pw';
SELECT 'CREATE DATABASE mtbert OWNER mtbert'
    WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mtbert') \gexec
SQL
        note "running on 127.0.0.1:$PORT (data: $dir)"
    fi
    url
}

stop() {
    local dir
    dir="$(data_dir 2>/dev/null)"
    if [[ -s $dir/postmaster.pid ]]; then
        as_pg "$(pg_bin)/pg_ctl" -D "$dir" -m fast -w stop >/dev/null && note "stopped"
    else
        note "not running (data: $dir)"
    fi
}

status() {
    if ready; then echo "running on 127.0.0.1:$PORT"; else echo "not running"; return 3; fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    url) url ;;
    *) echo "usage: $0 start|stop|status|url" >&2; exit 2 ;;
esac
