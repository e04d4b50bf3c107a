//! Packing blocks into chunks: a [`ChunkWriter`] takes block contents, builds 24 MiB chunks
//! (`--chunk-size`) on the low-priority thread, PUTs each as it fills (create-only, a couple in
//! flight) and collects the map changes that point at them for one commit. Uploads and GC's
//! rewrites of sparse chunks both write through it.

use super::Shared;
use super::helpers::other;
use crate::cache::{CacheInsert, CacheKey};
use crate::chunk::ChunkBuilder;
use crate::chunk_store::StoredBlock;
use blockmap::{BlockLocation, MapChange};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::task::JoinSet;

/// Chunk PUTs in flight per upload.
const PUT_CONCURRENCY: usize = 2;

/// Ids for the chunks this process writes: its writer lease epoch in the high 32 bits (never
/// reused, so ids are unique across writers and restarts), a counter in the low ones.
pub(super) struct ChunkIds {
    epoch: u64,
    next: AtomicU64,
}

impl ChunkIds {
    pub(super) fn new(lease_epoch: u64) -> Self {
        ChunkIds {
            epoch: lease_epoch,
            next: AtomicU64::new(0),
        }
    }

    fn next(&self) -> u64 {
        (self.epoch << 32) | self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether chunk `id` was written under an earlier lease (by a writer before this one).
    pub(super) fn is_older(&self, id: u64) -> bool {
        id >> 32 < self.epoch
    }
}

/// Builds chunks from block contents and PUTs them as they fill, two at a time; the map changes
/// that point at them are collected for one commit.
pub(super) struct ChunkWriter {
    /// `None` only while a batch is being packed on the background thread.
    packer: Option<Packer>,
    puts: JoinSet<io::Result<()>>,
    written: Written,
}

/// What a [`ChunkWriter`] stored.
#[derive(Default)]
pub(super) struct Written {
    /// `(chunk, bytes)` of every chunk PUT.
    pub new_chunks: Vec<(u64, u64)>,
    /// Where the blocks now live; all-zero blocks are deletions.
    pub changes: Vec<MapChange>,
    /// Cache keys of the blocks' previous versions: dead once the changes commit.
    pub retired: Vec<CacheKey>,
    pub chunk_bytes: u64,
}

/// Block contents for a [`ChunkWriter`]: `(block, content)`, `None` for a block left as is.
type Contents = Vec<(u64, Option<Vec<u8>>)>;

impl ChunkWriter {
    pub fn new(shared: &Shared) -> io::Result<Self> {
        Ok(ChunkWriter {
            packer: Some(Packer::new(shared)?),
            puts: JoinSet::new(),
            written: Written::default(),
        })
    }

    /// Runs `produce` and packs what it returns on the uploader's low-priority thread (building
    /// contents reads the journal, packing compresses and writes the cache), then starts the
    /// PUTs of the chunks that filled.
    pub async fn add(
        &mut self,
        shared: &Arc<Shared>,
        produce: impl FnOnce() -> io::Result<Contents> + Send + 'static,
    ) -> io::Result<()> {
        let mut packer = self
            .packer
            .take()
            .ok_or_else(|| io::Error::other("internal: chunk writer used after a failure"))?;
        let s = Arc::clone(shared);
        let mut packer = shared
            .background
            .run(move || {
                let contents = produce()?;
                let mut to_cache = Vec::with_capacity(contents.len());
                for (block, data) in &contents {
                    if let Some(data) = data {
                        if let Some(insert) = packer.add(&s, *block, data)? {
                            to_cache.push(insert);
                        }
                    }
                }
                // Just written means likely read soon: keep the batch in the cache, in one go.
                if let Err(e) = s.cache.insert_batch(&to_cache) {
                    tracing::debug!("cannot cache uploaded blocks: {e}");
                }
                Ok(packer)
            })
            .await?;
        self.written
            .changes
            .extend(packer.holes.drain(..).map(|block| MapChange::Delete {
                first: block,
                count: 1,
            }));
        self.written.retired.append(&mut packer.retired);
        let sealed = std::mem::take(&mut packer.sealed);
        self.packer = Some(packer);
        for (id, full) in sealed {
            self.seal(shared, id, full).await?;
        }
        Ok(())
    }

