//! `lifecycle`: what a checkpoint and a restore cost, on moto behind the latency proxy (20 ms
//! added to every request by default), for a 100 GiB disk with 1, 10 and 100 GiB written (one
//! block-map row per 64 KiB block, built directly; see `synthetic`):
//!
//! - **checkpoint create** of a served volume: `bucketdisk checkpoint create` from the command's
//!   start to its exit (it goes through the server's control socket), and the store requests
//!   it caused;
//! - **restore** of the served volume (its server stops it, switches it and serves it again,
//!   adopting the map the switch took),
//!   and of the volume with its server stopped: `bucketdisk restore` from start to exit;
//! - **first read after the restore**: a server started with an empty cache, process start → the
//!   first 4 KiB read answered and checked against the built block;
//! - **clone** of that checkpoint into a new volume: `bucketdisk clone` start to exit, then the
//!   clone's first read the same way.
//!
//! - **space a checkpoint holds**: 1 GiB written with fio (1M sequential, incompressible), a
//!   checkpoint, the same GiB written again, and the bytes of chunks in the store after the
//!   server's clean stop (uploads and collection done) — then again once the checkpoint is
//!   deleted and the volume served until its collection ran.
//!
//! - **a clone's first read on its source's host**: a base image written through a server,
//!   checkpointed and cloned; the clone's first read of it beside its source (shared cache, warm)
//!   and on a host with an empty cache, with the added latency.
//!
//! Repeats are interleaved across the sizes; each repeat takes a new checkpoint and restores
//! it, so later repeats run on volumes already restored (a map line past the first).

use crate::latency_proxy::{LatencyProxy, Traffic};
use crate::moto;
use crate::nbd_client::NbdClient;
use crate::process::{ServerProcess, check_interrupted, free_loopback_port, wait_with_timeout};
use crate::progress::Progress;
use crate::run_info::RunInfo;
use crate::stats::{Summary, show};
use crate::store_subjects::{self, BUCKET, DISK_BYTES, Env};
use crate::synthetic::{self, Built};
use crate::workspace::{Places, bucketdisk_binary, fresh_dir, workspace_root};
use anyhow::{Context, Result, bail, ensure};
use blockmap::replica::Layout;
use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::path::Path as StorePath;
use serde::Serialize;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const VOLUME: &str = "disk";
const GIB: u64 = 1 << 30;
const VERB_FLOOR_MS: f64 = 300.0;
const READ_FLOOR_MS: f64 = 1000.0;
const TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// First-byte delay the latency proxy adds to every S3 response during the timed steps, in ms.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// GiB written of the 100 GiB disk, per volume (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 10, 100])]
    written_gib: Vec<u64>,
    /// Checkpoint-and-restore rounds per volume, interleaved across them.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    #[command(flatten)]
    places: Places,
}

/// One round on one volume.
#[derive(Debug, Clone, Serialize)]
struct Round {
    written_gib: u64,
    repeat: usize,
    checkpoint_ms: f64,
    /// Store requests while the checkpoint was taken (the server's and the command's).
    checkpoint_store: Traffic,
    /// `bucketdisk restore` of the volume while its server serves it (no client connected).
    served_restore_ms: f64,
    restore_ms: f64,
    restore_store: Traffic,
    /// Process start → the first 4 KiB read answered, empty cache, after the restore.
    first_read_ms: f64,
    /// `bucketdisk clone` of the checkpoint into a new volume, and that volume's first read.
    clone_ms: f64,
    clone_first_read_ms: f64,
}

/// The store's chunk bytes around one overwrite of a checkpointed volume.
#[derive(Debug, Clone, Serialize)]
struct Space {
    written_bytes: u64,
    /// After the first write (uploaded).
    chunks_before: u64,
    /// After the overwrite, with the checkpoint holding the first version.
    chunks_with_checkpoint: u64,
    /// After the checkpoint was deleted and collection ran.
    chunks_after_delete: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    #[serde(flatten)]
    run: RunInfo,
    latency_ms: u64,
    built: Vec<Built>,
    commands: Vec<String>,
    rounds: Vec<Round>,
    space: Space,
    warm_clone: WarmClone,
}

