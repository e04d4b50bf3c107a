//! Checking a volume against the store (`bucketdisk verify`): its block map (SQLite's own
//! integrity check, every row inside the volume, every referenced chunk present and long enough
//! for its blocks) and, deep, every referenced block read back and checked against its CRC;
//! chunks of the volume nothing references are reported as orphans.
//!
//! Read-only and lease-free, like `inspect`: the map is read through followers (the latest
//! state, and with `checkpoints` each checkpoint's own files), so a running server is not
//! disturbed. Memory stays bounded whatever the volume's size: the map is walked one chunk's
//! rows at a time, and a deep check holds a few chunks' bytes at once.

use super::checkpoints::{self, Checkpoint};
use super::helpers::{blocking, other};
use super::inspect::{self, Holder, MapView, Reading};
use super::{catalog, lines};
use crate::chunk_store::{ChunkStore, StoredBlock};
use crate::metadata::VolumeMetadata;
use blockmap::replica::{Layout, Replica};
use blockmap::{BlockLocation, RestoreTarget};
use futures::StreamExt;
use object_store::ObjectStore;
use object_store::path::Path;
use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex};

/// Chunks read at once by a deep check (each one ranged GET of up to a chunk's size).
const DEEP_READS: usize = 16;
/// Damaged blocks listed per state at most (all are counted).
const LISTED: usize = 10_000;

/// What to check.
#[derive(Clone, Default)]
pub struct VerifyOptions {
    /// Read every referenced block and check its CRC (and, for an encrypted volume, open it).
    pub deep: bool,
    /// Check every checkpoint's state too.
    pub checkpoints: bool,
    /// An encrypted volume's key: needed by `deep`, checked whenever given.
    pub key: Option<Arc<crate::sealing::VolumeKey>>,
}

/// A block that cannot be read back as the map says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DamagedBlock {
    /// Its byte offset in the volume.
    pub offset: u64,
    /// The chunk the map says holds it (`%016x`, as its object is named).
    pub chunk: String,
    pub problem: String,
}

/// One map state's check.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StateReport {
    /// `latest`, or `checkpoint NAME`.
    pub state: String,
    pub txid: u64,
    /// Blocks the state stores, and the chunks they are in.
    pub blocks: u64,
    pub chunks: u64,
    /// Problems of the map itself (SQLite's integrity check, rows past the volume's end).
    pub map_problems: Vec<String>,
    /// Referenced chunks the store does not have.
    pub missing_chunks: Vec<String>,
    /// Blocks lost or damaged: the first [`LISTED`], and how many in all.
    pub damaged_blocks: Vec<DamagedBlock>,
    pub damaged_total: u64,
    /// Blocks read back and checked (deep only).
    pub blocks_read: u64,
}

impl StateReport {
    fn damage(&mut self, block: u64, block_size: u32, chunk: u64, problem: String) {
        self.damaged_total += 1;
        if self.damaged_blocks.len() < LISTED {
            self.damaged_blocks.push(DamagedBlock {
                offset: block * u64::from(block_size),
                chunk: format!("{chunk:016x}"),
                problem,
            });
        }
    }

    pub fn is_damaged(&self) -> bool {
        !self.map_problems.is_empty() || self.damaged_total > 0
    }
}

/// A chunk object of the volume nothing references.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OrphanChunk {
    pub chunk: String,
    pub bytes: u64,
}

/// What `verify` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub volume: String,
    pub deep: bool,
    pub states: Vec<StateReport>,
    /// The volume's chunk objects no checked state, checkpoint or upload in flight uses (GC
    /// deletes them; they cost space, not data).
    pub orphaned_chunks: Vec<OrphanChunk>,
    pub orphaned_bytes: u64,
}

impl VerifyReport {
    /// Whether any state lost data or has a damaged map.
    pub fn is_damaged(&self) -> bool {
        self.states.iter().any(StateReport::is_damaged)
    }
}

