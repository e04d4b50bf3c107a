//! The read path: overlay (journaled, not uploaded) → block cache → the store, the missing
//! blocks of a read fetched together (see `fetch`: neighbours in one ranged GET, each verified
//! against the map's checksum); holes cost nothing. Sequential readers get readahead (see
//! `readahead`), `--hydrate` pulls the whole disk in behind them.

use super::Shared;
use super::fetch::BlockFetch;
use super::fetch::{fetch_blocks, runs};
use super::helpers::{blocking, map_error};
use super::readahead::{Prefetch, Readahead, Ticket};
use crate::cache::CacheKey;
use crate::chunk_store::StoredBlock;
use crate::device::{Extent, ExtentKind, ReadSegment};
use crate::zeros::is_zero;
use blockmap::BlockLocation;
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};

/// Block status answers for at most this many blocks per request (clients ask again).
const STATUS_MAX_BLOCKS: u64 = 16384;
/// Reads up to this size are planned on the async worker when possible.
const INLINE_READ_MAX: u32 = 64 * 1024;
/// Concurrent GETs of background disk hydration: few, so foreground reads keep the bandwidth.
const HYDRATE_CONCURRENCY: usize = 4;

/// The read path's own state.
pub(super) struct ReadState {
    /// Blocks being fetched from the store, for others who want them meanwhile (see `fetch`).
    pub(super) fetches: Mutex<HashMap<CacheKey, BlockFetch>>,
    pub(super) readahead: Readahead,
    /// GETs readahead and `NBD_CMD_CACHE` may have in flight (hydration has its own few).
    pub(super) prefetch_slots: Arc<Semaphore>,
    pub(super) counters: ReadCounters,
}

impl ReadState {
    /// `readahead_bytes` ahead of a sequential reader at most; `prefetch_gets` GETs of
    /// readahead and `NBD_CMD_CACHE` in flight at most.
    pub(super) fn new(
        block_size: u64,
        total_blocks: u64,
        readahead_bytes: u64,
        prefetch_gets: usize,
    ) -> Self {
        ReadState {
            fetches: Mutex::new(HashMap::new()),
            readahead: Readahead::new(block_size, readahead_bytes, total_blocks),
            prefetch_slots: Arc::new(Semaphore::new(prefetch_gets.max(1))),
            counters: ReadCounters::default(),
        }
    }
}

/// Read-path counters for the metrics endpoint.
#[derive(Default)]
pub(super) struct ReadCounters {
    /// Block pieces of reads answered from the local cache.
    pub(super) cache_hits: AtomicU64,
    /// Blocks fetched from the store (reads, readahead and hydration alike).
    pub(super) store_fetches: AtomicU64,
    /// Ranged GETs of blocks (each brings one or more neighbouring blocks).
    pub(super) store_gets: AtomicU64,
    /// Blocks fetched again because they arrived damaged (checksum or decoding).
    pub(super) damaged_refetches: AtomicU64,
    /// Blocks readahead had planned and dropped because their stream was no longer read.
    pub(super) readahead_cancelled: AtomicU64,
    /// Disk hydration: blocks of the disk scanned so far (`--hydrate`).
    pub(super) hydration_scanned: AtomicU64,
}

impl ReadCounters {
    /// One ranged GET that brings `blocks` blocks.
    pub(super) fn fetched(&self, blocks: u64) {
        self.store_gets.fetch_add(1, Ordering::Relaxed);
        self.store_fetches.fetch_add(blocks, Ordering::Relaxed);
    }

    /// `blocks` blocks that arrived damaged, fetched again in one ranged GET.
    pub(super) fn refetched(&self, blocks: u64) {
        self.fetched(blocks);
        self.damaged_refetches.fetch_add(blocks, Ordering::Relaxed);
    }
}

/// One block's share of a read.
struct Piece {
    block: u64,
    /// Byte range within the block.
    at: usize,
    len: usize,
    part: Part,
}

enum Part {
    Zero,
    Data(Bytes),
    /// Read from the block cache into the read's shared buffer, at this byte of the read:
    /// adjacent cached pieces go out as one segment (one NBD reply chunk), as from a file.
    Cached {
        start: usize,
    },
    /// Stored and not cached.
    Fetch(BlockLocation),
    /// Overlay edits on top of the stored block (if any).
    Merge(Option<BlockLocation>),
}

