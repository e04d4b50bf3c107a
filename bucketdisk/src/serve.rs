//! `bucketdisk serve`: open (or create) volumes and serve them over NBD until stopped.

use crate::checkpoint_exports;
use crate::control;
use crate::key_args::KeyArgs;
use crate::served::ServedVolume;
use crate::store_args::{
    DEFAULT_DATA_DIR, DEFAULT_VOLUME, StoreArgs, block_size, file_engine, new_runtime,
    object_store, store_dir,
};
use anyhow::{Context, Result, bail};
use bucketdisk::units::{format_size, parse_chunk_size, parse_duration, parse_size};
use clap::Args;
use engine::object_volume::{ObjectVolume, VolumeConfig, catalog};
use engine::sealing::VolumeKey;
use engine::{BlockDevice, Durability, FileVolume};
use nbd_server::exports::{Export, Exports};
use nbd_server::server::{self, Listener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use stores::url::StoreLocation;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;

#[derive(Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// (A volume created on first start with a key is encrypted with it.)
    #[command(flatten)]
    pub(crate) key: KeyArgs,
    /// Local directory for the journal, cache and hydrated block map.
    /// [default: ./bucketdisk-data/cache]
    #[arg(long)]
    pub(crate) cache_dir: Option<PathBuf>,
    /// TCP address to listen on (ignored with --socket or socket activation).
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub(crate) listen: String,
    /// Listen on this Unix socket instead of TCP.
    #[arg(long)]
    pub(crate) socket: Option<PathBuf>,
    /// Volume to export (repeatable). The first is also the default export "". NAME@CHECKPOINT
    /// exports a checkpoint read-only; every checkpoint of a served volume is also answered
    /// as NAME@CHECKPOINT without this.
    #[arg(long = "volume", default_value = DEFAULT_VOLUME)]
    pub(crate) volumes: Vec<String>,
    /// Size of a volume created on first start.
    #[arg(long, default_value = "100G", value_parser = parse_size)]
    pub(crate) size: u64,
    /// Block size of a volume created on first start.
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub(crate) block_size: u64,
    /// Export read-only: writes, trims and zeroing fail with EPERM.
    #[arg(long)]
    pub(crate) read_only: bool,
    /// Local block cache size limit per volume.
    #[arg(long, value_parser = parse_size)]
    pub(crate) cache_size: Option<u64>,
    /// How often dirty data is uploaded to the store.
    #[arg(long, value_parser = parse_duration)]
    pub(crate) sync_interval: Option<Duration>,
    /// Local journal limit: once this much written data waits for upload, writes wait for the
    /// uploader (bursts up to this size are absorbed at local-disk speed). [default: 4G]
    #[arg(long, value_parser = parse_size)]
    pub(crate) journal_limit: Option<u64>,
    /// Target size of the chunks the uploader writes to the store, 4M to 32M: larger chunks
    /// mean fewer PUTs per GiB, smaller ones less rewriting when GC compacts them. [default: 24M]
    #[arg(long, value_parser = parse_chunk_size)]
    pub(crate) chunk_size: Option<u64>,
    /// What FLUSH waits for: local (journal on disk) or remote (uploaded to the store).
    #[arg(long, value_parser = ["local", "remote"])]
    pub(crate) durability: Option<String>,
    /// How far the store may lag behind the local journal while the load keeps rewriting the
    /// same blocks (rewrites between two uploads are uploaded once). Other loads are uploaded
    /// every --sync-interval; never lags with --durability remote. [default: 30s]
    #[arg(long, value_parser = parse_duration)]
    pub(crate) max_upload_lag: Option<Duration>,
    /// Writes waiting for room in a full journal fail with EIO once the store has made no
    /// progress at all for this long (while uploads progress, however slowly, they wait).
    /// [default: 5m]
    #[arg(long, value_parser = parse_duration)]
    pub(crate) stall_timeout: Option<Duration>,
    /// How long past states of a volume stay restorable: chunks the block map stopped using
    /// are deleted once this long has passed (0: right after the upload that replaced them).
    /// Longer windows keep every overwritten chunk that long. [default: 0s]
    #[arg(long, value_parser = parse_duration)]
    pub(crate) restore_window: Option<Duration>,
    /// Pull every block into the local cache in the background (object-storage engine).
    #[arg(long)]
    pub(crate) hydrate: bool,
    /// How far ahead of a sequential reader blocks are fetched from the store, at most: the
    /// window starts at 1M and doubles with each read that continues the stream; 0 turns
    /// readahead off. [default: 64M]
    #[arg(long, value_parser = parse_size)]
    pub(crate) readahead: Option<u64>,
    /// Ranged GETs that readahead and NBD_CMD_CACHE keep in flight at most (each
    /// brings up to 4 MiB of neighbouring blocks); reads a client waits for are not limited
    /// by it. [default: 16]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub(crate) prefetch_gets: Option<u64>,
    #[command(flatten)]
    pub(crate) tls: crate::tls_args::TlsArgs,
    /// Connections one client (an IP address; a user over a Unix socket) may hold at once;
    /// more are closed at once, with a log line.
    #[arg(long, default_value_t = nbd_server::limits::DEFAULT_CONNECTIONS as u64,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub(crate) max_client_connections: u64,
    /// Memory one client's requests in flight may take across its connections (payloads
    /// read, replies not yet written), at least 32M (the largest request); beyond it the
    /// client's next request waits, other clients do not.
    #[arg(long, default_value = "256M", value_parser = parse_client_memory)]
    pub(crate) client_memory: u64,
    /// Serve Prometheus metrics on http://ADDRESS/metrics: HOST:PORT, or a port alone for
    /// 127.0.0.1:PORT. Another address than loopback is the user's explicit choice; then
    /// protect it with --metrics-token-file.
    #[arg(long)]
    pub(crate) metrics: Option<String>,
    /// Scrapes must present the token in this file (owner-only) as `Authorization: Bearer
    /// TOKEN`; others get 401.
    #[arg(long, requires = "metrics")]
    pub(crate) metrics_token_file: Option<PathBuf>,
    /// Testing and benchmarks: delay every object-store request by this much (simulates a
    /// remote store's first-byte latency on a local one).
    #[arg(long, value_parser = parse_duration, hide = true)]
    pub(crate) inject_latency: Option<Duration>,
    /// Fault runs and tests: inject object-store faults by a seeded plan, e.g.
    /// `seed=7,rate=0.1,outage=60s+30s` (see stores::chaos::FaultPlan); what was injected is
    /// logged when the server stops.
    #[arg(long, hide = true)]
    pub(crate) inject_faults: Option<stores::chaos::FaultPlan>,
    /// Benchmarks: no garbage collection (dead chunks stay), to measure what it costs.
    #[arg(long, hide = true)]
    pub(crate) no_gc: bool,
    /// Benchmarks: blocks one upload step stores at most (to measure the bound).
    #[arg(long, hide = true)]
    pub(crate) upload_step_blocks: Option<usize>,
}

