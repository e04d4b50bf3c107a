//! `bucketdisk create`: a new volume in the store.

use crate::store_args::{StoreArgs, block_size, file_engine, new_runtime, object_store, store_dir};
use anyhow::{Context, Result};
use bucketdisk::units::{format_size, parse_size};
use clap::Args;
use engine::object_volume::ObjectVolume;
use engine::{BlockDevice, FileVolume};

#[derive(Args)]
pub(crate) struct CreateArgs {
    /// Volume name: 1-128 of [A-Za-z0-9._-].
    pub(crate) name: String,
    #[arg(long, value_parser = parse_size)]
    pub(crate) size: u64,
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub(crate) block_size: u64,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
}

pub(crate) fn create(args: CreateArgs) -> Result<()> {
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