fn no_base() -> io::Result<Vec<u8>> {
    Err(io::Error::other(
        "internal: overlay needed a base it said it did not need",
    ))
}

/// Decides where each block of the read comes from. The overlay is consulted before the map:
/// the uploader commits the map before it drops edits from the overlay, so a block missing
/// from the overlay here is already in the map.
///
/// With `inline`, only memory and the block cache are used: `Ok(None)` means a block-map query
/// is needed, which must run on a blocking thread.
fn plan(shared: &Shared, offset: u64, length: u32, inline: bool) -> io::Result<Option<Plan>> {
    let bs = shared.block_size();
    let generation = shared.log.generation();
    let end = offset + u64::from(length);
    let mut pieces = Vec::with_capacity((u64::from(length) / bs + 2) as usize);
    let mut pos = offset;
    while pos < end {
        let block = pos / bs;
        let at = pos % bs;
        let len = (bs - at).min(end - pos);
        pieces.push(Piece {
            block,
            at: at as usize,
            len: len as usize,
            part: Part::Zero,
        });
        pos += len;
    }
    let mut need_map = Vec::new();
    {
        let overlay = shared.log.overlay();
        for (i, piece) in pieces.iter_mut().enumerate() {
            if !overlay.touches(piece.block) {
                need_map.push(i);
            } else if overlay.needs_base(piece.block, u64::MAX) {
                piece.part = Part::Merge(None);
                need_map.push(i);
            } else {
                let data = overlay
                    .materialize(piece.block, no_base)?
                    .unwrap_or_default();
                piece.part = slice_of(data, piece.at, piece.len);
            }
        }
    }
    if need_map.is_empty() {
        return Ok(Some(Plan {
            generation,
            pieces,
            cached: Bytes::new(),
        }));
    }
    let first = pieces[0].block;
    let count = pieces[pieces.len() - 1].block - first + 1;
    // Where each block of the read lives, indexed by block - first (`None`: a hole).
    let rows: Vec<Option<BlockLocation>> = match shared.map.locations.get_range(first, count) {
        Some(known) => known,
        None if inline => return Ok(None),
        None => {
            let rows = shared.map.range(first, count)?;
            let mut by_block = vec![None; count as usize];
            for (block, location) in rows {
                if let Some(slot) = block
                    .checked_sub(first)
                    .and_then(|i| by_block.get_mut(i as usize))
                {
                    *slot = Some(location);
                }
            }
            by_block
        }
    };
    let mut cached: Option<BytesMut> = None;
    for i in need_map {
        let start = (pieces[i].block * bs + pieces[i].at as u64 - offset) as usize;
        let piece = &mut pieces[i];
        let location = rows[(piece.block - first) as usize];
        piece.part = match (&piece.part, location) {
            (Part::Merge(_), location) => Part::Merge(location),
            (_, None) => Part::Zero,
            (_, Some(loc)) => {
                let buffer = cached.get_or_insert_with(|| BytesMut::zeroed(length as usize));
                let key = shared.chunks.cache_key(&StoredBlock {
                    block: piece.block,
                    location: loc,
                });
                let into = &mut buffer[start..start + piece.len];
                if shared.cache.read_at(key, loc.checksum, piece.at, into)? {
                    shared
                        .reads
                        .counters
                        .cache_hits
                        .fetch_add(1, Ordering::Relaxed);
                    Part::Cached { start }
                } else {
                    Part::Fetch(loc)
                }
            }
        };
    }
    Ok(Some(Plan {
        generation,
        pieces,
        cached: cached.map(BytesMut::freeze).unwrap_or_default(),
    }))
}

/// Where each piece of a read comes from.
struct Plan {
    /// The overlay generation the plan was made at.
    generation: u64,
    pieces: Vec<Piece>,
    /// The read's buffer that [`Part::Cached`] pieces were read into.
    cached: Bytes,
}

fn slice_of(block: Vec<u8>, at: usize, len: usize) -> Part {
    let part = &block[at..at + len];
    if is_zero(part) {
        Part::Zero
    } else {
        Part::Data(Bytes::from(block).slice(at..at + len))
    }
}

