//! Chunks in object storage: `<volume>/chunks/<id as %016x>`, written once and never
//! overwritten, read as runs of neighbouring blocks with one ranged GET each, every block
//! verified against the block map's checksum (invariant I5: a mismatch is an error, never data).

use crate::cache::CacheKey;
use crate::chunk::{CheckScratch, Opening, check_block, decode_block_bytes, decode_sealed_block};
use crate::device::DeviceError;
use crate::sealing::{BlockSealer, ChunkSeal, Place};
use blockmap::BlockLocation;
use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{GetOptions, ObjectStore, ObjectStoreExt};
use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::sync::Arc;
use stores::retry::{Created, create_only, get_whole, with_retries};

/// A block of the disk and where the block map says its bytes are stored: what reading it from
/// the store needs (a sealed block opens only as the block it was written for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredBlock {
    pub block: u64,
    pub location: BlockLocation,
}

impl StoredBlock {
    fn opening<'a>(&self, seal: &'a ChunkSeal) -> Opening<'a> {
        Opening {
            seal,
            place: Place {
                block: self.block,
                offset: self.location.offset,
            },
        }
    }
}

#[derive(Clone)]
pub struct ChunkStore {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    block_size: u32,
    /// Tag of the volume these chunks are written by, in cache keys (see [`owner_tag`]).
    owner: u64,
    /// A clone's inherited chunks, oldest ancestor first: ids whose epoch is at most the bound
    /// (and above the previous one's) live in that directory. Never written or deleted here.
    inherited: Vec<InheritedChunks>,
    /// An encrypted volume's sealer (its ancestors share its key).
    sealer: Option<Arc<BlockSealer>>,
}

#[derive(Clone)]
struct InheritedChunks {
    dir: Path,
    through_epoch: u64,
    owner: u64,
}

/// The tag of a volume's identity (its uuid, or for volumes made before they had one, its root
/// in the store) that cache keys carry: stable across processes, as the cache's index is.
pub fn owner_tag(identity: &str) -> u64 {
    const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
    CRC64.checksum(identity.as_bytes())
}

