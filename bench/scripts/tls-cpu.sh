#!/bin/bash
# What TLS costs, in CPU seconds per GiB on each side: bench/scripts/tls-cpu.sh ROUNDS BUCKETDISK [BUCKETDISK2 ...] [nbdkit]
# Each server (bucketdisk's local-file engine, or nbdkit file) serves one 2 GiB file in clear and
# over TLS (X.509, certificates made here); fio's nbd engine reads and writes it in 1 MiB requests
# at QD8 for 8 s each. Printed per job: MiB/s, IOPS, the server's CPU seconds per GiB and
# microseconds per request (/proc/PID/stat), fio's CPU seconds per GiB (its usr+sys), and each
# server's peak RSS. Subjects interleave within a round.
# Other requests: BS=4k QD=32 JOBS="randread randwrite" bench/scripts/tls-cpu.sh ...
set -e
BS=${BS:-1M}; QD=${QD:-8}; JOBS=${JOBS:-"read write"}
rounds=$1; shift
W=${TMPDIR:-/tmp}/bucketdisk-tls-cpu; rm -rf $W; mkdir -p $W/pki/server $W/home/.pki/libnbd
cd $W/pki
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=ca -keyout ca-key.pem -out ca-cert.pem 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server-key.pem -out server.csr 2>/dev/null
printf "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n" > ext
openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 2 -extfile ext -out server-cert.pem 2>/dev/null
cp server-cert.pem server-key.pem ca-cert.pem server/; chmod 600 server/*
cp ca-cert.pem $W/home/.pki/libnbd/
"$1" create bench --size 2G --engine file --store $W/store >/dev/null
port=18809
start() { # bin tls
  if [ "$1" = nbdkit ]; then
    local extra=""; [ "$2" = tls ] && extra="--tls=require --tls-certificates=$W/pki/server"
    nbdkit --foreground --exit-with-parent -i 127.0.0.1 -p $port $extra file $W/store/bench/disk.raw >$W/server.log 2>&1 &
  else
    local extra=""; [ "$2" = tls ] && extra="--tls require --tls-dir $W/pki/server"
    "$1" serve --engine file --store $W/store --volume bench --listen 127.0.0.1:$port --cache-dir $W/cache $extra >$W/server.log 2>&1 &
  fi
  pid=$!
  for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
}
cpu() { awk '{print $14+$15}' /proc/$pid/stat; }
job() { # rw scheme
  HOME=$W/home fio --name=t --ioengine=nbd --uri=$2://localhost:$port/bench --rw=$1 --bs=$BS --iodepth=$QD --size=2G --norandommap --time_based --runtime=8 --output-format=json --output=$W/fio.json >/dev/null 2>&1
  python3 -c "import json;j=json.load(open('$W/fio.json'))['jobs'][0];k='read' if 'read' in '$1' else 'write';print(round(j[k]['bw_bytes']/1048576), j[k]['io_bytes'], round((j['usr_cpu']+j['sys_cpu'])/100*j['job_runtime']/1000/(j[k]['io_bytes']/2**30),2), j[k]['total_ios'], round(j[k]['iops']))"
}
start "$1" plain; HOME=$W/home fio --name=fill --ioengine=nbd --uri=nbd://localhost:$port/bench --rw=write --bs=1M --iodepth=8 --size=2G >/dev/null 2>&1; kill $pid; wait $pid || true
for r in $(seq $rounds); do
  for bin in "$@"; do
   for mode in plain tls; do
    start "$bin" $mode
    scheme=nbd; [ $mode = tls ] && scheme=nbds
    for rw in $JOBS; do
      c0=$(cpu); out=$(job $rw $scheme); c1=$(cpu)
      read mib bytes client ios iops <<< "$out"
      echo "round $r $(basename $bin) $mode $rw MiB/s=$mib IOPS=$iops server_cpu_s_per_GiB=$(python3 -c "print(round(($c1-$c0)/100/($bytes/2**30),2))") server_cpu_us_per_request=$(python3 -c "print(round(($c1-$c0)/100/$ios*1e6,2))") fio_cpu_s_per_GiB=$client"
    done
    echo "  $(basename $bin) $mode peak RSS $(grep VmHWM /proc/$pid/status)"
    kill $pid; wait $pid || true
   done
  done
done
