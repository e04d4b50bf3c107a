//! `verify` against a real store (a local directory and moto): a sound volume is sound; a chunk
//! deleted behind the volume's back, a flipped bit in a block and an orphaned chunk are each
//! named precisely; checkpoints are checked on request; a bit flipped on the way is not
//! reported as damage in the store.

use bytes::Bytes;
use engine::BlockDevice;
use engine::object_volume::{ObjectVolume, VerifyOptions, VerifyReport, verify};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use stores::chaos::{FaultKind, FaultPlan};

mod common;
use common::{Fixture, MIB, pattern};

const BLOCK: u32 = 65536;
const BLOCKS: u64 = 32;

async fn run(f: &Fixture, deep: bool, checkpoints: bool) -> VerifyReport {
    run_on(std::sync::Arc::clone(&f.store), f, deep, checkpoints).await
}

async fn run_on(
    store: std::sync::Arc<dyn ObjectStore>,
    f: &Fixture,
    deep: bool,
    checkpoints: bool,
) -> VerifyReport {
    verify(
        store,
        &Path::from(""),
        f.layout,
        "disk",
        VerifyOptions {
            deep,
            checkpoints,
            key: None,
        },
        |_, _| {},
    )
    .await
    .expect("verify")
}

/// The volume's chunk objects, sorted by id.
async fn chunks(f: &Fixture) -> Vec<(Path, u64)> {
    let mut found: Vec<(Path, u64)> = f
        .store
        .list(Some(&Path::from("disk/chunks")))
        .try_collect::<Vec<_>>()
        .await
        .expect("list")
        .into_iter()
        .map(|m| (m.location, m.size))
        .collect();
    found.sort();
    found
}

async fn write_volume(f: &Fixture, seed: u8) -> ObjectVolume {
    let v = f.open(f.config("a")).await;
    common::fill_blocks(&v, BLOCKS, BLOCK, seed).await;
    v
}

fn name(path: &Path) -> String {
    path.filename().expect("file name").to_string()
}

