#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need (skipping what is there),
# then checks formatting, lints, and runs every unit and integration test against the real
# binary and real clients, on a local-directory store and again on moto.
#
#   scripts/test.sh           everything (about 10 minutes on 2 cores)
#   scripts/test.sh --quick   formatting, lints and the unit tests only: nothing installed,
#                             no external client or server (about a minute once built)
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
    --quick)
        cargo fmt --all -- --check
        cargo clippy --workspace --all-targets -- -D warnings
        cargo test --workspace --lib --bins --no-fail-fast
        exit 0
        ;;
    "") ;;
    *) echo "usage: scripts/test.sh [--quick]" >&2; exit 2 ;;
esac

scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --no-fail-fast
# The real-client suites again with every volume on a real S3-protocol server (moto).
BUCKETDISK_TEST_STORE=s3 cargo test --no-fail-fast -p bucketdisk --test smoke --test libnbd_clients \
    --test qemu_fio_clients --test nbdsh_errors --test ext4_end_to_end --test crash_recovery \
    --test checkpoints --test volume_verbs
