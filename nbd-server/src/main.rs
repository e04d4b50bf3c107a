//! `bucketdisk`: create, inspect and serve virtual disks over NBD.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use engine::object_volume::{ObjectVolume, VolumeConfig, catalog};
use engine::{BlockDevice, Durability, FileVolume};
use nbd_server::exports::{Export, Exports};
use nbd_server::server::{self, Listener};
use nbd_server::units::{format_size, parse_chunk_size, parse_duration, parse_size};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use stores::url::{StoreLocation, open_store};
use tokio::sync::watch;

const DEFAULT_DATA_DIR: &str = "bucketdisk-data";
const DEFAULT_VOLUME: &str = "disk";

#[derive(Parser)]
#[command(
    name = "bucketdisk",
    version,
    about = "Thin virtual disks served over NBD"
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. info, debug, nbd_server=trace.
    #[arg(long, global = true, env = "BUCKETDISK_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve volumes over NBD (creates the default volume on first start).
    Serve(Box<ServeArgs>),
    /// Create a volume.
    Create(CreateArgs),
    /// Show a volume's size and usage.
    Info(InfoArgs),
}

#[derive(Args)]
struct StoreArgs {
    /// Where volumes live: file:///absolute/path, a directory path, s3://bucket/prefix (AWS_*
    /// environment for endpoint and credentials) or memory://.
    /// [default: ./bucketdisk-data/store]
    #[arg(long, env = "BUCKETDISK_STORE")]
    store: Option<String>,
    /// Storage engine: "object" (chunks + block map in the store, local journal and cache) or
    /// "file" (one sparse local file per volume; the local baseline, directory stores only).
    #[arg(long, env = "BUCKETDISK_ENGINE", default_value = "object", value_parser = ["object", "file"])]
    engine: String,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Local directory for the journal, cache and hydrated block map.
    /// [default: ./bucketdisk-data/cache]
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// TCP address to listen on (ignored with --socket or socket activation).
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: String,
    /// Listen on this Unix socket instead of TCP.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Volume to export (repeatable). The first is also the default export "".
    #[arg(long = "volume", default_value = DEFAULT_VOLUME)]
    volumes: Vec<String>,
    /// Size of a volume created on first start.
    #[arg(long, default_value = "100G", value_parser = parse_size)]
    size: u64,
    /// Block size of a volume created on first start.
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    block_size: u64,
    /// Export read-only: writes, trims and zeroing fail with EPERM.
    #[arg(long)]
    read_only: bool,
    /// Local block cache size limit per volume.
    #[arg(long, value_parser = parse_size)]
    cache_size: Option<u64>,
    /// How often dirty data is uploaded to the store.
    #[arg(long, value_parser = parse_duration)]
    sync_interval: Option<Duration>,
    /// Local journal limit: once this much written data waits for upload, writes wait for the
    /// uploader (bursts up to this size are absorbed at local-disk speed). [default: 4G]
    #[arg(long, value_parser = parse_size)]
    journal_limit: Option<u64>,
    /// Target size of the chunks the uploader writes to the store, 4M to 32M: larger chunks
    /// mean fewer PUTs per GiB, smaller ones less rewriting when GC compacts them. [default: 24M]
    #[arg(long, value_parser = parse_chunk_size)]
    chunk_size: Option<u64>,
    /// What FLUSH waits for: local (journal on disk) or remote (uploaded to the store).
    #[arg(long, value_parser = ["local", "remote"])]
    durability: Option<String>,
    /// How far the store may lag behind the local journal while the load keeps rewriting the
    /// same blocks (rewrites between two uploads are uploaded once). Other loads are uploaded
    /// every --sync-interval; never lags with --durability remote. [default: 30s]
    #[arg(long, value_parser = parse_duration)]
    max_upload_lag: Option<Duration>,
    /// Writes waiting for room in a full journal fail with EIO once the store has made no
    /// progress at all for this long (while uploads progress, however slowly, they wait).
    /// [default: 5m]
    #[arg(long, value_parser = parse_duration)]
    stall_timeout: Option<Duration>,
    /// How long past states of a volume stay restorable: chunks the block map stopped using
    /// are deleted once this long has passed (0: right after the upload that replaced them).
    /// Longer windows keep every overwritten chunk that long. [default: 0s]
    #[arg(long, value_parser = parse_duration)]
    restore_window: Option<Duration>,
    /// Pull every block into the local cache in the background (object-storage engine).
    #[arg(long)]
    hydrate: bool,
    /// How far ahead of a sequential reader blocks are fetched from the store, at most: the
    /// window starts at 1M and doubles with each read that continues the stream; 0 turns
    /// readahead off. [default: 64M]
    #[arg(long, value_parser = parse_size)]
    readahead: Option<u64>,
    /// Ranged GETs that readahead and NBD_CMD_CACHE keep in flight at most (each
    /// brings up to 4 MiB of neighbouring blocks); reads a client waits for are not limited
    /// by it. [default: 16]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    prefetch_gets: Option<u64>,
    /// Serve Prometheus metrics on http://ADDRESS/metrics (e.g. 127.0.0.1:9100).
    #[arg(long)]
    metrics: Option<String>,
    /// Testing and benchmarks: delay every object-store request by this much (simulates a
    /// remote store's first-byte latency on a local one).
    #[arg(long, value_parser = parse_duration, hide = true)]
    inject_latency: Option<Duration>,
    /// Benchmarks: no garbage collection (dead chunks stay), to measure what it costs.
    #[arg(long, hide = true)]
    no_gc: bool,
    /// Benchmarks: blocks one upload step stores at most (to measure the bound).
    #[arg(long, hide = true)]
    upload_step_blocks: Option<usize>,
}

