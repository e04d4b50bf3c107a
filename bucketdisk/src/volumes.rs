//! `bucketdisk list`, `delete` and `resize`: the volumes in a store, removing one, and changing
//! one's size.

use crate::control;
use crate::store_args::{StoreArgs, VolumeAccess, new_runtime, object_store};
use anyhow::{Context, Result, bail};
use bucketdisk::units::format_size;
use clap::Args;
use engine::object_volume::{catalog, checkpoints};
use futures::StreamExt;
use stores::url::StoreLocation;

#[derive(Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct DeleteArgs {
    /// The volume to delete.
    volume: String,
    #[command(flatten)]
    access: VolumeAccess,
}

/// One volume as `list` shows it.
#[derive(serde::Serialize)]
struct Row {
    name: String,
    size: u64,
    block_size: u32,
    allocated: u64,
    stored_bytes: u64,
    checkpoints: usize,
}

async fn describe(location: &StoreLocation, name: String) -> Result<Option<Row>> {
    let report = match engine::object_volume::inspect(
        std::sync::Arc::clone(&location.store),
        &location.prefix,
        location.layout,
        &name,
    )
    .await
    {
        Ok(report) => report,
        // Not a volume (or the remains of one being deleted).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading volume {name}")),
    };
    let checkpoints = checkpoints::list(location.store.as_ref(), &location.prefix, &name)
        .await
        .with_context(|| format!("listing the checkpoints of volume {name}"))?
        .len();
    Ok(Some(Row {
        name,
        size: report.meta.size,
        block_size: report.meta.block_size,
        allocated: report.allocated_blocks * u64::from(report.meta.block_size),
        stored_bytes: report.allocated_stored_bytes,
        checkpoints,
    }))
}

pub(crate) fn list(args: ListArgs) -> Result<()> {
    if args.store.engine == "file" {
        bail!("list reads object-engine stores (--engine object)");
    }
    let location = object_store(&args.store)?;
    let rows: Vec<Row> = new_runtime()?.block_on(async {
        let names = catalog::list_names(location.store.as_ref(), &location.prefix).await?;
        let described: Vec<Result<Option<Row>>> = futures::stream::iter(names)
            .map(|name| describe(&location, name))
            .buffered(8)
            .collect()
            .await;
        described
            .into_iter()
            .filter_map(Result::transpose)
            .collect::<Result<Vec<Row>>>()
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&rows)?);
    } else if rows.is_empty() {
        println!("no volumes in {}", location.description);
    } else {
        println!(
            "{:<32} {:>10} {:>10} {:>10} {:>11}",
            "NAME", "SIZE", "ALLOCATED", "STORED", "CHECKPOINTS"
        );
        for r in &rows {
            println!(
                "{:<32} {:>10} {:>10} {:>10} {:>11}",
                r.name,
                format_size(r.size),
                format_size(r.allocated),
                format_size(r.stored_bytes),
                r.checkpoints
            );
        }
    }
    Ok(())
}

pub(crate) fn delete(args: DeleteArgs) -> Result<()> {
    engine::validate_volume_name(&args.volume)?;
    let location = args.access.object_store("delete")?;
    let cache_dir = args.access.cache_dir();
    let name = args.volume.as_str();
    let deleted = new_runtime()?.block_on(async {
        if control::serves(&cache_dir, name).await? {
            bail!(
                "volume {name} is served by the server using {}: stop serving it first",
                cache_dir.display()
            );
        }
        let store = location.store.as_ref();
        let meta = catalog::load(store, &location.prefix, name).await?;
        // Without volume.json, only the remains of a deletion that did not finish.
        if meta.is_none()
            && !catalog::list_names(store, &location.prefix)
                .await?
                .iter()
                .any(|n| n == name)
        {
            bail!("no volume {name} in {}", location.description);
        }
        // Clones read this volume's chunks: it goes only after they do, --force or not.
        let kept = checkpoints::list(store, &location.prefix, name).await?;
        let mut clones = Vec::new();
        for c in &kept {
            clones.extend(
                engine::object_volume::clones_of(store, &location.prefix, name, &c.name).await?,
            );
        }
        if !clones.is_empty() {
            bail!(
                "volume {name} has clones ({}) that read its chunks: delete them first",
                clones.join(", ")
            );
        }
        if meta.is_some() && !args.access.force {
            control::check_not_held_elsewhere(&location, name, false).await?;
            if !kept.is_empty() {
                let names: Vec<&str> = kept.iter().map(|c| c.name.as_str()).collect();
                bail!(
                    "volume {name} has {} checkpoint(s) ({}): --force deletes them with it",
                    kept.len(),
                    names.join(", ")
                );
            }
        }
        let bar = crate::progress::bar("deleting objects");
        let count = catalog::delete_volume(store, &location.prefix, name, |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        })
        .await?;
        bar.finish_and_clear();
        if let Some(meta) = meta {
            // It no longer keeps its parent's checkpoint. (A crash before this leaves a marker
            // whose clone has no volume.json: ignored and removed by the parent.)
            engine::object_volume::release_parent(store, &location.prefix, &meta).await?;
        }
        Ok(count)
    })?;
    // Its own folder and those of its checkpoints served read-only (`NAME@CHECKPOINT`).
    let checkpoint_folders = std::fs::read_dir(&cache_dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(&format!("{name}@")))
        });
    for local in std::iter::once(cache_dir.join(name)).chain(checkpoint_folders) {
        if local.exists() {
            std::fs::remove_dir_all(&local)
                .with_context(|| format!("removing the local folder {}", local.display()))?;
        }
    }
    println!("deleted volume {name} ({deleted} objects)");
    Ok(())
}

#[derive(Args)]
pub(crate) struct ResizeArgs {
    /// The volume to resize.
    volume: String,
    /// The new size (K, M, G, T suffixes; a multiple of 4K, and of the block size to shrink).
    #[arg(value_parser = bucketdisk::units::parse_size)]
    size: u64,
    #[command(flatten)]
    access: VolumeAccess,
    /// Print the sizes as JSON.
    #[arg(long)]
    json: bool,
}

/// `bucketdisk resize`: through the volume's server when one runs here (new NBD connections see
/// the new size; connected clients keep theirs until they reconnect), else on the volume.
/// `--force` also discards data past a smaller size (without it, shrinking over data is refused).
pub(crate) fn resize(args: ResizeArgs) -> Result<()> {
    let location = args.access.object_store("resize")?;
    let request = control::Request::Resize {
        volume: args.volume.clone(),
        size: args.size,
        force: args.access.force,
    };
    let key = args.access.key.key()?;
    let result = new_runtime()?
        .block_on(control::run(
            &location,
            &args.access.cache_dir(),
            request,
            args.access.force,
            key,
        ))
        .with_context(|| format!("resizing volume {}", args.volume))?;
    if args.json {
        println!("{result}");
    } else {
        let old = result["old_size"].as_u64().unwrap_or_default();
        println!(
            "resized volume {} from {} to {}",
            args.volume,
            format_size(old),
            format_size(args.size)
        );
    }
    Ok(())
}
