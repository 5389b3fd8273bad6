#!/usr/bin/env bash
# Coverage-guided fuzzing of the targets in fuzz/ with cargo-fuzz (libFuzzer) on the
# stable toolchain (RUSTC_BOOTSTRAP=1 lets stable rustc take the -Z flags cargo-fuzz
# passes; no sanitizer: the project's code forbids unsafe). See fuzz/README.md.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   each TARGET (default: all) for SECONDS (default 10)
#
# Each target's working corpus is fuzz/libfuzzer/corpus/TARGET (not committed), started
# from the seeds fuzz/corpus/TARGET and the regression inputs fuzz/regressions/TARGET.
# A crash stops that target with libFuzzer's report; its input is in
# fuzz/libfuzzer/artifacts/TARGET/. Copy it to fuzz/regressions/TARGET/ with the fix
# (the hsm-fuzz tests replay it in every test run). A summary line per target goes to
# stdout and to fuzz/libfuzzer/runs.log (target, seconds, execs, corpus size, result).
# Environment: FUZZ_NICE (default 19), FUZZ_JOBS (targets run at once, default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
shift || true
all=(config plan share backup audit pskc requests)
targets=("${@:-${all[@]}}")
dir=fuzz/libfuzzer
nice_level=${FUZZ_NICE:-19}
jobs=${FUZZ_JOBS:-1}

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1 CARGO_INCREMENTAL=0
nice -n "$nice_level" cargo fuzz build --fuzz-dir "$dir" -s none
bin_dir=$dir/target/$(rustc -vV | sed -n 's/^host: //p')/release

run_one() {
    local t=$1 log
    mkdir -p "$dir/corpus/$t" "$dir/artifacts/$t" "$dir/logs"
    log="$dir/logs/$t-$(date -u +%Y%m%dT%H%M%S).log"
    local seeds=(fuzz/corpus/"$t")
    [ -d fuzz/regressions/"$t" ] && seeds+=(fuzz/regressions/"$t")
    local rc=0
    # The binary built above, run directly: an edit of the sources during a long
    # campaign must not make each run rebuild first.
    nice -n "$nice_level" "$bin_dir/$t" "$dir/corpus/$t" "${seeds[@]}" \
        -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 \
        -artifact_prefix="$dir/artifacts/$t/" -print_final_stats=1 >"$log" 2>&1 || rc=$?
    local execs corpus
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    corpus=$(find "$dir/corpus/$t" -type f | wc -l)
    local result=ok
    [ "$rc" -ne 0 ] && result="FAILED rc=$rc (see $log)"
    local line="$(date -u +%FT%TZ) target=$t seconds=$seconds execs=${execs:-?} corpus=$corpus result=$result"
    echo "$line" | tee -a "$dir/runs.log"
    return "$rc"
}

status=0
if [ "$jobs" -le 1 ]; then
    for t in "${targets[@]}"; do run_one "$t" || status=1; done
else
    pids=()
    for t in "${targets[@]}"; do
        run_one "$t" & pids+=($!)
        if [ "${#pids[@]}" -ge "$jobs" ]; then
            wait "${pids[0]}" || status=1
            pids=("${pids[@]:1}")
        fi
    done
    for p in "${pids[@]}"; do wait "$p" || status=1; done
fi
exit "$status"
