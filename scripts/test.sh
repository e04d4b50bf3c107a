#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, then checks formatting,
# lints, and runs every unit and integration test against the real binary and real clients.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
