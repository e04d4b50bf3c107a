//! The local block cache: a sparse file of fixed-size slots holding blocks fetched from object
//! storage, keyed by (chunk, offset, block of the disk) — chunks are immutable, so a key never
//! goes stale and the cache stays valid across restarts (its index is saved on clean close).
//!
//! Eviction is S3-FIFO, which resists scans: new blocks enter a small FIFO and are promoted to
//! the main FIFO only if they are read again; a block evicted from the small queue leaves a
//! "ghost" so that a quick return goes straight to main. A one-time sequential read of a whole
//! disk therefore cannot flush the working set.
//!
//! Every slot is checked against its block's checksum once per process, in full, before reads
//! of it are trusted: slots this process wrote count as checked; slots a previous process left
//! (a clean close's index) are checked again at their first read, so bits that rotted on disk
//! while the server was down cost a refetch, never wrong data. Whole-block `get`s are always
//! verified.

use crate::chunk::block_checksum;
use crate::fast_hash::{FastHashMap, FastHashSet};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Identity of a cached block: where its bytes live in object storage, and which block of the
/// disk they were read as. Chunk ids are unique within the volume that wrote them, so the key
/// names that volume too (`owner`, a tag of its identity, see `ChunkStore::cache_key`): a cache
/// shared by several volumes, a clone reading its parent's chunks among them, finds a block
/// under the same key whoever reads it. The block number matters for an encrypted volume,
/// whose stored blocks authenticate as one block of the disk only: a map that points another
/// block at the same bytes must not be answered from the cache with them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub owner: u64,
    pub chunk: u64,
    pub offset: u64,
    pub block: u64,
}

struct Entry {
    slot: u32,
    /// The block map's checksum of the stored block: which version of it this is.
    checksum: u32,
    /// CRC-32C of the slot's bytes: the map's checksum, except for an encrypted volume's
    /// blocks (the map's is then of the sealed bytes).
    content: u32,
    /// Reads since insertion or last demotion, capped at 3.
    freq: u8,
    in_main: bool,
    /// The slot's bytes were checked against `checksum` in this process (or written by it).
    /// Only then may a partial read skip verifying the whole block.
    verified: bool,
    /// Its bytes are being written: readers treat it as a miss and eviction skips it.
    writing: bool,
    /// Unique per insertion: a partial read that skips verification re-checks it afterwards,
    /// so a slot evicted and reused while it was being read is a miss, not another block.
    generation: u64,
}

#[derive(Default)]
struct State {
    entries: FastHashMap<CacheKey, Entry>,
    small: VecDeque<CacheKey>,
    main: VecDeque<CacheKey>,
    ghosts: VecDeque<CacheKey>,
    ghost_set: FastHashSet<CacheKey>,
    free: Vec<u32>,
    generations: u64,
    /// An index describing the slots was saved: before any slot takes another block it is
    /// deleted, so a saved index always describes the slots exactly (a volume's background
    /// task may still insert after the last close saved it).
    index_saved: bool,
}

/// One block for [`BlockCache::insert_batch`].
pub struct CacheInsert<'a> {
    pub key: CacheKey,
    /// The block map's checksum of the stored block.
    pub checksum: u32,
    /// CRC-32C of `data` (the caller has it already; `checksum` unless the block is sealed).
    pub content_checksum: u32,
    pub data: &'a [u8],
}

/// The cache's data file in its directory: fixed-size slots, sparse until filled.
pub(crate) const DATA_FILE: &str = "blocks.cache";
/// Writes at most this many consecutive slots at once.
const MAX_RUN_SLOTS: usize = 128;

/// Zero runs at least this long are punched out of the cache file instead of written.
const HOLE_MIN_BYTES: usize = 16 * 1024;
/// Granularity of the zero scan: a filesystem block.
const PAGE: usize = 4096;