/// Checks volume `name` (see the module). `progress(done, total)` counts chunks checked.
pub async fn verify(
    store: Arc<dyn ObjectStore>,
    prefix: &Path,
    layout: Layout,
    name: &str,
    options: VerifyOptions,
    progress: impl Fn(u64, u64) + Send + Sync,
) -> io::Result<VerifyReport> {
    let root = catalog::volume_root(prefix, name);
    let (meta, line, pinned, holder) = tokio::join!(
        catalog::load(store.as_ref(), prefix, name),
        lines::current(store.as_ref(), &root),
        checkpoints::list(store.as_ref(), prefix, name),
        inspect::holder(store.as_ref(), prefix, name)
    );
    let meta = catalog::require(meta?, name)?;
    let (line, pinned, holder) = (line?, pinned?, holder?);
    // A shallow check reads no block: it needs no key, but a key given must be the volume's.
    let sealer = match (options.deep, &options.key) {
        (false, None) => None,
        _ => super::open::sealer_for(&meta, options.key.as_deref())?,
    };
    let chunks = super::open::chunk_store(&store, prefix, &meta, sealer);
    let (readable, own) = tokio::join!(chunks.readable_objects(), chunks.own_objects());
    let (readable, own) = (readable?, own?);

    let mut states = vec![("latest".to_string(), None)];
    if options.checkpoints {
        states.extend(
            pinned
                .iter()
                .map(|c| (format!("checkpoint {}", c.name), Some(c))),
        );
    }
    let mut referenced: HashSet<u64> = pinned.iter().flat_map(|c| c.chunks.clone()).collect();
    let mut reports = Vec::new();
    for (label, checkpoint) in states {
        let replica = Arc::new(match checkpoint {
            None => lines::replica(&store, &root, layout, line.as_ref())?,
            Some(c) => lines::checkpoint_replica(&store, &root, layout, c)?,
        });
        let state = State {
            label,
            checkpoint,
            replica,
            db_name: format!("{root}#{}#verify#{}", meta.uuid, reports.len()),
        };
        let (report, known) =
            check_state(state, &meta, &chunks, &readable, options.deep, &progress).await?;
        referenced.extend(known);
        reports.push(report);
    }

    // Chunks of the writer's epoch may be uploads in flight, not yet in the map.
    let in_flight = match &holder {
        Holder::Held(lease) => Some(lease.epoch),
        _ => None,
    };
    let mut orphaned_chunks: Vec<OrphanChunk> = own
        .into_iter()
        .filter(|(id, _)| !referenced.contains(id) && in_flight != Some(id >> 32))
        .map(|(id, bytes)| OrphanChunk {
            chunk: format!("{id:016x}"),
            bytes,
        })
        .collect();
    orphaned_chunks.sort_by(|a, b| a.chunk.cmp(&b.chunk));
    Ok(VerifyReport {
        volume: name.to_string(),
        deep: options.deep,
        states: reports,
        orphaned_bytes: orphaned_chunks.iter().map(|o| o.bytes).sum(),
        orphaned_chunks,
    })
}

/// One map state to check.
struct State<'a> {
    label: String,
    checkpoint: Option<&'a Checkpoint>,
    replica: Arc<Replica>,
    db_name: String,
}

/// Checks one state; also returns every chunk its map knows (dead ones included: GC owns them).
async fn check_state(
    state: State<'_>,
    meta: &VolumeMetadata,
    chunks: &ChunkStore,
    readable: &HashMap<u64, u64>,
    deep: bool,
    progress: &(impl Fn(u64, u64) + Send + Sync),
) -> io::Result<(StateReport, Vec<u64>)> {
    let mut report = StateReport {
        state: state.label,
        ..StateReport::default()
    };
    if state.checkpoint.is_some_and(|c| c.txid == 0) {
        return Ok((report, Vec::new()));
    }
    let target = state
        .checkpoint
        .map_or(RestoreTarget::Latest, |c| RestoreTarget::Txid(c.txid));
    // Every row is walked: the map's files downloaded whole cost a GET each, where reading
    // its pages as the walk needs them costs one per page.
    let Some(view) =
        MapView::open_reading(state.replica, &state.db_name, target, Reading::Whole).await?
    else {
        return Ok((report, Vec::new()));
    };
    report.txid = view.txid;
    let size = meta.size;
    let block_size = meta.block_size;
    // The map's own checks, on a blocking thread.
    let (view, map_problems, referenced, known) = blocking(move || {
        let map = &view.map;
        let query = |e| other("querying the block map", e);
        let mut problems = map.integrity_problems().map_err(query)?;
        let size = super::recorded_size(map).map_err(query)?.unwrap_or(size);
        let (past_end, first) = map
            .blocks_from(size.div_ceil(u64::from(block_size)), 1)
            .map_err(query)?;
        if past_end > 0 {
            problems.push(format!(
                "{past_end} block(s) stored past the volume's end ({size} bytes), the first at \
                 byte {}",
                first[0] * u64::from(block_size)
            ));
        }
        let referenced = map.referenced_chunk_ids().map_err(query)?;
        let known = map.chunk_ids().map_err(query)?;
        Ok((Arc::new(Mutex::new(view)), problems, referenced, known))
    })
    .await?;
    report.map_problems = map_problems;
    report.chunks = referenced.len() as u64;
    let total = referenced.len() as u64;
    let done = std::sync::atomic::AtomicU64::new(0);

    // Each referenced chunk: its rows, present and long enough; read back when deep.
    let checks = futures::stream::iter(referenced.iter().copied())
        .map(|chunk| {
            let view = Arc::clone(&view);
            let done = &done;
            async move {
                let rows = blocking(move || {
                    let guard = view.lock().unwrap_or_else(|e| e.into_inner());
                    guard
                        .map
                        .blocks_in_chunk(chunk)
                        .map_err(|e| other("querying the block map", e))
                })
                .await?;
                // A task of its own: the body's bytes and their CRCs are worked on by the
                // runtime's threads, not all by the one driving this stream.
                let size = readable.get(&chunk).copied();
                let chunks = chunks.clone();
                let found = tokio::spawn(check_chunk(chunk, rows, size, chunks, deep))
                    .await
                    .map_err(|e| other("checking a chunk", e))?;
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                progress(n, total);
                Ok::<_, io::Error>(found)
            }
        })
        .buffer_unordered(if deep { DEEP_READS } else { 4 });
    let results: Vec<io::Result<ChunkFindings>> = checks.collect().await;
    for found in results {
        let found = found?;
        report.blocks += found.blocks;
        report.blocks_read += found.blocks_read;
        if found.missing {
            report.missing_chunks.push(format!("{:016x}", found.chunk));
        }
        for (block, problem) in found.damaged {
            report.damage(block, block_size, found.chunk, problem);
        }
    }
    report.missing_chunks.sort();
    report.damaged_blocks.sort_by_key(|d| d.offset);
    drop(view);
    Ok((report, known))
}