async fn finds_damage_precisely(f: Fixture) {
    let v = write_volume(&f, 1).await;
    v.create_checkpoint(Some("first"))
        .await
        .expect("checkpoint");
    // The first half rewritten: the checkpoint alone keeps its first chunk's blocks.
    for b in 0..BLOCKS / 2 {
        v.write(b * u64::from(BLOCK), pattern(BLOCK as usize, 99), false)
            .await
            .expect("write");
    }
    v.sync_to_store().await.expect("upload");
    v.close().await.expect("close");

    let sound = run(&f, true, true).await;
    assert!(!sound.is_damaged(), "{sound:?}");
    assert_eq!(sound.states.len(), 2, "latest and the checkpoint");
    assert_eq!(sound.states[0].blocks, BLOCKS);
    assert_eq!(
        sound.states[0].blocks_read, BLOCKS,
        "deep reads every block"
    );
    assert!(sound.orphaned_chunks.is_empty(), "{sound:?}");

    // An orphan: a chunk object nothing references.
    let orphan = Path::from("disk/chunks/00000000ffffff00");
    f.store
        .put(&orphan, PutPayload::from(Bytes::from(vec![7u8; 1000])))
        .await
        .expect("put orphan");
    let found = run(&f, false, false).await;
    assert!(!found.is_damaged(), "an orphan costs space, not data");
    assert_eq!(found.orphaned_chunks.len(), 1, "{found:?}");
    assert_eq!(found.orphaned_chunks[0].chunk, "00000000ffffff00");
    assert_eq!(found.orphaned_bytes, 1000);
    f.store.delete(&orphan).await.expect("delete orphan");

    // A flipped bit in a block of the latest state's newest chunk: only a deep check reads it.
    let (latest_chunk, _) = chunks(&f).await.pop().expect("a chunk");
    let mut bytes = f
        .store
        .get(&latest_chunk)
        .await
        .expect("get")
        .bytes()
        .await
        .expect("bytes")
        .to_vec();
    let entry = *engine::chunk::read_index(&bytes)
        .expect("chunk index")
        .last()
        .expect("an entry");
    let at = (entry.offset + u64::from(entry.length) / 2) as usize;
    bytes[at] ^= 0x10;
    f.store
        .put(&latest_chunk, PutPayload::from(Bytes::from(bytes)))
        .await
        .expect("put back");
    assert!(!run(&f, false, false).await.is_damaged(), "sizes are right");
    let found = run(&f, true, false).await;
    assert!(found.is_damaged());
    let latest = &found.states[0];
    assert_eq!(latest.damaged_total, 1, "{latest:?}");
    let damaged = &latest.damaged_blocks[0];
    assert_eq!(damaged.chunk, name(&latest_chunk));
    assert_eq!(
        damaged.offset,
        entry.block * u64::from(BLOCK),
        "{damaged:?}"
    );
    assert!(damaged.problem.contains("checksum") || damaged.problem.contains("decode"));

    // A chunk deleted behind the volume's back: the checkpoint's first chunk, which the latest
    // state no longer uses.
    let (first_chunk, _) = chunks(&f).await.remove(0);
    f.store.delete(&first_chunk).await.expect("delete chunk");
    let found = run(&f, false, false).await;
    assert!(
        found.states[0].missing_chunks.is_empty(),
        "the latest state does not use it: {found:?}"
    );
    let found = run(&f, false, true).await;
    let checkpoint = &found.states[1];
    assert_eq!(checkpoint.state, "checkpoint first");
    assert_eq!(checkpoint.missing_chunks, vec![name(&first_chunk)]);
    assert!(checkpoint.damaged_total > 0);
    assert_eq!(
        checkpoint.damaged_blocks[0].offset, 0,
        "its first block is the volume's first: {checkpoint:?}"
    );
    assert!(
        checkpoint.damaged_blocks[0].problem.contains("missing"),
        "{checkpoint:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_missing_damaged_and_orphaned_chunks_on_a_directory() {
    finds_damage_precisely(Fixture::new(64 * MIB, BLOCK).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_missing_damaged_and_orphaned_chunks_on_s3() {
    finds_damage_precisely(Fixture::on_s3(64 * MIB, BLOCK).await).await;
}

/// A deep check through a store that flips a bit in chunk bodies: flipped once, the block is
/// read again and found whole (nothing reported); flipped on every read, it is reported.
async fn damage_on_the_way_is_not_damage_at_rest(f: Fixture) {
    let v = write_volume(&f, 3).await;
    v.close().await.expect("close");
    let flips = |limit: Option<u64>| FaultPlan {
        kinds: vec![FaultKind::FlippedBit],
        limit,
        ..FaultPlan::default().with_rate(1.0)
    };
    let (store, chaos) = stores::url::with_faults(std::sync::Arc::clone(&f.store), flips(Some(1)));
    let once = run_on(store, &f, true, false).await;
    assert_eq!(chaos.counts().injected(), 1, "one chunk read was damaged");
    assert!(!once.is_damaged(), "{once:?}");
    assert_eq!(once.states[0].blocks_read, BLOCKS);

    let (store, chaos) = stores::url::with_faults(std::sync::Arc::clone(&f.store), flips(None));
    let always = run_on(store, &f, true, false).await;
    assert!(chaos.counts().injected() >= 2, "read and read again");
    assert!(always.is_damaged(), "damaged on every read: {always:?}");
    assert!(always.states[0].damaged_total >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bit_flipped_on_the_way_is_read_again_on_a_directory() {
    damage_on_the_way_is_not_damage_at_rest(Fixture::new(64 * MIB, BLOCK).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bit_flipped_on_the_way_is_read_again_on_s3() {
    damage_on_the_way_is_not_damage_at_rest(Fixture::on_s3(64 * MIB, BLOCK).await).await;
}