/// Writes `data` at `at`, punching holes where it holds long runs of zeros instead of writing
/// them. Blocks a sparse or partial write left mostly zeros (a 4 KiB write in a 64 KiB block)
/// then cost one page of page cache and disk writeback, not sixteen (measured: a sparse fill
/// spent a third of its upload time copying zeros into the cache file). A reused slot's old
/// bytes are gone either way: a hole reads as zeros.
fn write_sparse_at(file: &File, data: &[u8], at: u64) -> io::Result<()> {
    // (start, end, zero) runs of whole pages; a trailing partial page counts as data.
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let end = (pos + PAGE).min(data.len());
        let zero = end - pos == PAGE && crate::zeros::is_zero(&data[pos..end]);
        match runs.last_mut() {
            Some(run) if run.2 == zero => run.1 = end,
            _ => runs.push((pos, end, zero)),
        }
        pos = end;
    }
    // Short zero runs are cheaper to write than to punch: merge them into their neighbours.
    let mut merged: Vec<(usize, usize, bool)> = Vec::with_capacity(runs.len());
    for (start, end, zero) in runs {
        let zero = zero && end - start >= HOLE_MIN_BYTES;
        match merged.last_mut() {
            Some(run) if run.2 == zero => run.1 = end,
            _ => merged.push((start, end, zero)),
        }
    }
    for (start, end, zero) in merged {
        let offset = at + start as u64;
        if !zero || !crate::fallocate::punch_hole(file, offset, (end - start) as u64)? {
            file.write_all_at(&data[start..end], offset)?;
        }
    }
    Ok(())
}

/// Takes an exclusive `flock` on the cache file, without waiting: two processes writing slots
/// and saving indexes over each other would make a slot's bytes another block's.
fn lock_exclusive(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor this function borrows; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "in use by another process",
        ));
    }
    Err(e)
}

/// Splits slot-sorted reservations into runs of consecutive slots.
fn consecutive_runs(reserved: &[(u32, usize)]) -> impl Iterator<Item = &[(u32, usize)]> {
    let mut rest = reserved;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut len = 1;
        while len < rest.len() && len < MAX_RUN_SLOTS && rest[len].0 == rest[len - 1].0 + 1 {
            len += 1;
        }
        let (run, tail) = rest.split_at(len);
        rest = tail;
        Some(run)
    })
}

pub struct BlockCache {
    file: File,
    index_path: PathBuf,
    block_size: u32,
    slots: u32,
    state: Mutex<State>,
}

