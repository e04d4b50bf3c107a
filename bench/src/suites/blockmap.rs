//! The block map's cold open from object storage, hydration, lookups and update rate.
//!
//! A map of `--rows` blocks (1.6 M by default, about the size of a fully written 100 GiB volume
//! at 64 KiB blocks) is built locally, published as one snapshot LTX file to a local-directory
//! store, and opened through `FaultyStore` with `--latency` of first-byte delay on every request
//! (20 ms: a typical S3 first byte). Peer: `litestream restore` of the same replica followed by
//! an ordinary SQLite open and the same first lookup (its store is local, so it pays no latency:
//! the comparison flatters the peer).

use crate::machine::{Machine, load_average, utc_now};
use crate::stats::Summary;
use anyhow::{Context, Result, anyhow};
use blockmap::replica::{Layout, Replica};
use blockmap::vfs::ffi::{attach, detach, open_connection};
use blockmap::vfs::hydrate::{Progress, hydrate};
use blockmap::vfs::remote::{RemoteSource, sync_once};
use blockmap::vfs::state::{DatabaseState, PageSource};
use blockmap::{BlockLocation, BlockMap, MapChange};
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use stores::faulty::FaultyStore;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Rows (blocks) in the map.
    #[arg(long, default_value_t = 1_600_000)]
    rows: u64,
    /// First-byte latency added to every object-store request, in milliseconds.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Seconds of sustained updates (with a sync every second).
    #[arg(long, default_value_t = 5)]
    update_secs: u64,
    /// Where results are written.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

fn location(block: u64) -> BlockLocation {
    BlockLocation {
        chunk: block / 256 + 1,
        offset: (block % 256) * 40_000,
        length: 30_000 + (block % 1000) as u32,
        checksum: (block as u32).wrapping_mul(2_654_435_761),
    }
}

/// Builds the map in a local SQLite file and returns its path and size.
fn build_map(dir: &Path, rows: u64) -> Result<(PathBuf, u64)> {
    let path = dir.join("map.db");
    let conn = rusqlite::Connection::open(&path)?;
    conn.execute_batch("PRAGMA page_size=4096; PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;")?;
    let mut map = BlockMap::new(conn)?;
    let batch = 100_000;
    let mut first = 0;
    while first < rows {
        let last = (first + batch).min(rows);
        let chunks: Vec<(u64, u64)> = (first / 256 + 1..=(last - 1) / 256 + 1)
            .map(|c| (c, 256 * 40_000))
            .filter(|(c, _)| map.chunk(*c).ok().flatten().is_none())
            .collect();
        let changes: Vec<MapChange> = (first..last)
            .map(|b| MapChange::Put {
                block: b,
                location: location(b),
            })
            .collect();
        map.apply(&chunks, &changes)?;
        first = last;
    }
    drop(map);
    let size = std::fs::metadata(&path)?.len();
    Ok((path, size))
}

/// Publishes the database file as one snapshot LTX file (TXID 1).
async fn publish_snapshot(replica: &Replica, db: &Path) -> Result<()> {
    let image = std::fs::read(db)?;
    let pages = (image.len() / 4096) as u32;
    let header = ltx::Header {
        flags: ltx::HEADER_FLAG_NO_CHECKSUM,
        page_size: 4096,
        commit: pages,
        min_txid: 1,
        max_txid: 1,
        timestamp: 1,
        ..ltx::Header::default()
    };
    let mut enc = ltx::Encoder::new(Vec::new(), header)?;
    let lock = ltx::lock_pgno(4096);
    for (i, page) in image.chunks(4096).enumerate() {
        let pgno = i as u32 + 1;
        if pgno != lock {
            enc.encode_page(pgno, page)?;
        }
    }
    let (bytes, _) = enc.finish(0)?;
    replica
        .publish(9, bytes.into())
        .await
        .map_err(|e| anyhow!("publish snapshot: {e}"))?;
    Ok(())
}

struct Run {
    open_first_lookup_ms: f64,
    open_requests: u64,
    hydration_ms: f64,
    lookup_median_us: f64,
    updates_per_sec: f64,
    peer_restore_first_lookup_ms: f64,
}

