//! The local directory misbehaving: the journal's filesystem fills up, the cache's fills up,
//! the journal's last record is torn by a crash, the directory refuses writes. Each is a
//! clear error (or none, for the cache), reads go on, and no acknowledged write is lost. Full
//! filesystems are real: a tmpfs of a few MiB mounted for the test; a directory that refuses
//! writes is made immutable (`chattr +i`) under the open volume (the tests run as root, as
//! `scripts/test.sh` does, on an ext4 scratch directory).

use engine::object_volume::{ObjectVolume, VolumeConfig};
use engine::{BlockDevice, DeviceError};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod common;
use common::{Fixture, MIB, pattern, read};

const BLOCK: u32 = 65536;

/// Runs `cmd`, which needs root (and, for `chattr`, an ext4 scratch directory).
fn as_root(cmd: &mut Command) {
    let status = cmd.status().expect("running a command");
    assert!(
        status.success(),
        "{cmd:?} failed: these tests need root and an ext4 scratch directory"
    );
}

/// A tmpfs of `size` mounted at `path` for as long as this lives.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).expect("mount point");
        as_root(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(path),
        );
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn config(f: &Fixture, local: &Path, cache: &Path) -> VolumeConfig {
    let mut c = f.config("unused");
    c.local_dir = local.to_path_buf();
    c.shared_cache_dir = Some(cache.to_path_buf());
    c.cache_bytes = 8 * MIB;
    c
}