    /// Seals the last chunk and waits for every PUT.
    pub async fn finish(mut self, shared: &Arc<Shared>) -> io::Result<Written> {
        if let Some(packer) = self.packer.take() {
            if !packer.builder.is_empty() {
                self.seal(shared, packer.chunk_id, packer.builder).await?;
            }
        }
        while let Some(done) = self.puts.join_next().await {
            done.map_err(|e| other("chunk upload task", e))??;
        }
        Ok(self.written)
    }

    /// Finishes a chunk and starts its PUT (waiting while `PUT_CONCURRENCY` are in flight).
    async fn seal(
        &mut self,
        shared: &Arc<Shared>,
        id: u64,
        builder: ChunkBuilder,
    ) -> io::Result<()> {
        let (bytes, entries) = builder.finish();
        self.written.new_chunks.push((id, bytes.len() as u64));
        self.written.chunk_bytes += bytes.len() as u64;
        self.written
            .changes
            .extend(entries.iter().map(|e| MapChange::Put {
                block: e.block,
                location: BlockLocation {
                    chunk: id,
                    offset: e.offset,
                    length: e.length,
                    checksum: e.checksum,
                },
            }));
        while self.puts.len() >= PUT_CONCURRENCY {
            if let Some(done) = self.puts.join_next().await {
                done.map_err(|e| other("chunk upload task", e))??;
            }
        }
        let shared = Arc::clone(shared);
        self.puts.spawn(async move {
            shared.chunks.put(id, bytes).await?;
            shared.uploads.health.progress();
            Ok(())
        });
        Ok(())
    }
}

/// Packs materialised blocks into chunks of the configured size.
struct Packer {
    builder: ChunkBuilder,
    chunk_id: u64,
    /// Chunks that reached the target size, to be PUT.
    sealed: Vec<(u64, ChunkBuilder)>,
    /// Blocks whose content is all zeros: not stored, they become holes.
    holes: Vec<u64>,
    /// Cache keys of the packed blocks' previous versions: dead once this upload commits.
    retired: Vec<CacheKey>,
}

impl Packer {
    fn new(shared: &Shared) -> io::Result<Self> {
        let chunk_id = shared.chunk_ids.next();
        Ok(Packer {
            builder: builder_for(shared, chunk_id)?,
            chunk_id,
            sealed: Vec::new(),
            holes: Vec::new(),
            retired: Vec::new(),
        })
    }

    /// Packs one block; what to write into the cache for it (`None`: all zeros, a hole).
    fn add<'a>(
        &mut self,
        shared: &Shared,
        block: u64,
        data: &'a [u8],
    ) -> io::Result<Option<CacheInsert<'a>>> {
        // The block's previous version (if cached) is dead once this upload commits. It stays
        // in the cache until then: a read that merges an edit not yet uploaded with the stored
        // block needs it, and a miss would cost a store round trip per read.
        if let Some(old) = shared
            .map
            .locations
            .get_range(block, 1)
            .and_then(|found| found.first().copied().flatten())
            // An ancestor's block may still be read by the ancestor, or other clones, from
            // a cache they share: left to eviction.
            && !shared.chunks.is_inherited(old.chunk)
        {
            self.retired.push(shared.chunks.cache_key(&StoredBlock {
                block,
                location: old,
            }));
        }
        if crate::zeros::is_zero(data) {
            self.holes.push(block);
            return Ok(None);
        }
        let added = self
            .builder
            .add_block(block, data)
            .map_err(|e| other("building a chunk", e))?;
        // The chunk key is valid for the cache as soon as the chunk exists, and harmless before
        // (chunk ids are never reused).
        let insert = CacheInsert {
            key: CacheKey {
                owner: shared.chunks.owner_of(self.chunk_id),
                chunk: self.chunk_id,
                offset: added.entry.offset,
                block,
            },
            checksum: added.entry.checksum,
            content_checksum: added.content_checksum,
            data,
        };
        if self.builder.len() >= shared.config.chunk_bytes {
            let next = shared.chunk_ids.next();
            let full = std::mem::replace(&mut self.builder, builder_for(shared, next)?);
            let id = std::mem::replace(&mut self.chunk_id, next);
            self.sealed.push((id, full));
        }
        Ok(Some(insert))
    }
}

/// A builder for chunk `chunk`: an encrypted volume's seals every block for its place.
fn builder_for(shared: &Shared, chunk: u64) -> io::Result<ChunkBuilder> {
    let block_size = shared.meta.block_size;
    Ok(match shared.chunks.chunk_seal(chunk)? {
        None => ChunkBuilder::new(block_size),
        Some(seal) => ChunkBuilder::sealed(block_size, seal),
    })
}
