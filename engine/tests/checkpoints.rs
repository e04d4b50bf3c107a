//! Checkpoints against a real local-directory store: a checkpoint's map state and chunks outlive
//! overwrites, garbage collection, map maintenance and a restart; deleting it frees them; bad
//! names and states get clear errors.

use engine::BlockDevice;
use engine::object_volume::{ObjectVolume, RestoreReport, RestoreRequest, clone_volume};
use std::io::ErrorKind;

mod common;
use common::{Fixture, MIB, assert_state_is_complete, chunk_files, pattern, read, restore_state};

const BLOCK: u32 = 65536;

/// Writes `seed`'s pattern over the first `blocks` blocks and uploads it.
async fn fill(v: &ObjectVolume, blocks: u64, seed: u8) {
    common::fill_blocks(v, blocks, BLOCK, seed).await;
}

/// The blocks a restored state holds must be exactly `seed`'s fill.
fn assert_filled(state: &[(u64, Vec<u8>)], blocks: u64, seed: u8) {
    assert_eq!(state.len() as u64, blocks, "blocks in the state");
    for (block, data) in state {
        assert_eq!(
            data[..],
            pattern(BLOCK as usize, seed.wrapping_add(*block as u8))[..],
            "block {block}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_outlives_overwrites_gc_and_restarts_until_deleted() {
    let f = Fixture::new(64 * MIB, BLOCK).await;
    let v = f.open(f.config("a")).await;
    fill(&v, 32, 1).await;
    let before = v.create_checkpoint(Some("base")).await.expect("checkpoint");
    assert_eq!(before.name, "base");
    assert_eq!(before.allocated_blocks, 32);
    assert!(!before.chunks.is_empty() && !before.map_files.is_empty());
    // Overwrite everything a few times, with collection and map maintenance in between: the
    // chunks the checkpoint references are dead in the current map and would go.
    for round in 0..3u8 {
        fill(&v, 32, 10 + round).await;
        v.maintain_now().await.expect("maintenance");
    }
    let stored = chunk_files(&f);
    for chunk in &before.chunks {
        assert!(
            stored.contains(&format!("{chunk:016x}")),
            "pinned chunk {chunk:016x} deleted"
        );
    }
    let state = restore_state(&f, before.txid, BLOCK)
        .await
        .expect("checkpoint restorable");
    assert_filled(&state, 32, 1);
    v.close().await.expect("close");

    // Another host (an empty local folder) learns the pins from the store.
    let w = f.open(f.config("b")).await;
    assert_eq!(w.checkpoints().await.expect("list"), vec![before.clone()]);
    fill(&w, 32, 20).await;
    w.maintain_now().await.expect("maintenance");
    let state = restore_state(&f, before.txid, BLOCK)
        .await
        .expect("still restorable");
    assert_filled(&state, 32, 1);

    // Deleting it frees what only it kept.
    let with_checkpoint = chunk_files(&f).len();
    w.delete_checkpoint("base").await.expect("delete");
    assert!(w.checkpoints().await.expect("list").is_empty());
    w.maintain_now().await.expect("maintenance");
    w.maintain_now().await.expect("maintenance");
    let after = chunk_files(&f);
    assert!(
        after.len() < with_checkpoint,
        "{} chunks before the delete, {} after",
        with_checkpoint,
        after.len()
    );
    assert!(
        before
            .chunks
            .iter()
            .any(|c| !after.contains(&format!("{c:016x}"))),
        "the checkpoint's chunks are freed"
    );
    w.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_names_and_states_get_clear_errors() {
    let f = Fixture::new(64 * MIB, BLOCK).await;
    let v = f.open(f.config("a")).await;
    fill(&v, 2, 1).await;
    let generated = v.create_checkpoint(None).await.expect("checkpoint");
    assert!(generated.name.starts_with("ckpt-"), "{}", generated.name);
    v.create_checkpoint(Some("one")).await.expect("checkpoint");
    let again = v
        .create_checkpoint(Some("one"))
        .await
        .expect_err("duplicate");
    assert_eq!(again.kind(), ErrorKind::AlreadyExists, "{again}");
    for bad in ["", "a/b", "..", "disk@x", &"n".repeat(129)] {
        let e = v
            .create_checkpoint(Some(bad))
            .await
            .expect_err("invalid name");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad:?}: {e}");
    }
    let unknown = v.delete_checkpoint("nope").await.expect_err("unknown");
    assert_eq!(unknown.kind(), ErrorKind::NotFound, "{unknown}");
    let names: Vec<String> = v
        .checkpoints()
        .await
        .expect("list")
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, [generated.name.clone(), "one".to_string()]);
    v.close().await.expect("close");

    // A read-only open lists checkpoints and refuses to take or delete them.
    let mut config = f.config("ro");
    config.read_only = true;
    let ro = f.open(config).await;
    assert_eq!(ro.checkpoints().await.expect("list").len(), 2);
    assert!(ro.create_checkpoint(Some("two")).await.is_err());
    assert!(ro.delete_checkpoint("one").await.is_err());
    ro.close().await.expect("close");

    // A fenced writer refuses too.
    let old = f.open(f.config("old")).await;
    let new = f.open(f.config("new")).await;
    fill(&new, 1, 7).await;
    // Journaled, or refused already: `old` records itself as the journal's owner right after
    // its open, and that upload may have found the volume taken.
    if let Err(e) = old.write(0, pattern(4096, 3), false).await {
        assert!(e.to_string().contains("fenced"), "{e}");
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), old.sync_to_store()).await;
    let fenced = old
        .create_checkpoint(Some("late"))
        .await
        .expect_err("fenced");
    assert!(fenced.to_string().contains("fenced"), "{fenced}");
    new.close().await.expect("close");
}