/// The first `blocks` blocks hold the pattern written to each.
async fn assert_blocks(v: &ObjectVolume, blocks: u64) {
    for b in 0..blocks {
        let at = b * u64::from(BLOCK);
        let expected = pattern(BLOCK as usize, b as u8);
        assert_eq!(read(v, at, BLOCK).await, expected, "block {b}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_journal_fails_writes_with_no_space_keeps_reads_and_loses_nothing() {
    let f = Fixture::new(64 * MIB, BLOCK).await;
    let local = f.dir.path().join("local");
    let _tmpfs = Tmpfs::mount(&local, "6m");
    let cache = f.dir.path().join("cache");
    let mut c = config(&f, &local, &cache);
    c.sync_interval = Duration::from_secs(3600); // nothing leaves the journal by itself
    let v = f.open(c.clone()).await;
    let mut written = 0u64;
    let full = loop {
        match v
            .write(
                written * u64::from(BLOCK),
                pattern(BLOCK as usize, written as u8),
                false,
            )
            .await
        {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
        assert!(
            written < 200,
            "a 6 MiB journal took {written} blocks of 64 KiB"
        );
    };
    assert!(
        matches!(full, DeviceError::NoSpace(_)),
        "a full journal is NoSpace (ENOSPC to the client): {full}"
    );
    assert!(written > 20, "only {written} blocks fit");
    v.flush().await.expect("what was written is flushed");
    assert_blocks(&v, written).await;
    // Once uploaded, the journal has room again.
    v.sync_to_store().await.expect("upload");
    let more = written * u64::from(BLOCK);
    v.write(more, pattern(BLOCK as usize, 99), false)
        .await
        .expect("a write after the upload freed the journal");
    v.flush().await.expect("flush");
    drop(v); // a crash: the last write lives in the journal only
    let v = f.open(c).await;
    assert_blocks(&v, written).await;
    assert_eq!(read(&v, more, BLOCK).await, pattern(BLOCK as usize, 99));
    v.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_filesystem_costs_fetches_not_errors() {
    let f = Fixture::new(64 * MIB, BLOCK).await;
    let cache = f.dir.path().join("cache");
    let _tmpfs = Tmpfs::mount(&cache, "1m");
    let blocks = 48u64; // 3 MiB: three times the cache's filesystem
    {
        let v = f
            .open(config(&f, &f.dir.path().join("writer"), &cache))
            .await;
        for b in 0..blocks {
            v.write(
                b * u64::from(BLOCK),
                pattern(BLOCK as usize, b as u8),
                false,
            )
            .await
            .expect("writes go to the journal, not the cache");
        }
        v.close().await.expect("close: uploaded");
    }
    let v = f
        .open(config(&f, &f.dir.path().join("reader"), &cache))
        .await;
    for _round in 0..2 {
        assert_blocks(&v, blocks).await;
    }
    v.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_journal_record_is_dropped_at_restart_and_flushed_writes_stay() {
    let f = Fixture::new(64 * MIB, BLOCK).await;
    let local = f.dir.path().join("local");
    let cache = f.dir.path().join("cache");
    let mut c = config(&f, &local, &cache);
    c.sync_interval = Duration::from_secs(3600);
    {
        let v = f.open(c.clone()).await;
        v.write(0, pattern(BLOCK as usize, 1), false)
            .await
            .expect("write");
        v.flush().await.expect("flush");
        v.write(u64::from(BLOCK), pattern(BLOCK as usize, 2), false)
            .await
            .expect("write, never flushed");
        // A crash in the middle of writing the last record: cut it short.
    }
    let journal = local.join("journal");
    let mut segments: Vec<PathBuf> = std::fs::read_dir(&journal)
        .expect("journal")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("journal-0"))
        })
        .collect();
    segments.sort();
    let last = segments.last().expect("a segment");
    let len = std::fs::metadata(last).expect("segment").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(last)
        .expect("open");
    file.set_len(len - 1000).expect("tear the last record");
    drop(file);
    let v = f.open(c).await;
    assert_eq!(
        read(&v, 0, BLOCK).await,
        pattern(BLOCK as usize, 1),
        "flushed write"
    );
    assert_eq!(
        read(&v, u64::from(BLOCK), BLOCK).await,
        vec![0u8; BLOCK as usize],
        "the torn, unflushed write is gone, not half there"
    );
    v.write(u64::from(BLOCK), pattern(BLOCK as usize, 3), false)
        .await
        .expect("the journal takes writes again");
    v.close().await.expect("close");
}

/// `chattr -R +i` on `dirs` for as long as this lives: writes to files already open there fail
/// (EPERM), as on a filesystem that turned read-only under a running server (a read-only
/// remount is refused while files are open for writing, so the immutable flag stands in).
struct Immutable(Vec<PathBuf>);

impl Immutable {
    fn set(dirs: &[&Path]) -> Immutable {
        for dir in dirs {
            as_root(Command::new("chattr").args(["-R", "+i"]).arg(dir));
        }
        Immutable(dirs.iter().map(|d| d.to_path_buf()).collect())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = Command::new("chattr").args(["-R", "-i"]).arg(dir).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_directory_that_refuses_writes_fails_writes_keeps_reads_and_loses_nothing() {
    let f = Fixture::new(64 * MIB, BLOCK).await;
    let local = f.dir.path().join("local");
    let cache = f.dir.path().join("cache");
    let mut c = config(&f, &local, &cache);
    c.sync_interval = Duration::from_secs(3600);
    let v = f.open(c.clone()).await;
    for b in 0..8u64 {
        v.write(
            b * u64::from(BLOCK),
            pattern(BLOCK as usize, b as u8),
            false,
        )
        .await
        .expect("write");
    }
    v.sync_to_store().await.expect("upload");
    v.flush().await.expect("flush");
    {
        let _frozen = Immutable::set(&[&local, &cache]);
        let refused = v
            .write(9 * u64::from(BLOCK), pattern(BLOCK as usize, 9), false)
            .await
            .expect_err("a write the journal cannot take");
        assert!(
            refused.to_string().contains("not permitted"),
            "the error says why: {refused}"
        );
        // Reads go on: from the cache, and from the store past a cache that refuses blocks.
        assert_blocks(&v, 8).await;
    }
    v.write(9 * u64::from(BLOCK), pattern(BLOCK as usize, 9), false)
        .await
        .expect("writes work again once the directory takes them");
    v.flush().await.expect("flush");
    drop(v); // a crash
    let v = f.open(c).await;
    assert_blocks(&v, 8).await;
    assert_eq!(
        read(&v, 9 * u64::from(BLOCK), BLOCK).await,
        pattern(BLOCK as usize, 9)
    );
    v.close().await.expect("close");
}