pub(super) async fn read(
    shared: &Arc<Shared>,
    offset: u64,
    length: u32,
) -> io::Result<Vec<ReadSegment>> {
    if length > 0 {
        let bs = shared.block_size();
        let end = (offset + u64::from(length)).div_ceil(bs);
        if let Some(ahead) = shared.reads.readahead.on_read(offset / bs, end) {
            tokio::spawn(prefetch_blocks(Arc::clone(shared), ahead));
        }
    }
    // A chunk still missing after every look: the map points at a chunk that is not there.
    let mut missing = None;
    for _attempt in 0..5 {
        // Small reads whose blocks are known are planned right here: a block-cache hit is a
        // pread from the page cache, cheaper than a hand-off to a blocking thread.
        let inline = if length <= INLINE_READ_MAX {
            plan(shared, offset, length, true)?
        } else {
            None
        };
        let Plan {
            generation,
            mut pieces,
            cached,
        } = match inline {
            Some(planned) => planned,
            None => {
                let s = Arc::clone(shared);
                blocking(move || plan(&s, offset, length, false))
                    .await?
                    .ok_or_else(|| io::Error::other("internal: a read plan was not made"))?
            }
        };
        let wanted: Vec<(usize, StoredBlock)> = pieces
            .iter()
            .enumerate()
            .filter_map(|(i, p)| match p.part {
                Part::Fetch(location) | Part::Merge(Some(location)) => Some((
                    i,
                    StoredBlock {
                        block: p.block,
                        location,
                    },
                )),
                _ => None,
            })
            .collect();
        let stored: Vec<StoredBlock> = wanted.iter().map(|&(_, s)| s).collect();
        let fetched = wanted
            .iter()
            .map(|&(i, _)| i)
            .zip(fetch_blocks(shared, &stored).await);
        let mut bases: HashMap<usize, Bytes> = HashMap::new();
        let mut retry = false;
        for (i, result) in fetched {
            match result {
                Ok(data) => {
                    bases.insert(i, data);
                }
                // GC deleted a chunk this read had looked up just before: look again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    missing = Some(e);
                    retry = true;
                }
                Err(e) => return Err(e),
            }
        }
        if retry {
            continue;
        }
        if !merge(shared, generation, &mut pieces, &mut bases)? {
            continue; // the uploader moved edits out of the overlay meanwhile
        }
        return Ok(segments(pieces, &cached));
    }
    Err(missing.unwrap_or_else(|| {
        io::Error::other("read kept racing with uploads and garbage collection; giving up")
    }))
}

/// Fills fetched and merged pieces. `false` if the overlay changed since planning.
fn merge(
    shared: &Shared,
    generation: u64,
    pieces: &mut [Piece],
    bases: &mut HashMap<usize, Bytes>,
) -> io::Result<bool> {
    let overlay = pieces
        .iter()
        .any(|p| matches!(p.part, Part::Merge(_)))
        .then(|| shared.log.overlay());
    if overlay.is_some() && shared.log.generation() != generation {
        return Ok(false);
    }
    let bs = shared.block_size() as usize;
    for (i, piece) in pieces.iter_mut().enumerate() {
        match piece.part {
            Part::Fetch(_) => {
                let data = bases.remove(&i).unwrap_or_default();
                piece.part = if data.len() == bs {
                    slice_bytes(data, piece.at, piece.len)
                } else {
                    return Err(io::Error::other("internal: a fetched block is missing"));
                };
            }
            Part::Merge(_) => {
                let Some(overlay) = overlay.as_ref() else {
                    return Ok(false);
                };
                let base = bases.remove(&i);
                let block = overlay.materialize(piece.block, || {
                    Ok(base.map_or_else(|| vec![0u8; bs], |b| b.to_vec()))
                })?;
                match block {
                    Some(block) => piece.part = slice_of(block, piece.at, piece.len),
                    None => return Ok(false),
                }
            }
            _ => {}
        }
    }
    Ok(true)
}

fn slice_bytes(block: Bytes, at: usize, len: usize) -> Part {
    if is_zero(&block[at..at + len]) {
        Part::Zero
    } else {
        Part::Data(block.slice(at..at + len))
    }
}

