#!/usr/bin/env bash
# Two `hsm-service dev` instances in front of one SoftHSM token and one PostgreSQL
# database: what "several instances" means, on one machine.
#
#   scripts/dev-cluster.sh start    private PostgreSQL cluster (scripts/postgres.sh), then
#                                   instance 1 on 127.0.0.1:50051 and instance 2 on
#                                   127.0.0.1:50052, one data directory; waits until
#                                   `hsmctl health` answers SERVING on both
#   scripts/dev-cluster.sh stop     stops both instances and the database (data stays)
#   scripts/dev-cluster.sh status   health of each instance, and the database (its URL
#                                   when it runs, `stopped` when not); exit 1 unless all run
#
# Everything lives in $HSM_DEV_CLUSTER_DIR (default .hsm-dev-cluster): data/ (token,
# PINs, dev PKI, config.toml with the [store] section), postgres/ (the cluster), logs and
# pid files. Delete the directory (after stop) to start afresh. HSM_DEV_CLUSTER_PROFILE=dev
# uses a debug build instead of the release one; HSM_DEV_CLUSTER_PORTS="P1 P2" other ports. On a fresh Debian machine
# run it as root or with sudo the first time: it installs SoftHSM2 and PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${HSM_DEV_CLUSTER_DIR:-.hsm-dev-cluster}
PG_PORT=${HSM_DEV_CLUSTER_PG_PORT:-54330}
# shellcheck disable=SC2206 # two port numbers, split on purpose
PORTS=(${HSM_DEV_CLUSTER_PORTS:-50051 50052})
# Cargo profile of the binaries (release, like scripts/dev.sh; `dev` builds faster).
PROFILE=${HSM_DEV_CLUSTER_PROFILE:-release}
if [ "$PROFILE" = dev ]; then BIN=target/debug; else BIN=target/$PROFILE; fi

die() { echo "dev-cluster.sh: $*" >&2; exit 1; }

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

hsmctl() {
    "$BIN/hsmctl" --ca "$DIR/data/pki/ca.crt" --cert "$DIR/data/pki/officer-1.crt" \
        --key "$DIR/data/pki/officer-1.key" "$@"
}

# psql of the private cluster's PostgreSQL installation.
psql_bin() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/psql" ] && { echo "$d/psql"; return 0; }
    done
    command -v psql || die "psql not found"
}

wait_serving() {
    local port=$1 pidfile=$2 log=$3 i
    for i in $(seq 1 300); do
        pid_alive "$pidfile" || { tail -n 20 "$log" >&2; die "instance on :$port exited (log: $log)"; }
        if hsmctl --endpoint "https://127.0.0.1:$port" health >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    die "instance on :$port did not answer SERVING within 60 s (log: $log)"
}

start() {
    softhsm-config/setup.sh
    mkdir -p "$DIR"
    local url
    url=$(scripts/postgres.sh start "$DIR/postgres" "$PG_PORT")
    # The service's own database (the cluster's superuser owns it: dev only).
    local db_url=${url%/postgres}/hsm
    if [ "$("$(psql_bin)" "$url" -tAc "SELECT 1 FROM pg_database WHERE datname = 'hsm'")" != 1 ]; then
        "$(psql_bin)" "$url" -qc "CREATE DATABASE hsm" >/dev/null
    fi
    cargo build --profile "$PROFILE" --locked -q -p hsm-service -p hsm-client --bins
    local i port pidfile log
    for i in 0 1; do
        port=${PORTS[$i]}
        pidfile=$DIR/instance-$((i + 1)).pid
        log=$DIR/instance-$((i + 1)).log
        if pid_alive "$pidfile"; then
            echo "instance $((i + 1)) already running (pid $(cat "$pidfile"))"
            continue
        fi
        # The first run of instance 1 creates the data directory and writes the
        # database into its config.toml; instance 2 starts after it and reuses both.
        nohup "$BIN/hsm-service" dev --data-dir "$DIR/data" --listen "127.0.0.1:$port" \
            --postgres "$db_url" >"$log" 2>&1 &
        echo $! >"$pidfile"
        wait_serving "$port" "$pidfile" "$log"
    done
    cat <<MSG
two instances, one token ($DIR/data/tokens), one database ($db_url):
  https://127.0.0.1:${PORTS[0]}   (log $DIR/instance-1.log, audit chain dev-127.0.0.1-${PORTS[0]})
  https://127.0.0.1:${PORTS[1]}   (log $DIR/instance-2.log, audit chain dev-127.0.0.1-${PORTS[1]})
try:
  export HSMCTL_CA=$DIR/data/pki/ca.crt HSMCTL_CERT=$DIR/data/pki/login-service.crt HSMCTL_KEY=$DIR/data/pki/login-service.key
  $BIN/hsmctl --endpoint https://127.0.0.1:${PORTS[1]} health
stop: scripts/dev-cluster.sh stop
MSG
}

stop() {
    local i pidfile pid
    for i in 1 2; do
        pidfile=$DIR/instance-$i.pid
        if pid_alive "$pidfile"; then
            pid=$(cat "$pidfile")
            kill -TERM "$pid"
            for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
            echo "instance $i stopped"
        fi
        rm -f "$pidfile"
    done
    scripts/postgres.sh stop "$DIR/postgres"
    echo "database stopped (data kept in $DIR)"
}

status() {
    local i port rc=0
    for i in 0 1; do
        port=${PORTS[$i]}
        if pid_alive "$DIR/instance-$((i + 1)).pid"; then
            echo "instance $((i + 1)) https://127.0.0.1:$port: $(hsmctl --endpoint "https://127.0.0.1:$port" health 2>&1 || true)"
        else
            echo "instance $((i + 1)) https://127.0.0.1:$port: not running"
            rc=1
        fi
    done
    if [ ! -s "$DIR/postgres/data/PG_VERSION" ]; then
        echo "database: none"
        rc=1
    elif scripts/postgres.sh running "$DIR/postgres"; then
        echo "database: $(scripts/postgres.sh url "$DIR/postgres")"
    else
        # No URL: nothing answers there (the data stays in $DIR/postgres).
        echo "database: stopped (start brings it up again)"
        rc=1
    fi
    return $rc
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: dev-cluster.sh start | stop | status" ;;
esac
