//! Fetching stored blocks into the cache. Every miss (reads, readahead, hydration, the uploader's
//! bases, GC) comes through here, so that:
//! - blocks that lie close together in one chunk come in one ranged GET (a run), because a store
//!   serves a few hundred requests a second but hundreds of MiB/s in large ones;
//! - concurrent wants of one block share one GET (a per-block cell that every wanter awaits);
//! - every block is verified against the map's checksum on its own and cached once.

use super::Shared;
use super::helpers::lock;
use crate::cache::CacheKey;
use crate::chunk_store::StoredBlock;
use crate::device::DeviceError;
use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared as SharedFuture};
use std::io;
use std::sync::Arc;
use tokio::sync::OnceCell;

/// Most bytes one ranged GET spans: large enough to reach a store's bandwidth, small enough that
/// a run's first block is not held back long by its last.
pub(super) const MAX_RUN_BYTES: u64 = 4 << 20;
/// Bytes of blocks nobody asked for that a run reads through rather than splitting in two: a
/// second request costs more than this much transfer.
pub(super) const MAX_RUN_GAP: u64 = 256 << 10;
/// Times a block that arrived damaged is fetched again before its reader gets an error.
const DAMAGED_REFETCHES: usize = 2;
/// Runs of more blocks than this are decoded on a blocking thread.
const INLINE_DECODE_BLOCKS: usize = 2;

/// What one block's fetch ended with, shared by everyone who wanted it.
pub(super) type FetchResult = Result<Bytes, FetchFailure>;

/// A failed fetch as everyone who waited for the block receives it (an `io::Error` cannot be
/// cloned): the device error it becomes, kept apart so a reader is told what happened.
#[derive(Debug, Clone)]
pub(super) enum FetchFailure {
    Corrupt(String),
    /// The block's chunk is not in the store (a lookup older than a collection, or damage).
    Missing(String),
    StoreUnavailable(String),
    Other(io::ErrorKind, String),
}

impl FetchFailure {
    fn internal(what: &str) -> Self {
        FetchFailure::Other(io::ErrorKind::Other, format!("internal: {what}"))
    }
}

impl From<io::Error> for FetchFailure {
    fn from(e: io::Error) -> Self {
        let missing = e.kind() == io::ErrorKind::NotFound;
        match DeviceError::from(e) {
            DeviceError::Corrupt(why) if missing => FetchFailure::Missing(why),
            DeviceError::Corrupt(why) => FetchFailure::Corrupt(why),
            DeviceError::StoreUnavailable(why) => FetchFailure::StoreUnavailable(why),
            other => {
                let e = other.into_io();
                FetchFailure::Other(e.kind(), e.to_string())
            }
        }
    }
}

impl From<FetchFailure> for io::Error {
    fn from(failure: FetchFailure) -> Self {
        match failure {
            FetchFailure::Corrupt(why) => DeviceError::Corrupt(why).into_io(),
            FetchFailure::Missing(why) => {
                io::Error::new(io::ErrorKind::NotFound, DeviceError::Corrupt(why))
            }
            FetchFailure::StoreUnavailable(why) => DeviceError::StoreUnavailable(why).into_io(),
            FetchFailure::Other(kind, message) => io::Error::new(kind, message),
        }
    }
}
/// A fetch of one block that concurrent wanters share.
pub(super) type BlockFetch = Arc<OnceCell<FetchResult>>;

/// One ranged GET, decoded: a result per block of the run, in the run's order.
type RunFuture<'a> = SharedFuture<BoxFuture<'a, Arc<Vec<FetchResult>>>>;

