//! Checkpoints (docs/ARCHITECTURE.md §8): named map states kept restorable. A checkpoint is
//! `<volume>/checkpoints/<name>.json`, written create-only by the volume's writer: the map
//! TXID it holds, the replica files a restore of that TXID reads (map retention keeps them) and
//! the chunks that state references (GC keeps them). Taking one copies no data: the chunks are
//! immutable and the map state is already in the store.

use super::catalog;
use crate::file_volume::validate_volume_name;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use std::collections::HashSet;
use std::io;
use stores::retry::{get_whole, with_retries};

const DIR: &str = "checkpoints";
const SUFFIX: &str = ".json";
/// Checkpoint objects read at once when listing.
const LOAD_PARALLELISM: usize = 16;

/// One checkpoint as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    pub name: String,
    /// The block-map TXID whose state this is.
    pub txid: u64,
    /// When it was taken, in Unix milliseconds.
    pub created_ms: i64,
    /// The volume's size then.
    pub size: u64,
    /// Blocks stored in that state, and their bytes in the store (compressed).
    pub allocated_blocks: u64,
    pub stored_bytes: u64,
    /// The map replica's files a restore of `txid` reads.
    pub map_files: Vec<MapFile>,
    /// Every chunk that state references.
    pub chunks: Vec<u64>,
    /// The journal owner that state records (the local folder whose journal continues it): a
    /// restore must never let that folder replay its journal on top (see `lines`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_owner: Option<String>,
}

/// One block-map replica file a checkpoint (or a map line's base) is restored from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapFile {
    /// The volume whose root holds it, when not the one that records it (a clone's base).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// Its key, relative to that volume's root (`blockmap/ltx/9/….ltx`).
    pub path: String,
    pub level: u8,
    pub size: u64,
}

impl MapFile {
    /// Its full key, recorded by the volume at `volume_root`.
    pub fn key(&self, volume_root: &Path) -> Path {
        let root = match &self.volume {
            None => volume_root.clone(),
            Some(other) => catalog::prefix_of(volume_root).join(other.as_str()),
        };
        catalog::under(&root, &self.path)
    }

    /// The file at `key`, as the volume at `volume_root` records it (`None`: not a key under
    /// that volume's prefix).
    pub fn at(volume_root: &Path, key: &Path, level: u8, size: u64) -> Option<MapFile> {
        let text = |parts: &mut dyn Iterator<Item = object_store::path::PathPart<'_>>| {
            parts
                .map(|p| p.as_ref().to_string())
                .collect::<Vec<_>>()
                .join("/")
        };
        if let Some(mut rest) = key.prefix_match(volume_root) {
            return Some(MapFile {
                volume: None,
                path: text(&mut rest),
                level,
                size,
            });
        }
        let mut rest = key.prefix_match(&catalog::prefix_of(volume_root))?;
        let volume = rest.next()?.as_ref().to_string();
        Some(MapFile {
            volume: Some(volume),
            path: text(&mut rest),
            level,
            size,
        })
    }
}

/// Refuses what cannot name a checkpoint: the rules of volume names (1–128 of `[A-Za-z0-9._-]`,
/// not starting with '.'), so no `/`, `..` or `@` (which separates a volume from a checkpoint in
/// export names).
pub fn validate_name(name: &str) -> io::Result<()> {
    validate_volume_name(name).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "invalid checkpoint name {name:?}: use 1-128 of [A-Za-z0-9._-], not starting with '.'"
            ),
        )
    })
}

/// The name of a checkpoint taken at `unix_ms` without one: `ckpt-<UTC time>`, to the
/// millisecond, so that names sort by time.
pub fn generated_name(unix_ms: i64) -> String {
    let time = chrono::DateTime::from_timestamp_millis(unix_ms).unwrap_or_default();
    format!("ckpt-{}", time.format("%Y%m%dT%H%M%S%.3fZ"))
}

fn dir(prefix: &Path, volume: &str) -> Path {
    catalog::volume_root(prefix, volume).join(DIR)
}

