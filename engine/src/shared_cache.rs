//! One block cache per host folder, shared by every volume a process opens there.
//!
//! Cache keys name the volume that wrote a chunk (see [`crate::cache::CacheKey`]), so volumes
//! can share one cache: a clone reading its parent's chunks, or a checkpoint export reading its
//! volume's, finds the blocks the other already fetched, and one size limit covers the host.
//! A cache file has one process at a time (an exclusive `flock`); a volume that finds the
//! shared one taken by another process (a verb run directly while a server uses the folder)
//! gets a cache of its own in its local folder instead.
//!
//! The index a clean close saves must describe the slots exactly, so it is saved by the last
//! volume of the process to close, and deleted again if the cache goes back into use.

use crate::cache::BlockCache;
use std::collections::HashMap;
use std::io;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

/// A cache this process has open in a folder, and how many volumes use it.
struct Open {
    cache: Weak<BlockCache>,
    users: usize,
}

fn open_caches() -> MutexGuard<'static, HashMap<PathBuf, Open>> {
    static OPEN: OnceLock<Mutex<HashMap<PathBuf, Open>>> = OnceLock::new();
    OPEN.get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// One volume's use of a block cache: shared with other volumes of this process, or its own.
/// (A volume's own cache goes through the same registry: a volume opened again in the same
/// process while the closed one is still referenced finds the cache it left.)
pub struct CacheHandle {
    cache: Arc<BlockCache>,
    /// The cache's folder, as registered.
    dir: PathBuf,
    released: AtomicBool,
}

impl Deref for CacheHandle {
    type Target = BlockCache;
    fn deref(&self) -> &BlockCache {
        &self.cache
    }
}

impl CacheHandle {
    /// The cache for a volume whose own folder is `private_dir`: the shared one in
    /// `shared_dir` when given and free, else one in `private_dir`.
    pub fn open(
        shared_dir: Option<&Path>,
        private_dir: &Path,
        block_size: u32,
        capacity_bytes: u64,
    ) -> io::Result<CacheHandle> {
        if let Some(dir) = shared_dir {
            match CacheHandle::in_dir(dir, block_size, capacity_bytes) {
                Ok(handle) => {
                    discard_unused(private_dir);
                    return Ok(handle);
                }
                Err(e) => tracing::warn!(
                    "the shared block cache is not available ({e}); this volume uses one of its own"
                ),
            }
        }
        CacheHandle::in_dir(private_dir, block_size, capacity_bytes)
    }

    /// The cache in `dir`, opened by the first volume of this process that asks (its size is
    /// that volume's `capacity_bytes`).
    fn in_dir(dir: &Path, block_size: u32, capacity_bytes: u64) -> io::Result<CacheHandle> {
        let dir = std::path::absolute(dir)?;
        let mut open = open_caches();
        // Registered, but its last handle is being dropped (see `open_after_last_drop`).
        let dying = open
            .get(&dir)
            .is_some_and(|entry| entry.cache.strong_count() == 0);
        open.retain(|_, entry| entry.cache.strong_count() > 0);
        let reusable = open
            .get_mut(&dir)
            .and_then(|entry| Some((entry.cache.upgrade()?, entry)));
        let cache = match reusable {
            Some((cache, entry)) => {
                if cache.block_size() != block_size {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "it holds {} byte blocks, this volume's are {block_size}",
                            cache.block_size()
                        ),
                    ));
                }
                if entry.users == 0 {
                    cache.forget_saved_index()?;
                }
                entry.users += 1;
                cache
            }
            None => {
                let cache = Arc::new(match dying {
                    true => open_after_last_drop(&dir, block_size, capacity_bytes)?,
                    false => BlockCache::open(&dir, block_size, capacity_bytes)?,
                });
                let entry = Open {
                    cache: Arc::downgrade(&cache),
                    users: 1,
                };
                open.insert(dir.clone(), entry);
                cache
            }
        };
        Ok(CacheHandle {
            cache,
            dir,
            released: AtomicBool::new(false),
        })
    }

    /// The volume is done with the cache (at its close; later calls do nothing). The last user
    /// saves the index, so the next start finds the cache warm.
    pub fn release(&self) -> io::Result<()> {
        if self.released.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let mut open = open_caches();
        if leave(&mut open, &self.dir) {
            // Under the registry's lock: a volume opening meanwhile waits, then deletes it.
            // A cache that cannot save its index (its filesystem is full) costs the next
            // start its blocks, nothing else: no index means nothing of the cache is trusted.
            if let Err(e) = self.cache.save_index() {
                tracing::warn!(
                    "the block cache index in {} could not be saved ({e}); the next start \
                     fetches the cached blocks again",
                    self.dir.display()
                );
            }
        }
        Ok(())
    }
}