fn prefix(written_gib: u64) -> String {
    format!("lifecycle-{written_gib}g")
}

/// `bucketdisk <verb…>` on the volume under `prefix`, through the proxy.
fn verb(env: &Env, prefix: &str, words: &[&str], cache: &Path) -> Command {
    let mut cmd = Command::new(&env.bucketdisk);
    cmd.args(words);
    store_subjects::on_moto_store(&mut cmd, env, prefix)
        .arg("--cache-dir")
        .arg(cache)
        .env("BUCKETDISK_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs `cmd` to its end; its wall time in ms, to the millisecond (the exit is polled every
/// 0.2 ms: the shared waiting helper polls far less often).
fn timed(mut cmd: Command, what: &str) -> Result<f64> {
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            wait_with_timeout(&mut child, what, Duration::ZERO)?;
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    if !status.success() {
        let out = child.wait_with_output()?;
        bail!(
            "{what} failed ({status}): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(ms)
}

/// A server of `volume` under `prefix`, its cache in `cache`.
fn serve(
    env: &Env,
    prefix: &str,
    volume: &str,
    cache: &Path,
    log: &Path,
) -> Result<(ServerProcess, SocketAddr)> {
    serve_all(env, prefix, &[volume], cache, log)
}

/// A server of `volumes` under `prefix`, their cache directory `cache`.
fn serve_all(
    env: &Env,
    prefix: &str,
    volumes: &[&str],
    cache: &Path,
    log: &Path,
) -> Result<(ServerProcess, SocketAddr)> {
    let port = free_loopback_port()?;
    let listen = format!("127.0.0.1:{port}");
    let mut words = vec!["serve", "--size", "100G", "--listen", &listen];
    for volume in volumes {
        words.extend(["--volume", volume]);
    }
    let mut cmd = verb(env, prefix, &words, cache);
    cmd.env("BUCKETDISK_LOG", "info");
    let process = ServerProcess::spawn("bucketdisk", cmd, log)?;
    Ok((process, SocketAddr::from((Ipv4Addr::LOCALHOST, port))))
}

/// Process start → the first 4 KiB read answered, with an empty cache; checks the bytes.
fn first_read(env: &Env, prefix: &str, volume: &str, work: &Path, expected: &[u8]) -> Result<f64> {
    let cache = fresh_dir(work, &format!("first-read-cache-{volume}"))?;
    let start = Instant::now();
    let log = work.join(format!("first-read-{volume}.log"));
    let (mut server, addr) = serve(env, prefix, volume, &cache, &log)?;
    let stream = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) => {
                if start.elapsed() > TIMEOUT {
                    bail!("the server never listened: {e}");
                }
                server.ensure_running()?;
                std::thread::sleep(Duration::from_micros(500));
            }
        }
    };
    let mut client = NbdClient::handshake(stream)?;
    let data = client.read(0, 4096)?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    ensure!(client.size == DISK_BYTES, "export size {}", client.size);
    ensure!(
        data == expected,
        "block 0 read back different bytes after the restore"
    );
    client.disconnect()?;
    server.stop()?;
    Ok(ms)
}

/// One checkpoint, one restore, one first read, on the volume of `written_gib`.
fn round(
    env: &Env,
    proxy: &LatencyProxy,
    written_gib: u64,
    repeat: usize,
    expected: &[u8],
) -> Result<Round> {
    let prefix = prefix(written_gib);
    let work = env.work.join(format!("round-{written_gib}g-{repeat}"));
    std::fs::create_dir_all(&work)?;
    let cache = fresh_dir(&work, "cache")?;
    let (mut server, addr) = serve(env, &prefix, VOLUME, &cache, &work.join("server.log"))?;
    server.wait_until_serving(addr, TIMEOUT)?;
    let name = format!("round-{repeat}");
    let before = proxy.traffic();
    let checkpoint_ms = timed(
        verb(
            env,
            &prefix,
            &["checkpoint", "create", VOLUME, &name],
            &cache,
        ),
        "checkpoint create",
    )?;
    let checkpoint_store = proxy.traffic().since(&before);
    // Restored by its server while it serves (no client connected): stopped, switched, served
    // again under the same export with the map the switch took.
    let served_restore_ms = timed(
        verb(env, &prefix, &["restore", VOLUME, &name], &cache),
        "restore of the served volume",
    )?;
    server.stop()?;
    let before = proxy.traffic();
    let restore_ms = timed(
        verb(env, &prefix, &["restore", VOLUME, &name], &cache),
        "restore",
    )?;
    let restore_store = proxy.traffic().since(&before);
    let first_read_ms = first_read(env, &prefix, VOLUME, &work, expected)?;
    let copy = format!("copy-{repeat}");
    let source = format!("{VOLUME}@{name}");
    let clone_ms = timed(
        verb(env, &prefix, &["clone", &source, &copy], &cache),
        "clone",
    )?;
    let clone_first_read_ms = first_read(env, &prefix, &copy, &work, expected)?;
    Ok(Round {
        served_restore_ms,
        clone_ms,
        clone_first_read_ms,
        written_gib,
        repeat,
        checkpoint_ms,
        checkpoint_store,
        restore_ms,
        restore_store,
        first_read_ms,
    })
}

const SPACE_PREFIX: &str = "lifecycle-space";
const SPACE_BYTES: u64 = GIB;

/// Bytes of every chunk object of `volume` under `prefix`.
fn chunk_bytes(
    runtime: &tokio::runtime::Runtime,
    store: &Arc<dyn ObjectStore>,
    prefix: &str,
    volume: &str,
) -> Result<u64> {
    let dir = StorePath::from(format!("{prefix}/{volume}/chunks"));
    runtime.block_on(async {
        let objects: Vec<_> = store.list(Some(&dir)).try_collect().await?;
        Ok(objects.iter().map(|m| m.size).sum())
    })
}

/// The space a checkpoint holds once the volume is overwritten: written, checkpointed,
/// written again (no added latency: this measures bytes, not time).
fn space(env: &Env, store: &Arc<dyn ObjectStore>) -> Result<Space> {
    let work = env.work.join("space");
    std::fs::create_dir_all(&work)?;
    let cache = fresh_dir(&work, "cache")?;
    // One runtime for every listing: the store's client keeps its connections in it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let served = |what: &str| -> Result<(ServerProcess, SocketAddr)> {
        let log = work.join(format!("{what}.log"));
        let (mut server, addr) = serve(env, SPACE_PREFIX, VOLUME, &cache, &log)?;
        server.wait_until_serving(addr, TIMEOUT)?;
        Ok((server, addr))
    };
    let write = |addr: SocketAddr, pass: &str| -> Result<()> {
        crate::fio::pass(
            "write",
            SPACE_BYTES,
            &format!("nbd://{addr}/"),
            &work.join(format!("{pass}.json")),
        )?;
        Ok(())
    };
    let (server, addr) = served("first")?;
    write(addr, "first")?;
    server.stop()?;
    let chunks_before = chunk_bytes(&runtime, store, SPACE_PREFIX, VOLUME)?;
    let (server, addr) = served("overwrite")?;
    timed(
        verb(
            env,
            SPACE_PREFIX,
            &["checkpoint", "create", VOLUME, "held"],
            &cache,
        ),
        "checkpoint create",
    )?;
    write(addr, "overwrite")?;
    server.stop()?;
    let chunks_with_checkpoint = chunk_bytes(&runtime, store, SPACE_PREFIX, VOLUME)?;
    timed(
        verb(
            env,
            SPACE_PREFIX,
            &["checkpoint", "delete", VOLUME, "held"],
            &cache,
        ),
        "checkpoint delete",
    )?;
    // Served until a collection pass has run (they run every few seconds when idle).
    let (server, _) = served("collect")?;
    std::thread::sleep(Duration::from_secs(8));
    server.stop()?;
    let chunks_after_delete = chunk_bytes(&runtime, store, SPACE_PREFIX, VOLUME)?;
    Ok(Space {
        written_bytes: SPACE_BYTES,
        chunks_before,
        chunks_with_checkpoint,
        chunks_after_delete,
    })
}

