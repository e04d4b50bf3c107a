//! The per-volume local directory (`--cache-dir`/<volume>): journal, block cache, identity.
//!
//! Local state is only trusted for the volume and the history it was written for:
//! - `volume-uuid` names the volume; a directory left by a deleted volume of the same name is
//!   moved aside, never replayed into the new one.
//! - `instance-id` names this directory. Every upload records it in the block map
//!   (`journal_owner`); if the map's last upload came from another directory (another host took
//!   the volume over meanwhile), this journal's tail belongs to a history that was abandoned, and
//!   it is moved aside instead of being replayed on top of newer data.

use crate::metadata::random_id;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

const VOLUME_UUID_FILE: &str = "volume-uuid";
const INSTANCE_FILE: &str = "instance-id";

pub fn journal_dir(dir: &Path) -> PathBuf {
    dir.join("journal")
}

pub fn cache_dir(dir: &Path) -> PathBuf {
    dir.join("cache")
}

/// What a volume's local folder holds on disk. Only reads sizes, so it may be asked of the
/// folder of a running server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalUsage {
    /// Journal segments (spares included): writes waiting for upload live there.
    pub journal_bytes: u64,
    /// Disk space the block cache's sparse file occupies.
    pub cache_bytes: u64,
    /// The cache file's size: its limit (`--cache-size`).
    pub cache_capacity: u64,
    /// The cache is the one shared by the volumes of the cache directory.
    pub cache_shared: bool,
}

/// [`LocalUsage`] of the local folder `dir` (zeros for what is missing); the cache is the one in
/// `shared_cache_dir` unless the volume has one of its own.
pub fn usage(dir: &Path, shared_cache_dir: Option<&Path>) -> LocalUsage {
    use std::os::unix::fs::MetadataExt;
    let journal_bytes = std::fs::read_dir(journal_dir(dir))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    let own = cache_dir(dir).join(crate::cache::DATA_FILE);
    let (file, cache_shared) = match shared_cache_dir {
        Some(shared) if !own.exists() => (shared.join(crate::cache::DATA_FILE), true),
        _ => (own, false),
    };
    let (cache_bytes, cache_capacity) =
        std::fs::metadata(file).map_or((0, 0), |m| (m.blocks() * 512, m.len()));
    LocalUsage {
        journal_bytes,
        cache_bytes,
        cache_capacity,
        cache_shared,
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Moves `path` aside as `<path>.<what>-<unix time>`, keeping its data for a human to inspect.
fn move_aside(path: &Path, what: &str) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A second move within the same second (two restores in a row) gets a suffix.
    let stamp = now_secs();
    let mut target = path.with_file_name(format!("{name}.{what}-{stamp}"));
    let mut n = 1;
    while target.exists() {
        target = path.with_file_name(format!("{name}.{what}-{stamp}-{n}"));
        n += 1;
    }
    std::fs::rename(path, &target)?;
    Ok(target)
}

/// Prepares `dir` for volume `uuid`; returns this directory's instance id.
pub fn prepare(dir: &Path, uuid: &str) -> io::Result<String> {
    if dir.exists() {
        match std::fs::read_to_string(dir.join(VOLUME_UUID_FILE)) {
            Ok(found) if found.trim() == uuid => {}
            Ok(found) => {
                let moved = move_aside(dir, "other-volume")?;
                tracing::warn!(
                    "{} belonged to another volume (uuid {}); moved it to {}",
                    dir.display(),
                    found.trim(),
                    moved.display()
                );
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if std::fs::read_dir(dir)?.next().is_some() {
                    let moved = move_aside(dir, "unknown")?;
                    tracing::warn!(
                        "{} holds files of no known volume; moved it to {}",
                        dir.display(),
                        moved.display()
                    );
                }
            }
            Err(e) => return Err(e),
        }
    }
    std::fs::create_dir_all(dir)?;
    let uuid_path = dir.join(VOLUME_UUID_FILE);
    if !uuid_path.exists() {
        write_durably(&uuid_path, uuid)?;
    }
    let instance_path = dir.join(INSTANCE_FILE);
    match std::fs::read_to_string(&instance_path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => {
            let id = random_id()?;
            write_durably(&instance_path, &id)?;
            Ok(id)
        }
    }
}

/// Moves the journal aside if the block map's last upload came from another directory.
pub fn check_journal_owner(dir: &Path, instance: &str, owner: Option<&str>) -> io::Result<()> {
    let journal = journal_dir(dir);
    let Some(owner) = owner else { return Ok(()) };
    if owner == instance || !journal.exists() {
        return Ok(());
    }
    let moved = move_aside(&journal, "abandoned")?;
    tracing::warn!(
        "the volume was written from another host (journal owner {owner}) after this journal; \
         its unsynced tail cannot be replayed on top. Moved it to {}",
        moved.display()
    );
    Ok(())
}

fn write_durably(path: &Path, text: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_reads_journal_and_cache_sizes() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("disk");
        assert_eq!(
            usage(&dir, None),
            LocalUsage::default(),
            "nothing there yet"
        );
        std::fs::create_dir_all(journal_dir(&dir)).expect("journal dir");
        std::fs::write(journal_dir(&dir).join("a"), vec![1u8; 1000]).expect("segment");
        std::fs::write(journal_dir(&dir).join("b"), vec![1u8; 24]).expect("segment");
        std::fs::create_dir_all(cache_dir(&dir)).expect("cache dir");
        let cache = std::fs::File::create(cache_dir(&dir).join(crate::cache::DATA_FILE))
            .expect("cache file");
        cache.set_len(64 << 20).expect("sparse size");
        let used = usage(&dir, None);
        assert_eq!(used.journal_bytes, 1024);
        assert_eq!(used.cache_capacity, 64 << 20);
        assert!(used.cache_bytes < 1 << 20, "sparse: {used:?}");
    }

    #[test]
    fn identity_is_kept_and_foreign_state_moved_aside() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("disk");
        let id = prepare(&dir, "uuid-a").expect("prepare");
        assert_eq!(
            prepare(&dir, "uuid-a").expect("again"),
            id,
            "stable instance id"
        );
        std::fs::create_dir_all(journal_dir(&dir)).expect("journal dir");
        check_journal_owner(&dir, &id, Some(&id)).expect("own journal");
        assert!(journal_dir(&dir).exists());
        check_journal_owner(&dir, &id, Some("someone-else")).expect("foreign");
        assert!(!journal_dir(&dir).exists(), "moved aside");
        // Again within the same second: another name, not an error.
        std::fs::create_dir_all(journal_dir(&dir).join("segment")).expect("journal again");
        check_journal_owner(&dir, &id, Some("someone-else")).expect("foreign again");
        assert!(!journal_dir(&dir).exists(), "moved aside again");
        let other = prepare(&dir, "uuid-b").expect("other volume");
        assert_ne!(other, id, "a new directory for the new volume");
        let names: Vec<String> = std::fs::read_dir(root.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().any(|n| n.starts_with("disk.other-volume-")),
            "{names:?}"
        );
    }
}
