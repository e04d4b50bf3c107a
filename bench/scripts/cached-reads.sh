#!/bin/bash
# Reads answered from the block cache, two builds side by side:
# bench/scripts/cached-reads.sh ROUNDS BUCKETDISK_A BUCKETDISK_B [ENCRYPT]
# Each build serves its own 2 GiB object-engine volume on a local-directory store (encrypted
# when the fourth argument is "encrypt"), written with 1 MiB requests and read once so every
# block is cached; then, ROUNDS times and alternating between the two servers, fio's nbd engine
# reads 1 GiB of it at random in 4 KiB requests at QD32 and sequentially in 1 MiB requests at
# QD8 (8 s each; who goes first alternates by round). Printed per run: IOPS or MiB/s and the server's CPU microseconds per request.
set -e
rounds=$1; A=$2; B=$3; ENCRYPT=$4
W=${TMPDIR:-/tmp}/bucketdisk-cached-reads; rm -rf $W; mkdir -p $W
openssl rand -hex 32 > $W/key; chmod 600 $W/key
declare -A pid port
setup() { # name bin port
  local extra=""; [ "$ENCRYPT" = encrypt ] && extra="--encrypt --key-file $W/key"
  "$2" create bench --size 2G --store $W/$1/store $extra > /dev/null
  local key=""; [ "$ENCRYPT" = encrypt ] && key="--key-file $W/key"
  "$2" serve --store $W/$1/store --volume bench --cache-dir $W/$1/cache --cache-size 4G \
    --listen 127.0.0.1:$3 $key > $W/$1.log 2>&1 &
  pid[$1]=$!; port[$1]=$3
  for i in $(seq 200); do (echo > /dev/tcp/127.0.0.1/$3) 2>/dev/null && break; sleep 0.05; done
  fio --name=fill --ioengine=nbd --uri=nbd://localhost:$3/ --rw=write --bs=1M --iodepth=8 \
    --size=1G --refill_buffers --buffer_compress_percentage=50 > /dev/null
  fio --name=warm --ioengine=nbd --uri=nbd://localhost:$3/ --rw=read --bs=1M --iodepth=8 \
    --size=1G > /dev/null
}
cpu() { awk '{print $14+$15}' /proc/${pid[$1]}/stat; }
run() { # name rw bs qd
  local c0; c0=$(cpu $1)
  fio --name=t --ioengine=nbd --uri=nbd://localhost:${port[$1]}/ --rw=$2 --bs=$3 --iodepth=$4 \
    --size=1G --norandommap --time_based --runtime=8 --output-format=json --output=$W/fio.json > /dev/null
  local c1; c1=$(cpu $1)
  python3 -c "
import json; j=json.load(open('$W/fio.json'))['jobs'][0]['read']
print('$1 $2 $3', 'IOPS=%d' % j['iops'], 'MiB/s=%d' % (j['bw_bytes'] / 2**20),
      'server_cpu_us_per_request=%.2f' % (($c1 - $c0) / 100 / j['total_ios'] * 1e6))"
}
setup a "$A" 18821
setup b "$B" 18822
echo "a: $A ($("$A" --version)); b: $B ($("$B" --version)); encrypted: ${ENCRYPT:-no}"
for r in $(seq $rounds); do
  order="a b"; [ $((r % 2)) = 0 ] && order="b a"  # who goes first alternates
  for s in $order; do run $s randread 4k 32; done
  for s in $order; do run $s read 1M 8; done
done
for s in a b; do
  kill ${pid[$s]}; wait ${pid[$s]} || true
done