fn to_io(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// A store error as an I/O error whose kind says what retrying can do: `NotFound` (the object,
/// or for a PUT the bucket, is not there) and `PermissionDenied` (credentials or policy) are
/// answers, everything else may be transient.
fn store_error(what: &str, e: object_store::Error) -> io::Error {
    let kind = match &e {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("{what}: {e}"))
}

/// A failed read of stored blocks, as the device reports it: a chunk the map points at and the
/// store does not have is corrupt (I5 says never data, and it will not come back); any other
/// failure left after the retries means the store is unavailable.
fn read_error(what: &str, e: object_store::Error) -> io::Error {
    match e {
        // NotFound, so a read that looked the block up just before garbage collection
        // deleted its chunk looks it up again; should the map still point there, the volume
        // is damaged, which is what the carried error says.
        object_store::Error::NotFound { .. } => io::Error::new(
            io::ErrorKind::NotFound,
            DeviceError::Corrupt(format!("{what}: the chunk is missing from the store: {e}")),
        ),
        e => DeviceError::StoreUnavailable(format!("{what}: {e}")).into_io(),
    }
}

impl ChunkStore {
    /// Chunks of the volume whose objects live under `volume_prefix`.
    pub fn new(store: Arc<dyn ObjectStore>, volume_prefix: &Path, block_size: u32) -> Self {
        ChunkStore {
            store,
            prefix: volume_prefix.clone().join("chunks"),
            block_size,
            owner: owner_tag(volume_prefix.as_ref()),
            inherited: Vec::new(),
            sealer: None,
        }
    }

    /// The chunk store of an encrypted volume: every block is opened with `sealer`.
    pub fn sealed_by(mut self, sealer: Option<Arc<BlockSealer>>) -> Self {
        self.sealer = sealer;
        self
    }

    /// The seal of chunk `chunk`'s blocks (`None` for a plain volume): derived once for a run
    /// of blocks, which lies in one chunk.
    pub fn chunk_seal(&self, chunk: u64) -> io::Result<Option<ChunkSeal>> {
        self.sealer
            .as_deref()
            .map(|sealer| sealer.for_chunk(self.owner_of(chunk), chunk))
            .transpose()
            .map_err(io::Error::other)
    }

    /// The tag of the volume whose chunks these are, for cache keys (by default its root's).
    pub fn owned_by(mut self, owner: u64) -> Self {
        self.owner = owner;
        self
    }

    /// A clone's chunk store: ids of epoch at most `through_epoch` of each `(volume root,
    /// through_epoch, owner tag)`, oldest first, are read from that volume's chunks.
    pub fn inheriting(mut self, from: Vec<(Path, u64, u64)>) -> Self {
        self.inherited = from
            .into_iter()
            .map(|(root, through_epoch, owner)| InheritedChunks {
                dir: root.join("chunks"),
                through_epoch,
                owner,
            })
            .collect();
        self
    }

    /// Whether chunk `id` belongs to an ancestor (a clone never writes or deletes those).
    pub fn is_inherited(&self, chunk: u64) -> bool {
        self.inherited
            .last()
            .is_some_and(|i| chunk >> 32 <= i.through_epoch)
    }

    /// The ancestor chunk `id` belongs to, if any.
    fn ancestor(&self, chunk: u64) -> Option<&InheritedChunks> {
        self.inherited
            .iter()
            .find(|i| chunk >> 32 <= i.through_epoch)
    }

    pub fn path(&self, chunk: u64) -> Path {
        let dir = self.ancestor(chunk).map_or(&self.prefix, |i| &i.dir);
        dir.clone().join(format!("{chunk:016x}"))
    }

    /// The tag of the volume that wrote chunk `id`.
    pub fn owner_of(&self, chunk: u64) -> u64 {
        self.ancestor(chunk).map_or(self.owner, |i| i.owner)
    }

    /// The cache key of `stored`: the same in every volume that reads its chunk (a clone and
    /// its parent), so they share cached blocks.
    pub fn cache_key(&self, stored: &StoredBlock) -> CacheKey {
        CacheKey {
            owner: self.owner_of(stored.location.chunk),
            chunk: stored.location.chunk,
            offset: stored.location.offset,
            block: stored.block,
        }
    }

    /// Uploads a chunk create-only, retrying transient failures. A retry that finds the object
    /// already there checks it is ours (a lost response to a PUT that succeeded); anything else
    /// under this id is an error: chunk keys are never written twice.
    pub async fn put(&self, chunk: u64, bytes: Bytes) -> io::Result<()> {
        let path = self.path(chunk);
        let created = create_only(self.store.as_ref(), &path, bytes.clone(), "upload chunk")
            .await
            .map_err(|e| store_error(&format!("upload chunk {path}"), e))?;
        match created {
            Created::Stored => Ok(()),
            // Also `Taken`: an upload step retried after its PUT's reply was lost uses the
            // same chunk id again.
            Created::Taken | Created::TakenAfterFailure if self.fetch(chunk).await? == bytes => {
                Ok(())
            }
            Created::Taken | Created::TakenAfterFailure => Err(to_io(
                &format!("chunk {path}"),
                "a different object already exists",
            )),
        }
    }

    /// A whole chunk (GC rewrites, recovery).
    pub async fn fetch(&self, chunk: u64) -> io::Result<Bytes> {
        let path = self.path(chunk);
        get_whole(self.store.as_ref(), &path, "fetch chunk")
            .await
            .map_err(|e| store_error(&format!("fetch chunk {path}"), e))
    }

    /// The bytes of one chunk from the first block of `run` to the end of its last, in one
    /// ranged GET. `run` is sorted by offset and lies in one chunk (see `fetch::runs`); the
    /// blocks between its members, if any, come along and are dropped by [`Self::decode_run`].
    pub async fn read_span(&self, run: &[StoredBlock]) -> io::Result<Bytes> {
        let Some((path, range)) = self.span_of(run)? else {
            return Ok(Bytes::new());
        };
        let payload = with_retries("read block", || self.store.get_range(&path, range.clone()))
            .await
            .map_err(|e| read_error(&format!("read {path} {range:?}"), e))?;
        if payload.len() as u64 != range.end - range.start {
            return Err(DeviceError::Corrupt(format!(
                "read {path} {range:?}: the store returned {} bytes",
                payload.len()
            ))
            .into_io());
        }
        Ok(payload)
    }

    /// The object and byte range one ranged GET of `run` reads (none for an empty run).
    fn span_of(&self, run: &[StoredBlock]) -> io::Result<Option<(Path, Range<u64>)>> {
        let (Some(first), Some(last)) = (run.first(), run.last()) else {
            return Ok(None);
        };
        let (first, last) = (first.location, last.location);
        if run.iter().any(|s| s.location.chunk != first.chunk) || last.offset < first.offset {
            return Err(io::Error::other(
                "internal: a ranged read spans more than one chunk or is not sorted",
            ));
        }
        let end = run
            .iter()
            .map(|s| s.location.offset + u64::from(s.location.length))
            .max();
        Ok(Some((
            self.path(first.chunk),
            first.offset..end.unwrap_or(first.offset),
        )))
    }

    /// Checks every block of `run` (as for [`Self::read_span`]) as its bytes arrive, keeping
    /// only a verdict each (`None`: it decodes and matches its checksum). Memory stays at a
    /// block or two however long the span, and no buffer the size of the span is filled: a
    /// deep verify reads whole volumes this way. A GET that fails or ends early is retried.
    pub async fn check_run(&self, run: &[StoredBlock]) -> io::Result<Vec<Option<String>>> {
        let Some((path, range)) = self.span_of(run)? else {
            return Ok(Vec::new());
        };
        let seal = self.chunk_seal(run[0].location.chunk)?;
        with_retries("check blocks", || {
            self.check_run_once(&path, range.clone(), run, seal.as_ref())
        })
        .await
        .map_err(|e| read_error(&format!("read {path} {range:?}"), e))
    }

    async fn check_run_once(
        &self,
        path: &Path,
        range: Range<u64>,
        run: &[StoredBlock],
        seal: Option<&ChunkSeal>,
    ) -> object_store::Result<Vec<Option<String>>> {
        let options = GetOptions {
            range: Some(range.clone().into()),
            ..GetOptions::default()
        };
        let mut body = self.store.get_opts(path, options).await?.into_stream();
        let short = |at: u64| object_store::Error::Generic {
            store: "chunks",
            source: format!("{path}: the body of {range:?} ended at byte {at}").into(),
        };
        // The body's pieces a block still needs, each with its offset in the object; a block
        // inside one piece is checked in place, one across pieces is gathered into `joined`.
        let mut pieces: VecDeque<(u64, Bytes)> = VecDeque::new();
        let mut received = range.start;
        let (mut joined, mut scratch) = (Vec::new(), CheckScratch::default());
        let mut verdicts = Vec::with_capacity(run.len());
        for stored in run {
            let location = &stored.location;
            let (start, end) = (
                location.offset,
                location.offset + u64::from(location.length),
            );
            while received < end {
                let piece = body.next().await.ok_or_else(|| short(received))??;
                let length = piece.len() as u64;
                pieces.push_back((received, piece));
                received += length;
            }
            // Runs are sorted by offset: what ends before this block is not needed again.
            while pieces
                .front()
                .is_some_and(|(at, piece)| at + piece.len() as u64 <= start)
            {
                pieces.pop_front();
            }
            let payload: &[u8] = match pieces.front() {
                Some((at, piece)) if at + piece.len() as u64 >= end => {
                    &piece[(start - at) as usize..(end - at) as usize]
                }
                _ => {
                    joined.clear();
                    for (at, piece) in &pieces {
                        let from = start.saturating_sub(*at) as usize;
                        let to = (end - at).min(piece.len() as u64) as usize;
                        if from < to {
                            joined.extend_from_slice(&piece[from..to]);
                        }
                    }
                    &joined
                }
            };
            verdicts.push(
                check_block(
                    payload,
                    self.block_size,
                    location.checksum,
                    seal.map(|seal| stored.opening(seal)),
                    &mut scratch,
                )
                .err()
                .map(|e| format!("{path} at {start}: {e}")),
            );
        }
        // Read to the end: the body's length is checked, and its connection can be reused.
        while let Some(piece) = body.next().await {
            received += piece?.len() as u64;
        }
        if received != range.end {
            return Err(short(received));
        }
        Ok(verdicts)
    }

    /// Each block of `run` cut from `span` (what [`Self::read_span`] returned for it), decoded
    /// and verified on its own: a damaged block is an error for that block only, and the run
    /// fails as a whole only when its chunk's seal cannot be made.
    pub fn decode_run(
        &self,
        run: &[StoredBlock],
        span: &Bytes,
    ) -> io::Result<Vec<io::Result<Bytes>>> {
        let base = run.first().map_or(0, |s| s.location.offset);
        let seal = match run.first() {
            Some(first) => self.chunk_seal(first.location.chunk)?,
            None => None,
        };
        Ok(run
            .iter()
            .map(|stored| {
                let location = &stored.location;
                let path = self.path(location.chunk);
                let start = (location.offset - base) as usize;
                let end = start + location.length as usize;
                let payload = (end <= span.len())
                    .then(|| span.slice(start..end))
                    .ok_or_else(|| {
                        io::Error::other(format!("{path} at {}: outside the read", location.offset))
                    })?;
                // Whatever does not decode (checksum, framing, compression) is corrupt.
                let decoded = match &seal {
                    None => decode_block_bytes(payload, self.block_size, location.checksum),
                    Some(seal) => decode_sealed_block(
                        &payload,
                        self.block_size,
                        location.checksum,
                        stored.opening(seal),
                    ),
                };
                decoded.map_err(|e| {
                    DeviceError::Corrupt(format!("{path} at {}: {e}", location.offset)).into_io()
                })
            })
            .collect())
    }

    /// Ids of every chunk object of this volume's own in the store.
    pub async fn list(&self) -> io::Result<Vec<u64>> {
        Ok(self
            .own_objects()
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// This volume's own chunk objects, as `(id, size)`.
    pub async fn own_objects(&self) -> io::Result<Vec<(u64, u64)>> {
        self.objects_in(&self.prefix).await
    }

    /// Every chunk object this volume can read, own and inherited (each ancestor's ids in its
    /// range only), as id → size.
    pub async fn readable_objects(&self) -> io::Result<std::collections::HashMap<u64, u64>> {
        let mut all: std::collections::HashMap<u64, u64> =
            self.own_objects().await?.into_iter().collect();
        all.retain(|id, _| !self.is_inherited(*id));
        for ancestor in &self.inherited {
            for (id, size) in self.objects_in(&ancestor.dir).await? {
                if self.ancestor(id).is_some_and(|a| a.dir == ancestor.dir) {
                    all.insert(id, size);
                }
            }
        }
        Ok(all)
    }

    async fn objects_in(&self, dir: &Path) -> io::Result<Vec<(u64, u64)>> {
        use futures::TryStreamExt;
        let objects: Vec<_> = with_retries("list chunks", || {
            self.store.list(Some(dir)).try_collect::<Vec<_>>()
        })
        .await
        .map_err(|e| store_error("list chunks", e))?;
        Ok(objects
            .iter()
            .filter_map(|meta| {
                let id = u64::from_str_radix(meta.location.filename()?, 16).ok()?;
                Some((id, meta.size))
            })
            .collect())
    }

    /// Deletes one of this volume's chunks; an inherited one is left alone.
    pub async fn delete(&self, chunk: u64) -> io::Result<()> {
        if self.is_inherited(chunk) {
            return Ok(());
        }
        let path = self.path(chunk);
        match with_retries("delete chunk", || self.store.delete(&path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_error("delete chunk", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkBuilder;
    use object_store::local::LocalFileSystem;
    use stores::faulty::FaultyStore;

    /// Block `block` of the disk at `location`, as `fetch` reads it: a run of one.
    async fn read_block(
        chunks: &ChunkStore,
        block: u64,
        location: &BlockLocation,
    ) -> io::Result<Vec<u8>> {
        let run = [StoredBlock {
            block,
            location: *location,
        }];
        let span = chunks.read_span(&run).await?;
        chunks.decode_run(&run, &span)?.remove(0).map(Vec::from)
    }

    fn stored(block: u64, location: BlockLocation) -> StoredBlock {
        StoredBlock { block, location }
    }

    #[tokio::test]
    async fn blocks_round_trip_and_bad_checksums_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let local = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).expect("store"));
        let faulty = Arc::new(FaultyStore::new(local));
        let chunks = ChunkStore::new(Arc::clone(&faulty) as _, &Path::from("disk"), 4096);
        let mut builder = ChunkBuilder::new(4096);
        let blocks: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 4096]).collect();
        let entries: Vec<_> = blocks
            .iter()
            .enumerate()
            .map(|(i, b)| builder.add(i as u64, b).expect("add"))
            .collect();
        let (bytes, _) = builder.finish();
        faulty.fail_next(2);
        chunks
            .put(1, bytes.clone())
            .await
            .expect("upload despite failures");
        assert!(
            chunks.put(1, Bytes::from_static(b"other")).await.is_err(),
            "never overwritten"
        );
        for (e, b) in entries.iter().zip(&blocks) {
            let loc = BlockLocation {
                chunk: 1,
                offset: e.offset,
                length: e.length,
                checksum: e.checksum,
            };
            assert_eq!(&read_block(&chunks, e.block, &loc).await.expect("read"), b);
        }
        let e = entries[3];
        let wrong = BlockLocation {
            chunk: 1,
            offset: e.offset,
            length: e.length,
            checksum: e.checksum ^ 1,
        };
        let err = read_block(&chunks, 3, &wrong)
            .await
            .expect_err("checksum mismatch");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        chunks.delete(1).await.expect("delete");
        chunks.delete(1).await.expect("deleting twice is fine");
    }

    /// Sealed blocks whose map rows are made to match what lies at their place (as a store
    /// that rewrote both chunk and map could): only the seal stands between them and wrong data.
    #[tokio::test]
    async fn a_sealed_block_moved_with_a_matching_checksum_still_does_not_open() {
        use crate::sealing::{Encryption, VolumeKey};
        let dir = tempfile::tempdir().expect("tempdir");
        let local = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).expect("store"));
        let key = VolumeKey::parse(&[3u8; 32]).expect("key");
        let sealer = Arc::new(
            Encryption::new(&key)
                .expect("record")
                .sealer("disk", Some(&key))
                .expect("sealer"),
        );
        let chunks = ChunkStore::new(local as _, &Path::from("disk"), 4096)
            .sealed_by(Some(Arc::clone(&sealer)));
        let seal = sealer.for_chunk(chunks.owner_of(1), 1).expect("chunk seal");
        let mut builder = ChunkBuilder::sealed(4096, seal);
        let noise = |seed: u64| -> Vec<u8> {
            let mut x = seed | 1;
            (0..4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        let (a, b) = (noise(1), noise(2));
        let (ea, eb) = (
            builder.add(0, &a).expect("add"),
            builder.add(1, &b).expect("add"),
        );
        assert_eq!(ea.length, eb.length);
        let (bytes, _) = builder.finish();
        let at = |e: &crate::chunk::ChunkEntry| {
            e.offset as usize..(e.offset + u64::from(e.length)) as usize
        };
        let location = |chunk: u64, offset: u64, payload: &[u8]| BlockLocation {
            chunk,
            offset,
            length: payload.len() as u32,
            checksum: crate::chunk::block_checksum(payload),
        };
        let mut swapped = bytes.to_vec();
        swapped[at(&ea)].copy_from_slice(&bytes[at(&eb)]);
        swapped[at(&eb)].copy_from_slice(&bytes[at(&ea)]);
        chunks.put(1, bytes.clone()).await.expect("put");
        chunks.put(2, Bytes::from(swapped)).await.expect("put");
        chunks.put(3, bytes.clone()).await.expect("put");
        let good = location(1, ea.offset, &bytes[at(&ea)]);
        assert_eq!(read_block(&chunks, 0, &good).await.expect("read"), a);
        // Swapped within a chunk, the same bytes under another chunk id, or block 0's bytes
        // given to block 1 by its map row (checksum and all).
        for (block, moved) in [
            (0, location(2, ea.offset, &bytes[at(&eb)])),
            (0, location(3, ea.offset, &bytes[at(&ea)])),
            (1, good),
        ] {
            let err = read_block(&chunks, block, &moved)
                .await
                .expect_err("moved block");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(err.to_string().contains("does not authenticate"), "{err}");
            let verdicts = chunks
                .check_run(&[stored(block, moved)])
                .await
                .expect("check");
            assert!(verdicts[0].is_some(), "a deep verify reports it too");
        }
        assert_eq!(
            chunks.check_run(&[stored(0, good)]).await.expect("check"),
            vec![None]
        );
    }

    #[tokio::test]
    async fn a_run_is_one_get_and_each_block_is_verified_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let local = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).expect("store"));
        let counted = Arc::new(stores::counting::CountingStore::new(local));
        let chunks = ChunkStore::new(Arc::clone(&counted) as _, &Path::from("disk"), 4096);
        let mut builder = ChunkBuilder::new(4096);
        let blocks: Vec<Vec<u8>> = (0..8u8)
            .map(|i| (0..4096u32).map(|j| (j % 251) as u8 ^ i).collect())
            .collect();
        let locations: Vec<StoredBlock> = blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let e = builder.add(i as u64, b).expect("add");
                let location = BlockLocation {
                    chunk: 7,
                    offset: e.offset,
                    length: e.length,
                    checksum: e.checksum,
                };
                stored(e.block, location)
            })
            .collect();
        chunks.put(7, builder.finish().0).await.expect("upload");
        // Blocks 2, 3, 5 and 6: block 4 lies in the span and is dropped; block 5's checksum is
        // wrong, which fails block 5 alone.
        let mut run = vec![locations[2], locations[3], locations[5], locations[6]];
        run[2].location.checksum ^= 1;
        let before = counted.counts().get_requests;
        let span = chunks.read_span(&run).await.expect("one GET");
        assert_eq!(counted.counts().get_requests - before, 1);
        let decoded = chunks
            .decode_run(&run, &span)
            .expect("plain: no seal to make");
        assert_eq!(decoded[0].as_ref().expect("block 2"), &blocks[2]);
        assert_eq!(decoded[1].as_ref().expect("block 3"), &blocks[3]);
        let err = decoded[2].as_ref().expect_err("block 5 fails its checksum");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(decoded[3].as_ref().expect("block 6"), &blocks[6]);
        let mut other_chunk = run.clone();
        other_chunk[1].location.chunk = 8;
        assert!(
            chunks.read_span(&other_chunk).await.is_err(),
            "one chunk per run"
        );
    }
}
