//! The options every subcommand takes to find its volumes (`--store`, `--engine`), and the
//! helpers that turn them into a store, a directory or a runtime.

use crate::key_args::KeyArgs;
use anyhow::{Context, Result, bail};
use clap::Args;
use engine::sealing::VolumeKey;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use stores::url::{StoreLocation, open_store};

pub(crate) const DEFAULT_DATA_DIR: &str = "bucketdisk-data";
pub(crate) const DEFAULT_VOLUME: &str = "disk";

#[derive(Args)]
pub(crate) struct StoreArgs {
    /// Where volumes live: file:///absolute/path, a directory path, s3://bucket/prefix (AWS_*
    /// environment for endpoint and credentials) or memory://.
    /// [default: ./bucketdisk-data/store]
    #[arg(long, env = "BUCKETDISK_STORE")]
    pub(crate) store: Option<String>,
    /// Storage engine: "object" (chunks + block map in the store, local journal and cache) or
    /// "file" (one sparse local file per volume; the local baseline, directory stores only).
    #[arg(long, env = "BUCKETDISK_ENGINE", default_value = "object", value_parser = ["object", "file"])]
    pub(crate) engine: String,
    /// Test tool: the process kills itself (SIGKILL) just before the Nth change it would make
    /// to the store, to crash a verb at each of its steps.
    #[arg(long, hide = true, env = "BUCKETDISK_CRASH_BEFORE_STORE_CHANGE")]
    pub(crate) crash_before_store_change: Option<u64>,
}

pub(crate) fn store_url(args: &StoreArgs) -> String {
    args.store
        .clone()
        .unwrap_or_else(|| format!("{DEFAULT_DATA_DIR}/store"))
}

pub(crate) fn object_store(args: &StoreArgs) -> Result<StoreLocation> {
    let url = store_url(args);
    let mut location = open_store(&url).with_context(|| format!("--store {url}"))?;
    if let Some(n) = args.crash_before_store_change {
        tracing::warn!("this process kills itself before store change {n} (crash test)");
        location.store = stores::url::with_crash_point(location.store, n);
    }
    Ok(location)
}

pub(crate) fn file_engine(args: &StoreArgs) -> bool {
    args.engine == "file"
}

pub(crate) fn new_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs `work` on a blocking thread, with the current runtime to drive its futures: for
/// futures rustc cannot prove `Send` for every lifetime (opening a volume nests several), which
/// a spawned task needs. `Err` if the thread panicked.
pub(crate) async fn on_own_thread<T: Send + 'static>(
    work: impl FnOnce(&tokio::runtime::Handle) -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || work(&runtime)).await
}

/// Resolves `--store` to a local directory (the local-file engine).
pub(crate) fn store_dir(args: &StoreArgs) -> Result<PathBuf> {
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

pub(crate) fn block_size(value: u64) -> Result<u32> {
    u32::try_from(value).context("block size too large")
}

/// The block cache every volume opened under a cache directory shares (a name no volume
/// can have: volume names never start with a dot).
const SHARED_CACHE: &str = ".blocks";

/// The block cache shared by the volumes whose local folders are in `cache_dir`.
pub(crate) fn shared_cache_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join(SHARED_CACHE)
}

/// The engine's configuration for the volume whose local folder is `<cache_dir>/<local>`, with
/// the cache directory's shared block cache.
pub(crate) fn volume_config(
    cache_dir: &Path,
    local: &str,
    key: Option<Arc<VolumeKey>>,
) -> engine::VolumeConfig {
    let mut config = engine::VolumeConfig::new(cache_dir.join(local));
    config.shared_cache_dir = Some(shared_cache_dir(cache_dir));
    config.key = key;
    config
}

/// Where a verb that changes a volume finds it, and whether it may take it over.
#[derive(Args)]
pub(crate) struct VolumeAccess {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// The cache directory of the server that serves the volume on this host (its control
    /// socket is there) and of the volume's local folder. [default: ./bucketdisk-data/cache]
    #[arg(long)]
    pub(crate) cache_dir: Option<PathBuf>,
    /// Go ahead even though the volume's writer lease says a server that did not stop cleanly
    /// may still hold it (that server, if it runs, stops accepting writes).
    #[arg(long)]
    pub(crate) force: bool,
    #[command(flatten)]
    pub(crate) key: KeyArgs,
}

impl VolumeAccess {
    pub(crate) fn cache_dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR).join("cache"))
    }

    /// The object store; an error for `--engine file`, which these verbs do not apply to.
    pub(crate) fn object_store(&self, verb: &str) -> Result<StoreLocation> {
        if file_engine(&self.store) {
            bail!("{verb} needs the object engine (--engine object)");
        }
        object_store(&self.store)
    }
}
