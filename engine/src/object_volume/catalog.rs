//! A volume's description in the object store: `<prefix>/<name>/volume.json`, written once
//! (create-only) so that any host can serve the volume with nothing but the store URL.

use crate::metadata::{METADATA_FILE, VolumeMetadata};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::io;
use stores::retry::{get_whole, with_retries};

/// Format name of volumes kept as chunks and a block map in object storage.
pub const FORMAT: &str = "object-v1";
/// The same, with every block sealed (see `sealing`): a name of its own, so an engine that
/// cannot open sealed blocks refuses the volume instead of writing plaintext into it.
pub const SEALED_FORMAT: &str = "object-v1-sealed";

/// The format of a new volume, encrypted or not.
pub fn format_for(encrypted: bool) -> &'static str {
    if encrypted { SEALED_FORMAT } else { FORMAT }
}

/// Where everything of volume `name` lives under the store prefix.
pub fn volume_root(prefix: &Path, name: &str) -> Path {
    prefix.clone().join(name)
}

/// The key `relative` (`a/b/c`) names under `root`.
pub fn under(root: &Path, relative: &str) -> Path {
    relative
        .split('/')
        .fold(root.clone(), |path, part| path.join(part))
}

/// The prefix the volume at `volume_root` lives under (its root without its name).
pub fn prefix_of(volume_root: &Path) -> Path {
    let mut parts: Vec<_> = volume_root.parts().collect();
    parts.pop();
    parts
        .into_iter()
        .fold(Path::default(), |path, part| path.join(part))
}

fn metadata_path(prefix: &Path, name: &str) -> Path {
    volume_root(prefix, name).join(METADATA_FILE)
}

/// The volume's metadata, or `None` if no such volume exists in the store.
pub async fn load(
    store: &dyn ObjectStore,
    prefix: &Path,
    name: &str,
) -> io::Result<Option<VolumeMetadata>> {
    crate::file_volume::validate_volume_name(name)?;
    let path = metadata_path(prefix, name);
    let got = get_whole(store, &path, "read volume.json").await;
    let bytes = match got {
        Ok(bytes) => bytes,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(io::Error::other(format!("reading {path}: {e}"))),
    };
    let meta: VolumeMetadata = serde_json::from_slice(&bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: {e}")))?;
    if meta.format != FORMAT && meta.format != SEALED_FORMAT {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{path}: volume format {:?}; this engine reads {FORMAT:?} and {SEALED_FORMAT:?}",
                meta.format
            ),
        ));
    }
    // A sealed volume whose record of its encryption went missing (or a plain one that grew
    // one) was altered: opening it would write plaintext beside sealed blocks, or the reverse.
    if (meta.format == SEALED_FORMAT) != meta.encryption.is_some() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{path}: format {:?} {} an encryption record: the file was altered",
                meta.format,
                if meta.encryption.is_some() {
                    "with"
                } else {
                    "without"
                }
            ),
        ));
    }
    // The names it carries become store keys (its chunks, its ancestors'): a volume.json that
    // names another volume, or a name that is not one, is refused.
    let foreign = std::iter::once(meta.name.as_str())
        .chain(meta.parent.iter().map(|p| p.volume.as_str()))
        .chain(meta.inherits.iter().map(|i| i.volume.as_str()))
        .find(|n| crate::file_volume::validate_volume_name(n).is_err());
    if meta.name != name || foreign.is_some() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{path}: names volume {:?}{}",
                meta.name,
                foreign.map_or(String::new(), |n| format!(" and refers to {n:?}"))
            ),
        ));
    }
    Ok(Some(meta))
}

/// Every key under `dir` (retried; `what` names the listing in errors).
pub async fn list_keys(store: &dyn ObjectStore, dir: &Path, what: &str) -> io::Result<Vec<Path>> {
    use futures::TryStreamExt;
    with_retries(what, || async {
        store
            .list(Some(dir))
            .map_ok(|meta| meta.location)
            .try_collect::<Vec<Path>>()
            .await
    })
    .await
    .map_err(|e| io::Error::other(format!("listing {dir}: {e}")))
}

