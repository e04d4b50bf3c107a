//! What the object-volume tests share: a volume on a real local-directory store (or on moto),
//! reading it back whole, test patterns, and checks of what the store holds.
#![allow(dead_code)] // each test file uses its own part

use blockmap::replica::Layout;
use bytes::Bytes;
use engine::BlockDevice;
use engine::ReadSegment;
use engine::object_volume::{ObjectVolume, VolumeConfig};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use std::sync::Arc;
use std::time::Duration;

#[path = "../../../blockmap/tests/common/mod.rs"]
pub mod s3_server;

pub const MIB: u64 = 1 << 20;

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub store: Arc<dyn ObjectStore>,
    pub layout: Layout,
    _moto: Option<s3_server::Moto>,
}

impl Fixture {
    pub async fn new(size: u64, block_size: u32) -> Fixture {
        Self::on_directory(size, block_size, None).await
    }

    /// A fixture whose volume `disk` is encrypted with `key` (see `engine::sealing`).
    pub async fn encrypted(
        size: u64,
        block_size: u32,
        key: &engine::sealing::VolumeKey,
    ) -> Fixture {
        Self::on_directory(size, block_size, Some(key)).await
    }

    /// Volume `disk` on a local-directory store, encrypted with `key` if one is given.
    async fn on_directory(
        size: u64,
        block_size: u32,
        key: Option<&engine::sealing::VolumeKey>,
    ) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("store")).expect("store dir");
        let store: Arc<dyn ObjectStore> =
            Arc::new(LocalFileSystem::new_with_prefix(dir.path().join("store")).expect("store"));
        let (s, root) = (store.as_ref(), Path::from(""));
        ObjectVolume::create_with_key(s, &root, "disk", size, block_size, key)
            .await
            .expect("create");
        Fixture {
            dir,
            store,
            layout: Layout::File,
            _moto: None,
        }
    }

    /// The same, on a real S3-protocol server (moto).
    pub async fn on_s3(size: u64, block_size: u32) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let moto = s3_server::start_moto();
        s3_server::create_bucket(moto.port, "volumes");
        let store = s3_server::s3(moto.port, "volumes");
        ObjectVolume::create(store.as_ref(), &Path::from(""), "disk", size, block_size)
            .await
            .expect("create");
        Fixture {
            dir,
            store,
            layout: Layout::ObjectStore,
            _moto: Some(moto),
        }
    }

    pub fn config(&self, local: &str) -> VolumeConfig {
        let mut c = VolumeConfig::new(self.dir.path().join(local));
        c.sync_interval = Duration::from_millis(100);
        c.cache_bytes = 64 * MIB;
        c.chunk_bytes = MIB as usize;
        c
    }

    pub async fn open(&self, config: VolumeConfig) -> ObjectVolume {
        self.open_on(Arc::clone(&self.store), config).await
    }

    pub async fn open_on(&self, store: Arc<dyn ObjectStore>, config: VolumeConfig) -> ObjectVolume {
        ObjectVolume::open(store, &Path::from(""), self.layout, "disk", config)
            .await
            .expect("open")
    }
}

/// One of the volume's metrics, by name (panics if it has none by that name).
pub async fn metric(v: &ObjectVolume, name: &str) -> f64 {
    v.metrics()
        .await
        .iter()
        .find(|m| m.name == name)
        .map(|m| m.value)
        .unwrap_or_else(|| panic!("no metric {name}"))
}

pub async fn read(v: &ObjectVolume, offset: u64, len: u32) -> Vec<u8> {
    try_read(v, offset, len).await.expect("read")
}

/// The bytes at `offset`, or the read's error.
pub async fn try_read(v: &ObjectVolume, offset: u64, len: u32) -> engine::DeviceResult<Vec<u8>> {
    let mut out = Vec::with_capacity(len as usize);
    for seg in v.read(offset, len).await? {
        match seg {
            ReadSegment::Data(d) => out.extend_from_slice(&d),
            ReadSegment::Zero(n) => out.resize(out.len() + n as usize, 0),
        }
    }
    assert_eq!(out.len(), len as usize);
    Ok(out)
}