fn path(prefix: &Path, volume: &str, name: &str) -> Path {
    dir(prefix, volume).join(format!("{name}{SUFFIX}"))
}

/// Every checkpoint of `volume`, oldest first.
pub async fn list(
    store: &dyn ObjectStore,
    prefix: &Path,
    volume: &str,
) -> io::Result<Vec<Checkpoint>> {
    let dir = dir(prefix, volume);
    let listed = catalog::list_keys(store, &dir, "list checkpoints").await?;
    let names: Vec<Path> = listed
        .into_iter()
        .filter(|p| p.filename().is_some_and(|f| f.ends_with(SUFFIX)))
        .collect();
    let mut checkpoints: Vec<Checkpoint> = futures::stream::iter(names)
        .map(|path| async move { load_path(store, &path).await })
        .buffer_unordered(LOAD_PARALLELISM)
        .try_filter_map(|found| async move { Ok(found) })
        .try_collect()
        .await?;
    checkpoints.sort_by(|a, b| (a.txid, &a.name).cmp(&(b.txid, &b.name)));
    Ok(checkpoints)
}

/// Checkpoint `name` of `volume`, or `None` if there is none.
pub async fn load(
    store: &dyn ObjectStore,
    prefix: &Path,
    volume: &str,
    name: &str,
) -> io::Result<Option<Checkpoint>> {
    validate_name(name)?;
    load_path(store, &path(prefix, volume, name)).await
}

async fn load_path(store: &dyn ObjectStore, path: &Path) -> io::Result<Option<Checkpoint>> {
    let got = get_whole(store, path, "read a checkpoint").await;
    let bytes = match got {
        Ok(bytes) => bytes,
        // Deleted between the listing and the read.
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(io::Error::other(format!("reading {path}: {e}"))),
    };
    let checkpoint: Checkpoint = serde_json::from_slice(&bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: {e}")))?;
    check_names(&checkpoint)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: {e}")))?;
    Ok(Some(checkpoint))
}

/// Names a stored checkpoint carries become store keys: a hostile or damaged one must not lead
/// a read outside the volumes' prefix.
pub(crate) fn check_names(checkpoint: &Checkpoint) -> io::Result<()> {
    validate_name(&checkpoint.name)?;
    for file in &checkpoint.map_files {
        if let Some(volume) = &file.volume {
            validate_volume_name(volume)?;
        }
        if file
            .path
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == ".." || part.contains('\0'))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("map file path {:?} is not a plain relative key", file.path),
            ));
        }
    }
    Ok(())
}

/// Stores a new checkpoint; `AlreadyExists` if one of that name exists.
pub async fn create(
    store: &dyn ObjectStore,
    prefix: &Path,
    volume: &str,
    checkpoint: &Checkpoint,
) -> io::Result<()> {
    validate_name(&checkpoint.name)?;
    let path = path(prefix, volume, &checkpoint.name);
    let text = serde_json::to_vec(checkpoint).map_err(io::Error::other)?;
    if catalog::put_new(store, &path, text).await? {
        return Ok(());
    }
    Err(already_exists(volume, &checkpoint.name))
}

pub(super) fn already_exists(volume: &str, name: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("volume {volume} already has a checkpoint named {name}"),
    )
}

pub(super) fn not_found(volume: &str, name: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("volume {volume} has no checkpoint named {name}"),
    )
}

/// Removes checkpoint `name` (its object only: what it pinned is freed by the writer's GC).
pub async fn delete(
    store: &dyn ObjectStore,
    prefix: &Path,
    volume: &str,
    name: &str,
) -> io::Result<()> {
    validate_name(name)?;
    let path = path(prefix, volume, name);
    match with_retries("delete a checkpoint", || store.delete(&path)).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(io::Error::other(format!("deleting {path}: {e}"))),
    }
}

/// What a volume's checkpoints keep: the writer's GC and map retention ask this.
#[derive(Debug, Default, Clone)]
pub(super) struct Pins {
    checkpoints: Vec<Checkpoint>,
}