/// What checking one chunk found.
struct ChunkFindings {
    chunk: u64,
    blocks: u64,
    blocks_read: u64,
    missing: bool,
    /// (block, problem)
    damaged: Vec<(u64, String)>,
}

/// Checks `rows` (the blocks the map keeps in `chunk`) against the chunk's object; reads them
/// back when `deep`.
async fn check_chunk(
    chunk: u64,
    mut rows: Vec<(u64, BlockLocation)>,
    size: Option<u64>,
    chunks: ChunkStore,
    deep: bool,
) -> ChunkFindings {
    let mut found = ChunkFindings {
        chunk,
        blocks: rows.len() as u64,
        blocks_read: 0,
        missing: false,
        damaged: Vec::new(),
    };
    let Some(size) = size else {
        found.missing = true;
        found.damaged = rows
            .iter()
            .map(|(block, _)| {
                (
                    *block,
                    format!("chunk {chunk:016x} is missing from the store"),
                )
            })
            .collect();
        return found;
    };
    rows.retain(|(block, location)| {
        let end = location.offset + u64::from(location.length);
        if end <= size {
            return true;
        }
        found.damaged.push((
            *block,
            format!("its bytes end at {end}, past the chunk's end ({size} bytes)"),
        ));
        false
    });
    if !deep || rows.is_empty() {
        return found;
    }
    // Each block is checked as the chunk's bytes stream in, and only its verdict is kept:
    // memory stays at a block or two whatever the chunk's size. Each is checked as the block
    // the map says it is (a sealed block opens as that block only), so rows pointing many
    // blocks at the same bytes are each checked, for the price of the CPU only.
    rows.sort_by_key(|&(block, location)| (location.offset, block));
    let stored: Vec<StoredBlock> = rows
        .iter()
        .map(|&(block, location)| StoredBlock { block, location })
        .collect();
    match chunks.check_run(&stored).await {
        Ok(verdicts) => {
            let mut damaged: HashMap<u64, String> = HashMap::new();
            for (checked, verdict) in stored.iter().zip(verdicts) {
                if let Some(problem) = verdict {
                    damaged.insert(checked.block, problem);
                }
            }
            confirm_damage(&chunks, &stored, &mut damaged).await;
            for checked in &stored {
                found.blocks_read += 1;
                if let Some(problem) = damaged.get(&checked.block) {
                    found.damaged.push((checked.block, problem.clone()));
                }
            }
        }
        Err(e) => {
            for (block, _) in &rows {
                found.damaged.push((*block, format!("cannot be read: {e}")));
            }
        }
    }
    found
}

/// Reads the blocks found damaged again (one more GET for the chunk): bytes damaged on the way
/// (a flaky network or store front end) are not damage at rest, and `verify` must not report
/// them as such.
async fn confirm_damage(
    chunks: &ChunkStore,
    checked: &[StoredBlock],
    damaged: &mut HashMap<u64, String>,
) {
    let suspects: Vec<StoredBlock> = checked
        .iter()
        .filter(|s| damaged.contains_key(&s.block))
        .copied()
        .collect();
    let Ok(again) = chunks.check_run(&suspects).await else {
        return;
    };
    for (suspect, verdict) in suspects.iter().zip(again) {
        if verdict.is_none() {
            tracing::warn!(
                "chunk {:016x} at {}: damaged when first read, whole when read again (damage \
                 on the way, not in the store)",
                suspect.location.chunk,
                suspect.location.offset
            );
            damaged.remove(&suspect.block);
        }
    }
}