/// Pieces as protocol segments, runs of zeros merged.
fn segments(pieces: Vec<Piece>, cached: &Bytes) -> Vec<ReadSegment> {
    let mut out: Vec<ReadSegment> = Vec::with_capacity(pieces.len());
    // The cached run being extended: its start in the read and its length.
    let mut run: Option<(usize, usize)> = None;
    for piece in pieces {
        if let Part::Cached { start } = piece.part {
            match &mut run {
                Some((from, len)) if *from + *len == start => *len += piece.len,
                _ => {
                    if let Some((from, len)) = run.take() {
                        out.push(ReadSegment::Data(cached.slice(from..from + len)));
                    }
                    run = Some((start, piece.len));
                }
            }
            continue;
        }
        if let Some((from, len)) = run.take() {
            out.push(ReadSegment::Data(cached.slice(from..from + len)));
        }
        match piece.part {
            Part::Data(data) => out.push(ReadSegment::Data(data)),
            _ => match out.last_mut() {
                Some(ReadSegment::Zero(n)) => *n += piece.len as u64,
                _ => out.push(ReadSegment::Zero(piece.len as u64)),
            },
        }
    }
    if let Some((from, len)) = run {
        out.push(ReadSegment::Data(cached.slice(from..from + len)));
    }
    out
}

/// `NBD_CMD_CACHE`: starts fetching the range's stored blocks into the cache.
pub(super) async fn prefetch(shared: &Arc<Shared>, offset: u64, length: u64) -> io::Result<()> {
    if length == 0 {
        return Ok(());
    }
    let bs = shared.block_size();
    let first = offset / bs;
    let count = (offset + length).div_ceil(bs) - first;
    tokio::spawn(prefetch_blocks(
        Arc::clone(shared),
        Prefetch {
            first,
            count,
            ticket: None,
        },
    ));
    Ok(())
}

/// Stored, uncached blocks of `first..first+count` that the overlay does not hide.
fn missing_blocks(shared: &Shared, first: u64, count: u64) -> io::Result<Vec<StoredBlock>> {
    let rows: Vec<(u64, BlockLocation)> = match shared.map.locations.get_range(first, count) {
        Some(known) => (first..)
            .zip(known)
            .filter_map(|(block, loc)| Some((block, loc?)))
            .collect(),
        None => shared.map.range(first, count)?,
    };
    let overlay = shared.log.overlay();
    Ok(rows
        .into_iter()
        .map(|(block, location)| StoredBlock { block, location })
        .filter(|stored| {
            !overlay.touches(stored.block)
                && !shared.cache.contains(shared.chunks.cache_key(stored))
        })
        .collect())
}

/// Fetches the stored, uncached blocks of a prefetch, a run per GET, at most
/// `VolumeConfig::prefetch_gets` GETs at once; runs not yet started are dropped once the
/// prefetch's stream is no longer read.
async fn prefetch_blocks(shared: Arc<Shared>, prefetch: Prefetch) {
    let Prefetch {
        first,
        count,
        ticket,
    } = prefetch;
    let s = Arc::clone(&shared);
    let missing = match blocking(move || missing_blocks(&s, first, count)).await {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!("readahead lookup failed: {e}");
            return;
        }
    };
    let current =
        |ticket: Option<Ticket>| ticket.is_none_or(|t| shared.reads.readahead.is_current(t));
    for run in runs(missing) {
        let Ok(permit) = Arc::clone(&shared.reads.prefetch_slots)
            .acquire_owned()
            .await
        else {
            return;
        };
        if !current(ticket) {
            shared
                .reads
                .counters
                .readahead_cancelled
                .fetch_add(run.len() as u64, Ordering::Relaxed);
            continue;
        }
        fetch_in_background(&shared, run, permit, |e| {
            tracing::debug!("readahead fetch failed: {e}")
        });
    }
}

/// Fetches `run` into the cache on a task of its own, holding `permit` until it is done; a
/// failure is only reported (the blocks are fetched again when someone reads them).
fn fetch_in_background(
    shared: &Arc<Shared>,
    run: Vec<StoredBlock>,
    permit: tokio::sync::OwnedSemaphorePermit,
    report: fn(&io::Error),
) {
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let _permit = permit;
        for result in fetch_blocks(&shared, &run).await {
            if let Err(e) = result {
                report(&e);
            }
        }
    });
}