fn one_run(rt: &tokio::runtime::Runtime, root: &Path, args: &Args, run: usize) -> Result<Run> {
    let local: Arc<dyn ObjectStore> =
        Arc::new(LocalFileSystem::new_with_prefix(root.join("store"))?);
    let faulty = Arc::new(FaultyStore::new(local));
    faulty.set_latency(Duration::from_millis(args.latency_ms));
    let replica = Arc::new(Replica::new(
        Arc::clone(&faulty) as _,
        StorePath::from("vol/blockmap"),
        Layout::File,
    ));
    let probe = args.rows / 2 + 7;

    // Cold open + first lookup.
    let start = Instant::now();
    let source = rt
        .block_on(RemoteSource::open(
            Arc::clone(&replica),
            ltx::RestoreTarget::Latest,
            rt.handle().clone(),
        ))
        .map_err(|e| anyhow!("open: {e}"))?;
    let txid = source.txid();
    let state = Arc::new(DatabaseState::new(Some(Arc::new(source)), 4096)?);
    let name = format!("bench-map-{run}");
    attach(&name, Arc::clone(&state));
    let conn = open_connection(&name)?;
    let found = conn.query_row(
        "SELECT chunk FROM blocks WHERE block = ?1",
        [probe as i64],
        |r| r.get::<_, i64>(0),
    )?;
    let open_first_lookup_ms = start.elapsed().as_secs_f64() * 1000.0;
    let open_requests = faulty.requests();
    anyhow::ensure!(found as u64 == location(probe).chunk, "wrong lookup result");

    // Hydration of the whole map, then the switch.
    let start = Instant::now();
    let local_copy = rt
        .block_on(hydrate(
            &replica,
            txid,
            &root.join(format!("hydrated-{run}.db")),
            &Progress::default(),
        ))
        .map_err(|e| anyhow!("hydrate: {e}"))?;
    state.replace_base(Arc::new(local_copy))?;
    let hydration_ms = start.elapsed().as_secs_f64() * 1000.0;

    // Lookups after hydration, through the typed API.
    let mut map = BlockMap::new(conn)?;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut samples = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let block = x % args.rows;
        let t = Instant::now();
        let got = map.get(block)?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        anyhow::ensure!(
            got == Some(location(block)),
            "wrong lookup for block {block}"
        );
    }
    let lookup_median_us = Summary::of(&samples).map_or(0.0, |s| s.median);

    // Sustained updates: batches of rewrites, a sync to the store every second.
    let deadline = Instant::now() + Duration::from_secs(args.update_secs);
    let mut next_sync = Instant::now() + Duration::from_secs(1);
    let mut updated = 0u64;
    let started = Instant::now();
    let chunk_base = args.rows / 256 + 1_000_000 + run as u64 * 100_000;
    let mut batch_no = 0u64;
    while Instant::now() < deadline {
        let chunk = chunk_base + batch_no;
        let changes: Vec<MapChange> = (0..1000)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let block = x % args.rows;
                MapChange::Put {
                    block,
                    location: BlockLocation {
                        chunk,
                        offset: i * 4096,
                        length: 4096,
                        checksum: 1,
                    },
                }
            })
            .collect();
        map.apply(&[(chunk, 4096 * 1000)], &changes)?;
        updated += 1000;
        batch_no += 1;
        if Instant::now() >= next_sync {
            rt.block_on(sync_once(&state, &replica, 1))
                .map_err(|e| anyhow!("sync: {e}"))?;
            next_sync += Duration::from_secs(1);
        }
    }
    rt.block_on(sync_once(&state, &replica, 1))
        .map_err(|e| anyhow!("sync: {e}"))?;
    let updates_per_sec = updated as f64 / started.elapsed().as_secs_f64();
    drop(map);
    detach(&name);

    // Peer: litestream restore of the same replica, then open and look up.
    let out = root.join(format!("peer-{run}.db"));
    let start = Instant::now();
    let status = std::process::Command::new("litestream")
        .arg("restore")
        .arg("-o")
        .arg(&out)
        .arg(format!(
            "file://{}",
            root.join("store/vol/blockmap").display()
        ))
        .output()
        .context("running litestream restore")?;
    anyhow::ensure!(
        status.status.success(),
        "litestream restore failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let peer = rusqlite::Connection::open(&out)?;
    peer.query_row(
        "SELECT chunk FROM blocks WHERE block = ?1",
        [probe as i64],
        |r| r.get::<_, i64>(0),
    )?;
    let peer_restore_first_lookup_ms = start.elapsed().as_secs_f64() * 1000.0;

    Ok(Run {
        open_first_lookup_ms,
        open_requests,
        hydration_ms,
        lookup_median_us,
        updates_per_sec,
        peer_restore_first_lookup_ms,
    })
}

