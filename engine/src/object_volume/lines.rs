//! Map lines (docs/ARCHITECTURE.md §8): how a volume's block map is restored to a checkpoint
//! without copying it. Line 0 is the replica in `blockmap/`. Restoring writes line n + 1,
//! `map-lines/<n as %016x>.json` (create-only; the highest line is the volume's map): a replica
//! of its own in `blockmap-<n>/` whose history starts with the checkpoint's files (its *base*,
//! wherever they live), so its first own file is the checkpoint's TXID + 1. Nothing of the old
//! line is read again; what checkpoints do not pin of it is deleted.

use super::checkpoints::{Checkpoint, MapFile};
use blockmap::replica::{Layout, Replica, ReplicaFile};
use object_store::ObjectStore;
use object_store::path::Path;
use std::io;
use std::sync::Arc;
use stores::retry::get_whole;

const DIR: &str = "map-lines";
/// Line 0's replica directory.
pub const FIRST_REPLICA: &str = "blockmap";

/// One line after the first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapLine {
    pub line: u64,
    /// Its replica's directory, relative to the volume's root.
    pub dir: String,
    /// The state it starts from, and the files that restore it.
    pub base_txid: u64,
    pub base: Vec<MapFile>,
    /// The checkpoint restored, for people reading the bucket.
    pub checkpoint: String,
    /// The journal owner the base state records. Until a writer of this line records another,
    /// no local folder may replay its journal on top (a restore that crashed before its new
    /// owner was committed would otherwise let that folder's stale tail in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_owner: Option<String>,
}

impl MapLine {
    /// The journal owner an open must go by, given the one the map records: none at all while
    /// the map still records the base's owner (every journal is moved aside).
    pub fn effective_owner(&self, recorded: Option<String>) -> Option<String> {
        match (&self.stale_owner, recorded) {
            (Some(stale), Some(recorded)) if *stale == recorded => {
                Some(format!("restored-line-{}", self.line))
            }
            (_, recorded) => recorded,
        }
    }
}

fn dir(root: &Path) -> Path {
    root.clone().join(DIR)
}

/// The volume's current line (`None`: line 0, never restored).
pub async fn current(store: &dyn ObjectStore, root: &Path) -> io::Result<Option<MapLine>> {
    let dir = dir(root);
    let listed = super::catalog::list_keys(store, &dir, "list map lines").await?;
    let Some(newest) = listed
        .iter()
        .filter_map(|p| {
            let name = p.filename()?.strip_suffix(".json")?;
            (name.len() == 16).then(|| u64::from_str_radix(name, 16).ok())?
        })
        .max()
    else {
        return Ok(None);
    };
    let path = dir.clone().join(format!("{newest:016x}.json"));
    let bytes = get_whole(store, &path, "read a map line")
        .await
        .map_err(|e| io::Error::other(format!("reading {path}: {e}")))?;
    let line: MapLine = serde_json::from_slice(&bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: {e}")))?;
    if line.line != newest {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path} says it is line {}", line.line),
        ));
    }
    Ok(Some(line))
}

/// Starts a new line; `AlreadyExists` if another restore took that number first.
pub async fn create(store: &dyn ObjectStore, root: &Path, line: &MapLine) -> io::Result<()> {
    let path = dir(root).join(format!("{:016x}.json", line.line));
    let text = serde_json::to_vec(line).map_err(io::Error::other)?;
    if super::catalog::put_new(store, &path, text).await? {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{path} exists: the volume was restored by someone else meanwhile"),
    ))
}

/// The replica of `line` (line 0 when `None`) of the volume at `root`.
pub fn replica(
    store: &Arc<dyn ObjectStore>,
    root: &Path,
    layout: Layout,
    line: Option<&MapLine>,
) -> io::Result<Replica> {
    let Some(line) = line else {
        return Ok(Replica::new(
            Arc::clone(store),
            root.clone().join(FIRST_REPLICA),
            layout,
        ));
    };
    let base = base_files(root, &line.base, &format!("map line {}", line.line))?;
    let dir = super::catalog::under(root, &line.dir);
    Ok(Replica::with_base(Arc::clone(store), dir, layout, base))
}

/// A replica of checkpoint `checkpoint`'s state alone: the files it records (in whichever line
/// they are) and a directory of its own that nothing writes, so no later state of any line is
/// in it.
pub fn checkpoint_replica(
    store: &Arc<dyn ObjectStore>,
    root: &Path,
    layout: Layout,
    checkpoint: &Checkpoint,
) -> io::Result<Replica> {
    let what = format!("checkpoint {}", checkpoint.name);
    let base = base_files(root, &checkpoint.map_files, &what)?;
    let dir = root
        .clone()
        .join("checkpoints")
        .join(format!("{}.map", checkpoint.name));
    Ok(Replica::with_base(Arc::clone(store), dir, layout, base))
}

/// `files`, recorded by the volume at `root`, as replica files.
fn base_files(root: &Path, files: &[MapFile], what: &str) -> io::Result<Vec<ReplicaFile>> {
    files
        .iter()
        .map(|f| {
            ReplicaFile::stored(f.key(root), f.level, f.size).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{what}: {} is not an LTX file", f.path),
                )
            })
        })
        .collect()
}

/// The replica directory of line `n`, relative to the volume's root.
pub fn replica_dir(n: u64) -> String {
    if n == 0 {
        FIRST_REPLICA.to_string()
    } else {
        format!("{FIRST_REPLICA}-{n}")
    }
}