pub(crate) fn serve(args: ServeArgs) -> Result<()> {
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
    // Before any volume opens: a TLS or metrics setup that cannot work is one line, at once.
    let tls = args.tls.load()?;
    let key = args.key.key()?;
    let metrics_token = args
        .metrics_token_file
        .as_deref()
        .map(nbd_server::metrics::MetricsToken::from_file)
        .transpose()?
        .map(Arc::new);
    let runtime = new_runtime()?;
    runtime.block_on(async move {
        // Before anything can be seen from outside (the port, the log line): a SIGTERM sent
        // as soon as the port accepts must stop the server cleanly, not kill it.
        let stop_signals = StopSignals::install();
        let mut exports = Vec::new();
        let mut object_volumes = std::collections::HashMap::new();
        let mut injected = None;
        let location = if file_engine(&args.store) {
            warn_engine_only_flags(&args, &cache_dir, key.is_some());
            None
        } else {
            let mut location = object_store(&args.store)?;
            if let Some(latency) = args.inject_latency {
                tracing::warn!(
                    "every object-store request is delayed by {latency:?} (--inject-latency)"
                );
                location.store = stores::url::with_latency(location.store, latency);
            }
            if let Some(plan) = &args.inject_faults {
                tracing::warn!("object-store faults are injected ({plan:?})");
                let (store, chaos) = stores::url::with_faults(location.store, plan.clone());
                location.store = store;
                injected = Some(chaos);
            }
            Some(location)
        };
        // Before any volume is opened: a second server on this cache folder must fail here,
        // not after it took (and fenced) the first one's volumes.
        let control_listener = match &location {
            Some(_) => Some(control::bind(&cache_dir).await?),
            None => None,
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
                Some(location) => match name.split_once('@') {
                    // A checkpoint: read-only, as it was taken.
                    Some((volume, checkpoint)) => Arc::new(
                        checkpoint_exports::open(
                            location,
                            volume,
                            checkpoint,
                            &cache_dir,
                            key.clone(),
                        )
                        .await?,
                    ),
                    None => {
                        let (volume, config) = open_object_volume(
                            location,
                            name,
                            &args,
                            &cache_dir,
                            block_size,
                            key.clone(),
                        )
                        .await?;
                        let served = Arc::new(ServedVolume::new(
                            name.clone(),
                            location.clone(),
                            config,
                            volume,
                        ));
                        object_volumes.insert(name.clone(), Arc::clone(&served));
                        served
                    }
                },
            };
            tracing::info!(
                volume = name,
                size = %format_size(device.size()),
                read_only = args.read_only,
                engine = %args.store.engine,
                "volume ready"
            );
            exports.push(Export::new(
                name.clone(),
                format!("bucketdisk volume {name}"),
                device,
            ));
        }
        let mut exports = Exports::new(exports);
        if let Some(location) = &location
            && !object_volumes.is_empty()
        {
            // `disk@NAME` for every checkpoint of a served volume, opened when asked for.
            let mut served: Vec<String> = object_volumes.keys().cloned().collect();
            served.sort();
            exports = exports.with_source(Arc::new(checkpoint_exports::CheckpointExports::new(
                location.clone(),
                cache_dir.clone(),
                served,
                key.clone(),
            )));
        }
        let exports = Arc::new(exports);
        let (stop_tx, stop_rx) = watch::channel(false);
        // Verbs (checkpoints) for these volumes come through here, so they never fence them.
        let control = control_listener.map(|listener| {
            let path = control::socket_path(&cache_dir);
            tracing::info!("control socket {}", path.display());
            tokio::spawn(control::serve(
                listener,
                path,
                control::Served {
                    volumes: object_volumes,
                    exports: Arc::clone(&exports),
                },
                stop_rx.clone(),
            ))
        });
        let listener = match Listener::from_socket_activation()? {
            Some(l) => l,
            None => match &args.socket {
                Some(path) => Listener::unix(path.clone())?,
                None => Listener::tcp(&args.listen).await?,
            },
        };
        if let Some(tls) = &tls {
            tracing::info!(
                "TLS {}, {}; SIGHUP reads the credentials again",
                match tls.mode() {
                    nbd_server::tls::TlsMode::Require => "required",
                    _ => "offered",
                },
                tls.credentials().describe()
            );
            crate::tls_args::reload_on_sighup(Arc::clone(tls));
        }
        tracing::info!("serving NBD on {}", listener.describe());
        if let Some(address) = &args.metrics {
            let address = metrics_address(address);
            let metrics_listener = tokio::net::TcpListener::bind(&address)
                .await
                .with_context(|| format!("cannot listen for metrics on {address}"))?;
            let bound = metrics_listener.local_addr()?;
            tracing::info!(
                "serving metrics on http://{bound}/metrics{}",
                if metrics_token.is_some() {
                    " (bearer token required)"
                } else {
                    ""
                }
            );
            if !bound.ip().is_loopback() && metrics_token.is_none() {
                tracing::warn!(
                    "metrics on {bound}, beyond loopback, without --metrics-token-file: whoever \
                     can reach it reads them"
                );
            }
            tokio::spawn(nbd_server::metrics::serve(
                metrics_listener,
                Arc::clone(&exports),
                metrics_token.clone(),
                stop_rx.clone(),
            ));
        }
        tokio::spawn(async move {
            stop_signals.wait().await;
            tracing::info!("stopping: finishing in-flight requests");
            let _ = stop_tx.send(true);
        });
        let policy = server::ServerPolicy {
            tls,
            limits: nbd_server::limits::ClientLimits::new(
                args.max_client_connections as usize,
                args.client_memory,
            ),
        };
        server::run(listener, Arc::clone(&exports), policy, stop_rx).await?;
        if let Some(control) = control {
            // Stopped with the server (the stop signal reaches both); a request in flight is
            // answered before the volumes close.
            let _ = control.await;
        }
        for export in exports.all() {
            export
                .device
                .close()
                .await
                .with_context(|| format!("closing volume {}", export.name))?;
        }
        if let Some(chaos) = injected {
            tracing::info!(
                "injected store faults: {} retried={}",
                chaos.counts(),
                stores::retry::retried()
            );
        }
        tracing::info!("stopped cleanly");
        Ok(())
    })
}