/// Groups blocks into runs, each one ranged GET: sorted by chunk and offset, duplicates
/// dropped, a run broken where the chunk changes, the gap to the next block exceeds
/// [`MAX_RUN_GAP`] or the span would exceed [`MAX_RUN_BYTES`]. (Two blocks of the disk the map
/// places at the same bytes are not duplicates: each is read as itself, in runs of its own.)
pub(super) fn runs(mut blocks: Vec<StoredBlock>) -> Vec<Vec<StoredBlock>> {
    blocks.sort_unstable_by_key(|s| (s.location.chunk, s.location.offset, s.block));
    blocks.dedup_by_key(|s| (s.location.chunk, s.location.offset, s.block));
    let mut runs: Vec<Vec<StoredBlock>> = Vec::new();
    for stored in blocks {
        let location = stored.location;
        if let Some(run) = runs.last_mut()
            && let (Some(first), Some(last)) = (run.first(), run.last())
        {
            let (first, last) = (first.location, last.location);
            // Sorted: in the same chunk, `location` starts at or after `first`.
            let last_end = last.offset + u64::from(last.length);
            let end = location.offset + u64::from(location.length);
            if location.chunk == first.chunk
                && location.offset >= last_end
                && location.offset - last_end <= MAX_RUN_GAP
                && end - first.offset <= MAX_RUN_BYTES
            {
                run.push(stored);
                continue;
            }
        }
        runs.push(vec![stored]);
    }
    runs
}

/// The content of each of `blocks` (in that order): from the cache, or fetched from the store
/// in as few GETs as [`runs`] allows and cached. Blocks another task is already fetching are
/// awaited, not fetched again.
pub(super) async fn fetch_blocks(
    shared: &Shared,
    blocks: &[StoredBlock],
) -> Vec<io::Result<Bytes>> {
    let mut results: Vec<Option<io::Result<Bytes>>> = Vec::with_capacity(blocks.len());
    let mut wanted = Vec::new();
    for (i, stored) in blocks.iter().enumerate() {
        match shared
            .cache
            .get(shared.chunks.cache_key(stored), stored.location.checksum)
        {
            Ok(Some(data)) => results.push(Some(Ok(Bytes::from(data)))),
            Ok(None) => {
                results.push(None);
                wanted.push(i);
            }
            Err(e) => results.push(Some(Err(e))),
        }
    }
    if wanted.is_empty() {
        return settled(results);
    }
    // Claim a cell per wanted block: a new one (ours to fill) or one another task is filling.
    let mut cells: Vec<(usize, BlockFetch, bool)> = Vec::with_capacity(wanted.len());
    {
        let mut fetches = lock(&shared.reads.fetches);
        for i in wanted {
            let key = shared.chunks.cache_key(&blocks[i]);
            let mut ours = false;
            let cell = fetches.entry(key).or_insert_with(|| {
                ours = true;
                BlockFetch::default()
            });
            cells.push((i, Arc::clone(cell), ours));
        }
    }
    let claimed = Claimed {
        shared,
        cells: cells
            .iter()
            .filter(|(_, _, ours)| *ours)
            .map(|(i, cell, _)| (shared.chunks.cache_key(&blocks[*i]), Arc::clone(cell)))
            .collect(),
    };
    let our_runs = runs(
        cells
            .iter()
            .filter(|(_, _, ours)| *ours)
            .map(|&(i, _, _)| blocks[i])
            .collect(),
    );
    let run_of: std::collections::HashMap<CacheKey, (RunFuture<'_>, usize)> = our_runs
        .into_iter()
        .flat_map(|run| {
            let keys: Vec<CacheKey> = run.iter().map(|s| shared.chunks.cache_key(s)).collect();
            let future = fetch_run(shared, run).boxed().shared();
            keys.into_iter()
                .enumerate()
                .map(move |(at, key)| (key, (future.clone(), at)))
        })
        .collect();
    let waits =
        cells.iter().map(|(i, cell, _)| {
            let stored = blocks[*i];
            let run = run_of.get(&shared.chunks.cache_key(&stored)).cloned();
            async move {
                let result = cell
                    .get_or_init(|| async move {
                        match run {
                            Some((run, at)) => run.await.get(at).cloned().unwrap_or_else(|| {
                                Err(FetchFailure::internal("a run lost a block"))
                            }),
                            // Its owner gave up (its reader went away) before filling it.
                            None => fetch_run(shared, vec![stored])
                                .await
                                .first()
                                .cloned()
                                .unwrap_or_else(|| {
                                    Err(FetchFailure::internal("a fetch lost its block"))
                                }),
                        }
                    })
                    .await
                    .clone();
                (*i, result)
            }
        });
    for (i, result) in futures::future::join_all(waits).await {
        results[i] = Some(result.map_err(io::Error::from));
    }
    drop(claimed);
    settled(results)
}

/// The cells a [`fetch_blocks`] call created: forgotten when it ends, however it ends (a
/// reader whose client went away is dropped mid-fetch; a cell left behind would keep its
/// block in memory for good). Someone still waiting on one holds its own `Arc`.
struct Claimed<'a> {
    shared: &'a Shared,
    cells: Vec<(CacheKey, BlockFetch)>,
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        let mut fetches = lock(&self.shared.reads.fetches);
        for (key, cell) in &self.cells {
            if fetches.get(key).is_some_and(|c| Arc::ptr_eq(c, cell)) {
                fetches.remove(key);
            }
        }
    }
}