/// A volume dropped without closing (a failed open, a crash path) leaves without saving: the
/// next start then trusts nothing of the cache, which is safe.
impl Drop for CacheHandle {
    fn drop(&mut self) {
        if !self.released.swap(true, Ordering::SeqCst) {
            leave(&mut open_caches(), &self.dir);
        }
    }
}

/// One user fewer of the cache in `dir`; whether it was the last.
fn leave(open: &mut HashMap<PathBuf, Open>, dir: &Path) -> bool {
    match open.get_mut(dir) {
        Some(entry) => {
            entry.users = entry.users.saturating_sub(1);
            entry.users == 0
        }
        None => false,
    }
}

/// Opens the cache in `dir` whose last handle in this process is being dropped (its
/// registration dead, its file maybe not yet closed): the lock is then this process's own,
/// released within moments, so a refusal is tried again for a little while.
fn open_after_last_drop(
    dir: &Path,
    block_size: u32,
    capacity_bytes: u64,
) -> io::Result<BlockCache> {
    let mut tries = 0;
    loop {
        match BlockCache::open(dir, block_size, capacity_bytes) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && tries < 20 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            result => return result,
        }
    }
}

/// Removes a volume's own cache folder (left by an open that found the shared one busy) once
/// nobody uses it: its blocks are only a cache, and its space counts twice otherwise.
fn discard_unused(private_dir: &Path) {
    if let Err(e) = BlockCache::remove_if_unused(private_dir) {
        tracing::warn!("cannot remove {}: {e}", private_dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheKey;

    const BS: u32 = 4096;

    fn key(n: u64) -> CacheKey {
        CacheKey {
            owner: 1,
            chunk: n,
            offset: 0,
            block: n,
        }
    }

    #[test]
    fn volumes_share_the_folder_and_the_last_one_out_saves_the_index() {
        let root = tempfile::tempdir().expect("tempdir");
        let shared = root.path().join("shared");
        let a = CacheHandle::open(Some(&shared), &root.path().join("a"), BS, 1 << 20).expect("a");
        let b = CacheHandle::open(Some(&shared), &root.path().join("b"), BS, 1 << 20).expect("b");
        a.insert(key(1), &[1u8; BS as usize]).expect("insert");
        assert!(
            b.contains(key(1)),
            "what one volume caches, the other finds"
        );
        a.release().expect("release a");
        a.release().expect("a second release does nothing");
        let index = shared.join("blocks.index");
        assert!(!index.exists(), "saved only when the last user leaves");
        b.release().expect("release b");
        assert!(index.exists(), "the last user saved the index");
        let c = CacheHandle::open(Some(&shared), &root.path().join("c"), BS, 1 << 20).expect("c");
        assert!(c.contains(key(1)));
        assert!(
            !index.exists(),
            "back in use: a crash from now on must not trust the saved index"
        );
        drop((a, b, c));
        assert!(!root.path().join("a").exists(), "no private caches made");
    }

    #[test]
    fn a_cache_busy_in_another_process_means_one_of_the_volumes_own() {
        let root = tempfile::tempdir().expect("tempdir");
        let shared = root.path().join("shared");
        // Another process's open file description holds the lock; a second open of the file
        // from this process is refused the same way.
        let other = BlockCache::open(&shared, BS, 1 << 20).expect("other process");
        let private = root.path().join("vol");
        let h = CacheHandle::open(Some(&shared), &private, BS, 1 << 20).expect("open");
        h.insert(key(2), &[2u8; BS as usize]).expect("insert");
        assert!(!other.contains(key(2)));
        assert!(private.join(crate::cache::DATA_FILE).exists());
        h.release().expect("release");
        drop(h);
        drop(other);
        // The shared cache is free again: the volume's own folder goes.
        let h = CacheHandle::open(Some(&shared), &private, BS, 1 << 20).expect("reopen");
        assert!(
            !private.exists(),
            "the private cache was removed once unused"
        );
        drop(h);
    }
}