const WARM_PREFIX: &str = "lifecycle-warm";
/// What the clone's "boot" reads: the start of the base image.
const BOOT_BYTES: u64 = 256 << 20;

/// A clone's first read of its base image on its source's host (the cache directory's shared
/// block cache warm with the source's blocks) and on a host with an empty cache.
#[derive(Debug, Clone, Serialize)]
struct WarmClone {
    read_bytes: u64,
    warm_ms: f64,
    warm_gets: u64,
    cold_ms: f64,
    cold_gets: u64,
}

/// A base image written through a server (its blocks in that host's cache), checkpointed and
/// cloned; then the clone's first `BOOT_BYTES` read with fio (1M, QD32) on that host, beside
/// its source, and on a host with an empty cache; time from the read's start and the store
/// GETs it caused, with the proxy's latency.
fn warm_clone(env: &Env, proxy: &LatencyProxy, latency: Duration) -> Result<WarmClone> {
    let work = env.work.join("warm-clone");
    std::fs::create_dir_all(&work)?;
    let host = fresh_dir(&work, "host-cache")?;
    let (mut server, addr) = serve(env, WARM_PREFIX, VOLUME, &host, &work.join("base.log"))?;
    server.wait_until_serving(addr, TIMEOUT)?;
    crate::fio::pass(
        "write",
        BOOT_BYTES,
        &format!("nbd://{addr}/"),
        &work.join("base.json"),
    )?;
    timed(
        verb(
            env,
            WARM_PREFIX,
            &["checkpoint", "create", VOLUME, "base"],
            &host,
        ),
        "checkpoint create",
    )?;
    server.stop()?;
    timed(
        verb(env, WARM_PREFIX, &["clone", "disk@base", "vm"], &host),
        "clone",
    )?;
    proxy.set_delay(latency);
    let boot = |cache: &Path, volumes: &[&str], what: &str| -> Result<(f64, u64)> {
        let log = work.join(format!("{what}.log"));
        let (mut server, addr) = serve_all(env, WARM_PREFIX, volumes, cache, &log)?;
        server.wait_until_serving(addr, TIMEOUT)?;
        let before = proxy.traffic();
        let start = Instant::now();
        crate::fio::pass(
            "read",
            BOOT_BYTES,
            &format!("nbd://{addr}/vm"),
            &work.join(format!("{what}.json")),
        )?;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        let gets = proxy.traffic().since(&before).gets;
        server.stop()?;
        Ok((ms, gets))
    };
    let (warm_ms, warm_gets) = boot(&host, &[VOLUME, "vm"], "warm")?;
    let empty = fresh_dir(&work, "empty-cache")?;
    let (cold_ms, cold_gets) = boot(&empty, &["vm"], "cold")?;
    proxy.set_delay(Duration::ZERO);
    Ok(WarmClone {
        read_bytes: BOOT_BYTES,
        warm_ms,
        warm_gets,
        cold_ms,
        cold_gets,
    })
}

