#!/usr/bin/env bash
# Throwaway PostgreSQL for tests.
#
#   scripts/postgres.sh start    # install if needed, initdb, start, create db "sweeps" (idempotent)
#   scripts/postgres.sh url      # print the SQLAlchemy URL
#   scripts/postgres.sh status   # exit 0 if running
#   scripts/postgres.sh stop     # stop and delete the data dir
#
# Env: PGPORT (default 55432), TP_SWEEP_PG_DIR (default /tmp/tp_sweep_pg-$PGPORT).
# The server listens on 127.0.0.1 only, trusts every local connection and runs
# with fsync off: it is for tests, never for data you want to keep.
set -euo pipefail

PORT="${PGPORT:-55432}"
ROOT="${TP_SWEEP_PG_DIR:-/tmp/tp_sweep_pg-$PORT}"
DATA="$ROOT/data"
SOCK="$ROOT/sock"
LOG="$ROOT/server.log"
DB=sweeps
PG_USER=postgres

die() { echo "postgres.sh: $*" >&2; exit 1; }

find_bindir() {
    local d
    # Newest installed major version wins.
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n "$d" && -x "$d/initdb" ]]; then echo "$d"; return 0; fi
    if command -v pg_config >/dev/null 2>&1; then
        d=$(pg_config --bindir)
        if [[ -x "$d/initdb" ]]; then echo "$d"; return 0; fi
    fi
    return 1
}

ensure_installed() {
    if BIN=$(find_bindir); then return 0; fi
    [[ $(id -u) -eq 0 ]] || die "PostgreSQL binaries not found and not root; install the 'postgresql' package"
    echo "postgres.sh: installing postgresql (apt-get)..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y --no-install-recommends postgresql >/dev/null
    BIN=$(find_bindir) || die "postgresql installed but initdb not found"
}

# postgres refuses to run as root, so server-side commands run as $PG_USER.
as_pg() {
    if [[ $(id -u) -eq 0 ]]; then
        id "$PG_USER" >/dev/null 2>&1 || useradd --system --home-dir "$ROOT" --shell /bin/sh "$PG_USER"
        runuser -u "$PG_USER" -- "$@"
    else
        "$@"
    fi
}

is_running() {
    [[ -n "${BIN:-}" && -f "$DATA/PG_VERSION" ]] || return 1
    as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

# Serialise concurrent start/stop calls (e.g. parallel test sessions).
lock() {
    exec 9>"/tmp/tp_sweep_pg-$PORT.lock"
    flock 9
}

cmd_start() {
    ensure_installed
    lock
    if ! is_running; then
        if [[ ! -f "$DATA/PG_VERSION" ]]; then
            rm -rf "$ROOT"
            mkdir -p "$DATA" "$SOCK"
            [[ $(id -u) -eq 0 ]] && chown -R "$PG_USER" "$ROOT"
            chmod 700 "$DATA"
            as_pg "$BIN/initdb" -D "$DATA" -U "$PG_USER" -A trust -E UTF8 \
                --locale=C.UTF-8 --no-sync >"$ROOT/initdb.log" 2>&1 \
                || { cat "$ROOT/initdb.log" >&2; die "initdb failed"; }
        fi
        # 9>&-: the postmaster must not inherit the lock fd, or it would hold the lock forever.
        if ! as_pg "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 30 start -o \
            "-c listen_addresses=127.0.0.1 -p $PORT -k $SOCK -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
            >/dev/null 9>&-; then
            tail -n 20 "$LOG" >&2 || true
            die "server failed to start on port $PORT (port in use?)"
        fi
    fi
    if [[ -z $("$BIN/psql" -h 127.0.0.1 -p "$PORT" -U "$PG_USER" -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$DB'") ]]; then
        "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U "$PG_USER" "$DB"
    fi
    echo "postgres.sh: running on 127.0.0.1:$PORT (data $DATA)" >&2
}

cmd_stop() {
    BIN=$(find_bindir) || true
    lock
    if is_running; then
        as_pg "$BIN/pg_ctl" -D "$DATA" -m immediate -w stop >/dev/null
    fi
    rm -rf "$ROOT"
}

cmd_status() {
    BIN=$(find_bindir) || return 1
    is_running
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    url) echo "postgresql+psycopg://$PG_USER@127.0.0.1:$PORT/$DB" ;;
    *) echo "usage: $0 start|stop|status|url" >&2; exit 2 ;;
esac
