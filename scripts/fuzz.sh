#!/usr/bin/env bash
# Fuzzes every target for SECONDS each (default 600), two at a time (one per core):
#   fuzz/           nbd_session nbd_tls_options nbd_frames journal_segment cache_index stored_json
#   ltx/fuzz/       decode (seeded with the Litestream files in testdata/ltx)
# Each run starts from the committed seeds (fuzz/corpus/<target>/) and keeps what it finds in
# fuzz/corpus-run/<target>/ (not committed). A crash stops that target and leaves its input in
# fuzz/artifacts/<target>/: fix it, then keep the input in fuzz/regressions/<target>/, which
# scripts/test.sh replays. Writes a report to bench/results/fuzz-<UTC time>.md.
# Needs cargo-fuzz (installed if missing); RUSTC_BOOTSTRAP lets the stable toolchain accept the
# sanitizer flags cargo-fuzz passes.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
root="$(pwd)"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1

targets=(nbd_session nbd_tls_options nbd_frames journal_segment cache_index stored_json)
(cd fuzz && cargo fuzz build -O)
(cd ltx/fuzz && cargo fuzz build -O decode)

logs="$(mktemp -d)"
run() { # dir target corpus...
    local dir="$1" target="$2"; shift 2
    local run_corpus="$dir/corpus-run/$target"
    mkdir -p "$run_corpus" "$dir/artifacts/$target"
    (cd "$dir" && cargo fuzz run -O "$target" "$run_corpus" "$@" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=262144 -print_final_stats=1 \
        -artifact_prefix="artifacts/$target/") >"$logs/$target.log" 2>&1 || true
}

ltx_seeds="$root/ltx/fuzz/corpus-run/seeds"
mkdir -p "$ltx_seeds"
find "$root/testdata/ltx" -name '*.ltx' -exec cp {} "$ltx_seeds/" \; 2>/dev/null || true

jobs_run=0
for target in "${targets[@]}"; do
    run "$root/fuzz" "$target" "$root/fuzz/corpus/$target" &
    jobs_run=$((jobs_run + 1))
    if [ $((jobs_run % 2)) -eq 0 ]; then wait; fi
done
run "$root/ltx/fuzz" decode "$ltx_seeds" &
wait

stamp="$(date -u +%Y-%m-%d-%H%M)"
report="bench/results/fuzz-$stamp.md"
{
    echo "# Fuzzing — $stamp"
    echo
    echo '```'
    echo "scripts/fuzz.sh $seconds"
    echo '```'
    echo
    echo "$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), two targets at a time, $seconds s each, libFuzzer via cargo-fuzz $(cargo fuzz --version | cut -d' ' -f2), seeded from \`fuzz/corpus/\` (and \`testdata/ltx\` for \`decode\`)."
    echo
    echo "| target | seconds | executions | exec/s | coverage (edges) | corpus kept | crashes |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    for target in "${targets[@]}" decode; do
        log="$logs/$target.log"
        stat() { grep -m1 "stat::$1:" "$log" | awk '{print $2}'; }
        crashes=$(grep -c -E "^==[0-9]+== ERROR|panicked at|deadly signal" "$log" || true)
        cov=$(grep -E "^#[0-9]+.*(DONE|pulse)" "$log" | tail -1 | sed -E 's/.*cov: ([0-9]+).*/\1/')
        corpus=$(grep -E "^#[0-9]+.*DONE" "$log" | tail -1 | sed -E 's/.*corp: ([0-9]+).*/\1/')
        echo "| $target | $seconds | $(stat number_of_executed_units) | $(stat average_exec_per_sec) | ${cov:-?} | ${corpus:-?} | $crashes |"
    done
} > "$report"
cat "$report"
for target in "${targets[@]}" decode; do
    if grep -q -E "panicked at|deadly signal|ERROR: libFuzzer" "$logs/$target.log"; then
        echo "--- $target crashed:"; grep -m5 -E "panicked at|ERROR|Test unit written" "$logs/$target.log"
    fi
done
