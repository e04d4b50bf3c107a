//! `bucketdisk info`: a volume's size and usage, as text or JSON.

use crate::store_args::{
    DEFAULT_DATA_DIR, StoreArgs, file_engine, new_runtime, object_store, store_dir,
};
use anyhow::{Context, Result};
use bucketdisk::units::format_size;
use clap::Args;
use engine::FileVolume;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct InfoArgs {
    pub(crate) name: String,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Local directory whose journal state to report. [default: ./bucketdisk-data/cache]
    #[arg(long)]
    pub(crate) cache_dir: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn info(args: InfoArgs) -> Result<()> {
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
        print_fields(&[
            ("volume", meta.name.clone()),
            ("size", with_bytes(meta.size)),
            ("block size", format_size(u64::from(meta.block_size))),
            ("allocated", with_bytes(allocated)),
            ("format", meta.format.clone()),
            ("store", store.display().to_string()),
        ]);
    }
    Ok(())
}

/// `info` for the object engine: the volume as the store describes it (a follower of its
/// block map: no lease, no local folder, a running writer is not disturbed) plus this host's
/// journal and cache for it.
fn object_info(args: InfoArgs) -> Result<()> {
    let location = object_store(&args.store)?;
    let cache_dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR).join("cache"));
    let shared_cache = crate::store_args::shared_cache_dir(&cache_dir);
    let local =
        engine::object_volume::local_usage(&cache_dir.join(&args.name), Some(&shared_cache));
    let report = new_runtime()?
        .block_on(engine::object_volume::inspect(
            location.store,
            &location.prefix,
            location.layout,
            &args.name,
        ))
        .with_context(|| format!("reading volume {}", args.name))?;
    let meta = &report.meta;
    let allocated = report.allocated_blocks * u64::from(meta.block_size);
    if args.json {
        let value = serde_json::json!({
            "name": meta.name,
            "size": meta.size,
            "block_size": meta.block_size,
            "allocated": allocated,
            "allocated_blocks": report.allocated_blocks,
            "stored_bytes": report.allocated_stored_bytes,
            "chunks": report.chunks,
            "chunk_bytes": report.chunk_bytes,
            "map_txid": report.map_txid,
            "local_journal_bytes": local.journal_bytes,
            "local_cache_bytes": local.cache_bytes,
            "local_cache_capacity": local.cache_capacity,
            "local_cache_shared": local.cache_shared,
            "format": meta.format,
            "encryption": meta.encryption.as_ref().map(|e| e.cipher.clone()),
            "store": location.description,
        });
        println!("{value}");
    } else {
        print_fields(&[
            ("volume", meta.name.clone()),
            ("size", with_bytes(meta.size)),
            ("block size", format_size(u64::from(meta.block_size))),
            (
                "allocated",
                format!(
                    "{} ({} blocks, {} stored after compression)",
                    format_size(allocated),
                    report.allocated_blocks,
                    format_size(report.allocated_stored_bytes)
                ),
            ),
            (
                "chunks",
                format!("{} ({})", report.chunks, format_size(report.chunk_bytes)),
            ),
            ("map txid", report.map_txid.to_string()),
            (
                "local journal",
                format!(
                    "{} in {}",
                    format_size(local.journal_bytes),
                    cache_dir.join(&args.name).display()
                ),
            ),
            (
                "local cache",
                format!(
                    "{} used of {}{}",
                    format_size(local.cache_bytes),
                    format_size(local.cache_capacity),
                    if local.cache_shared {
                        " (shared by the volumes of this cache directory)"
                    } else {
                        ""
                    }
                ),
            ),
            ("format", meta.format.clone()),
            (
                "encryption",
                meta.encryption.as_ref().map_or("none".to_string(), |e| {
                    format!("{} (blocks in the store)", e.cipher)
                }),
            ),
            ("store", location.description.clone()),
        ]);
    }
    Ok(())
}

/// `2 GiB (2147483648 bytes)`.
fn with_bytes(bytes: u64) -> String {
    format!("{} ({bytes} bytes)", format_size(bytes))
}

/// `label:  value` lines, the values aligned.
fn print_fields(fields: &[(&str, String)]) {
    let width = fields.iter().map(|(l, _)| l.len() + 1).max().unwrap_or(0);
    for (label, value) in fields {
        println!("{:<width$} {value}", format!("{label}:"));
    }
}