/// `--client-memory`: a size that holds the largest request.
fn parse_client_memory(text: &str) -> Result<u64, String> {
    let bytes = parse_size(text)?;
    let least = nbd_server::transmission::MAX_PAYLOAD;
    if bytes < least {
        return Err(format!(
            "at least {} (the largest request a client may send)",
            format_size(least)
        ));
    }
    Ok(bytes)
}

/// `--metrics`'s address: a port alone means loopback.
fn metrics_address(given: &str) -> String {
    match given.parse::<u16>() {
        Ok(port) => format!("127.0.0.1:{port}"),
        Err(_) => given.to_string(),
    }
}

/// Opens (creating on first start) an object-storage volume; returns it with the configuration
/// it was opened with (to open it again after a restore).
async fn open_object_volume(
    location: &StoreLocation,
    name: &str,
    args: &ServeArgs,
    cache_dir: &Path,
    block_size: u32,
    key: Option<Arc<VolumeKey>>,
) -> Result<(ObjectVolume, VolumeConfig)> {
    let mut config = crate::store_args::volume_config(cache_dir, name, key.clone());
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
    config.holder = format!("{} pid {}", control::hostname(), std::process::id());
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
        Ok(volume) => return Ok((volume, config)),
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
    let (store, prefix) = (location.store.as_ref(), &location.prefix);
    let key = config.key.as_deref();
    ObjectVolume::create_with_key(store, prefix, name, args.size, block_size, key)
        .await
        .with_context(|| format!("creating volume {name}"))?;
    tracing::info!(
        volume = name,
        size = %format_size(args.size),
        encrypted = key.is_some(),
        "created volume"
    );
    let volume = open(config.clone())
        .await
        .with_context(|| format!("opening volume {name} in {}", location.description))?;
    Ok((volume, config))
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

fn warn_engine_only_flags(args: &ServeArgs, cache_dir: &Path, key_given: bool) {
    let ignored: Vec<&str> = [
        (key_given, "--key-file (or BUCKETDISK_KEY)"),
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

/// SIGTERM and SIGINT, caught from the moment they are installed (one received meanwhile is
/// kept, and `wait` returns at once).
struct StopSignals(Option<(Signal, Signal)>);

impl StopSignals {
    fn install() -> Self {
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => StopSignals(Some((term, int))),
            _ => {
                tracing::error!("cannot install signal handlers; stop with SIGKILL");
                StopSignals(None)
            }
        }
    }

    async fn wait(self) {
        let Some((mut term, mut int)) = self.0 else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}