/// Writes `seed`'s pattern over the first `blocks` blocks of `block_size` and uploads it.
pub async fn fill_blocks(v: &ObjectVolume, blocks: u64, block_size: u32, seed: u8) {
    for b in 0..blocks {
        v.write(
            b * u64::from(block_size),
            pattern(block_size as usize, seed.wrapping_add(b as u8)),
            false,
        )
        .await
        .expect("write");
    }
    v.sync_to_store().await.expect("upload");
}

pub fn pattern(len: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect::<Vec<u8>>(),
    )
}

pub fn chunk_files(f: &Fixture) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(f.dir.path().join("store/disk/chunks"))
        .expect("chunks dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Restores the block map at `txid` (the latest state if `None`) from the store and checks
/// that every chunk it refers to is still there; returns the chunks missing.
pub async fn missing_chunks(f: &Fixture, txid: Option<u64>) -> Vec<String> {
    use blockmap::replica::Replica;
    let replica = Replica::new(Arc::clone(&f.store), Path::from("disk/blockmap"), f.layout);
    let files = replica.list().await.expect("list");
    let txid = txid.unwrap_or_else(|| files.iter().map(|f| f.name.max_txid).max().expect("files"));
    let out = f.dir.path().join(format!("restored-{txid}.db"));
    let _ = std::fs::remove_file(&out);
    let progress = blockmap::vfs::hydrate::Progress::default();
    blockmap::vfs::hydrate::hydrate(&replica, txid, &out, &progress)
        .await
        .expect("restore");
    let db = rusqlite::Connection::open(&out).expect("open restored map");
    let mut stmt = db
        .prepare("SELECT DISTINCT chunk FROM blocks")
        .expect("query");
    let chunks: Vec<i64> = stmt
        .query_map([], |r| r.get(0))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("rows");
    let existing = chunk_files(f);
    chunks
        .into_iter()
        .map(|chunk| format!("{chunk:016x}"))
        .filter(|name| !existing.contains(name))
        .collect()
}

pub async fn assert_state_is_complete(f: &Fixture, txid: Option<u64>) {
    let missing = missing_chunks(f, txid).await;
    assert!(
        missing.is_empty(),
        "map state {txid:?} refers to deleted chunks {missing:?}"
    );
}

/// The disk as of block-map TXID `txid`, rebuilt from the store alone: the map restored from
/// its replica, then every block it lists read from its chunk and verified. `Err` says why the
/// state cannot be restored (its map files or chunks are gone).
pub async fn restore_state(
    f: &Fixture,
    txid: u64,
    block_size: u32,
) -> Result<Vec<(u64, Vec<u8>)>, String> {
    use blockmap::replica::Replica;
    let replica = Replica::new(Arc::clone(&f.store), Path::from("disk/blockmap"), f.layout);
    let out = f.dir.path().join(format!("restored-{txid}.db"));
    let _ = std::fs::remove_file(&out);
    let progress = blockmap::vfs::hydrate::Progress::default();
    blockmap::vfs::hydrate::hydrate(&replica, txid, &out, &progress)
        .await
        .map_err(|e| format!("map state {txid}: {e}"))?;
    let db = rusqlite::Connection::open(&out).expect("open restored map");
    let mut stmt = db
        .prepare("SELECT block, chunk, offset, length, checksum FROM blocks ORDER BY block")
        .expect("query");
    let rows: Vec<(i64, i64, i64, i64, i64)> = stmt
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("rows");
    let mut blocks = Vec::new();
    for (block, chunk, offset, length, checksum) in rows {
        let path = Path::from(format!("disk/chunks/{chunk:016x}"));
        let range = offset as u64..(offset + length) as u64;
        let payload = f
            .store
            .get_range(&path, range)
            .await
            .map_err(|e| format!("block {block} in chunk {chunk:016x}: {e}"))?;
        let data = engine::chunk::decode_block(&payload, block_size, checksum as u32)
            .map_err(|e| format!("block {block}: {e}"))?;
        blocks.push((block as u64, data));
    }
    Ok(blocks)
}