fn settled(results: Vec<Option<io::Result<Bytes>>>) -> Vec<io::Result<Bytes>> {
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(io::Error::other("internal: a block was never fetched"))))
        .collect()
}

/// One ranged GET for `run`, each block verified and put in the cache before anyone sees it
/// (so nobody fetches it again once its cell is forgotten). Blocks that arrive damaged are
/// fetched again, up to [`DAMAGED_REFETCHES`] times: damage in transit goes away with another
/// GET; damage at rest stays and is the reader's error.
async fn fetch_run(shared: &Shared, run: Vec<StoredBlock>) -> Arc<Vec<FetchResult>> {
    shared.reads.counters.fetched(run.len() as u64);
    let span = shared.chunks.read_span(&run).await;
    let mut results = settle_run(shared, &run, span).await;
    for _ in 0..DAMAGED_REFETCHES {
        let damaged: Vec<usize> = (0..run.len())
            .filter(|&i| matches!(results.get(i), Some(Err(FetchFailure::Corrupt(_)))))
            .collect();
        if damaged.is_empty() {
            break;
        }
        tracing::warn!(
            volume = %shared.meta.name,
            "{} block(s) arrived damaged, fetching them again",
            damaged.len()
        );
        shared.reads.counters.refetched(damaged.len() as u64);
        let again: Vec<StoredBlock> = damaged.iter().map(|&i| run[i]).collect();
        let span = shared.chunks.read_span(&again).await;
        let settled = settle_run(shared, &again, span).await;
        for (&i, result) in damaged.iter().zip(settled) {
            results[i] = result;
        }
    }
    for failure in &results {
        if let Err(FetchFailure::Corrupt(why)) = failure {
            tracing::error!(volume = %shared.meta.name, "a stored block is damaged: {why}");
        }
    }
    Arc::new(results)
}

/// The blocks of `run` from `span`, its ranged GET's answer: each verified and cached.
async fn settle_run(
    shared: &Shared,
    run: &[StoredBlock],
    span: io::Result<Bytes>,
) -> Vec<FetchResult> {
    let decoded = match span {
        Ok(span) => decode(shared, run, span).await,
        Err(e) => Err(e),
    };
    let decoded = match decoded {
        Ok(decoded) => decoded,
        Err(e) => {
            tracing::error!(volume = %shared.meta.name, "reading blocks from the store failed: {e}");
            return vec![Err(FetchFailure::from(e)); run.len()];
        }
    };
    run.iter()
        .zip(decoded)
        .map(|(stored, block)| match block {
            Ok(data) => {
                let key = shared.chunks.cache_key(stored);
                let checksum = stored.location.checksum;
                if let Err(e) = shared.cache.insert_stored(key, checksum, &data) {
                    tracing::warn!("cannot cache a block: {e}");
                }
                Ok(data)
            }
            Err(e) => {
                tracing::warn!(volume = %shared.meta.name, "a block arrived damaged: {e}");
                Err(FetchFailure::from(e))
            }
        })
        .collect()
}