pub fn run(args: Args, command: String) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let load_before = load_average();
    let (_, started) = utc_now();
    eprintln!("bench: building a map of {} rows", args.rows);
    let (db, db_size) = build_map(dir.path(), args.rows)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut runs = Vec::new();
    for r in 0..args.repeats {
        // Each repeat starts from a fresh replica holding just the snapshot.
        let root = dir.path().join(format!("run-{r}"));
        std::fs::create_dir_all(root.join("store"))?;
        let store: Arc<dyn ObjectStore> =
            Arc::new(LocalFileSystem::new_with_prefix(root.join("store"))?);
        let replica = Replica::new(store, StorePath::from("vol/blockmap"), Layout::File);
        rt.block_on(publish_snapshot(&replica, &db))?;
        eprintln!("bench: run {}/{}", r + 1, args.repeats);
        runs.push(one_run(&rt, &root, &args, r)?);
    }
    let (date, finished) = utc_now();
    let machine = Machine::probe(dir.path());
    let row = |name: &str, unit: &str, floor: &str, f: &dyn Fn(&Run) -> f64| {
        let values: Vec<f64> = runs.iter().map(f).collect();
        let s = Summary::of(&values).unwrap_or(Summary {
            median: 0.0,
            min: 0.0,
            max: 0.0,
            n: 0,
        });
        format!(
            "| {name} | {:.1} {unit} | {:.1}–{:.1} | {floor} |\n",
            s.median, s.min, s.max
        )
    };
    let mut md = String::new();
    writeln!(
        md,
        "# blockmap: cold open, hydration, lookups, updates — {date}\n"
    )?;
    writeln!(md, "```\n{command}\n```\n")?;
    writeln!(
        md,
        "Machine: {} × {}, {:.1} GiB, kernel {}, {}. Load average before {load_before}, after {}. Run {started} → {finished}.\n",
        machine.nproc,
        machine.cpu_model,
        machine.memory_bytes as f64 / (1u64 << 30) as f64,
        machine.kernel,
        machine.filesystem,
        load_average()
    )?;
    writeln!(
        md,
        "Map: {} rows, {:.1} MB SQLite file (4 KiB pages), published as one snapshot LTX file to a local-directory store wrapped with {} ms of first-byte latency per request. Median of {} runs (min–max).\n",
        args.rows,
        db_size as f64 / 1e6,
        args.latency_ms,
        runs.len()
    )?;
    md.push_str("| measurement | median | range | floor |\n|---|---:|---:|---|\n");
    md.push_str(&row(
        "open + first lookup (VFS, cold, remote)",
        "ms",
        "< 300 ms",
        &|r| r.open_first_lookup_ms,
    ));
    md.push_str(&row("object-store requests for that", "", "", &|r| {
        r.open_requests as f64
    }));
    md.push_str(&row("full hydration", "ms", "< 3000 ms", &|r| {
        r.hydration_ms
    }));
    md.push_str(&row(
        "lookup after hydration (median)",
        "µs",
        "≤ 5 µs",
        &|r| r.lookup_median_us,
    ));
    md.push_str(&row(
        "row updates, 1 s syncs",
        "rows/s",
        "≥ 20 000/s",
        &|r| r.updates_per_sec,
    ));
    md.push_str(&row(
        "peer: litestream restore + open + same lookup (no latency)",
        "ms",
        "",
        &|r| r.peer_restore_first_lookup_ms,
    ));
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join(format!("blockmap-{date}.md"));
    std::fs::write(&path, md)?;
    eprintln!("bench: wrote {}", path.display());
    Ok(())
}
