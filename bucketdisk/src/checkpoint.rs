//! `bucketdisk checkpoint create|list|delete` and `bucketdisk restore`: named, restorable states
//! of a volume. Taking or deleting one goes through the server that holds the volume when one
//! runs here (see `control`), so it is never fenced; listing reads the store; restoring needs
//! the volume not served.

use crate::control::{self, Request};
use crate::store_args::{StoreArgs, VolumeAccess, new_runtime, object_store};
use anyhow::{Context, Result};
use bucketdisk::units::format_size;
use clap::{Args, Subcommand};
use engine::object_volume::checkpoints::{self, Checkpoint};

#[derive(Args)]
pub(crate) struct CheckpointArgs {
    #[command(subcommand)]
    command: CheckpointCommand,
}

#[derive(Subcommand)]
enum CheckpointCommand {
    /// Take a checkpoint: everything written before the command, uploaded and pinned (no data
    /// is copied). Prints its name.
    Create {
        /// The volume to checkpoint.
        volume: String,
        /// 1-128 of [A-Za-z0-9._-]. [default: ckpt-<UTC time>]
        name: Option<String>,
        #[command(flatten)]
        target: VolumeAccess,
        /// Print the checkpoint as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List a volume's checkpoints, oldest first.
    List {
        /// The volume whose checkpoints to list.
        volume: String,
        #[command(flatten)]
        store: StoreArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a checkpoint; the space only it held is freed by the volume's garbage collection.
    Delete {
        /// The volume the checkpoint belongs to.
        volume: String,
        /// The checkpoint to delete.
        name: String,
        #[command(flatten)]
        target: VolumeAccess,
    },
}

/// Carries `request` out through the volume's server or on the volume itself.
fn run(access: &VolumeAccess, request: Request) -> Result<serde_json::Value> {
    let location = access.object_store("checkpoints")?;
    let key = access.key.key()?;
    new_runtime()?.block_on(control::run(
        &location,
        &access.cache_dir(),
        request,
        access.force,
        key,
    ))
}

pub(crate) fn checkpoint(args: CheckpointArgs) -> Result<()> {
    match args.command {
        CheckpointCommand::Create {
            volume,
            name,
            target,
            json,
        } => {
            let result = run(
                &target,
                Request::CheckpointCreate {
                    volume: volume.clone(),
                    name,
                },
            )?;
            let checkpoint: Checkpoint =
                serde_json::from_value(result).context("reading the checkpoint")?;
            if json {
                println!("{}", serde_json::to_string(&describe(&checkpoint))?);
            } else {
                println!("{}", checkpoint.name);
            }
        }
        CheckpointCommand::List {
            volume,
            store,
            json,
        } => {
            let location = object_store(&store)?;
            let list = new_runtime()?
                .block_on(checkpoints::list(
                    location.store.as_ref(),
                    &location.prefix,
                    &volume,
                ))
                .with_context(|| format!("listing the checkpoints of volume {volume}"))?;
            if json {
                let rows: Vec<serde_json::Value> = list.iter().map(describe).collect();
                println!("{}", serde_json::Value::Array(rows));
            } else if list.is_empty() {
                println!("volume {volume} has no checkpoints");
            } else {
                println!(
                    "{:<32} {:<24} {:>10} {:>12}",
                    "NAME", "CREATED (UTC)", "SIZE", "STORED"
                );
                for c in &list {
                    println!(
                        "{:<32} {:<24} {:>10} {:>12}",
                        c.name,
                        created(c),
                        format_size(c.size),
                        format_size(c.stored_bytes)
                    );
                }
            }
        }
        CheckpointCommand::Delete {
            volume,
            name,
            target,
        } => {
            run(
                &target,
                Request::CheckpointDelete {
                    volume: volume.clone(),
                    name: name.clone(),
                },
            )?;
            println!("deleted checkpoint {name} of volume {volume}");
        }
    }
    Ok(())
}

fn created(c: &Checkpoint) -> String {
    chrono::DateTime::from_timestamp_millis(c.created_ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

/// A checkpoint for people and scripts: what it is, not the chunk list it pins.
fn describe(c: &Checkpoint) -> serde_json::Value {
    serde_json::json!({
        "name": c.name,
        "txid": c.txid,
        "created": created(c),
        "created_ms": c.created_ms,
        "size": c.size,
        "allocated_blocks": c.allocated_blocks,
        "stored_bytes": c.stored_bytes,
        "chunks": c.chunks.len(),
    })
}

#[derive(Args)]
pub(crate) struct RestoreArgs {
    /// The volume to restore.
    volume: String,
    /// The checkpoint to restore.
    checkpoint: String,
    /// Take a checkpoint of the current state first (its name is printed).
    #[arg(long)]
    keep_current: bool,
    #[command(flatten)]
    access: VolumeAccess,
    /// Print what was done as JSON.
    #[arg(long)]
    json: bool,
}

/// `bucketdisk restore`: the volume as its checkpoint holds it, from now on, on every host.
/// A volume served here is restored by its server (refused while NBD clients are connected,
/// unless `--force` ends their sessions); otherwise the verb restores it itself.
pub(crate) fn restore(args: RestoreArgs) -> Result<()> {
    let location = args.access.object_store("restore")?;
    let cache_dir = args.access.cache_dir();
    let name = args.volume.as_str();
    let key = args.access.key.key()?;
    let report = new_runtime()?.block_on(async {
        // A served volume: its server closes it, restores it and serves it again.
        let served = control::Request::Restore {
            volume: name.to_string(),
            checkpoint: args.checkpoint.clone(),
            keep_current: args.keep_current,
            force: args.access.force,
        };
        if let Some(result) = control::ask_server(&cache_dir, &served).await? {
            return serde_json::from_value(result).context("reading the server's answer");
        }
        let mut config = crate::store_args::volume_config(&cache_dir, name, key);
        config.holder = control::holder_name("restore");
        let request = engine::object_volume::RestoreRequest {
            volume: name,
            checkpoint: &args.checkpoint,
            keep_current: args.keep_current,
        };
        let force = args.access.force;
        engine::object_volume::restore(
            std::sync::Arc::clone(&location.store),
            &location.prefix,
            location.layout,
            request,
            config,
            |holder| control::may_take(name, holder, force).map_err(std::io::Error::other),
        )
        .await
        .with_context(|| format!("restoring volume {name} to checkpoint {}", args.checkpoint))
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        if let Some(kept) = &report.kept_current {
            println!("kept the replaced state as checkpoint {kept}");
        }
        println!(
            "restored volume {name} to checkpoint {} (map TXID {})",
            report.checkpoint, report.txid
        );
    }
    Ok(())
}

#[derive(Args)]
pub(crate) struct CloneArgs {
    /// The volume to clone, as VOLUME@CHECKPOINT, or VOLUME for its state now (a checkpoint
    /// named clone-NEW is taken of it first).
    source: String,
    /// The new volume's name.
    new: String,
    #[command(flatten)]
    access: VolumeAccess,
    /// Print the new volume as JSON.
    #[arg(long)]
    json: bool,
}

/// `bucketdisk clone`: a new volume, writable at once, sharing the source's chunks.
pub(crate) fn clone(args: CloneArgs) -> Result<()> {
    let location = args.access.object_store("clone")?;
    let new = args.new.as_str();
    engine::validate_volume_name(new)?;
    let (source, checkpoint) = match args.source.split_once('@') {
        Some((volume, checkpoint)) => (volume.to_string(), checkpoint.to_string()),
        None => {
            // The source's state now: through its server when one runs here, so the
            // checkpoint holds every write acknowledged before this command.
            let name = format!("clone-{new}");
            run(
                &args.access,
                Request::CheckpointCreate {
                    volume: args.source.clone(),
                    name: Some(name.clone()),
                },
            )
            .with_context(|| format!("checkpointing volume {} to clone it", args.source))?;
            (args.source.clone(), name)
        }
    };
    let meta = new_runtime()?
        .block_on(engine::object_volume::clone_volume(
            location.store.as_ref(),
            &location.prefix,
            &source,
            &checkpoint,
            new,
        ))
        .with_context(|| format!("cloning {source}@{checkpoint} into {new}"))?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "name": meta.name,
                "size": meta.size,
                "block_size": meta.block_size,
                "source": source,
                "checkpoint": checkpoint,
            })
        );
    } else {
        println!("cloned {source}@{checkpoint} into volume {new}");
    }
    Ok(())
}