/// The names of the volumes under `prefix` (directories that hold a `volume.json`, or a
/// partly deleted volume's remains: callers load each and see).
pub async fn list_names(store: &dyn ObjectStore, prefix: &Path) -> io::Result<Vec<String>> {
    let listing = with_retries("list volumes", || store.list_with_delimiter(Some(prefix)))
        .await
        .map_err(|e| io::Error::other(format!("listing {prefix}: {e}")))?;
    let mut names: Vec<String> = listing
        .common_prefixes
        .iter()
        .filter_map(|p| p.filename().map(String::from))
        .collect();
    names.sort();
    Ok(names)
}

/// Deletes everything of volume `name`: `volume.json` first (from then on no open finds the
/// volume), then every other object under its root, `progress(done, total)` as they go. Run
/// again after a crash, it finishes the job.
pub async fn delete_volume(
    store: &dyn ObjectStore,
    prefix: &Path,
    name: &str,
    progress: impl Fn(u64, u64),
) -> io::Result<u64> {
    use futures::{StreamExt, TryStreamExt};
    let meta = metadata_path(prefix, name);
    match with_retries("delete volume.json", || store.delete(&meta)).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(io::Error::other(format!("deleting {meta}: {e}"))),
    }
    let root = volume_root(prefix, name);
    let objects = list_keys(store, &root, "list the volume").await?;
    let total = objects.len() as u64;
    let done = std::sync::atomic::AtomicU64::new(0);
    progress(0, total);
    futures::stream::iter(objects)
        .map(|path| async move {
            match with_retries("delete an object", || store.delete(&path)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(io::Error::other(format!("deleting {path}: {e}"))),
            }
        })
        .buffer_unordered(16)
        .try_for_each(|()| {
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            progress(n, total);
            async { Ok(()) }
        })
        .await?;
    Ok(total)
}

/// `meta` of volume `name`, or the error that says there is no such volume.
pub fn require(meta: Option<VolumeMetadata>, name: &str) -> io::Result<VolumeMetadata> {
    meta.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no volume {name} in the store"),
        )
    })
}

/// Writes a new object create-only (the keys a volume's metadata lives under are never
/// overwritten). `Ok(false)`: it existed already.
pub async fn put_new(store: &dyn ObjectStore, path: &Path, body: Vec<u8>) -> io::Result<bool> {
    let options = PutOptions {
        mode: PutMode::Create,
        ..PutOptions::default()
    };
    match store.put_opts(path, PutPayload::from(body), options).await {
        Ok(_) => Ok(true),
        Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
        Err(e) => Err(io::Error::other(format!("writing {path}: {e}"))),
    }
}

/// Stores new metadata; fails with `AlreadyExists` if the volume exists.
pub async fn create(
    store: &dyn ObjectStore,
    prefix: &Path,
    meta: &VolumeMetadata,
) -> io::Result<()> {
    let path = metadata_path(prefix, &meta.name);
    let text = serde_json::to_vec_pretty(meta).map_err(io::Error::other)?;
    if put_new(store, &path, text).await? {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("volume {} already exists ({path})", meta.name),
    ))
}

/// Checks the shape of a new volume: a size that is a non-zero multiple of the block size, and
/// a block size that is a power of two from 4 KiB to 4 MiB (docs/ARCHITECTURE.md §2).
pub fn validate_geometry(size: u64, block_size: u32) -> io::Result<()> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
    if !block_size.is_power_of_two() || !(4096..=4 << 20).contains(&block_size) {
        return Err(invalid(format!(
            "block size {block_size} must be a power of two from 4 KiB to 4 MiB"
        )));
    }
    if size == 0 || size % 4096 != 0 {
        return Err(invalid(format!(
            "volume size {size} must be a non-zero multiple of 4096"
        )));
    }
    Ok(())
}