/// Allocation of a range: overlay first, then the map (holes come straight from it).
pub(super) async fn block_status(
    shared: &Arc<Shared>,
    offset: u64,
    length: u64,
) -> io::Result<Vec<Extent>> {
    let s = Arc::clone(shared);
    blocking(move || {
        let bs = s.block_size();
        let end = offset + length;
        let first = offset / bs;
        let end_block = end.div_ceil(bs).min(first + STATUS_MAX_BLOCKS);
        let runs = s
            .map
            .lookups()
            .allocated_runs(first, end_block - first)
            .map_err(|e| map_error("block map lookup", e))?;
        let mut stored = vec![false; (end_block - first) as usize];
        for (start, len) in runs {
            for b in start..start + len {
                stored[(b - first) as usize] = true;
            }
        }
        let overlay = s.log.overlay();
        let mut extents: Vec<Extent> = Vec::new();
        for block in first..end_block {
            let data = overlay
                .state(block)
                .unwrap_or(stored[(block - first) as usize]);
            let kind = if data {
                ExtentKind::Data
            } else {
                ExtentKind::Hole
            };
            let from = (block * bs).max(offset);
            let to = ((block + 1) * bs).min(end);
            match extents.last_mut() {
                Some(last) if last.kind == kind => last.length += to - from,
                _ => extents.push(Extent {
                    length: to - from,
                    kind,
                }),
            }
        }
        Ok(extents)
    })
    .await
}

/// The stored content of blocks (the uploader's bases for partial writes); absent blocks are
/// zeros and left out.
pub(super) async fn stored_blocks(
    shared: &Arc<Shared>,
    blocks: Vec<u64>,
) -> io::Result<HashMap<u64, Bytes>> {
    if blocks.is_empty() {
        return Ok(HashMap::new());
    }
    let s = Arc::clone(shared);
    let wanted: Vec<StoredBlock> = blocking(move || {
        let map = s.map.lookups();
        let mut found = Vec::new();
        for block in blocks {
            if let Some(location) = map
                .get(block)
                .map_err(|e| map_error("block map lookup", e))?
            {
                found.push(StoredBlock { block, location });
            }
        }
        Ok(found)
    })
    .await?;
    let fetched = fetch_blocks(shared, &wanted).await;
    wanted
        .into_iter()
        .zip(fetched)
        .map(|(stored, data)| data.map(|d| (stored.block, d)))
        .collect()
}

/// `--hydrate`: pulls every stored block into the cache, a few at a time, pausing while
/// foreground reads miss the cache.
pub(super) async fn hydrate(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let started = Instant::now();
    let total_blocks = shared.size().div_ceil(shared.block_size());
    let slots = Arc::new(tokio::sync::Semaphore::new(HYDRATE_CONCURRENCY));
    let mut next = 0u64;
    let mut fetched = 0u64;
    while next < total_blocks {
        if *stop.borrow() {
            return;
        }
        let s = Arc::clone(&shared);
        let count = 4096.min(total_blocks - next);
        let missing = match blocking(move || missing_blocks(&s, next, count)).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("hydration lookup failed, retrying: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        for run in runs(missing) {
            let permit = tokio::select! {
                p = Arc::clone(&slots).acquire_owned() => p,
                _ = stop.changed() => return,
            };
            let Ok(permit) = permit else { return };
            fetched += run.len() as u64;
            fetch_in_background(&shared, run, permit, |e| {
                tracing::warn!("hydration fetch failed (will be fetched on demand): {e}")
            });
        }
        next += count;
        // Counted when the scan moves on; the last few GETs may still be in flight.
        shared
            .reads
            .counters
            .hydration_scanned
            .store(next, Ordering::Relaxed);
    }
    let _ = slots.acquire_many(HYDRATE_CONCURRENCY as u32).await;
    tracing::info!(
        volume = %shared.meta.name,
        blocks = fetched,
        seconds = started.elapsed().as_secs_f64(),
        "disk hydration complete"
    );
}