pub fn run(args: Args, command: String) -> Result<()> {
    let workspace = workspace_root();
    let bin = bucketdisk_binary(args.places.bucketdisk.as_deref(), &workspace)?;
    let tmp = args.places.scratch("bucketdisk-lifecycle-")?;
    let mut run = RunInfo::begin(command, &bin, &workspace, tmp.path())?;
    let (env, moto, proxy) = Env::on_moto(bin, tmp.path())?;
    let store = moto::client(&format!("http://{}", moto.addr), BUCKET)?;
    let steps = (args.written_gib.len() * (1 + args.repeats) + 2) as u64;
    let mut progress = Progress::new(steps);
    let mut built = Vec::new();
    for &gib in &args.written_gib {
        check_interrupted()?;
        let rows = gib * GIB / u64::from(synthetic::BLOCK);
        progress.step(&format!(
            "building a 100 GiB volume with {gib} GiB written ({rows} map rows)"
        ));
        built.push(synthetic::build_volume_in(
            Arc::clone(&store),
            &StorePath::from(prefix(gib)),
            Layout::ObjectStore,
            VOLUME,
            DISK_BYTES,
            rows,
        )?);
        progress.step_done();
    }
    proxy.set_delay(Duration::from_millis(args.latency_ms));
    let expected = synthetic::content(0)[..4096].to_vec();
    let mut rounds = Vec::new();
    for repeat in 0..args.repeats {
        for &gib in &args.written_gib {
            check_interrupted()?;
            progress.step(&format!("repeat {} · {gib} GiB written", repeat + 1));
            let r = round(&env, &proxy, gib, repeat, &expected)
                .with_context(|| format!("{gib} GiB written, repeat {}", repeat + 1))?;
            eprintln!(
                "lifecycle: {gib} GiB — checkpoint {:.0} ms ({} requests), restore {:.0} ms \
                 ({} requests), first read after it {:.0} ms",
                r.checkpoint_ms,
                r.checkpoint_store.requests,
                r.restore_ms,
                r.restore_store.requests,
                r.first_read_ms
            );
            rounds.push(r);
            progress.step_done();
        }
    }
    proxy.set_delay(Duration::ZERO);
    progress.step("the space a checkpoint holds after one overwrite");
    let space = space(&env, &store)?;
    progress.step_done();
    progress.step("a clone's first read on its source's host and on an empty one");
    let latency = Duration::from_millis(args.latency_ms);
    let warm_clone = warm_clone(&env, &proxy, latency)?;
    progress.step_done();
    progress.finish();
    run.finish();
    let cache = PathBuf::from("CACHE");
    let commands = [
        vec!["checkpoint", "create", VOLUME, "round-N"],
        vec!["restore", VOLUME, "round-N"],
        vec!["clone", "disk@round-N", "copy-N"],
    ]
    .iter()
    .map(|words| {
        store_subjects::describe(&verb(&env, "lifecycle-Ng", words, &cache))
            .replace(&env.work.display().to_string(), "WORK")
    })
    .collect();
    let report = Report {
        run,
        latency_ms: args.latency_ms,
        built,
        commands,
        rounds,
        space,
        warm_clone,
    };
    let out_dir = args.places.out_dir(&workspace);
    let stem = report.run.stem("lifecycle");
    let md = markdown(&report, &stem);
    crate::report::write_md_json(&out_dir, &stem, &md, &report)?;
    print!("{md}");
    Ok(())
}

