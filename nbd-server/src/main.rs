//! `bucketdisk`: create, inspect and serve virtual disks over NBD.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use engine::{BlockDevice, FileVolume};
use nbd_server::exports::{Export, Exports};
use nbd_server::server::{self, Listener};
use nbd_server::units::{format_size, parse_duration, parse_size};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
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
    Serve(ServeArgs),
    /// Create a volume.
    Create(CreateArgs),
    /// Show a volume's size and usage.
    Info(InfoArgs),
}

#[derive(Args)]
struct StoreArgs {
    /// Where volumes live: file:///absolute/path or a directory path.
    /// [default: ./bucketdisk-data/store]
    #[arg(long, env = "BUCKETDISK_STORE")]
    store: Option<String>,
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
    /// Local cache size limit (object-storage engine; the local-file engine has no cache).
    #[arg(long, value_parser = parse_size)]
    cache_size: Option<u64>,
    /// How often dirty data is uploaded (object-storage engine).
    #[arg(long, value_parser = parse_duration)]
    sync_interval: Option<Duration>,
    /// What FLUSH waits for: local (journal) or remote (object storage) (object-storage engine).
    #[arg(long, value_parser = ["local", "remote"])]
    durability: Option<String>,
    /// Pull every block into the local cache in the background (object-storage engine).
    #[arg(long)]
    hydrate: bool,
    /// Prometheus metrics address (not served yet).
    #[arg(long)]
    metrics: Option<String>,
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
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
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

/// Resolves `--store` to a local directory. Only local-directory stores exist in this engine.
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
        bail!(
            "--store {url}: only local-directory stores (file:///path) are supported by the \
             local-file engine"
        );
    }
    Ok(PathBuf::from(url))
}

fn block_size(value: u64) -> Result<u32> {
    u32::try_from(value).context("block size too large")
}

fn create(args: CreateArgs) -> Result<()> {
    let store = store_dir(&args.store)?;
    let volume = FileVolume::create(&store, &args.name, args.size, block_size(args.block_size)?)
        .with_context(|| format!("creating volume {}", args.name))?;
    println!(
        "created volume {} ({}) in {}",
        args.name,
        format_size(volume.size()),
        store.display()
    );
    Ok(())
}

fn info(args: InfoArgs) -> Result<()> {
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

fn serve(args: ServeArgs) -> Result<()> {
    let store = store_dir(&args.store)?;
    let cache_dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR).join("cache"));
    warn_engine_only_flags(&args, &cache_dir);
    let block_size = block_size(args.block_size)?;

    let mut exports = Vec::new();
    for name in &args.volumes {
        if exports.iter().any(|e: &Export| &e.name == name) {
            bail!("--volume {name} given twice");
        }
        let volume = open_volume(&store, name, args.size, block_size, args.read_only)?;
        tracing::info!(
            volume = name,
            size = %format_size(volume.size()),
            read_only = args.read_only,
            "volume ready"
        );
        exports.push(Export {
            name: name.clone(),
            description: format!("bucketdisk volume {name}"),
            device: Arc::new(volume),
        });
    }
    let exports = Arc::new(Exports::new(exports));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = match Listener::from_socket_activation()? {
            Some(l) => l,
            None => match &args.socket {
                Some(path) => Listener::unix(path.clone())?,
                None => Listener::tcp(&args.listen).await?,
            },
        };
        tracing::info!("serving NBD on {}", listener.describe());
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            wait_for_stop_signal().await;
            tracing::info!("stopping: finishing in-flight requests");
            let _ = stop_tx.send(true);
        });
        server::run(listener, Arc::clone(&exports), stop_rx).await?;
        for export in exports.iter() {
            if !export.device.capabilities().read_only {
                export
                    .device
                    .flush()
                    .await
                    .with_context(|| format!("flushing volume {}", export.name))?;
            }
        }
        tracing::info!("stopped cleanly");
        Ok(())
    })
}

fn open_volume(
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
        (args.durability.is_some(), "--durability"),
        (args.hydrate, "--hydrate"),
        (args.metrics.is_some(), "--metrics"),
    ]
    .into_iter()
    .filter_map(|(given, flag)| given.then_some(flag))
    .collect();
    if !ignored.is_empty() {
        tracing::warn!(
            cache_dir = %cache_dir.display(),
            "{} apply to the object-storage engine; the local-file engine ignores them \
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
