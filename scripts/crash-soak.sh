#!/usr/bin/env bash
# Crash soak for MINUTES (default 20): rounds of writes with FLUSH, trims and zeroing through
# NBD against a server on moto, each ended by kill -9 at a random moment — some rounds delete
# the whole cache directory after the kill, some inject store faults. After every crash the
# disk must hold every flushed write and be a prefix of the acknowledged history (see
# bench/src/suites/crash_soak.rs). Writes bench/results/crash-soak-<UTC time>.md and .json;
# exits non-zero if any round failed its check. Needs what scripts/install-deps.sh installs.
# Extra arguments go to the suite, e.g. `--rounds 100 --seed 7 --region-mib 128`.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-20}"
shift || true
exec cargo run -q -p bench --release -- crash-soak --minutes "$minutes" "$@"