fn markdown(r: &Report, stem: &str) -> String {
    let mut md = String::new();
    r.run.header(
        &mut md,
        "lifecycle: checkpoint and restore of a 100 GiB disk",
        &[
            ("moto", moto::version_line()),
            ("bucketdisk", r.run.tools.bucketdisk_line()),
        ],
    );
    let _ = writeln!(
        md,
        "moto behind the latency proxy, {} ms added to every request in the timed steps. \
         Each volume is a 100 GiB disk whose block map has one row per written 64 KiB block \
         (built directly, every row pointing at real checksummed data). A round: a server \
         starts on the volume; `bucketdisk checkpoint create` runs (through the server's control \
         socket), timed from the command's start to its exit; `bucketdisk restore` of it runs \
         while the server serves the volume (the server stops it, switches its map and serves \
         it again adopting the map the switch took), timed the same way; the server stops; `bucketdisk \
         restore` of that checkpoint runs, timed the same way; then a server starts with an \
         empty cache and the first 4 KiB read of block 0 is timed from process start and checked; \
         then `bucketdisk clone` of the checkpoint into a new volume is timed, and that volume's \
         first read the same way. Medians (min–max) of {} rounds per volume, interleaved.\n",
        r.latency_ms,
        r.rounds.iter().map(|x| x.repeat).max().map_or(0, |m| m + 1)
    );
    for c in &r.commands {
        let _ = writeln!(md, "- `{c}`");
    }
    let _ = writeln!(
        md,
        "\n| written | map rows | checkpoint create, ms (≤ {VERB_FLOOR_MS:.0}) | its store requests (PUTs) | restore of the served volume, ms (≤ {VERB_FLOOR_MS:.0}) | restore, server stopped, ms (≤ {VERB_FLOOR_MS:.0}) | its store requests (PUTs) | first 4 KiB read after restore, empty cache, ms (≤ {READ_FLOOR_MS:.0}) | clone, ms (≤ {VERB_FLOOR_MS:.0}) | the clone's first 4 KiB read, empty cache, ms (≤ {READ_FLOOR_MS:.0}) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let mut sizes: Vec<u64> = r.rounds.iter().map(|x| x.written_gib).collect();
    sizes.dedup();
    sizes.sort_unstable();
    sizes.dedup();
    for gib in sizes {
        let of = |f: &dyn Fn(&Round) -> f64| {
            let v: Vec<f64> = r
                .rounds
                .iter()
                .filter(|x| x.written_gib == gib)
                .map(f)
                .collect();
            show(Summary::of(&v), 0)
        };
        let rows = r
            .built
            .iter()
            .find(|b| b.rows * u64::from(synthetic::BLOCK) == gib * GIB)
            .map_or(0, |b| b.rows);
        let _ = writeln!(
            md,
            "| {gib} GiB | {rows} | {} | {} ({}) | {} | {} | {} ({}) | {} | {} | {} |",
            of(&|x| x.checkpoint_ms),
            of(&|x| x.checkpoint_store.requests as f64),
            of(&|x| x.checkpoint_store.puts as f64),
            of(&|x| x.served_restore_ms),
            of(&|x| x.restore_ms),
            of(&|x| x.restore_store.requests as f64),
            of(&|x| x.restore_store.puts as f64),
            of(&|x| x.first_read_ms),
            of(&|x| x.clone_ms),
            of(&|x| x.clone_first_read_ms),
        );
    }
    let _ = writeln!(
        md,
        "\nPer round:\n\n| written | round | checkpoint ms | requests | served restore ms | restore ms | requests | first read ms | clone ms | clone's first read ms |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for x in &r.rounds {
        let _ = writeln!(
            md,
            "| {} GiB | {} | {:.0} | {} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.0} |",
            x.written_gib,
            x.repeat + 1,
            x.checkpoint_ms,
            x.checkpoint_store.requests,
            x.served_restore_ms,
            x.restore_ms,
            x.restore_store.requests,
            x.first_read_ms,
            x.clone_ms,
            x.clone_first_read_ms
        );
    }
    let gib = |b: u64| b as f64 / GIB as f64;
    let sp = &r.space;
    let _ = writeln!(
        md,
        "\n## Space a checkpoint holds\n\n{:.0} GiB written with fio (1M sequential, \
         incompressible data), a checkpoint, the same range written again; chunk bytes in the \
         store after each clean stop (uploads and collection done). No added latency.\n\n\
         | state | chunk bytes in the store |\n|---|---:|\n\
         | written once | {:.2} GiB |\n\
         | overwritten, the checkpoint holding the first version | {:.2} GiB |\n\
         | checkpoint deleted, collection run | {:.2} GiB |",
        gib(sp.written_bytes),
        gib(sp.chunks_before),
        gib(sp.chunks_with_checkpoint),
        gib(sp.chunks_after_delete)
    );
    let w = &r.warm_clone;
    let _ = writeln!(
        md,
        "\n## A clone's first read on its source's host\n\n{} MiB written through a server \
         (the base image: its blocks land in that host's cache), checkpointed, cloned; then the \
         clone's first read of those {} MiB with fio (1M, QD32) with {} ms added to every store \
         request: on the same host, served beside its source from the same cache directory \
         (the block cache is shared and keyed by the chunk's writer), and on a host with an \
         empty cache. Time from the read's start; store GETs during it.\n\n\
         | host | read, ms | store GETs |\n|---|---:|---:|\n\
         | the source's (warm) | {:.0} | {} |\n\
         | empty cache | {:.0} | {} |",
        w.read_bytes >> 20,
        w.read_bytes >> 20,
        r.latency_ms,
        w.warm_ms,
        w.warm_gets,
        w.cold_ms,
        w.cold_gets
    );
    let _ = writeln!(
        md,
        "\nRaw numbers for every run: `{stem}.json` beside this file."
    );
    md
}