async fn try_restore(
    f: &Fixture,
    checkpoint: &str,
    local: &str,
    keep_current: bool,
) -> std::io::Result<RestoreReport> {
    let request = RestoreRequest {
        volume: "disk",
        checkpoint,
        keep_current,
    };
    engine::object_volume::restore(
        std::sync::Arc::clone(&f.store),
        &object_store::path::Path::from(""),
        f.layout,
        request,
        f.config(local),
        |_| Ok(()),
    )
    .await
}

async fn restore(f: &Fixture, checkpoint: &str, local: &str, keep_current: bool) -> RestoreReport {
    try_restore(f, checkpoint, local, keep_current)
        .await
        .expect("restore")
}

/// Blocks the volume has fetched from the store.
async fn fetches(v: &ObjectVolume) -> f64 {
    common::metric(v, "bucketdisk_store_block_fetches_total").await
}

/// Every block of the first `blocks` as `seed`'s fill, read through the volume.
async fn assert_reads(v: &ObjectVolume, blocks: u64, seed: u8) {
    for b in 0..blocks {
        let got = read(v, b * u64::from(BLOCK), BLOCK).await;
        let want = pattern(BLOCK as usize, seed.wrapping_add(b as u8));
        assert!(
            got[..] == want[..],
            "block {b} is not seed {seed}'s (starts {:?}, wanted {:?})",
            &got[..4],
            &want[..4]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_serves_the_checkpoint_everywhere_and_never_replays_a_stale_journal() {
    let f = Fixture::new(64 * MIB, BLOCK).await;
    let mut config = f.config("a");
    config.sync_interval = std::time::Duration::from_secs(3600);
    let a = f.open(config).await;
    fill(&a, 16, 1).await;
    a.create_checkpoint(Some("one")).await.expect("checkpoint");
    fill(&a, 16, 2).await;
    // Journaled on host a and never uploaded (the uploader sleeps): a tail that must not be
    // replayed on top of the restored state.
    a.write(0, pattern(BLOCK as usize, 99), true)
        .await
        .expect("journaled");
    drop(a);

    let report = restore(&f, "one", "b", true).await;
    assert_eq!(report.line, 1);
    let kept = report
        .kept_current
        .clone()
        .expect("the replaced state is kept");
    // Host a's folder, opened again: the restored state, its journal tail set aside.
    let a = f.open(f.config("a")).await;
    assert_reads(&a, 16, 1).await;
    // Writes go on in the new line; GC and map maintenance keep both checkpoints restorable.
    fill(&a, 4, 3).await;
    a.maintain_now().await.expect("maintenance");
    let names: Vec<String> = a
        .checkpoints()
        .await
        .expect("list")
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["one".to_string(), kept.clone()]);
    a.close().await.expect("close");

    // Back to the state replaced (line 2, based on line 0's files), then to "one" again.
    assert_eq!(restore(&f, &kept, "c", false).await.line, 2);
    let c = f.open(f.config("c")).await;
    assert_reads(&c, 16, 2).await;
    c.close().await.expect("close");
    assert_eq!(restore(&f, "one", "d", false).await.line, 3);
    let d = f.open(f.config("fresh")).await;
    assert_reads(&d, 16, 1).await;
    d.maintain_now().await.expect("maintenance");
    d.close().await.expect("close");
    let d = f.open(f.config("fresh-again")).await;
    assert_reads(&d, 16, 1).await;
    d.close().await.expect("close");

    // Each checkpoint still reads as its own state, whichever line the volume is on now (the
    // current line continues "one": a checkpoint of another line is not in its history).
    for (checkpoint, seed) in [("one", 1), (kept.as_str(), 2)] {
        let view = ObjectVolume::open_checkpoint(
            std::sync::Arc::clone(&f.store),
            &object_store::path::Path::from(""),
            f.layout,
            "disk",
            checkpoint,
            f.config(&format!("view-{checkpoint}")),
        )
        .await
        .expect("open the checkpoint");
        assert_reads(&view, 16, seed).await;
        view.close().await.expect("close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_to_an_unknown_checkpoint_changes_nothing() {
    let f = Fixture::new(64 * MIB, BLOCK).await;
    let v = f.open(f.config("a")).await;
    fill(&v, 4, 1).await;
    v.close().await.expect("close");
    let e = try_restore(&f, "nope", "a", false)
        .await
        .expect_err("unknown checkpoint");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let v = f.open(f.config("a")).await;
    assert_reads(&v, 4, 1).await;
    fill(&v, 1, 5).await;
    v.close().await.expect("close");
}

async fn open_volume(f: &Fixture, name: &str, local: &str) -> ObjectVolume {
    ObjectVolume::open(
        std::sync::Arc::clone(&f.store),
        &object_store::path::Path::from(""),
        f.layout,
        name,
        f.config(local),
    )
    .await
    .expect("open")
}

/// Block `b` holds `seed`'s fill of it.
async fn assert_block(v: &ObjectVolume, b: u64, seed: u8) {
    let got = read(v, b * u64::from(BLOCK), BLOCK).await;
    let want = pattern(BLOCK as usize, seed.wrapping_add(b as u8));
    assert!(
        got[..] == want[..],
        "block {b} is not seed {seed}'s (starts {:?})",
        &got[..4]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_shares_the_checkpoint_and_goes_its_own_way() {
    let f = Fixture::new(64 * MIB, BLOCK).await;
    let prefix = object_store::path::Path::from("");
    let source = f.open(f.config("s")).await;
    fill(&source, 16, 1).await;
    let base = source
        .create_checkpoint(Some("base"))
        .await
        .expect("checkpoint");
    let chunks_before = chunk_files(&f).len();
    let meta = clone_volume(f.store.as_ref(), &prefix, "disk", "base", "twin")
        .await
        .expect("clone");
    assert_eq!(
        meta.parent.as_ref().map(|p| p.checkpoint.as_str()),
        Some("base")
    );
    assert_eq!(chunk_files(&f).len(), chunks_before, "nothing copied");
    let twin = open_volume(&f, "twin", "t").await;
    assert_reads(&twin, 16, 1).await;

    // Independent from here on, through collection on both sides.
    // The clone rewrites every block: the source's chunks are dead to it.
    fill(&twin, 16, 2).await;
    fill(&source, 4, 3).await;
    source.maintain_now().await.expect("maintenance");
    twin.maintain_now().await.expect("maintenance");
    // Every chunk of the checkpoint the clone came from is still in the source's store.
    assert_state_is_complete(&f, Some(base.txid)).await;
    for b in 0..16 {
        assert_block(&twin, b, 2).await;
        assert_block(&source, b, if b < 4 { 3 } else { 1 }).await;
    }
    // From the store alone (nothing cached): the clone's collection deleted nothing of the
    // source's, however dead it is to the clone.
    let mut config = f.config("s-cold");
    config.read_only = true;
    let cold = f.open(config).await;
    for b in 0..16 {
        assert_block(&cold, b, if b < 4 { 3 } else { 1 }).await;
    }
    cold.close().await.expect("close");

    // A clone of the clone.
    twin.create_checkpoint(Some("t1"))
        .await
        .expect("checkpoint of the clone");
    clone_volume(f.store.as_ref(), &prefix, "twin", "t1", "grandchild")
        .await
        .expect("clone of a clone");
    let busy = source
        .delete_checkpoint("base")
        .await
        .expect_err("a clone depends on it");
    assert_eq!(busy.kind(), ErrorKind::ResourceBusy, "{busy}");
    assert!(busy.to_string().contains("twin"), "{busy}");
    twin.close().await.expect("close");

    // The source overwrites everything and collects; the descendants still read their states.
    fill(&source, 16, 4).await;
    source.maintain_now().await.expect("maintenance");
    source.close().await.expect("close");
    let grandchild = open_volume(&f, "grandchild", "g").await;
    for b in 0..16 {
        assert_block(&grandchild, b, 2).await;
    }
    fill(&grandchild, 2, 5).await;
    grandchild.close().await.expect("close");
    let twin = open_volume(&f, "twin", "t2").await;
    for b in 0..16 {
        assert_block(&twin, b, 2).await;
    }
    twin.close().await.expect("close");
    let duplicate = clone_volume(f.store.as_ref(), &prefix, "disk", "base", "twin")
        .await
        .expect_err("exists");
    assert_eq!(duplicate.kind(), ErrorKind::AlreadyExists, "{duplicate}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_grows_at_once_and_shrinks_only_over_no_data() {
    let f = Fixture::new(64 * MIB, BLOCK).await;
    let v = f.open(f.config("a")).await;
    fill(&v, 4, 1).await;
    v.create_checkpoint(Some("small"))
        .await
        .expect("checkpoint");
    assert_eq!(v.resize(128 * MIB, false).await.expect("grow"), 64 * MIB);
    assert_eq!(v.size(), 128 * MIB);
    v.write(100 * MIB, pattern(BLOCK as usize, 9), false)
        .await
        .expect("a write past the old end");
    let refused = v
        .resize(64 * MIB, false)
        .await
        .expect_err("data past the new end");
    assert_eq!(refused.kind(), ErrorKind::InvalidInput, "{refused}");
    assert!(refused.to_string().contains("holds data past"), "{refused}");
    assert_eq!(v.size(), 128 * MIB, "a refused shrink changes nothing");
    let unaligned = v
        .resize(64 * MIB + 4096, false)
        .await
        .expect_err("not a block multiple");
    assert_eq!(unaligned.kind(), ErrorKind::InvalidInput, "{unaligned}");
    v.resize(64 * MIB, true).await.expect("forced shrink");
    assert_eq!(v.size(), 64 * MIB);
    assert!(
        v.write(100 * MIB, pattern(4096, 1), false).await.is_err(),
        "past the end"
    );
    assert_reads(&v, 4, 1).await;
    v.close().await.expect("close");

    // The size is the map's: another folder sees it, and growing again shows zeros where the
    // discarded data was.
    let w = f.open(f.config("b")).await;
    assert_eq!(w.size(), 64 * MIB);
    w.resize(128 * MIB, false).await.expect("grow again");
    assert_eq!(read(&w, 100 * MIB, BLOCK).await, vec![0u8; BLOCK as usize]);
    w.close().await.expect("close");
    let report = engine::object_volume::inspect(
        std::sync::Arc::clone(&f.store),
        &object_store::path::Path::from(""),
        f.layout,
        "disk",
    )
    .await
    .expect("inspect");
    assert_eq!(report.meta.size, 128 * MIB, "info reports the size now");
    // A checkpoint carries its state's size.
    restore(&f, "small", "c", false).await;
    let x = f.open(f.config("c")).await;
    assert_eq!(x.size(), 64 * MIB);
    assert_reads(&x, 4, 1).await;
    x.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_that_crashed_before_its_new_owner_replays_no_journal() {
    use engine::object_volume::lines::{self, MapLine};
    let f = Fixture::new(64 * MIB, BLOCK).await;
    let mut config = f.config("a");
    config.sync_interval = std::time::Duration::from_secs(3600);
    let a = f.open(config).await;
    fill(&a, 8, 1).await;
    let one = a.create_checkpoint(Some("one")).await.expect("checkpoint");
    assert!(
        one.journal_owner.is_some(),
        "the checkpoint names its journal's owner"
    );
    fill(&a, 8, 2).await;
    a.write(0, pattern(BLOCK as usize, 99), true)
        .await
        .expect("a journaled tail");
    drop(a);
    // A restore's switch, then a crash before its new journal owner was committed.
    let line = MapLine {
        line: 1,
        dir: lines::replica_dir(1),
        base_txid: one.txid,
        base: one.map_files.clone(),
        checkpoint: one.name.clone(),
        stale_owner: one.journal_owner.clone(),
    };
    lines::create(
        f.store.as_ref(),
        &object_store::path::Path::from("disk"),
        &line,
    )
    .await
    .expect("line");
    // The folder whose journal continued the checkpoint's state: set aside, never replayed.
    let a = f.open(f.config("a")).await;
    assert_reads(&a, 8, 1).await;
    a.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_on_its_sources_host_reads_the_blocks_the_source_cached() {
    let f = Fixture::new(64 * MIB, BLOCK).await;
    let prefix = object_store::path::Path::from("");
    let shared = f.dir.path().join("shared-cache");
    let config = |local: &str| {
        let mut c = f.config(local);
        c.shared_cache_dir = Some(shared.clone());
        c
    };
    let open = |name: &'static str, c| {
        let store = std::sync::Arc::clone(&f.store);
        let prefix = prefix.clone();
        async move {
            ObjectVolume::open(store, &prefix, f.layout, name, c)
                .await
                .expect("open")
        }
    };
    let source = open("disk", config("s")).await;
    fill(&source, 16, 1).await;
    source
        .create_checkpoint(Some("base"))
        .await
        .expect("checkpoint");
    clone_volume(f.store.as_ref(), &prefix, "disk", "base", "twin")
        .await
        .expect("clone");

    let twin = open("twin", config("t")).await;
    assert_reads(&twin, 16, 1).await;
    assert_eq!(
        fetches(&twin).await,
        0.0,
        "the clone read every block from the cache its source filled"
    );
    // What the clone would have cost with a cache of its own.
    let mut own = f.config("t-own");
    own.read_only = true;
    let follower = open("twin", own).await;
    assert_reads(&follower, 16, 1).await;
    assert!(fetches(&follower).await > 0.0, "a cache of its own is cold");
    follower.close().await.expect("close");

    // The clone's overwrites retire its own versions only: the source's blocks stay cached.
    fill(&twin, 4, 2).await;
    twin.maintain_now().await.expect("maintenance");
    assert_reads(&source, 16, 1).await;
    assert_eq!(
        fetches(&source).await,
        0.0,
        "the source still reads from the cache"
    );

    // The last volume out saves the shared index: after a restart the clone starts warm.
    source.close().await.expect("close");
    twin.close().await.expect("close");
    let twin = open("twin", config("t")).await;
    for b in 0..16 {
        assert_block(&twin, b, if b < 4 { 2 } else { 1 }).await;
    }
    assert_eq!(fetches(&twin).await, 0.0, "warm after a restart");
    twin.close().await.expect("close");
}

/// Opens checkpoint `checkpoint` of `volume` read-only from a fresh local folder (its reads come
/// from the store) and checks every block's seed.
async fn assert_checkpoint(f: &Fixture, volume: &str, checkpoint: &str, seeds: &[u8]) {
    let view = ObjectVolume::open_checkpoint(
        std::sync::Arc::clone(&f.store),
        &object_store::path::Path::from(""),
        f.layout,
        volume,
        checkpoint,
        f.config(&format!("view-{volume}-{checkpoint}-{}", seeds[0])),
    )
    .await
    .expect("open the checkpoint");
    for (b, seed) in seeds.iter().enumerate() {
        assert_block(&view, b as u64, *seed).await;
    }
    view.close().await.expect("close");
}

/// Checkpoints of a volume and of its clone, and the clone itself, read back exactly while
/// both volumes overwrite everything several times with collection and map maintenance.
async fn checkpoints_and_clones_survive_overwrites_and_gc(f: Fixture) {
    const BLOCKS: usize = 32;
    let prefix = object_store::path::Path::from("");
    let source = f.open(f.config("s")).await;
    fill(&source, BLOCKS as u64, 1).await;
    source.create_checkpoint(Some("a")).await.expect("a");
    fill(&source, BLOCKS as u64, 2).await;
    source.create_checkpoint(Some("b")).await.expect("b");
    clone_volume(f.store.as_ref(), &prefix, "disk", "a", "twin")
        .await
        .expect("clone");
    let twin = open_volume(&f, "twin", "t").await;
    // The clone rewrites its first half each round: its second half stays the source's.
    let mut twin_seeds = vec![1u8; BLOCKS];
    let mut twin_checkpoint = Vec::new();
    for round in 0..3u8 {
        fill(&source, BLOCKS as u64, 10 + round).await;
        fill(&twin, BLOCKS as u64 / 2, 20 + round).await;
        twin_seeds[..BLOCKS / 2].fill(20 + round);
        if round == 0 {
            twin.create_checkpoint(Some("t1")).await.expect("t1");
            twin_checkpoint = twin_seeds.clone();
        }
        source.maintain_now().await.expect("maintenance");
        twin.maintain_now().await.expect("maintenance");
    }
    let seeds_of = |seed: u8| vec![seed; BLOCKS];
    for (b, seed) in twin_seeds.iter().enumerate() {
        assert_block(&source, b as u64, 12).await;
        assert_block(&twin, b as u64, *seed).await;
    }
    source.close().await.expect("close");
    twin.close().await.expect("close");
    // From the store alone, in fresh folders.
    assert_checkpoint(&f, "disk", "a", &seeds_of(1)).await;
    assert_checkpoint(&f, "disk", "b", &seeds_of(2)).await;
    assert_checkpoint(&f, "twin", "t1", &twin_checkpoint).await;
    let twin = open_volume(&f, "twin", "t-fresh").await;
    for (b, seed) in twin_seeds.iter().enumerate() {
        assert_block(&twin, b as u64, *seed).await;
    }
    twin.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_and_clones_survive_overwrites_and_gc_on_a_directory() {
    checkpoints_and_clones_survive_overwrites_and_gc(Fixture::new(64 * MIB, BLOCK).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_and_clones_survive_overwrites_and_gc_on_s3() {
    checkpoints_and_clones_survive_overwrites_and_gc(Fixture::on_s3(64 * MIB, BLOCK).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_could_leave_the_prefix_are_refused_wherever_they_enter() {
    let f = Fixture::new(64 * MIB, BLOCK).await;
    let prefix = object_store::path::Path::from("");
    for bad in ["../disk", "a/b", "x\0y", "tab\tname", "..", ".hidden", ""] {
        let e = ObjectVolume::open(
            std::sync::Arc::clone(&f.store),
            &prefix,
            f.layout,
            bad,
            f.config("bad"),
        )
        .await
        .err()
        .expect("a name that is not a volume's is refused");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad:?}: {e}");
        let e = clone_volume(f.store.as_ref(), &prefix, "disk", "base", bad)
            .await
            .expect_err("a clone named so");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad:?}: {e}");
    }
    let v = f.open(f.config("a")).await;
    fill(&v, 2, 1).await;
    v.create_checkpoint(Some("base")).await.expect("checkpoint");
    v.close().await.expect("close");

    // A checkpoint whose recorded map files point outside the volumes' prefix.
    rewrite_json(&f, "disk/checkpoints/base.json", |checkpoint| {
        checkpoint["map_files"][0]["volume"] = serde_json::json!("../../etc");
    })
    .await;
    let e = v_checkpoints(&f).await.expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("base.json"), "{e}");

    // A volume.json that names another volume.
    rewrite_json(&f, "disk/volume.json", |meta| {
        meta["name"] = serde_json::json!("other");
    })
    .await;
    let e = ObjectVolume::open(
        std::sync::Arc::clone(&f.store),
        &prefix,
        f.layout,
        "disk",
        f.config("b"),
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
}

/// Rewrites the JSON object at `key` in the store with `change`.
async fn rewrite_json(f: &Fixture, key: &str, change: impl FnOnce(&mut serde_json::Value)) {
    use object_store::{ObjectStoreExt, PutPayload};
    let key = object_store::path::Path::from(key);
    let got = f.store.get(&key).await.expect("get");
    let mut value: serde_json::Value =
        serde_json::from_slice(&got.bytes().await.expect("bytes")).expect("json");
    change(&mut value);
    let bytes = serde_json::to_vec(&value).expect("json");
    f.store
        .put(&key, PutPayload::from(bytes))
        .await
        .expect("put");
}

/// The checkpoints of `disk`, read from the store.
async fn v_checkpoints(
    f: &Fixture,
) -> std::io::Result<Vec<engine::object_volume::checkpoints::Checkpoint>> {
    engine::object_volume::checkpoints::list(
        f.store.as_ref(),
        &object_store::path::Path::from(""),
        "disk",
    )
    .await
}
