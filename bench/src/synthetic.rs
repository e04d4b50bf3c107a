//! Volumes whose block map is built directly, without writing their data through NBD: what a
//! large, much-written volume looks like to a server that boots on it, at the cost of one real
//! chunk. The chunk holds [`DISTINCT`] blocks of varied content; the map's rows cycle over
//! them, spread evenly over the whole disk (block 0 included), so every row points at real,
//! checksummed data and any read can be verified.

use anyhow::{Context, Result, anyhow, ensure};
use blockmap::replica::{Layout, Replica};
use blockmap::writer::MapWriter;
use blockmap::{BlockLocation, BlockMap, MapChange};
use engine::chunk::ChunkBuilder;
use engine::chunk_store::ChunkStore;
use engine::object_volume::ObjectVolume;
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Block size of the built volumes (the engine's default).
pub const BLOCK: u32 = 64 * 1024;
/// Distinct block contents in the chunk.
pub const DISTINCT: u64 = 64;
/// Rows per map transaction (and per sync to the replica) while building.
const BATCH: u64 = 50_000;

/// Content of the `k`-th distinct block: 4 KiB pages, some pseudo-random and some a repeated
/// text pattern (how many of each depends on `k`), so blocks compress by different amounts.
pub fn content(k: u64) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (k + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut out = vec![0u8; BLOCK as usize];
    let text = format!("bucketdisk synthetic block {k:04} ");
    for (page_no, page) in out.chunks_exact_mut(4096).enumerate() {
        if (page_no as u64 + k) % 4 == 0 {
            for (i, b) in page.iter_mut().enumerate() {
                *b = text.as_bytes()[i % text.len()];
            }
        } else {
            for word in page.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
        }
    }
    out
}

/// The block row `i` of `rows` describes, on a disk of `blocks` blocks.
pub fn block_of_row(i: u64, rows: u64, blocks: u64) -> u64 {
    (u128::from(i) * u128::from(blocks) / u128::from(rows)) as u64
}

/// What was built.
#[derive(Debug, Clone, Serialize)]
pub struct Built {
    pub volume_bytes: u64,
    pub rows: u64,
    /// SQLite page count × page size at the end of the build.
    pub map_bytes: u64,
    /// Size of the newest snapshot in the replica (level 9).
    pub snapshot_bytes: u64,
    /// Every file in the replica after maintenance, and their total size.
    pub replica_files: u64,
    pub replica_bytes: u64,
    pub chunk_bytes: u64,
    pub build_secs: f64,
}

/// Creates volume `name` of `volume_bytes` in the local-directory store `store_dir` with a map
/// of `rows` rows; see [`build_volume_in`].
pub fn build_volume(store_dir: &Path, name: &str, volume_bytes: u64, rows: u64) -> Result<Built> {
    std::fs::create_dir_all(store_dir)?;
    let store: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(store_dir)?);
    build_volume_in(
        store,
        &StorePath::from(""),
        Layout::File,
        name,
        volume_bytes,
        rows,
    )
}

/// Creates volume `name` of `volume_bytes` under `prefix` of `store` (its LTX files named as
/// `layout` says) with a map of `rows` rows, syncs it, compacts it and writes a snapshot (as a
/// long-running writer would have), and leaves it closed.
pub fn build_volume_in(
    store: Arc<dyn ObjectStore>,
    prefix: &StorePath,
    layout: Layout,
    name: &str,
    volume_bytes: u64,
    rows: u64,
) -> Result<Built> {
    let started = Instant::now();
    let blocks = volume_bytes / u64::from(BLOCK);
    ensure!(rows > 0 && rows <= blocks, "{rows} rows on {blocks} blocks");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let root = prefix.clone().join(name);
    rt.block_on(ObjectVolume::create(
        store.as_ref(),
        prefix,
        name,
        volume_bytes,
        BLOCK,
    ))
    .context("creating the volume")?;
    let replica = Arc::new(Replica::new(
        Arc::clone(&store),
        root.clone().join("blockmap"),
        layout,
    ));
    let db_name = format!("bench-build-{name}-{}", std::process::id());
    let writer = rt
        .block_on(MapWriter::open(
            Arc::clone(&store),
            Arc::clone(&replica),
            root.clone(),
            &db_name,
            "bench map builder",
            rt.handle().clone(),
        ))
        .map_err(|e| anyhow!("opening the map writer: {e}"))?;

    // The chunk first (a map row points at a chunk only once the chunk is stored), with the
    // id a writer of this lease's epoch would have given it.
    let chunk_id = writer.lease().epoch << 32;
    let mut builder = ChunkBuilder::new(BLOCK);
    let entries: Vec<_> = (0..DISTINCT)
        .map(|k| builder.add(k, &content(k)))
        .collect::<Result<_, _>>()?;
    let (bytes, _) = builder.finish();
    let chunk_bytes = bytes.len() as u64;
    rt.block_on(ChunkStore::new(Arc::clone(&store), &root, BLOCK).put(chunk_id, bytes))
        .context("storing the chunk")?;

    let mut map = BlockMap::new(writer.connection()?)?;
    map.apply_with_meta(&[(chunk_id, chunk_bytes)], &[], &[("journal_seq", "0")])?;
    let mut first = 0;
    while first < rows {
        let last = (first + BATCH).min(rows);
        let changes: Vec<MapChange> = (first..last)
            .map(|i| {
                let e = entries[(i % DISTINCT) as usize];
                MapChange::Put {
                    block: block_of_row(i, rows, blocks),
                    location: BlockLocation {
                        chunk: chunk_id,
                        offset: e.offset,
                        length: e.length,
                        checksum: e.checksum,
                    },
                }
            })
            .collect();
        map.apply(&[], &changes)?;
        rt.block_on(writer.sync())
            .map_err(|e| anyhow!("syncing the map: {e}"))?;
        first = last;
    }
    let pages: i64 = map
        .connection()
        .query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let page_size: i64 = map
        .connection()
        .query_row("PRAGMA page_size", [], |r| r.get(0))?;
    drop(map);
    rt.block_on(writer.maintain())
        .map_err(|e| anyhow!("compacting the map: {e}"))?;
    rt.block_on(writer.close())
        .map_err(|e| anyhow!("closing the map: {e}"))?;

    let files = rt
        .block_on(replica.list())
        .map_err(|e| anyhow!("listing the map replica: {e}"))?;
    let snapshot_bytes = files
        .iter()
        .filter(|f| f.level == ltx::naming::SNAPSHOT_LEVEL)
        .max_by_key(|f| f.name.max_txid)
        .map_or(0, |f| f.size);
    Ok(Built {
        volume_bytes,
        rows,
        map_bytes: (pages * page_size) as u64,
        snapshot_bytes,
        replica_files: files.len() as u64,
        replica_bytes: files.iter().map(|f| f.size).sum(),
        chunk_bytes,
        build_secs: started.elapsed().as_secs_f64(),
    })
}

/// Every regular file under `dir`, with its size.
pub fn list_files(dir: &Path, out: &mut Vec<(std::path::PathBuf, u64)>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            match e.metadata() {
                Ok(m) if m.is_dir() => list_files(&p, out),
                Ok(m) => out.push((p, m.len())),
                Err(_) => {}
            }
        }
    }
}

/// Copies a directory tree (a pristine store, so every boot starts from the same state).
pub fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &dest)?;
        } else {
            std::fs::copy(e.path(), &dest)
                .with_context(|| format!("copying {}", e.path().display()))?;
        }
    }
    Ok(())
}