impl Pins {
    pub(super) fn new(checkpoints: Vec<Checkpoint>) -> Self {
        Pins { checkpoints }
    }

    pub(super) fn checkpoints(&self) -> &[Checkpoint] {
        &self.checkpoints
    }

    pub(super) fn get(&self, name: &str) -> Option<&Checkpoint> {
        self.checkpoints.iter().find(|c| c.name == name)
    }

    pub(super) fn add(&mut self, checkpoint: Checkpoint) {
        self.checkpoints.push(checkpoint);
    }

    pub(super) fn remove(&mut self, name: &str) {
        self.checkpoints.retain(|c| c.name != name);
    }

    /// Chunks some checkpoint references: never deleted.
    pub(super) fn chunks(&self) -> HashSet<u64> {
        self.checkpoints
            .iter()
            .flat_map(|c| c.chunks.iter().copied())
            .collect()
    }

    /// Map replica files some checkpoint is restored from: retention keeps them.
    pub(super) fn map_files(&self, volume_root: &Path) -> Vec<Path> {
        let mut files: Vec<Path> = self
            .checkpoints
            .iter()
            .flat_map(|c| c.map_files.iter())
            .map(|f| f.key(volume_root))
            .collect();
        files.sort_by(|a, b| a.as_ref().cmp(b.as_ref()));
        files.dedup();
        files
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_generated_names_sort_by_time() {
        for bad in ["", "a/b", "..", ".hidden", "disk@now", &"x".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        validate_name("before-upgrade_2.1").expect("valid");
        let early = generated_name(1_700_000_000_000);
        let late = generated_name(1_700_000_000_001);
        assert_eq!(early, "ckpt-20231114T221320.000Z");
        assert!(early < late);
        validate_name(&early).expect("generated names are valid");
    }

    #[test]
    fn pins_are_the_union_of_every_checkpoint() {
        let checkpoint = |name: &str, chunks: Vec<u64>, files: Vec<&str>| Checkpoint {
            name: name.into(),
            txid: 1,
            created_ms: 0,
            size: 1 << 30,
            allocated_blocks: 0,
            stored_bytes: 0,
            journal_owner: None,
            map_files: files
                .into_iter()
                .map(|path| MapFile {
                    volume: None,
                    path: path.into(),
                    level: 9,
                    size: 100,
                })
                .collect(),
            chunks,
        };
        let mut pins = Pins::new(vec![checkpoint(
            "a",
            vec![1, 2],
            vec!["blockmap/ltx/9/x.ltx"],
        )]);
        pins.add(checkpoint(
            "b",
            vec![2, 3],
            vec!["blockmap/ltx/9/x.ltx", "blockmap/ltx/0/y.ltx"],
        ));
        assert_eq!(pins.chunks(), HashSet::from([1, 2, 3]));
        let root = Path::from("vols/disk");
        let files: Vec<String> = pins
            .map_files(&root)
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(
            files,
            [
                "vols/disk/blockmap/ltx/0/y.ltx",
                "vols/disk/blockmap/ltx/9/x.ltx"
            ]
        );
        pins.remove("a");
        let elsewhere = MapFile {
            volume: Some("parent".into()),
            path: "blockmap/ltx/9/x.ltx".into(),
            level: 9,
            size: 1,
        };
        let key = elsewhere.key(&root);
        assert_eq!(key.as_ref(), "vols/parent/blockmap/ltx/9/x.ltx");
        assert_eq!(MapFile::at(&root, &key, 9, 1), Some(elsewhere));
        let own = MapFile::at(&root, &Path::from("vols/disk/blockmap/a.ltx"), 0, 2).expect("own");
        assert_eq!((own.volume, own.path.as_str()), (None, "blockmap/a.ltx"));
        assert_eq!(pins.chunks(), HashSet::from([2, 3]));
        assert!(pins.get("a").is_none() && pins.get("b").is_some());
    }
}