#[derive(Args)]
struct CreateArgs {
    /// Volume name: 1-128 of [A-Za-z0-9._-].
    name: String,
    #[arg(long, value_parser = parse_size)]
    size: u64,
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    block_size: u64,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args)]
struct InfoArgs {
    name: String,
    #[command(flatten)]
    store: StoreArgs,
    /// Local directory whose journal state to report. [default: ./bucketdisk-data/cache]
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// glibc gives every thread that allocates an arena of its own, and memory freed there stays
/// cached in it: with the blocking pool's threads passing chunk-sized buffers around, that cost
/// ~80 MiB of resident memory during sustained writes (peak RSS 200 → 121 MiB for a 4 GiB
/// sequential write, measured). Two arenas are plenty for this workload. Unless the user chose.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: called first thing in main, before any other thread exists; mallopt only
        // adjusts the allocator's tuning and reports (ignored) failure through its result.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Create(args) => create(args),
        Command::Info(args) => info(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bucketdisk: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn store_url(args: &StoreArgs) -> String {
    args.store
        .clone()
        .unwrap_or_else(|| format!("{DEFAULT_DATA_DIR}/store"))
}

fn object_store(args: &StoreArgs) -> Result<StoreLocation> {
    let url = store_url(args);
    open_store(&url).with_context(|| format!("--store {url}"))
}

fn file_engine(args: &StoreArgs) -> bool {
    args.engine == "file"
}

fn new_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Resolves `--store` to a local directory (the local-file engine).
fn store_dir(args: &StoreArgs) -> Result<PathBuf> {
    let Some(url) = args.store.as_deref() else {
        return Ok(PathBuf::from(DEFAULT_DATA_DIR).join("store"));
    };
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            bail!("--store {url}: a file:// URL needs an absolute path (file:///var/lib/...)");
        }
        return Ok(PathBuf::from(path));
    }
    if url.contains("://") {
        bail!("--store {url}: --engine file needs a local directory (file:///path)");
    }
    Ok(PathBuf::from(url))
}

fn block_size(value: u64) -> Result<u32> {
    u32::try_from(value).context("block size too large")
}

