#!/usr/bin/env bash
# Sweeps the upload step bound (bucketdisk serve --upload-step-blocks, hidden) on a sparse fill:
# moto on loopback, 20 ms added to every store request (--inject-latency), fio writing one
# 4 KiB block every 64 KiB (one pass, --io_size = size/16), then a clean stop that uploads the
# rest. Prints, per bound and round: fio's time and IOPS, and how long the stop took to drain.
#   bench/scripts/upload-step-sweep.sh [SIZE] [IO_SIZE] [extra serve flags...]
# e.g. bench/scripts/upload-step-sweep.sh 16G 1G --journal-limit 256M
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE=${1:-16G}; IO=${2:-1G}; shift $(( $# >= 2 ? 2 : $# ))
BIN=${BUCKETDISK:-target/release/bucketdisk}
[ -x "$BIN" ] || cargo build --release -p bucketdisk
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
export AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true

one_run() { # $1 = step bound, then extra serve flags; prints one line
    local bound=$1; shift
    local d="$WORK/run" port=5999
    rm -rf "$d"; mkdir -p "$d"
    moto_server -H 127.0.0.1 -p $port > "$d/moto.log" 2>&1 & local moto=$!
    until curl -s -o /dev/null "http://127.0.0.1:$port/"; do sleep 0.2; done
    curl -s -X PUT "http://127.0.0.1:$port/vols" > /dev/null
    AWS_ENDPOINT_URL=http://127.0.0.1:$port "$BIN" serve --store s3://vols/v \
        --cache-dir "$d/cache" --listen 127.0.0.1:10998 --size "$SIZE" \
        --upload-step-blocks "$bound" --inject-latency 20ms "$@" > "$d/serve.log" 2>&1 & local server=$!
    until (exec 3<>/dev/tcp/127.0.0.1/10998) 2>/dev/null; do sleep 0.1; done
    local t0=$(date +%s.%N)
    fio --name=f --ioengine=nbd --uri=nbd://127.0.0.1:10998/ --rw=write:60k --bs=4k \
        --size="$SIZE" --io_size="$IO" --iodepth=32 --output-format=json --output="$d/fio.json"
    local fio_s=$(echo "$(date +%s.%N) - $t0" | bc)
    local t1=$(date +%s.%N); kill -TERM $server; wait $server
    local drain_s=$(echo "$(date +%s.%N) - $t1" | bc)
    kill $moto; wait $moto 2>/dev/null || true
    local iops=$(python3 -c "import json;print(round(json.load(open('$d/fio.json'))['jobs'][0]['write']['iops']))")
    printf 'step=%-6s fio_s=%.1f iops=%s drain_s=%.1f\n' "$bound" "$fio_s" "$iops" "$drain_s"
}

for round in 1 2; do
    for bound in 4096 16384 32768 65536; do
        echo -n "round=$round "; one_run $bound "$@"
    done
done
