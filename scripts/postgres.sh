#!/usr/bin/env bash
# A private PostgreSQL cluster for tests and development, in a directory of its own.
#
#   scripts/postgres.sh install          installs Debian's postgresql package if initdb is missing
#   scripts/postgres.sh start DIR [PORT] [--tls]
#                                        creates (first time) and starts a cluster in DIR,
#                                        listening on 127.0.0.1:PORT (default 54329) only,
#                                        trust authentication for local TCP (except members
#                                        of the role hsm_password_login, which need their
#                                        password: scram-sha-256); prints its URL.
#                                        --tls also turns TLS on (plaintext stays allowed)
#                                        with a server certificate for 127.0.0.1/localhost
#                                        signed by a throw-away CA made in DIR/tls
#   scripts/postgres.sh ca DIR           prints the path of that CA's certificate (PEM)
#   scripts/postgres.sh stop DIR         stops it (the data stays in DIR)
#   scripts/postgres.sh url DIR          prints the URL of the cluster in DIR
#   scripts/postgres.sh running DIR      exit status 0 when the cluster in DIR is running
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

# A throw-away CA and a server certificate it signs (EC P-256, 10 years), in DIR/tls.
make_tls() {
    local tls=$1/tls
    [ -s "$tls/server.key" ] && return 0
    command -v openssl >/dev/null 2>&1 || die "--tls needs openssl"
    mkdir -p "$tls"
    (
        cd "$tls"
        umask 077
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
            -subj "/CN=hsm-service test PostgreSQL CA" -keyout ca.key -out ca.pem \
            -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -subj "/CN=127.0.0.1" -keyout server.key -out server.csr
        printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" \
            "basicConstraints=critical,CA:FALSE" "extendedKeyUsage=serverAuth" >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
            -extfile server.ext -out server.pem
        rm -f server.csr server.ext ca.srl
    ) >"$1/tls.log" 2>&1 || { cat "$1/tls.log" >&2; die "making the test certificates failed"; }
    chmod 644 "$tls/ca.pem" "$tls/server.pem"
    chmod 755 "$tls"
    # PostgreSQL wants its key owned by the server's user and unreadable by others.
    [ "$(id -u)" = 0 ] && chown "$PG_USER" "$tls/server.key"
    chmod 600 "$tls/server.key"
}

# Settings this script owns, appended once to the cluster's configuration (a cluster
# made by an older version of this script gets them at its next start). Prints
# "changed" when it wrote something.
configure() {
    local dir=$1 tls=$2 data=$1/data
    if ! grep -q hsm_password_login "$data/pg_hba.conf"; then
        # First matching line wins: members of the role authenticate with a password (the
        # tests of store.password_file), everyone else is trusted as before.
        { echo "host all +hsm_password_login 127.0.0.1/32 scram-sha-256"; cat "$data/pg_hba.conf"; } \
            >"$data/pg_hba.conf.new"
        mv "$data/pg_hba.conf.new" "$data/pg_hba.conf"
        [ "$(id -u)" = 0 ] && chown "$PG_USER" "$data/pg_hba.conf"
        echo changed
    fi
    if [ "$tls" = 1 ] && ! grep -q "^ssl = on" "$data/postgresql.conf"; then
        make_tls "$dir"
        printf '%s\n' "# scripts/postgres.sh --tls" "ssl = on" \
            "ssl_cert_file = '$dir/tls/server.pem'" "ssl_key_file = '$dir/tls/server.key'" \
            >>"$data/postgresql.conf"
        echo changed
    fi
}

start() {
    local dir=${1:?usage: postgres.sh start DIR [PORT] [--tls]} port=${2:-} tls=0
    [ "${3:-}" = --tls ] && tls=1
    if [ "$port" = --tls ]; then tls=1; port=; fi
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
    local changed
    changed=$(configure "$dir" "$tls")
    if as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        if [ -n "$changed" ]; then
            as_owner "$bin/pg_ctl" -D "$data" reload >/dev/null
        fi
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

# Exit status 0 when the cluster in DIR is running (pg_ctl status), 1 otherwise.
running() {
    local dir=${1:?usage: postgres.sh running DIR}
    [ -s "$dir/data/PG_VERSION" ] || return 1
    local bin
    bin=$(bindir) || return 1
    as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1
}

case "${1:-}" in
    install) install ;;
    start) shift; start "$@" ;;
    stop) shift; stop "$@" ;;
    url) shift; url "${1:?usage: postgres.sh url DIR}" ;;
    running) shift; running "$@" ;;
    ca)
        shift
        ca_dir=$(cd "${1:?usage: postgres.sh ca DIR}" && pwd)
        [ -s "$ca_dir/tls/ca.pem" ] || die "no CA in $ca_dir/tls (start the cluster with --tls)"
        echo "$ca_dir/tls/ca.pem"
        ;;
    *) die "usage: postgres.sh install | start DIR [PORT] [--tls] | stop DIR | url DIR | running DIR | ca DIR" ;;
esac