impl BlockCache {
    /// Opens the cache in `dir` with room for `capacity_bytes`, reusing a clean close's index.
    /// One process at a time: another one using `dir` makes this fail with `WouldBlock`.
    pub fn open(dir: &Path, block_size: u32, capacity_bytes: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let slots = u32::try_from((capacity_bytes / u64::from(block_size)).max(1))
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cache too large"))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(DATA_FILE))?;
        lock_exclusive(&file).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("the block cache in {}: {e}", dir.display()),
            )
        })?;
        file.set_len(u64::from(slots) * u64::from(block_size))?;
        let cache = BlockCache {
            file,
            index_path: dir.join("blocks.index"),
            block_size,
            slots,
            state: Mutex::new(State::default()),
        };
        cache.load_index()?;
        Ok(cache)
    }

    /// Deletes the folder `dir` of a cache no process has open, holding the cache's lock while
    /// it does (a process that opens it meanwhile waits for nothing: it makes a new one);
    /// whether it did.
    pub fn remove_if_unused(dir: &Path) -> io::Result<bool> {
        let Ok(file) = File::open(dir.join(DATA_FILE)) else {
            return Ok(false);
        };
        if lock_exclusive(&file).is_err() {
            return Ok(false);
        }
        std::fs::remove_dir_all(dir)?;
        Ok(true)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads the saved index (entries all go to the main queue), then deletes it: a crash
    /// before the next clean close must not trust slots written since.
    fn load_index(&self) -> io::Result<()> {
        let mut state = self.state();
        let mut used = vec![false; self.slots as usize];
        if let Ok(f) = File::open(&self.index_path) {
            let mut lines = io::BufReader::new(f).lines();
            // An index written for another geometry (or by an older version) describes other
            // slots: none of it is trusted.
            let header = lines.next().transpose()?;
            let ours = header.as_deref() == Some(self.index_header().as_str());
            for line in lines.filter(|_| ours) {
                let line = line?;
                let fields: Vec<u64> = line.split(' ').filter_map(|f| f.parse().ok()).collect();
                let [slot, owner, chunk, offset, block, checksum, content] = fields[..] else {
                    continue;
                };
                let slot = slot as u32;
                if slot >= self.slots || used[slot as usize] {
                    continue;
                }
                used[slot as usize] = true;
                let key = CacheKey {
                    owner,
                    chunk,
                    offset,
                    block,
                };
                state.entries.insert(
                    key,
                    Entry {
                        slot,
                        checksum: checksum as u32,
                        content: content as u32,
                        freq: 0,
                        in_main: true,
                        // Checked again before it is trusted (see the module's doc).
                        verified: false,
                        writing: false,
                        generation: 0,
                    },
                );
                state.main.push_back(key);
            }
            std::fs::remove_file(&self.index_path)?;
        }
        state.free = (0..self.slots)
            .rev()
            .filter(|s| !used[*s as usize])
            .collect();
        Ok(())
    }

    /// Saves the index for the next start (clean close only). Slots are synced first, so a
    /// slot verified (or written) in this process stays verified: the index exists only after
    /// a clean close and is deleted as soon as it is loaded, so a crash never inherits it.
    pub fn save_index(&self) -> io::Result<()> {
        self.file.sync_data()?;
        // Held until the index is in place: no slot takes another block meanwhile.
        let mut state = self.state();
        let tmp = self.index_path.with_extension("tmp");
        let written = self.write_index(&state, &tmp);
        if written.is_err() {
            // A half-written index (a full filesystem) must not keep taking its space.
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        std::fs::rename(&tmp, &self.index_path)?;
        state.index_saved = true;
        Ok(())
    }

    /// The index of `state`'s slots, written and synced to `tmp`.
    fn write_index(&self, state: &State, tmp: &Path) -> io::Result<()> {
        let mut out = io::BufWriter::new(File::create(tmp)?);
        writeln!(out, "{}", self.index_header())?;
        for key in state.main.iter().chain(state.small.iter()) {
            if let Some(e) = state.entries.get(key) {
                if e.writing {
                    continue;
                }
                writeln!(
                    out,
                    "{} {} {} {} {} {} {}",
                    e.slot, key.owner, key.chunk, key.offset, key.block, e.checksum, e.content
                )?;
            }
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()
    }

    /// The index's first line: the geometry its slot numbers mean.
    fn index_header(&self) -> String {
        format!(
            "bucketdisk block cache v3: {} slots of {} bytes",
            self.slots, self.block_size
        )
    }

    /// Deletes the saved index before a slot takes another block (see `State::index_saved`).
    fn invalidate_saved_index(&self, state: &mut State) -> io::Result<()> {
        if state.index_saved {
            self.remove_index_file()?;
            state.index_saved = false;
        }
        Ok(())
    }

    /// A cached block, verified against `checksum`; `None` on a miss or a damaged slot.
    pub fn get(&self, key: CacheKey, checksum: u32) -> io::Result<Option<Vec<u8>>> {
        let (slot, generation, content) = {
            let mut state = self.state();
            match state.entries.get_mut(&key) {
                Some(e) if e.checksum == checksum && !e.writing => {
                    e.freq = (e.freq + 1).min(3);
                    (e.slot, e.generation, e.content)
                }
                _ => return Ok(None),
            }
        };
        let mut data = vec![0u8; self.block_size as usize];
        self.file
            .read_exact_at(&mut data, u64::from(slot) * u64::from(self.block_size))?;
        if block_checksum(&data) != content {
            self.remove_damaged(key, slot, generation);
            return Ok(None);
        }
        Ok(Some(data))
    }

    /// Reads `buf.len()` bytes at `at` within a cached block into `buf`; `false` on a miss or a
    /// damaged slot. A slot not yet verified is checked against `checksum` in full first; after
    /// that only the requested bytes are read.
    pub fn read_at(
        &self,
        key: CacheKey,
        checksum: u32,
        at: usize,
        buf: &mut [u8],
    ) -> io::Result<bool> {
        let (slot, verified, generation) = {
            let mut state = self.state();
            match state.entries.get_mut(&key) {
                Some(e) if e.checksum == checksum && !e.writing => {
                    e.freq = (e.freq + 1).min(3);
                    (e.slot, e.verified, e.generation)
                }
                _ => return Ok(false),
            }
        };
        let slot_start = u64::from(slot) * u64::from(self.block_size);
        if verified {
            self.file.read_exact_at(buf, slot_start + at as u64)?;
            let unchanged = self
                .state()
                .entries
                .get(&key)
                .is_some_and(|e| e.slot == slot && e.generation == generation);
            return Ok(unchanged);
        }
        let Some(block) = self.get(key, checksum)? else {
            return Ok(false);
        };
        if let Some(e) = self.state().entries.get_mut(&key) {
            e.verified = true;
        }
        buf.copy_from_slice(&block[at..at + buf.len()]);
        Ok(true)
    }

    /// Caches a plain block (a no-op if it is already there).
    pub fn insert(&self, key: CacheKey, data: &[u8]) -> io::Result<()> {
        let checksum = block_checksum(data);
        self.insert_stored(key, checksum, data)
    }

    /// Caches a block whose checksum in the block map is `checksum` (of its sealed bytes for
    /// an encrypted volume).
    pub fn insert_stored(&self, key: CacheKey, checksum: u32, data: &[u8]) -> io::Result<()> {
        self.insert_batch(&[CacheInsert {
            key,
            checksum,
            content_checksum: block_checksum(data),
            data,
        }])
    }

    /// Caches several blocks (each a no-op if it is already there). Blocks that land in
    /// consecutive slots are written with one `pwrite`: the page cache then holds the cache
    /// file in large folios, which makes the page lookup of every later cached read cheaper
    /// (measured: 64 KiB writes cost ~0.6 µs more per cached 4 KiB read than 1 MiB writes).
    pub fn insert_batch(&self, items: &[CacheInsert<'_>]) -> io::Result<()> {
        if items
            .iter()
            .any(|i| i.data.len() != self.block_size as usize)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "wrong block size",
            ));
        }
        // (slot, item) for every block that got a slot, in slot order.
        let mut reserved: Vec<(u32, usize)> = {
            let mut state = self.state();
            self.invalidate_saved_index(&mut state)?;
            items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| Some((self.reserve(&mut state, item)?, i)))
                .collect()
        };
        reserved.sort_unstable();
        let mut first_error = None;
        for run in consecutive_runs(&reserved) {
            let at = u64::from(run[0].0) * u64::from(self.block_size);
            let written = if let [(_, i)] = run {
                write_sparse_at(&self.file, items[*i].data, at)
            } else {
                let mut buf = Vec::with_capacity(run.len() * self.block_size as usize);
                for &(_, i) in run {
                    buf.extend_from_slice(items[i].data);
                }
                write_sparse_at(&self.file, &buf, at)
            };
            let mut state = self.state();
            for &(slot, i) in run {
                let key = items[i].key;
                if written.is_ok() {
                    if let Some(e) = state.entries.get_mut(&key) {
                        e.writing = false;
                    }
                } else if state.entries.remove(&key).is_some() {
                    state.free.push(slot);
                }
            }
            if let Err(e) = written {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Takes a slot for `item` and records it as being written; `None` if the block is already
    /// cached or nothing can be evicted.
    fn reserve(&self, state: &mut State, item: &CacheInsert<'_>) -> Option<u32> {
        if state.entries.contains_key(&item.key) {
            return None;
        }
        let slot = state.free.pop().or_else(|| self.evict(state))?;
        let returning = state.ghost_set.remove(&item.key);
        state.generations += 1;
        let generation = state.generations;
        state.entries.insert(
            item.key,
            Entry {
                slot,
                checksum: item.checksum,
                content: item.content_checksum,
                freq: 0,
                in_main: returning,
                verified: true,
                writing: true,
                generation,
            },
        );
        if returning {
            state.main.push_back(item.key);
        } else {
            state.small.push_back(item.key);
        }
        Some(slot)
    }

    /// Drops blocks that are no longer any disk block's current version, freeing their slots
    /// for the next inserts. A slot still being written is left to its writer.
    pub fn forget(&self, keys: &[CacheKey]) {
        let mut state = self.state();
        for key in keys {
            if state.entries.get(key).is_some_and(|e| !e.writing) {
                if let Some(e) = state.entries.remove(key) {
                    state.free.push(e.slot);
                }
            }
        }
    }

    /// Drops a slot that failed verification, unless the entry was replaced meanwhile (the
    /// slot evicted and the block inserted again, maybe still being written): freeing that
    /// slot would let two writers share it.
    fn remove_damaged(&self, key: CacheKey, slot: u32, generation: u64) {
        let mut state = self.state();
        let same = state
            .entries
            .get(&key)
            .is_some_and(|e| e.slot == slot && e.generation == generation && !e.writing);
        if same {
            state.entries.remove(&key);
            state.free.push(slot);
            // The queues drop the stale key lazily when it reaches their head.
        }
    }

    /// Frees one slot (S3-FIFO). `None` only if the cache holds nothing evictable.
    fn evict(&self, state: &mut State) -> Option<u32> {
        let small_target = (self.slots as usize / 10).max(1);
        for _ in 0..4 * (self.slots as usize + 1) {
            let from_small = state.small.len() > small_target || state.main.is_empty();
            let key = if from_small {
                state.small.pop_front()
            } else {
                state.main.pop_front()
            }?;
            let Some(entry) = state.entries.get_mut(&key) else {
                continue;
            };
            if entry.writing {
                if from_small {
                    state.small.push_back(key);
                } else {
                    state.main.push_back(key);
                }
                continue;
            }
            if from_small {
                if entry.freq > 0 {
                    entry.freq = 0;
                    entry.in_main = true;
                    state.main.push_back(key);
                    continue;
                }
                let slot = entry.slot;
                state.entries.remove(&key);
                state.ghosts.push_back(key);
                state.ghost_set.insert(key);
                while state.ghosts.len() > self.slots as usize {
                    if let Some(old) = state.ghosts.pop_front() {
                        state.ghost_set.remove(&old);
                    }
                }
                return Some(slot);
            }
            if entry.freq > 0 {
                entry.freq -= 1;
                state.main.push_back(key);
                continue;
            }
            let slot = entry.slot;
            state.entries.remove(&key);
            return Some(slot);
        }
        None
    }

    /// The chunks that have blocks in the cache as `(owner, chunk)`, in order.
    pub fn cached_chunks(&self) -> Vec<(u64, u64)> {
        let mut chunks: Vec<(u64, u64)> = self
            .state()
            .entries
            .keys()
            .map(|k| (k.owner, k.chunk))
            .collect();
        chunks.sort_unstable();
        chunks.dedup();
        chunks
    }

    /// Whether a block is cached (without counting as a read).
    pub fn contains(&self, key: CacheKey) -> bool {
        self.state().entries.contains_key(&key)
    }

    /// The size of one slot.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Deletes the index a clean close saved, for a cache that goes back into use in this
    /// process: a crash from now on must not trust it (see [`BlockCache::save_index`]).
    pub fn forget_saved_index(&self) -> io::Result<()> {
        let mut state = self.state();
        self.remove_index_file()?;
        state.index_saved = false;
        Ok(())
    }

    fn remove_index_file(&self) -> io::Result<()> {
        match std::fs::remove_file(&self.index_path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Blocks currently cached.
    pub fn len(&self) -> usize {
        self.state().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u32 = 4096;

    fn block(n: u64) -> Vec<u8> {
        (0..BS).map(|i| (n as u8).wrapping_add(i as u8)).collect()
    }

    fn key(n: u64) -> CacheKey {
        CacheKey {
            owner: 7,
            chunk: n / 100,
            offset: n % 100 * 8192,
            block: n + 1000,
        }
    }

    fn get(c: &BlockCache, n: u64) -> Option<Vec<u8>> {
        c.get(key(n), block_checksum(&block(n))).expect("get")
    }

    #[test]
    fn mostly_zero_blocks_are_stored_as_holes_and_read_back_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = BlockCache::open(dir.path(), 65536, 64 * 65536).expect("open");
        // A slot first holds noise, then is reused for a block that is 4 KiB of data and
        // zeros: the old bytes must not show through the hole.
        let noise: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 1) as u8 | 1).collect();
        c.insert(key(1), &noise).expect("insert");
        c.forget(&[key(1)]);
        let mut sparse = vec![0u8; 65536];
        sparse[..4096].copy_from_slice(&noise[..4096]);
        sparse[40000..40010].copy_from_slice(b"0123456789");
        c.insert(key(2), &sparse).expect("insert");
        let got = c
            .get(key(2), block_checksum(&sparse))
            .expect("get")
            .expect("hit");
        assert_eq!(got, sparse);
        let mut part = vec![1u8; 8192];
        assert!(
            c.read_at(key(2), block_checksum(&sparse), 8192, &mut part)
                .expect("read")
        );
        assert_eq!(part, vec![0u8; 8192], "the punched range reads as zeros");
        let allocated = std::os::unix::fs::MetadataExt::blocks(
            &std::fs::metadata(dir.path().join("blocks.cache")).expect("cache file"),
        ) * 512;
        assert!(
            allocated < 65536,
            "{allocated} bytes allocated for one sparse block"
        );
    }

    #[test]
    fn hits_misses_and_capacity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = BlockCache::open(dir.path(), BS, 100 * u64::from(BS)).expect("open");
        assert_eq!(get(&c, 1), None);
        c.insert(key(1), &block(1)).expect("insert");
        assert_eq!(get(&c, 1), Some(block(1)));
        assert_eq!(
            c.get(key(1), 12345).expect("get"),
            None,
            "another checksum is another block"
        );
        for n in 2..1000 {
            c.insert(key(n), &block(n)).expect("insert");
        }
        assert!(c.len() <= 100, "bounded: {}", c.len());
        let file = std::fs::metadata(dir.path().join("blocks.cache"))
            .expect("stat")
            .len();
        assert_eq!(file, 100 * u64::from(BS));
    }

    #[test]
    fn a_new_version_takes_over_the_old_versions_slot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = BlockCache::open(dir.path(), BS, 10 * u64::from(BS)).expect("open");
        c.insert(key(1), &block(1)).expect("insert");
        c.insert(key(2), &block(2)).expect("insert");
        let slot_of = |c: &BlockCache, n: u64| c.state().entries.get(&key(n)).map(|e| e.slot);
        let old_slot = slot_of(&c, 1);
        c.forget(&[key(1)]);
        c.insert(key(3), &block(3)).expect("insert");
        assert_eq!(get(&c, 1), None, "the old version is gone");
        assert_eq!(get(&c, 3), Some(block(3)));
        assert_eq!(get(&c, 2), Some(block(2)), "others untouched");
        assert_eq!(slot_of(&c, 3), old_slot, "same slot, no fresh one");
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn a_restart_checks_every_slot_again_before_trusting_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let c = BlockCache::open(dir.path(), BS, 10 * u64::from(BS)).expect("open");
            c.insert(key(1), &block(1)).expect("insert");
            c.save_index().expect("save");
        }
        let verified = |c: &BlockCache| c.state().entries.get(&key(1)).map(|e| e.verified);
        let c = BlockCache::open(dir.path(), BS, 10 * u64::from(BS)).expect("reopen");
        assert_eq!(verified(&c), Some(false), "kept, but not trusted yet");
        let mut buf = [0u8; 16];
        assert!(
            c.read_at(key(1), block_checksum(&block(1)), 8, &mut buf)
                .expect("read")
        );
        assert_eq!(buf[..], block(1)[8..24]);
        assert_eq!(verified(&c), Some(true), "checked in full on first read");
        c.save_index().expect("save");
        drop(c);
        // Bits rotted on disk while no process had the cache open: a partial read misses.
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join(DATA_FILE))
            .expect("open");
        f.write_all_at(&[0xee; 4], 100).expect("damage");
        let c = BlockCache::open(dir.path(), BS, 10 * u64::from(BS)).expect("reopen");
        assert!(
            !c.read_at(key(1), block_checksum(&block(1)), 8, &mut buf)
                .expect("read"),
            "a rotted slot is a miss, not data"
        );
        drop(c);
        // An index in an older format (no block numbers): nothing of it is kept.
        let (k, sum) = (key(1), block_checksum(&block(1)));
        let old = format!(
            "bucketdisk block cache v2: 10 slots of {BS} bytes\n0 7 {} {} {sum} {sum}\n",
            k.chunk, k.offset
        );
        std::fs::write(dir.path().join("blocks.index"), old).expect("write index");
        let c = BlockCache::open(dir.path(), BS, 10 * u64::from(BS)).expect("reopen");
        assert_eq!(verified(&c), None, "an old index's slots are free");
    }

    #[test]
    fn a_sealed_blocks_slot_is_found_by_the_maps_checksum_and_checked_by_its_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let map_checksum = block_checksum(&block(1)) ^ 0x5555; // of the sealed bytes
        {
            let c = BlockCache::open(dir.path(), BS, 10 * u64::from(BS)).expect("open");
            c.insert_stored(key(1), map_checksum, &block(1))
                .expect("insert");
            assert_eq!(c.get(key(1), map_checksum).expect("get"), Some(block(1)));
            assert_eq!(
                c.get(key(1), block_checksum(&block(1))).expect("get"),
                None,
                "looked up by the map's checksum only"
            );
            c.save_index().expect("save");
        }
        let c = BlockCache::open(dir.path(), BS, 10 * u64::from(BS)).expect("reopen");
        let mut buf = [0u8; 16];
        assert!(
            c.read_at(key(1), map_checksum, 8, &mut buf).expect("read"),
            "verified against its content after a restart"
        );
        assert_eq!(buf[..], block(1)[8..24]);
        // The same bytes taken for another block of the disk (a map pointing it there): a miss.
        let elsewhere = CacheKey { block: 5, ..key(1) };
        assert_eq!(c.get(elsewhere, map_checksum).expect("get"), None);
    }

    #[test]
    fn a_batch_lands_in_consecutive_slots_and_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = BlockCache::open(dir.path(), BS, 300 * u64::from(BS)).expect("open");
        let blocks: Vec<Vec<u8>> = (0..200).map(block).collect();
        let mut items: Vec<CacheInsert<'_>> = blocks
            .iter()
            .enumerate()
            .map(|(n, data)| CacheInsert {
                key: key(n as u64),
                checksum: block_checksum(data),
                content_checksum: block_checksum(data),
                data,
            })
            .collect();
        // The same key twice in one batch: cached once.
        items.push(CacheInsert {
            key: key(3),
            checksum: block_checksum(&blocks[3]),
            content_checksum: block_checksum(&blocks[3]),
            data: &blocks[3],
        });
        c.insert_batch(&items).expect("batch");
        assert_eq!(c.len(), 200);
        for n in 0..200 {
            assert_eq!(get(&c, n), Some(block(n)), "block {n}");
        }
        let slot_of = |n: u64| c.state().entries.get(&key(n)).map(|e| e.slot);
        assert_eq!(
            slot_of(150),
            slot_of(0).map(|s| s + 150),
            "consecutive slots"
        );
    }

    #[test]
    fn a_scan_does_not_flush_the_working_set() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = BlockCache::open(dir.path(), BS, 100 * u64::from(BS)).expect("open");
        for n in 0..50 {
            c.insert(key(n), &block(n)).expect("insert");
        }
        for _ in 0..3 {
            for n in 0..50 {
                assert!(get(&c, n).is_some());
            }
        }
        for n in 10_000..12_000 {
            c.insert(key(n), &block(n)).expect("scan");
        }
        let kept = (0..50).filter(|n| get(&c, *n).is_some()).count();
        assert!(
            kept >= 45,
            "only {kept} of the 50 hot blocks survived a 2000-block scan"
        );
    }

    #[test]
    fn survives_a_clean_restart_and_ignores_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let c = BlockCache::open(dir.path(), BS, 10 * u64::from(BS)).expect("open");
            for n in 0..5 {
                c.insert(key(n), &block(n)).expect("insert");
            }
            c.save_index().expect("save");
        }
        // Damage one slot's bytes behind the cache's back.
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join("blocks.cache"))
            .expect("open");
        f.write_all_at(&[0xff; 16], 0).expect("damage");
        let c = BlockCache::open(dir.path(), BS, 10 * u64::from(BS)).expect("reopen");
        let hits = (0..5).filter(|n| get(&c, *n).is_some()).count();
        assert_eq!(
            hits, 4,
            "the damaged block is a miss, the others survived the restart"
        );
        // Without a clean close the index is not trusted.
        drop(c);
        let c = BlockCache::open(dir.path(), BS, 10 * u64::from(BS)).expect("reopen");
        assert!(c.is_empty());
    }

    #[test]
    fn one_user_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = BlockCache::open(dir.path(), BS, 10 * u64::from(BS)).expect("open");
        let Err(e) = BlockCache::open(dir.path(), BS, 10 * u64::from(BS)) else {
            panic!("a second user of the same cache file was let in");
        };
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
        drop(c);
        BlockCache::open(dir.path(), BS, 10 * u64::from(BS)).expect("free again once closed");
    }

    #[test]
    fn an_index_for_another_geometry_is_not_trusted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = BlockCache::open(dir.path(), BS, 10 * u64::from(BS)).expect("open");
        c.insert(key(1), &block(1)).expect("insert");
        c.save_index().expect("save");
        drop(c);
        // The same file opened for 8 KiB blocks: slot n is another byte range.
        let c = BlockCache::open(dir.path(), 2 * BS, 10 * u64::from(BS)).expect("reopen");
        assert!(
            c.is_empty(),
            "nothing of a 4 KiB index is trusted for 8 KiB slots"
        );
        drop(c);
        let c = BlockCache::open(dir.path(), BS, 20 * u64::from(BS)).expect("reopen");
        assert!(c.is_empty(), "nor for another number of slots");
    }

    #[test]
    fn a_slot_taken_after_the_index_was_saved_deletes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = BlockCache::open(dir.path(), BS, 2 * u64::from(BS)).expect("open");
        c.insert(key(1), &block(1)).expect("insert");
        c.insert(key(2), &block(2)).expect("insert");
        c.save_index().expect("save");
        let index = dir.path().join("blocks.index");
        assert!(index.exists());
        // A late insert (a background task of a closed volume) evicts a saved slot.
        c.insert(key(3), &block(3)).expect("insert");
        assert!(
            !index.exists(),
            "the saved index no longer describes the slots"
        );
        drop(c);
        let c = BlockCache::open(dir.path(), BS, 2 * u64::from(BS)).expect("reopen");
        assert!(c.is_empty(), "a crash now trusts nothing");
    }
}