fn create(args: CreateArgs) -> Result<()> {
    if file_engine(&args.store) {
        let store = store_dir(&args.store)?;
        let volume =
            FileVolume::create(&store, &args.name, args.size, block_size(args.block_size)?)
                .with_context(|| format!("creating volume {}", args.name))?;
        println!(
            "created volume {} ({}) in {}",
            args.name,
            format_size(volume.size()),
            store.display()
        );
        return Ok(());
    }
    let location = object_store(&args.store)?;
    let block_size = block_size(args.block_size)?;
    new_runtime()?.block_on(async {
        ObjectVolume::create(
            location.store.as_ref(),
            &location.prefix,
            &args.name,
            args.size,
            block_size,
        )
        .await
        .with_context(|| format!("creating volume {}", args.name))?;
        println!(
            "created volume {} ({}, {} blocks) in {}",
            args.name,
            format_size(args.size),
            format_size(u64::from(block_size)),
            location.description
        );
        Ok(())
    })
}

fn info(args: InfoArgs) -> Result<()> {
    if !file_engine(&args.store) {
        return object_info(args);
    }
    let store = store_dir(&args.store)?;
    let volume = FileVolume::open(&store, &args.name, true)
        .with_context(|| format!("opening volume {}", args.name))?;
    let meta = volume.metadata();
    let allocated = volume.allocated_bytes()?;
    if args.json {
        let value = serde_json::json!({
            "name": meta.name,
            "size": meta.size,
            "block_size": meta.block_size,
            "allocated": allocated,
            "format": meta.format,
            "store": store.display().to_string(),
        });
        println!("{value}");
    } else {
        println!("volume:     {}", meta.name);
        println!(
            "size:       {} ({} bytes)",
            format_size(meta.size),
            meta.size
        );
        println!("block size: {}", format_size(u64::from(meta.block_size)));
        println!(
            "allocated:  {} ({} bytes)",
            format_size(allocated),
            allocated
        );
        println!("format:     {}", meta.format);
        println!("store:      {}", store.display());
    }
    Ok(())
}

/// `info` for the object engine: opens the volume read-only (it does not disturb a running
/// writer) and reports the block map's view plus the local journal's size.
fn object_info(args: InfoArgs) -> Result<()> {
    let location = object_store(&args.store)?;
    let cache_dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR).join("cache"));
    let journal_bytes = journal_bytes(&cache_dir.join(&args.name).join("journal"));
    let (cache_used, cache_capacity) = cache_usage(&cache_dir.join(&args.name).join("cache"));
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    new_runtime()?.block_on(async {
        let mut config = VolumeConfig::new(scratch.path().join("info"));
        config.read_only = true;
        config.cache_bytes = 1 << 20;
        let volume = ObjectVolume::open(
            location.store,
            &location.prefix,
            location.layout,
            &args.name,
            config,
        )
        .await
        .with_context(|| format!("opening volume {}", args.name))?;
        let meta = volume.metadata().clone();
        let stats = volume.stats().await?;
        let allocated = stats.allocated_blocks * u64::from(meta.block_size);
        if args.json {
            let value = serde_json::json!({
                "name": meta.name,
                "size": meta.size,
                "block_size": meta.block_size,
                "allocated": allocated,
                "allocated_blocks": stats.allocated_blocks,
                "stored_bytes": stats.allocated_stored_bytes,
                "chunks": stats.chunks,
                "map_txid": stats.map_txid,
                "local_journal_bytes": journal_bytes,
                "local_cache_bytes": cache_used,
                "local_cache_capacity": cache_capacity,
                "format": meta.format,
                "store": location.description,
            });
            println!("{value}");
        } else {
            println!("volume:        {}", meta.name);
            println!(
                "size:          {} ({} bytes)",
                format_size(meta.size),
                meta.size
            );
            println!("block size:    {}", format_size(u64::from(meta.block_size)));
            println!(
                "allocated:     {} ({} blocks, {} stored after compression)",
                format_size(allocated),
                stats.allocated_blocks,
                format_size(stats.allocated_stored_bytes)
            );
            println!("chunks:        {}", stats.chunks);
            println!("map txid:      {}", stats.map_txid);
            println!(
                "local journal: {} in {}",
                format_size(journal_bytes),
                cache_dir.join(&args.name).display()
            );
            println!(
                "local cache:   {} used of {}",
                format_size(cache_used),
                format_size(cache_capacity)
            );
            println!("format:        {}", meta.format);
            println!("store:         {}", location.description);
        }
        Ok(())
    })
}

