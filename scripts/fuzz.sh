#!/usr/bin/env bash
# make fuzz: runs each cargo-fuzz target in fuzz/ for FUZZ_SECS seconds (default 180), starting
# from its committed corpus (fuzz/corpus/<target>/, read only); new inputs go to the ignored
# fuzz/runs/<target>/, crashes to fuzz/artifacts/<target>/. Fails if any target fails a
# property, panics, hangs (FUZZ_TIMEOUT seconds on one input) or runs out of memory.
#
# Usage: scripts/fuzz.sh [target…]   (default: every target)
#
# cargo-fuzz drives rustc with -Z flags (the sanitizer); the toolchain here is stable, so
# RUSTC_BOOTSTRAP=1 lets stable rustc accept them. AddressSanitizer works that way on stable.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS="${FUZZ_SECS:-180}"
TIMEOUT="${FUZZ_TIMEOUT:-10}"
SANITIZER="${FUZZ_SANITIZER:-address}"
ALL=(ws_message stream_request cursor jwt credentials)
if [ "$#" -gt 0 ]; then targets=("$@"); else targets=("${ALL[@]}"); fi

# libfuzzer-sys compiles libFuzzer (C++): `make fuzz` installs g++ first when it is missing.
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz (cargo install cargo-fuzz --locked, ~2 min)"
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

# -a: debug assertions and overflow checks on, so an arithmetic overflow is a crash too.
FUZZ_FLAGS=(-a --sanitizer "$SANITIZER")
echo "fuzz: building ${targets[*]} (sanitizer: $SANITIZER)"
for t in "${targets[@]}"; do
    cargo fuzz build "${FUZZ_FLAGS[@]}" "$t"
done

mkdir -p fuzz/runs
failed=()
summary=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/runs/$t"
    log="fuzz/runs/$t.log"
    dict=()
    [ -f "fuzz/dicts/$t.dict" ] && dict=("-dict=fuzz/dicts/$t.dict")
    echo "fuzz: $t for ${SECS}s (log: $log)"
    # The first corpus directory receives the new inputs; the committed one is only read.
    if cargo fuzz run "${FUZZ_FLAGS[@]}" "$t" "fuzz/runs/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$SECS" -timeout="$TIMEOUT" -rss_limit_mb=2048 \
        -print_final_stats=1 "${dict[@]}" >"$log" 2>&1; then
        result=ok
    else
        result=FAILED
        failed+=("$t")
        grep -E "panicked|ERROR: libFuzzer|SUMMARY|Test unit written|artifact" "$log" | head -20 || true
    fi
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
    final_stat() { grep -E "^stat::$1:" "$log" | awk '{print $2}' | tail -1; }
    cov=$(sed -nE 's/.* cov: ([0-9]+) ft: ([0-9]+) corp: ([0-9]+)\/.*/cov \1, features \2, corpus \3/p' <<<"$done_line")
    summary+=("$(printf '%-15s %-7s runs %-9s exec/s %-6s %s, peak RSS %s MB' \
        "$t" "$result" "$(final_stat number_of_executed_units)" "$(final_stat average_exec_per_sec)" \
        "${cov:-n/a}" "$(final_stat peak_rss_mb)")")
done

echo
echo "fuzz: ${SECS}s per target"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]} (inputs in fuzz/artifacts/<target>/; reproduce with" \
        "RUSTC_BOOTSTRAP=1 cargo fuzz run -a <target> <file>, then add the file to fuzz/corpus/<target>/)"
    exit 1
fi
echo "fuzz: no crash"
