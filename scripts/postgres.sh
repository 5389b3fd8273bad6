#!/usr/bin/env bash
# A private PostgreSQL cluster for tests and development, in a directory of its own.
#
#   scripts/postgres.sh install          installs Debian's postgresql package if initdb is missing
#   scripts/postgres.sh start DIR [PORT] creates (first time) and starts a cluster in DIR,
#                                        listening on 127.0.0.1:PORT (default 54329) only,
#                                        trust authentication for local TCP; prints its URL
#   scripts/postgres.sh stop DIR         stops it (the data stays in DIR)
#   scripts/postgres.sh url DIR          prints the URL of the cluster in DIR
#
# PG_EXTRA_OPTS (optional) is added to the server's options on start, e.g.
# PG_EXTRA_OPTS="-c shared_preload_libraries=pg_stat_statements" (benches/report uses it).
#
# Idempotent: start on a running cluster only prints the URL; stop on a stopped one does
# nothing. PostgreSQL refuses to run as root, so as root the cluster belongs to the
# system user `hsmpg` (created if missing); otherwise to the calling user. The URL names
# the superuser `hsm` and the database `postgres`: tests create their own databases.
set -euo pipefail

PG_USER=hsmpg
SUPERUSER=hsm

die() { echo "postgres.sh: $*" >&2; exit 1; }

bindir() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && { echo "$d"; return 0; }
    done
    command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
    return 1
}

install() {
    bindir >/dev/null && return 0
    [ "$(id -u)" = 0 ] || die "initdb is missing; run as root (or: apt-get install postgresql)"
    echo "postgres.sh: installing Debian's postgresql package" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends postgresql >&2
    bindir >/dev/null || die "postgresql installed but no initdb under /usr/lib/postgresql/*/bin"
}

# Runs a command as the cluster's owner.
as_owner() {
    if [ "$(id -u)" = 0 ]; then
        # runuser needs no password and no tty (CI has neither).
        runuser -u "$PG_USER" -- "$@"
    else
        "$@"
    fi
}

owner_setup() {
    [ "$(id -u)" = 0 ] || return 0
    if ! id -u "$PG_USER" >/dev/null 2>&1; then
        useradd --system --no-create-home --shell /usr/sbin/nologin "$PG_USER"
    fi
}

port_of() { cat "$1/port" 2>/dev/null || echo 54329; }

url() {
    local dir=$1
    echo "postgresql://$SUPERUSER@127.0.0.1:$(port_of "$dir")/postgres"
}

start() {
    local dir=${1:?usage: postgres.sh start DIR [PORT]} port=${2:-}
    install
    owner_setup
    local bin
    bin=$(bindir)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    [ -n "$port" ] || port=$(port_of "$dir")
    local data=$dir/data
    if [ ! -s "$data/PG_VERSION" ]; then
        [ "$(id -u)" = 0 ] && chown "$PG_USER" "$dir"
        as_owner "$bin/initdb" -D "$data" -U "$SUPERUSER" --auth=trust --encoding=UTF8 \
            --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
            || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
        echo "$port" >"$dir/port"
    fi
    port=$(port_of "$dir")
    if as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        url "$dir"
        return 0
    fi
    # Loopback only; the socket directory is the cluster's own (not /var/run/postgresql,
    # which may not exist or belong to another cluster). fsync stays on: tests of
    # durability must not pass because the database lied about it.
    as_owner "$bin/pg_ctl" -D "$data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=300 ${PG_EXTRA_OPTS:-}" start >/dev/null \
        || { tail -n 20 "$dir/server.log" >&2; die "the server did not start (log: $dir/server.log)"; }
    url "$dir"
}

stop() {
    local dir=${1:?usage: postgres.sh stop DIR}
    [ -s "$dir/data/PG_VERSION" ] || return 0
    local bin
    bin=$(bindir) || return 0
    if as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    fi
}

case "${1:-}" in
    install) install ;;
    start) shift; start "$@" ;;
    stop) shift; stop "$@" ;;
    url) shift; url "${1:?usage: postgres.sh url DIR}" ;;
    *) die "usage: postgres.sh install | start DIR [PORT] | stop DIR | url DIR" ;;
esac