/// Bytes the block cache file really occupies (it is sparse) and its size limit.
fn cache_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir.join("blocks.cache")).map_or((0, 0), |m| (m.blocks() * 512, m.len()))
}

fn journal_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn serve(args: ServeArgs) -> Result<()> {
    let cache_dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR).join("cache"));
    let block_size = block_size(args.block_size)?;
    let mut names: Vec<&String> = Vec::new();
    for name in &args.volumes {
        if names.contains(&name) {
            bail!("--volume {name} given twice");
        }
        names.push(name);
    }
    let runtime = new_runtime()?;
    runtime.block_on(async move {
        let mut exports = Vec::new();
        let location = if file_engine(&args.store) {
            warn_engine_only_flags(&args, &cache_dir);
            None
        } else {
            let mut location = object_store(&args.store)?;
            if let Some(latency) = args.inject_latency {
                tracing::warn!(
                    "every object-store request is delayed by {latency:?} (--inject-latency)"
                );
                location.store = stores::url::with_latency(location.store, latency);
            }
            Some(location)
        };
        for name in &args.volumes {
            let device: Arc<dyn BlockDevice> = match &location {
                None => Arc::new(open_file_volume(
                    &store_dir(&args.store)?,
                    name,
                    args.size,
                    block_size,
                    args.read_only,
                )?),
                Some(location) => Arc::new(
                    open_object_volume(location, name, &args, &cache_dir, block_size).await?,
                ),
            };
            tracing::info!(
                volume = name,
                size = %format_size(device.size()),
                read_only = args.read_only,
                engine = %args.store.engine,
                "volume ready"
            );
            exports.push(Export {
                name: name.clone(),
                description: format!("bucketdisk volume {name}"),
                device,
                metrics: Default::default(),
            });
        }
        let exports = Arc::new(Exports::new(exports));
        let listener = match Listener::from_socket_activation()? {
            Some(l) => l,
            None => match &args.socket {
                Some(path) => Listener::unix(path.clone())?,
                None => Listener::tcp(&args.listen).await?,
            },
        };
        tracing::info!("serving NBD on {}", listener.describe());
        let (stop_tx, stop_rx) = watch::channel(false);
        if let Some(address) = &args.metrics {
            let metrics_listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen for metrics on {address}"))?;
            tracing::info!("serving metrics on http://{address}/metrics");
            tokio::spawn(nbd_server::metrics::serve(
                metrics_listener,
                Arc::clone(&exports),
                stop_rx.clone(),
            ));
        }
        tokio::spawn(async move {
            wait_for_stop_signal().await;
            tracing::info!("stopping: finishing in-flight requests");
            let _ = stop_tx.send(true);
        });
        server::run(listener, Arc::clone(&exports), stop_rx).await?;
        for export in exports.iter() {
            export
                .device
                .close()
                .await
                .with_context(|| format!("closing volume {}", export.name))?;
        }
        tracing::info!("stopped cleanly");
        Ok(())
    })
}

