//! Encrypted volumes against a real local-directory store: nothing written through the volume
//! reaches the store in clear, a wrong or missing key is an error at open, a damaged or moved
//! sealed block is an error (never data), and garbage collection, checkpoints, restore, clones
//! and verify work on them as on plain volumes.

use engine::object_volume::{
    ObjectVolume, RestoreRequest, VerifyOptions, VolumeConfig, clone_volume, verify,
};
use engine::sealing::VolumeKey;
use engine::{BlockDevice, DeviceError};
use object_store::path::Path;
use std::io::ErrorKind;
use std::sync::Arc;

mod common;
use common::{Fixture, MIB, chunk_files, try_read};

const BLOCK: u32 = 65536;
const MARKER: &[u8] = b"BUCKETDISK-PLAINTEXT-MARKER-";

fn key(byte: u8) -> Arc<VolumeKey> {
    Arc::new(VolumeKey::parse(&[byte; 32]).expect("key"))
}

/// A block holding the marker many times: for even `n` between runs of random bytes (so the block
/// is stored raw), or all in a row (so it is compressed, the marker kept once in LZ4's
/// literals).
fn marked_block(n: u64) -> Vec<u8> {
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(BLOCK as usize);
    while out.len() < BLOCK as usize {
        out.extend_from_slice(MARKER);
        if n % 2 == 0 {
            for _ in 0..512 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                out.push(x as u8);
            }
        }
    }
    out.truncate(BLOCK as usize);
    out
}

fn config(f: &Fixture, local: &str, key: Option<Arc<VolumeKey>>) -> VolumeConfig {
    let mut c = f.config(local);
    c.key = key;
    c
}

async fn try_open(f: &Fixture, name: &str, c: VolumeConfig) -> std::io::Result<ObjectVolume> {
    ObjectVolume::open(Arc::clone(&f.store), &Path::from(""), f.layout, name, c).await
}

async fn write_marked(v: &ObjectVolume, blocks: u64) {
    for b in 0..blocks {
        v.write(u64::from(BLOCK) * b, marked_block(b).into(), false)
            .await
            .expect("write");
    }
    v.sync_to_store().await.expect("upload");
}

/// Every file the store holds, with its bytes.
fn stored_files(f: &Fixture) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    fn walk(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push((path.clone(), std::fs::read(&path).expect("read")));
            }
        }
    }
    let mut out = Vec::new();
    walk(&f.dir.path().join("store"), &mut out);
    out
}

