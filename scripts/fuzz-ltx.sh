#!/usr/bin/env bash
# Fuzzes the LTX decoder (ltx/fuzz, target "decode") for the given number of seconds
# (default 600), seeded with the real Litestream files from testdata/ltx.
# Needs cargo-fuzz (`cargo install cargo-fuzz`); RUSTC_BOOTSTRAP lets the stable toolchain
# accept the sanitizer flags cargo-fuzz passes.
set -euo pipefail
cd "$(dirname "$0")/../ltx"
seconds="${1:-600}"
testdata="${LTX_TESTDATA:-$(cd .. && pwd)/testdata/ltx}"

command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
corpus=fuzz/corpus/decode
mkdir -p "$corpus"
if [ -d "$testdata" ]; then
    find "$testdata" -name '*.ltx' -exec cp {} "$corpus/" \;
fi
RUSTC_BOOTSTRAP=1 cargo fuzz run decode "$corpus" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=262144 -print_final_stats=1
