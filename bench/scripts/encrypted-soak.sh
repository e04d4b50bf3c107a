#!/bin/bash
# Sustained overwrites on an encrypted volume on moto, then a cold read-back check:
# bench/scripts/encrypted-soak.sh [MINUTES] (default 10). moto on 127.0.0.1:5123, an 8 GiB
# volume created --encrypt, served with a 1 GiB journal; fio: MINUTES of 16 KiB random
# overwrites over 2 GiB at QD16, then 1 GiB written with crc32c verify headers; a clean stop;
# a server with an empty cache reads that 1 GiB back with fio --verify_only; verify --deep.
set -e
W=${TMPDIR:-/tmp}/bucketdisk-encrypted-soak; rm -rf $W; mkdir -p $W
BIN=${BUCKETDISK:-$(cd "$(dirname "$0")/../.." && pwd)/target/release/bucketdisk}
MINUTES=${1:-10}
moto_server -H 127.0.0.1 -p 5123 > $W/moto.log 2>&1 & moto=$!
sleep 3
python3 -c "import boto3;boto3.client('s3',endpoint_url='http://127.0.0.1:5123',aws_access_key_id='t',aws_secret_access_key='t',region_name='us-east-1').create_bucket(Bucket='soak')"
export AWS_ENDPOINT_URL=http://127.0.0.1:5123 AWS_ACCESS_KEY_ID=t AWS_SECRET_ACCESS_KEY=t AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true
openssl rand -hex 32 > $W/key; chmod 600 $W/key
$BIN create disk --size 8G --encrypt --key-file $W/key --store s3://soak/v
serve() { $BIN serve --store s3://soak/v --key-file $W/key --cache-dir $W/$1 --listen 127.0.0.1:18811 --journal-limit 1G --metrics 127.0.0.1:18812 >> $W/server.log 2>&1 & pid=$!; for i in $(seq 200); do (echo > /dev/tcp/127.0.0.1/18811) 2>/dev/null && break; sleep 0.05; done; }
serve cache1
echo "$(date +%T) $MINUTES min of 16k random overwrites over 2 GiB"
fio --name=over --ioengine=nbd --uri=nbd://localhost:18811/ --rw=randwrite --bs=16k --iodepth=16 --size=2G --time_based --runtime=$((MINUTES*60)) --output-format=json --output=$W/over.json > /dev/null
python3 -c "import json;j=json.load(open('$W/over.json'))['jobs'][0]['write'];print('overwrites: %.0f MiB/s, %d IOPS, %d GiB written, errors=%d' % (j['bw_bytes']/2**20, j['iops'], j['io_bytes']/2**30, json.load(open('$W/over.json'))['jobs'][0]['error']))"
echo "$(date +%T) 1 GiB written with verify headers"
fio --name=last --ioengine=nbd --uri=nbd://localhost:18811/ --rw=write --bs=64k --iodepth=8 --size=1G --verify=crc32c --do_verify=0 --verify_state_save=0 --output-format=json --output=$W/last.json > /dev/null
curl -s 127.0.0.1:18812/metrics | grep -E "^bucketdisk_(allocated_bytes|stored_bytes|chunk_bytes|chunks_rewritten_total|dirty_bytes)" | head -8 || true
kill $pid; wait $pid; echo "clean stop: $?"
$BIN info disk --store s3://soak/v --cache-dir $W/cache1 | grep -E "allocated|stored|chunks|encryption" || true
echo "$(date +%T) cold read-back, verify-only"
serve cache2
fio --name=last --ioengine=nbd --uri=nbd://localhost:18811/ --rw=write --bs=64k --iodepth=8 --size=1G --verify=crc32c --verify_only --verify_state_save=0 --output-format=json --output=$W/check.json > /dev/null && echo "verify-only: ok"
python3 -c "import json;j=json.load(open('$W/check.json'))['jobs'][0];print('verify errors:', j['error'], 'read', j['read']['io_bytes']>>20, 'MiB')"
kill $pid; wait $pid
echo "$(date +%T) verify --deep"
$BIN verify disk --deep --store s3://soak/v --key-file $W/key
grep -ciE " (WARN|ERROR) " $W/server.log || true
kill $moto
