#!/usr/bin/env bash
# Soak (issue 15 §5; a bench, not a test): `hsm-service dev` on a fresh data directory,
# its peak VerifyCode first (HOTP accepted path, closed loop, 64 in flight, 20 s), then
# MINUTES one-minute slices of open-loop load at 80% of that peak, mixed: 3/4 of it
# VerifyCode (HOTP, accepted path) and 1/4 logins (`mixed`: VerifyCode TOTP + SignAssertion
# on its evidence), two `hsmctl bench --rate` processes side by side. The service's RSS
# (and its anonymous part, the heap) is read every 10 s. Prints one line per slice (rates, p50/p99, errors, RSS) and a summary:
# RSS at start, max and end, total errors, p99 of the first and last slice.
#
#   scripts/soak.sh [MINUTES]      default 10; PROFILE=debug uses the debug binaries
#                                  (default release: cargo build --release first);
#                                  SOAK_CACHE_MIB, SOAK_POSTGRES_URL: below
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-10}
profile=${PROFILE:-release}
if [ "$profile" = release ]; then
  cargo build --locked --release -p hsm-service -p hsm-client --bins >&2
fi
bin=target/$profile
dir=$(mktemp -d "${TMPDIR:-/tmp}/hsm-soak.XXXXXX")
svc_pid=""
cleanup() {
  if [ -n "$svc_pid" ]; then kill "$svc_pid" 2>/dev/null || true; wait "$svc_pid" 2>/dev/null || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT

# SOAK_POSTGRES_URL: the store on that PostgreSQL database instead of the embedded one
# (tells the service's own memory apart from redb's page cache, which counts as heap).
# SOAK_CACHE_MIB (embedded store only; default: the service's, 512): store.cache_mib,
# the page cache the heap grows into until it is full (in the first minutes at this
# load); the heap's slope after that is the finding.
store_args=()
if [ -n "${SOAK_POSTGRES_URL:-}" ]; then store_args=(--postgres "$SOAK_POSTGRES_URL"); fi
start_service() {
  env -u SOFTHSM2_CONF -u KRYOPTIC_CONF RUST_LOG=warn "$bin/hsm-service" dev --listen 127.0.0.1:0 \
    --data-dir "$dir/data" "${store_args[@]}" > "$dir/out" 2> "$dir/err" &
  svc_pid=$!
  for _ in $(seq 1 300); do
    grep -q "listening on" "$dir/out" 2>/dev/null && break
    sleep 0.1
  done
}
start_service
if [ -z "${SOAK_POSTGRES_URL:-}" ] && [ -n "${SOAK_CACHE_MIB:-}" ]; then
  # The first start wrote the data directory's config; restart with the cache size in it.
  kill "$svc_pid"; wait "$svc_pid" 2>/dev/null || true
  printf '\n[store]\ncache_mib = %s\n' "$SOAK_CACHE_MIB" >> "$dir/data/config.toml"
  start_service
fi
addr=$(sed -n 's/^hsm-service listening on \([^ ]*\).*/\1/p' "$dir/out" | head -1)
[ -n "$addr" ] || { cat "$dir/err" >&2; exit 1; }
pki=$dir/data/pki
bench() {
  "$bin/hsmctl" --endpoint "https://$addr" --ca "$pki/ca.crt" --cert "$pki/login-service.crt" \
    --key "$pki/login-service.key" --json bench "$@"
}
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$svc_pid/status"; }
# The heap's share of it (redb's page cache, up to 512 MiB, is heap too; SOAK_POSTGRES_URL
# leaves it out).
anon_kb() { awk '/^RssAnon/ {print $2}' "/proc/$svc_pid/status"; }
jq_num() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {'d': d}))" "$@"; }

bench --scenario verify-hotp --concurrency 64 --credentials 128 --duration 20s > "$dir/peak.json"
peak=$(jq_num "$dir/peak.json" "round(d['throughput_per_second'])")
verify_rate=$(( peak * 80 * 3 / 400 ))
login_rate=$(( peak * 80 / 400 ))
echo "peak VerifyCode (HOTP accepted, 64 in flight): $peak/s; soak at 80%: verify-hotp $verify_rate/s + mixed $login_rate/s, $minutes x 1 min"

rss_start=$(rss_kb); rss_max=$rss_start; anon_start=$(anon_kb); anon_max=$anon_start; errors=0; first_p99=""; last_p99=""
(while kill -0 "$svc_pid" 2>/dev/null; do rss_kb >> "$dir/rss"; anon_kb >> "$dir/anon"; sleep 10; done) &
sampler=$!
for m in $(seq 1 "$minutes"); do
  bench --scenario verify-hotp --rate "$verify_rate" --credentials 256 --duration 60s --warmup 0s > "$dir/v.json" &
  v=$!
  bench --scenario mixed --rate "$login_rate" --credentials 256 --duration 60s --warmup 0s > "$dir/m.json" &
  l=$!
  wait "$v" "$l"
  line=$(python3 - "$dir/v.json" "$dir/m.json" <<'EOF'
import json, sys
v, m = (json.load(open(f)) for f in sys.argv[1:3])
errs = sum(v["errors"].values()) if isinstance(v["errors"], dict) else v["errors"]
errs += sum(m["errors"].values()) if isinstance(m["errors"], dict) else m["errors"]
print(f'{v["throughput_per_second"]:.0f} {v["latency_ms"]["p50"]:.2f} {v["latency_ms"]["p99"]:.2f} '
      f'{m["throughput_per_second"]:.0f} {m["latency_ms"]["p99"]:.2f} {errs} {v["accepted_share"]:.4f}')
EOF
)
  read -r vt vp50 vp99 mt mp99 e share <<< "$line"
  rss=$(rss_kb); anon=$(anon_kb)
  [ "$rss" -gt "$rss_max" ] && rss_max=$rss
  [ "$anon" -gt "$anon_max" ] && anon_max=$anon
  errors=$((errors + e))
  [ -n "$first_p99" ] || first_p99=$vp99
  last_p99=$vp99
  echo "$anon" >> "$dir/anon_by_minute"
  echo "min $m: verify ${vt}/s p50 ${vp50} p99 ${vp99} ms (accepted ${share}); logins ${mt}/s p99 ${mp99} ms; errors $e; RSS $((rss / 1024)) MiB (anon $((anon / 1024)) MiB)"
done
kill "$sampler" 2>/dev/null || true
for r in $(cat "$dir/rss"); do [ "$r" -gt "$rss_max" ] && rss_max=$r; done
for r in $(cat "$dir/anon"); do [ "$r" -gt "$anon_max" ] && anon_max=$r; done
rss_end=$(rss_kb); anon_end=$(anon_kb)
store=$(du -m "$dir/data/store.redb" 2>/dev/null | cut -f1 || echo "?")
# The heap's slope over the second half (caches full by then): MiB per minute.
half=$(( (minutes + 1) / 2 ))
anon_half=$(sed -n "${half}p" "$dir/anon_by_minute")
slope=$(python3 -c "print(f'{($anon_end - $anon_half) / 1024 / max(1, $minutes - $half):+.2f}')")
echo "heap slope from minute $half to $minutes: $slope MiB/min"
echo "summary: RSS start $((rss_start / 1024)) MiB, max $((rss_max / 1024)) MiB, end $((rss_end / 1024)) MiB; of it anonymous (heap) start $((anon_start / 1024)), max $((anon_max / 1024)), end $((anon_end / 1024)) MiB (sampled every 10 s); store file ${store} MiB; errors $errors; VerifyCode p99 first minute ${first_p99} ms, last ${last_p99} ms"