fn files_with_marker(f: &Fixture) -> Vec<std::path::PathBuf> {
    stored_files(f)
        .into_iter()
        .filter(|(_, bytes)| bytes.windows(MARKER.len()).any(|w| w == MARKER))
        .map(|(path, _)| path)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_written_reaches_the_store_in_clear() {
    // The check can fail: a plain volume written the same way stores the marker.
    let plain = Fixture::new(16 * MIB, BLOCK).await;
    let v = plain.open(plain.config("a")).await;
    write_marked(&v, 8).await;
    v.close().await.expect("close");
    assert!(
        !files_with_marker(&plain).is_empty(),
        "a plain volume stores plaintext"
    );

    let f = Fixture::encrypted(16 * MIB, BLOCK, &key(1)).await;
    let v = try_open(&f, "disk", config(&f, "a", Some(key(1))))
        .await
        .expect("open");
    write_marked(&v, 8).await;
    // Overwrites and collection rewrite chunks (their live blocks opened and sealed again
    // for their new place): those are sealed too.
    for round in 0..3 {
        for b in (0..8).step_by(2 + round) {
            v.write(u64::from(BLOCK) * b, marked_block(b + 100).into(), false)
                .await
                .expect("write");
        }
        v.sync_to_store().await.expect("upload");
        v.maintain_now().await.expect("maintenance");
    }
    let rewritten = common::metric(&v, "bucketdisk_chunks_rewritten_total").await;
    assert!(rewritten > 0.0, "garbage collection rewrote a sealed chunk");
    v.close().await.expect("close");
    assert_eq!(files_with_marker(&f), Vec::<std::path::PathBuf>::new());

    // Read back on another host (a cold cache): every block from its sealed chunk.
    let v = try_open(&f, "disk", config(&f, "b", Some(key(1))))
        .await
        .expect("open");
    for b in 0..8u64 {
        // Round r rewrote every (2 + r)th block from 0.
        let rewritten = (0..3).any(|r| b % (2 + r) == 0);
        let want = if rewritten { b + 100 } else { b };
        assert_block(&v, b, want, "read back as last written").await;
    }
    v.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_key_is_an_error_at_open() {
    let f = Fixture::encrypted(16 * MIB, BLOCK, &key(1)).await;
    let missing = try_open(&f, "disk", config(&f, "a", None))
        .await
        .err()
        .expect("no key: refused");
    assert_eq!(missing.kind(), ErrorKind::PermissionDenied);
    assert!(
        missing
            .to_string()
            .contains("volume disk is encrypted: give its key"),
        "{missing}"
    );
    let wrong = try_open(&f, "disk", config(&f, "a", Some(key(2))))
        .await
        .err()
        .expect("wrong key: refused");
    assert!(wrong.to_string().contains("another key"), "{wrong}");
    // Refused before anything was taken: the right key opens it at once.
    let v = try_open(&f, "disk", config(&f, "a", Some(key(1))))
        .await
        .expect("open");
    v.close().await.expect("close");

    // Its format names it sealed: an engine that cannot seal refuses it, and a volume.json
    // whose encryption record was removed is refused as altered, never opened in clear.
    let path = f.dir.path().join("store/disk/volume.json");
    let text = std::fs::read_to_string(&path).expect("volume.json");
    let mut meta: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(meta["format"], "object-v1-sealed");
    meta.as_object_mut().expect("object").remove("encryption");
    std::fs::write(&path, meta.to_string()).expect("write");
    let altered = try_open(&f, "disk", config(&f, "a", None))
        .await
        .err()
        .expect("altered: refused");
    assert!(altered.to_string().contains("was altered"), "{altered}");
}

/// Reads block `b` of `v`, which must hold [`marked_block`]`(want)`; `what` names it on failure.
async fn assert_block(v: &ObjectVolume, b: u64, want: u64, what: &str) {
    let got = try_read(v, u64::from(BLOCK) * b, BLOCK)
        .await
        .unwrap_or_else(|e| panic!("{what}: block {b}: {e:?}"));
    assert!(got == marked_block(want), "{what}: block {b}");
}

/// An encrypted volume on a fresh store whose first `blocks` blocks hold [`marked_block`]s,
/// written through local directory "a" and closed.
async fn written_encrypted(blocks: u64) -> Fixture {
    let f = Fixture::encrypted(16 * MIB, BLOCK, &key(1)).await;
    let v = try_open(&f, "disk", config(&f, "a", Some(key(1))))
        .await
        .expect("open");
    write_marked(&v, blocks).await;
    v.close().await.expect("close");
    f
}

/// The volume's only chunk file.
fn only_chunk(f: &Fixture) -> std::path::PathBuf {
    let chunks = chunk_files(f);
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    f.dir.path().join("store/disk/chunks").join(&chunks[0])
}

/// Where block `block`'s sealed bytes lie in the chunk, from the chunk's own index.
fn payload_range(chunk: &[u8], block: u64) -> std::ops::Range<usize> {
    let entries = engine::chunk::read_index(chunk).expect("index");
    let e = entries.iter().find(|e| e.block == block).expect("entry");
    e.offset as usize..(e.offset + u64::from(e.length)) as usize
}

/// Opens the volume on a fresh host (a cold cache) and reads block `b`.
async fn read_cold(f: &Fixture, local: &str, b: u64) -> engine::DeviceResult<Vec<u8>> {
    let v = try_open(f, "disk", config(f, local, Some(key(1))))
        .await
        .expect("open");
    let got = try_read(&v, u64::from(BLOCK) * b, BLOCK).await;
    v.close().await.expect("close");
    got
}

/// `verify --deep` of the fixture's volume with `key`.
async fn deep_verify(
    f: &Fixture,
    key: Option<Arc<VolumeKey>>,
) -> std::io::Result<engine::object_volume::VerifyReport> {
    let options = VerifyOptions {
        deep: true,
        checkpoints: false,
        key,
    };
    verify(
        Arc::clone(&f.store),
        &Path::from(""),
        f.layout,
        "disk",
        options,
        |_, _| {},
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_or_swapped_sealed_block_is_an_error_never_data() {
    // Blocks 0 and 2 are stored raw: their sealed bytes have the same length.
    let f = written_encrypted(3).await;
    let path = only_chunk(&f);
    let original = std::fs::read(&path).expect("read chunk");
    let (zero, two) = (payload_range(&original, 0), payload_range(&original, 2));
    assert_eq!(zero.len(), BLOCK as usize + engine::sealing::SEAL_OVERHEAD);
    assert_eq!(zero.len(), two.len());

    // A flipped ciphertext byte in block 0: that block is corrupt (EIO), the others read.
    let mut damaged = original.clone();
    damaged[zero.start + zero.len() / 2] ^= 0x01;
    std::fs::write(&path, &damaged).expect("write chunk");
    let err = read_cold(&f, "b", 0).await.expect_err("flipped byte");
    assert!(matches!(err, DeviceError::Corrupt(_)), "{err:?}");
    assert_eq!(read_cold(&f, "c", 1).await.expect("read"), marked_block(1));

    // Blocks 0 and 2 swapped in the chunk: each is an error, never the other's data.
    let mut swapped = original.clone();
    swapped[zero.clone()].copy_from_slice(&original[two.clone()]);
    swapped[two].copy_from_slice(&original[zero]);
    std::fs::write(&path, &swapped).expect("write chunk");
    for (b, local) in [(0, "d"), (2, "e")] {
        let err = read_cold(&f, local, b).await.expect_err("swapped block");
        assert!(matches!(err, DeviceError::Corrupt(_)), "block {b}: {err:?}");
    }
    assert_eq!(read_cold(&f, "f", 1).await.expect("read"), marked_block(1));

    // Restored: verify --deep finds nothing wrong, and needs the key.
    std::fs::write(&path, &original).expect("write chunk");
    let report = deep_verify(&f, Some(key(1))).await.expect("verify");
    assert!(!report.is_damaged(), "{report:?}");
    assert_eq!(report.states[0].blocks_read, 3);
    let refused = deep_verify(&f, None)
        .await
        .expect_err("a deep verify opens blocks: it needs the key");
    assert!(refused.to_string().contains("encrypted"), "{refused}");
    std::fs::write(&path, &damaged).expect("write chunk");
    let report = deep_verify(&f, Some(key(1))).await.expect("verify");
    assert_eq!(report.states[0].damaged_total, 1, "{report:?}");
}

/// Whoever can write the bucket can rewrite the block map: here block 2's row is pointed at
/// block 0's sealed bytes, checksum and all. Block 0's seal binds it to block 0, so block 2
/// reads as an error, never as block 0's data: on a host that never read it, and on one whose
/// cache holds block 0 (cached as block 0, not as whatever points at its bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_row_pointing_at_another_blocks_sealed_bytes_is_an_error_cached_or_not() {
    use blockmap::replica::Replica;
    use blockmap::writer::MapWriter;
    use blockmap::{BlockMap, MapChange};
    let f = written_encrypted(3).await;
    let warm = try_open(&f, "disk", config(&f, "warm", Some(key(1))))
        .await
        .expect("open");
    for b in 0..3 {
        assert_block(&warm, b, b, "before the map is altered").await;
    }
    warm.close().await.expect("close");

    let replica = Arc::new(Replica::new(
        Arc::clone(&f.store),
        Path::from("disk/blockmap"),
        f.layout,
    ));
    let intruder = MapWriter::open(
        Arc::clone(&f.store),
        replica,
        Path::from("disk"),
        "intruder-map",
        "intruder",
        tokio::runtime::Handle::current(),
    )
    .await
    .expect("take the map");
    {
        let mut map = BlockMap::new(intruder.connection().expect("connection")).expect("map");
        let zero = map.get(0).expect("lookup").expect("block 0 is stored");
        map.apply(
            &[],
            &[MapChange::Put {
                block: 2,
                location: zero,
            }],
        )
        .expect("rewrite block 2's row");
    }
    intruder.sync().await.expect("publish");
    intruder.close().await.expect("close");

    for local in ["cold", "warm"] {
        let v = try_open(&f, "disk", config(&f, local, Some(key(1))))
            .await
            .expect("open");
        match try_read(&v, u64::from(BLOCK) * 2, BLOCK).await {
            Err(DeviceError::Corrupt(_)) => {}
            Err(e) => panic!("{local}: block 2 is another error: {e:?}"),
            Ok(data) => panic!(
                "{local}: block 2 read as {}",
                if data == marked_block(0) {
                    "block 0's data"
                } else {
                    "data"
                }
            ),
        }
        for b in 0..2 {
            assert_block(&v, b, b, local).await;
        }
        v.close().await.expect("close");
    }
    let report = deep_verify(&f, Some(key(1))).await.expect("verify");
    assert_eq!(report.states[0].damaged_total, 1, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_restore_and_clones_of_an_encrypted_volume() {
    let f = Fixture::encrypted(16 * MIB, BLOCK, &key(1)).await;
    let prefix = Path::from("");
    let v = try_open(&f, "disk", config(&f, "a", Some(key(1))))
        .await
        .expect("open");
    write_marked(&v, 4).await;
    v.create_checkpoint(Some("base")).await.expect("checkpoint");
    for b in 0..4 {
        v.write(u64::from(BLOCK) * b, marked_block(b + 50).into(), false)
            .await
            .expect("write");
    }
    v.sync_to_store().await.expect("upload");
    v.close().await.expect("close");

    // A clone reads its source's sealed chunks with the same key, and only with it.
    clone_volume(f.store.as_ref(), &prefix, "disk", "base", "twin")
        .await
        .expect("clone");
    let refused = try_open(&f, "twin", config(&f, "t0", None))
        .await
        .err()
        .expect("a clone of an encrypted volume is encrypted");
    assert!(
        refused.to_string().contains("volume twin is encrypted"),
        "{refused}"
    );
    let twin = try_open(&f, "twin", config(&f, "t", Some(key(1))))
        .await
        .expect("open clone");
    for b in 0..4 {
        assert_block(&twin, b, b, "clone").await;
    }
    // Its own writes are sealed for its own chunks, and read back.
    twin.write(0, marked_block(7).into(), false)
        .await
        .expect("write");
    twin.sync_to_store().await.expect("upload");
    twin.close().await.expect("close");
    let twin = try_open(&f, "twin", config(&f, "t2", Some(key(1))))
        .await
        .expect("open clone");
    assert_block(&twin, 0, 7, "the clone's own write").await;
    assert_block(&twin, 1, 1, "the clone").await;
    twin.close().await.expect("close");

    // Restore: the checkpoint's state, sealed blocks and all.
    let request = RestoreRequest {
        volume: "disk",
        checkpoint: "base",
        keep_current: false,
    };
    engine::object_volume::restore(
        Arc::clone(&f.store),
        &prefix,
        f.layout,
        request,
        config(&f, "r", Some(key(1))),
        |_| Ok(()),
    )
    .await
    .expect("restore");
    let v = try_open(&f, "disk", config(&f, "r2", Some(key(1))))
        .await
        .expect("open restored");
    for b in 0..4 {
        assert_block(&v, b, b, "restored").await;
    }
    v.close().await.expect("close");
    assert_eq!(files_with_marker(&f), Vec::<std::path::PathBuf>::new());
}