/// Opens (creating on first start) an object-storage volume.
async fn open_object_volume(
    location: &StoreLocation,
    name: &str,
    args: &ServeArgs,
    cache_dir: &Path,
    block_size: u32,
) -> Result<ObjectVolume> {
    let mut config = VolumeConfig::new(cache_dir.join(name));
    if let Some(bytes) = args.cache_size {
        config.cache_bytes = bytes;
    }
    if let Some(interval) = args.sync_interval {
        config.sync_interval = interval;
    }
    if let Some(bytes) = args.journal_limit {
        config.max_dirty_bytes = bytes;
    }
    if let Some(bytes) = args.chunk_size {
        config.chunk_bytes = bytes as usize;
    }
    if args.durability.as_deref() == Some("remote") {
        config.durability = Durability::Remote;
    }
    if let Some(lag) = args.max_upload_lag {
        config.max_upload_lag = lag;
    }
    if let Some(timeout) = args.stall_timeout {
        config.stall_timeout = timeout;
    }
    if let Some(window) = args.restore_window {
        config.restore_window = window;
    }
    config.upload_step_blocks = args.upload_step_blocks;
    config.collect_garbage = !args.no_gc;
    config.read_only = args.read_only;
    config.hydrate = args.hydrate;
    if let Some(bytes) = args.readahead {
        config.readahead_bytes = bytes;
    }
    if let Some(gets) = args.prefetch_gets {
        config.prefetch_gets = gets as usize;
    }
    config.holder = format!("{} pid {}", hostname(), std::process::id());
    let open = |config: VolumeConfig| {
        ObjectVolume::open(
            Arc::clone(&location.store),
            &location.prefix,
            location.layout,
            name,
            config,
        )
    };
    // Opened straight away (the open reads volume.json itself: a boot is a handful of round
    // trips, and this saves one); created only when it is missing.
    let missing = match open(config.clone()).await {
        Ok(volume) => return Ok(volume),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let meta = catalog::load(location.store.as_ref(), &location.prefix, name)
                .await
                .with_context(|| format!("reading volume {name}"))?;
            if meta.is_some() { Err(e) } else { Ok(()) }
        }
        Err(e) => Err(e),
    };
    missing.with_context(|| format!("opening volume {name} in {}", location.description))?;
    if args.read_only {
        bail!("volume {name} does not exist in {}", location.description);
    }
    ObjectVolume::create(
        location.store.as_ref(),
        &location.prefix,
        name,
        args.size,
        block_size,
    )
    .await
    .with_context(|| format!("creating volume {name}"))?;
    tracing::info!(volume = name, size = %format_size(args.size), "created volume");
    open(config)
        .await
        .with_context(|| format!("opening volume {name} in {}", location.description))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into())
}

fn open_file_volume(
    store: &Path,
    name: &str,
    size: u64,
    block_size: u32,
    read_only: bool,
) -> Result<FileVolume> {
    std::fs::create_dir_all(store)
        .with_context(|| format!("creating the store directory {}", store.display()))?;
    FileVolume::open_or_create(store, name, size, block_size, read_only)
        .with_context(|| format!("opening volume {name} in {}", store.display()))
}

fn warn_engine_only_flags(args: &ServeArgs, cache_dir: &Path) {
    let ignored: Vec<&str> = [
        (args.cache_dir.is_some(), "--cache-dir"),
        (args.cache_size.is_some(), "--cache-size"),
        (args.sync_interval.is_some(), "--sync-interval"),
        (args.journal_limit.is_some(), "--journal-limit"),
        (args.durability.is_some(), "--durability"),
        (args.max_upload_lag.is_some(), "--max-upload-lag"),
        (args.stall_timeout.is_some(), "--stall-timeout"),
        (args.restore_window.is_some(), "--restore-window"),
        (args.hydrate, "--hydrate"),
        (args.readahead.is_some(), "--readahead"),
        (args.prefetch_gets.is_some(), "--prefetch-gets"),
    ]
    .into_iter()
    .filter_map(|(given, flag)| given.then_some(flag))
    .collect();
    if !ignored.is_empty() {
        tracing::warn!(
            cache_dir = %cache_dir.display(),
            "{} apply to the object engine; --engine file ignores them \
             (writes are durable at FLUSH via fdatasync)",
            ignored.join(", ")
        );
    }
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