/// Each block of `run` decoded from `span` on its own (see `ChunkStore::decode_run`), on a
/// blocking thread when the run is long.
async fn decode(
    shared: &Shared,
    run: &[StoredBlock],
    span: Bytes,
) -> io::Result<Vec<io::Result<Bytes>>> {
    if run.len() <= INLINE_DECODE_BLOCKS {
        return shared.chunks.decode_run(run, &span);
    }
    let chunks = shared.chunks.clone();
    let blocks = run.to_vec();
    tokio::task::spawn_blocking(move || chunks.decode_run(&blocks, &span))
        .await
        .map_err(|e| io::Error::other(format!("decoding blocks failed: {e}")))?
}

/// A block's GET started before the volume was open (see [`EarlyFetch`]): adopted as that
/// block's fetch, so a read that wants it meanwhile awaits it instead of fetching it again.
/// Should it fail, the block is fetched the usual way.
pub(super) fn adopt_early(shared: &Arc<Shared>, early: EarlyFetch) {
    let key = shared.chunks.cache_key(&early.block);
    let cell = BlockFetch::default();
    lock(&shared.reads.fetches).insert(key, Arc::clone(&cell));
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let stored = early.block;
        cell.get_or_init(|| async {
            let span = match early.span.await {
                Ok(span) => span,
                Err(e) => Err(io::Error::other(format!("early fetch task failed: {e}"))),
            };
            shared.reads.counters.fetched(1);
            let settled = match settle_run(&shared, &[stored], span).await.first() {
                Some(Ok(data)) => return Ok(data.clone()),
                _ => fetch_run(&shared, vec![stored]).await,
            };
            settled
                .first()
                .cloned()
                .unwrap_or_else(|| Err(FetchFailure::internal("a fetch lost its block")))
        })
        .await;
        let mut fetches = lock(&shared.reads.fetches);
        if fetches.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            fetches.remove(&key);
        }
    });
}

/// The ranged GET of one block, started while the volume opens (a boot's first read is block
/// 0: its lookup is made while the map's next TXID is claimed, and its GET can run then too).
pub(super) struct EarlyFetch {
    pub block: StoredBlock,
    pub span: tokio::task::JoinHandle<io::Result<Bytes>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockmap::BlockLocation;

    /// Block `offset` of the disk (each its own block) at `offset` in `chunk`.
    fn at(chunk: u64, offset: u64, length: u32) -> StoredBlock {
        StoredBlock {
            block: chunk << 32 | offset,
            location: BlockLocation {
                chunk,
                offset,
                length,
                checksum: 0,
            },
        }
    }

    #[test]
    fn neighbours_in_one_chunk_share_a_run() {
        let got = runs(vec![
            at(2, 100, 50),
            at(1, 8, 100),
            at(1, 108, 100),
            at(1, 108, 100),
            at(2, 8, 92),
        ]);
        assert_eq!(
            got,
            vec![
                vec![at(1, 8, 100), at(1, 108, 100)],
                vec![at(2, 8, 92), at(2, 100, 50)]
            ]
        );
    }

    #[test]
    fn runs_break_at_wide_gaps_and_at_the_span_limit() {
        let gap = MAX_RUN_GAP;
        let got = runs(vec![
            at(1, 8, 10),
            at(1, 18 + gap, 10),
            at(1, 29 + 2 * gap, 10),
        ]);
        assert_eq!(got.len(), 2, "the second gap is one byte too wide: {got:?}");
        let got = runs(vec![at(2, 5, 10), at(1, 900, 10), at(1, 1000, 10)]);
        assert_eq!(
            got.len(),
            2,
            "a later chunk at a lower offset starts a new run"
        );
        let block = 64 << 10;
        let many: Vec<_> = (0..200)
            .map(|i| at(1, 8 + i * block, block as u32))
            .collect();
        let got = runs(many);
        assert!(got.iter().all(|r| {
            let end = r
                .last()
                .map_or(0, |s| s.location.offset + u64::from(s.location.length));
            let span = end - r[0].location.offset;
            span <= MAX_RUN_BYTES
        }));
        assert_eq!(got.iter().map(Vec::len).sum::<usize>(), 200);
        assert_eq!(
            got.len(),
            200usize.div_ceil((MAX_RUN_BYTES / block) as usize)
        );
    }
}
