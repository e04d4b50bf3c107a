//! `bucketdisk create`: a new volume in the store.

use crate::key_args::KeyArgs;
use crate::store_args::{StoreArgs, block_size, file_engine, new_runtime, object_store, store_dir};
use anyhow::{Context, Result, bail};
use bucketdisk::units::{format_size, parse_size};
use clap::Args;
use engine::object_volume::ObjectVolume;
use engine::sealing::KEY_ENV;
use engine::{BlockDevice, FileVolume};

#[derive(Args)]
pub(crate) struct CreateArgs {
    /// Volume name: 1-128 of [A-Za-z0-9._-].
    pub(crate) name: String,
    /// Size of the virtual disk, e.g. 100G (K/M/G/T suffixes, powers of 1024). Thin: only
    /// blocks written take space in the store.
    #[arg(long, value_parser = parse_size)]
    pub(crate) size: u64,
    /// Block size: the unit of storage, caching and compression (a power of two, 4K-4M). Larger
    /// blocks suit sequential work; fixed for the volume's life.
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub(crate) block_size: u64,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Encrypt the volume at rest: every block it stores is sealed (AES-256-GCM) with the key
    /// of --key-file or BUCKETDISK_KEY, which every later open needs. Object engine only.
    #[arg(long)]
    pub(crate) encrypt: bool,
    #[command(flatten)]
    pub(crate) key: KeyArgs,
}

pub(crate) fn create(args: CreateArgs) -> Result<()> {
    if args.encrypt && file_engine(&args.store) {
        bail!("--encrypt needs the object engine (--engine object)");
    }
    let key = match (args.encrypt, args.key.key()?) {
        (true, None) => {
            bail!("--encrypt needs a key: --key-file FILE or {KEY_ENV} (openssl rand -hex 32)")
        }
        (true, key) => key,
        (false, Some(_)) => bail!(
            "a key was given (--key-file, BUCKETDISK_KEY_FILE or {KEY_ENV}) without --encrypt: \
             say --encrypt to make an encrypted volume"
        ),
        (false, None) => None,
    };
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
        let (store, prefix, name) = (location.store.as_ref(), &location.prefix, &args.name);
        ObjectVolume::create_with_key(store, prefix, name, args.size, block_size, key.as_deref())
            .await
            .with_context(|| format!("creating volume {}", args.name))?;
        println!(
            "created {}volume {} ({}, {} blocks) in {}",
            if key.is_some() { "encrypted " } else { "" },
            args.name,
            format_size(args.size),
            format_size(u64::from(block_size)),
            location.description
        );
        Ok(())
    })
}
