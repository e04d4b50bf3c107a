//! End to end, as a user would: a 100 GiB bucketdisk volume formatted with ext4, filled,
//! trimmed, and mounted again after a server restart.
//!
//! There is no nbd kernel module here, so the block device is built from parts that are:
//!
//! ```text
//! bucketdisk serve --store file://DIR/store --socket DIR/nbd.sock --size 100G
//! touch TARGET
//! qemu-storage-daemon \
//!   --blockdev driver=nbd,node-name=nbd0,server.type=unix,server.path=DIR/nbd.sock,discard=unmap \
//!   --export type=fuse,id=exp0,node-name=nbd0,mountpoint=TARGET,writable=on,allow-other=off
//! losetup --find --show TARGET            # -> /dev/loopN
//! mkfs.ext4 -F -q /dev/loopN && mount /dev/loopN MNT
//! ```
//!
//! A discard on the loop device becomes `fallocate(PUNCH_HOLE)` on the FUSE file, which
//! qemu-storage-daemon turns into a write-zeroes request that *may unmap*, which reaches the
//! server as NBD_CMD_WRITE_ZEROES without NO_HOLE, and the server punches a hole in
//! `<store>/disk/disk.raw`. `discard=unmap` on the blockdev is essential: without it qemu strips
//! "may unmap", the server is asked for allocated zeroes (NO_HOLE), and every trim preallocates
//! the trimmed range on the host; an fstrim of the empty 100 GiB filesystem then tries to
//! allocate ~98 GiB. The test checks that discards really punch holes (on a small range) before
//! it lets mkfs and fstrim discard the whole device.
//!
//! Everything set up here is torn down by [`Stack`]'s `Drop`, so a failing assertion never leaves
//! a mount, a loop device or a FUSE export behind.

mod common;
use common::*;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VOLUME_BYTES: u64 = 100 * GIB;

/// The loop device, FUSE export and ext4 mount stacked on one running server. Drop tears down
/// whatever is still up, in order: unmount ext4, detach the loop device, stop
/// qemu-storage-daemon, and lazily unmount a FUSE export it left behind.
struct Stack {
    target: PathBuf,
    mnt: PathBuf,
    qsd_log: PathBuf,
    qsd: Option<Child>,
    loop_dev: Option<String>,
}

impl Stack {
    fn new(work: &Path) -> Self {
        // Canonical, so the paths match /proc/self/mountinfo even if TMPDIR is a symlink.
        let work = work.canonicalize().expect("canonicalize work dir");
        let target = work.join("fuse-target");
        let mnt = work.join("mnt");
        std::fs::create_dir_all(&mnt).expect("create mount point");
        File::create(&target).expect("create FUSE mount target");
        Stack {
            target,
            mnt,
            qsd_log: work.join("qsd.log"),
            qsd: None,
            loop_dev: None,
        }
    }

    /// Exports the server's default volume as `target` and attaches a loop device to it.
    fn up(&mut self, socket: &Path) {
        let server = format!("server.type=unix,server.path={}", socket.display());
        self.up_from(&server, &[]);
    }

    /// [`Stack::up`] from the NBD server `server` (qemu's `server.*` and `tls-creds` options)
    /// with qemu `--object`s (TLS credentials).
    fn up_from(&mut self, server: &str, objects: &[String]) {
        assert!(
            self.qsd.is_none() && self.loop_dev.is_none(),
            "stack already up"
        );
        let log = File::create(&self.qsd_log).expect("create qsd log");
        let blockdev = format!("driver=nbd,node-name=nbd0,{server},discard=unmap");
        let export = format!(
            "type=fuse,id=exp0,node-name=nbd0,mountpoint={},writable=on,allow-other=off",
            self.target.display()
        );
        let mut qsd = Command::new("qemu-storage-daemon");
        for object in objects {
            qsd.arg("--object").arg(object);
        }
        let child = qsd
            .arg("--blockdev")
            .arg(&blockdev)
            .arg("--export")
            .arg(&export)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone qsd log"))
            .stderr(log)
            .spawn()
            .expect("spawn qemu-storage-daemon");
        self.qsd = Some(child);

        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let len = std::fs::metadata(&self.target).map(|m| m.len()).ok();
            if is_mounted(&self.target) && len == Some(VOLUME_BYTES) {
                break;
            }
            if let Some(Ok(Some(status))) = self.qsd.as_mut().map(|c| c.try_wait()) {
                self.qsd = None;
                panic!(
                    "qemu-storage-daemon exited early ({status}):\n{}",
                    self.qsd_log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "FUSE export did not appear (size {len:?}):\n{}",
                self.qsd_log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }

        let dev = run(Command::new("losetup")
            .arg("--find")
            .arg("--show")
            .arg(&self.target));
        let dev = dev.trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        self.loop_dev = Some(dev);
    }

    fn dev(&self) -> &str {
        self.loop_dev.as_deref().expect("loop device attached")
    }

    fn mount(&mut self) {
        run(Command::new("mount").arg(self.dev()).arg(&self.mnt));
        assert!(is_mounted(&self.mnt));
    }

    fn umount(&mut self) {
        run(Command::new("umount").arg(&self.mnt));
        assert!(
            !is_mounted(&self.mnt),
            "{} still mounted",
            self.mnt.display()
        );
    }

    /// Orderly teardown that fails the test if any step fails.
    fn down(&mut self) {
        if is_mounted(&self.mnt) {
            self.umount();
        }
        if let Some(dev) = self.loop_dev.take() {
            run(Command::new("losetup").arg("-d").arg(&dev));
            wait_loop_detached(&dev);
        }
        if let Some(mut child) = self.qsd.take() {
            let status = stop_child(&mut child);
            assert!(
                status.is_some_and(|s| s.success()),
                "qemu-storage-daemon did not exit cleanly on SIGTERM ({status:?}):\n{}",
                self.qsd_log_text()
            );
        }
        assert!(
            !is_mounted(&self.target),
            "FUSE export still mounted after qemu-storage-daemon exited"
        );
    }

    /// Teardown after the server died under the stack: I/O errors are expected, so everything
    /// is forced (lazy unmounts, SIGKILL) and nothing is asserted.
    fn crash_down(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = run_output(Command::new("umount").arg("-l").arg(&self.mnt));
        }
        if let Some(dev) = self.loop_dev.take() {
            let _ = run_output(Command::new("losetup").arg("-d").arg(&dev));
            wait_loop_detached(&dev);
        }
        if let Some(mut child) = self.qsd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.target) {
            let _ = run_output(Command::new("umount").arg("-l").arg(&self.target));
        }
    }

    fn qsd_log_text(&self) -> String {
        std::fs::read_to_string(&self.qsd_log).unwrap_or_default()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- qemu-storage-daemon log ----\n{}", self.qsd_log_text());
        }
        // Best effort, every step whatever happened before it.
        if is_mounted(&self.mnt) {
            let _ = run_output(Command::new("umount").arg("-l").arg(&self.mnt));
        }
        if let Some(dev) = self.loop_dev.take() {
            let _ = run_output(Command::new("losetup").arg("-d").arg(&dev));
            wait_loop_detached(&dev);
        }
        if let Some(mut child) = self.qsd.take() {
            stop_child(&mut child);
        }
        if is_mounted(&self.target) {
            let _ = run_output(Command::new("umount").arg("-l").arg(&self.target));
        }
    }
}

/// SIGTERM, then SIGKILL after 10 s. Returns the exit status if the process exited by itself.
fn stop_child(child: &mut Child) -> Option<std::process::ExitStatus> {
    let _ = run_output(
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Waits (up to 10 s) until the kernel has released the loop device's backing file.
fn wait_loop_detached(dev: &str) {
    let name = dev.trim_start_matches("/dev/");
    let backing = PathBuf::from(format!("/sys/block/{name}/loop/backing_file"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while backing.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True if `path` is a mount point (of anything) in this mount namespace.
fn is_mounted(path: &Path) -> bool {
    let wanted = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .any(|mount_point| mount_point == wanted)
}

/// Bytes the volume holds, as the server reports them (data extents of NBD block status): on
/// a thin volume, exactly what is allocated.
fn allocated(server: &Server) -> u64 {
    mapped_data(server)
}

/// Bytes the server reports as data (not hole) through NBD block status.
fn mapped_data(server: &Server) -> u64 {
    let totals = run(Command::new("nbdinfo")
        .arg("--map")
        .arg("--totals")
        .arg(server.uri()));
    // Lines look like "   5316608   0.0%   0 data" and "107368865792 100.0%   3 hole,zero".
    totals
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [bytes, _, "0", "data"] => bytes.parse::<u64>().ok(),
                _ => None,
            }
        })
        .sum()
}

/// Files written to the filesystem; `keep` files survive the deletion before fstrim.
struct TestFile {
    rel: PathBuf,
    keep: bool,
}

/// Writes the [`test_files`] under `originals` and copies them onto the filesystem at `mnt`,
/// then syncs it.
fn write_test_files(mnt: &Path, originals: &Path) -> Vec<(TestFile, usize)> {
    let files = test_files();
    for (seed, (file, len)) in files.iter().enumerate() {
        let original = originals.join(&file.rel);
        std::fs::create_dir_all(original.parent().expect("parent")).expect("mkdir originals");
        write_pattern_file(&original, *len, seed as u64 + 1);
        let target = mnt.join(&file.rel);
        std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir on ext4");
        std::fs::copy(&original, &target).expect("copy onto ext4");
    }
    run(Command::new("sync").arg("-f").arg(mnt));
    files
}

fn test_files() -> Vec<(TestFile, usize)> {
    let mut files = Vec::new();
    for i in 0..4 {
        files.push((
            TestFile {
                rel: PathBuf::from(format!("big-{i}.bin")),
                keep: i == 3,
            },
            (8 * MIB) as usize,
        ));
    }
    files.push((
        TestFile {
            rel: PathBuf::from("odd/size-1MiB-plus-123.bin"),
            keep: true,
        },
        (MIB + 123) as usize,
    ));
    for a in 0..3 {
        for b in 0..3 {
            for c in 0..4 {
                files.push((
                    TestFile {
                        rel: PathBuf::from(format!("tree/d{a}/e{b}/file-{c}.dat")),
                        keep: true,
                    },
                    1000 + 7919 * (a * 12 + b * 4 + c),
                ));
            }
        }
    }
    files
}

/// Compares every kept file under `mnt` with its original in `originals`, and checks the deleted
/// ones are gone.
fn verify_files(mnt: &Path, originals: &Path, files: &[(TestFile, usize)], after_delete: bool) {
    for (file, len) in files {
        let on_fs = mnt.join(&file.rel);
        if after_delete && !file.keep {
            assert!(!on_fs.exists(), "{} came back", file.rel.display());
            continue;
        }
        let got = std::fs::read(&on_fs).unwrap_or_else(|e| panic!("read {}: {e}", on_fs.display()));
        let want = std::fs::read(originals.join(&file.rel)).expect("read original");
        assert_eq!(got.len(), *len, "{} has the wrong size", file.rel.display());
        assert!(
            got == want,
            "{} has the wrong content: {}",
            file.rel.display(),
            describe_mismatch(&got, &want)
        );
    }
}

/// The 4 KiB pages of `got` that are neither the written data at that place (`want`) nor zeros.
fn foreign_pages(got: &[u8], want: &[u8]) -> Vec<usize> {
    const PAGE: usize = 4096;
    got.chunks(PAGE)
        .enumerate()
        .filter(|(i, page)| {
            let start = i * PAGE;
            let written = want.get(start..start + page.len());
            written != Some(page) && page.iter().any(|&b| b != 0)
        })
        .map(|(i, _)| i)
        .collect()
}

/// Which 4 KiB pages of a file differ from what was written and what they hold instead, so a
/// failure says whether data went missing (zeros), went stale, or landed in the wrong place.
fn describe_mismatch(got: &[u8], want: &[u8]) -> String {
    const PAGE: usize = 4096;
    let mut bad = Vec::new();
    for (i, (g, w)) in got.chunks(PAGE).zip(want.chunks(PAGE)).enumerate() {
        if g != w {
            let zeros = g.iter().all(|&b| b == 0);
            let first = g.iter().zip(w).position(|(a, b)| a != b).unwrap_or(0);
            bad.push(format!(
                "page {i} (from byte {}){}",
                i * PAGE + first,
                if zeros {
                    " is zeros"
                } else {
                    " holds other data"
                }
            ));
        }
    }
    format!(
        "{} bytes (want {}), {} of {} pages differ: {}",
        got.len(),
        want.len(),
        bad.len(),
        want.len().div_ceil(PAGE),
        bad.join(", ")
    )
}

fn e2fsck_clean(dev: &str) {
    let out = run_output(Command::new("e2fsck").arg("-fn").arg(dev));
    assert!(
        out.status.success(),
        "e2fsck -fn {dev} found problems ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ext4_on_100g_volume_survives_trim_and_restart() {
    for tool in [
        "qemu-storage-daemon",
        "losetup",
        "blkdiscard",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "umount",
        "fstrim",
        "nbdinfo",
        "sync",
    ] {
        require_tool(tool);
    }
    assert_eq!(
        run(Command::new("id").arg("-u")).trim(),
        "0",
        "this test needs root (losetup, mount)"
    );
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
    let test_start = Instant::now();

    let mut server = Server::start_with(ServerOptions {
        unix_socket: true,
        size: "100G",
        ..Default::default()
    });
    let Endpoint::Unix(socket) = server.endpoint.clone() else {
        unreachable!("unix_socket: true")
    };
    let work = tempfile::Builder::new()
        .prefix("bucketdisk-ext4-")
        .tempdir()
        .expect("tempdir");
    let originals = work.path().join("originals");
    // Declared after `server`, so it is torn down before the server stops.
    let mut stack = Stack::new(work.path());
    stack.up(&socket);
    let dev = stack.dev().to_string();
    println!("loop device {dev} on {}", stack.target.display());

    // Canary: a discard on the loop device must punch a hole on the server. If it allocated
    // instead, the whole-device discards of mkfs and fstrim would fill the host's disk.
    let baseline = allocated(&server);
    let canary_at = GIB;
    let canary = vec![0x5a_u8; (16 * MIB) as usize];
    {
        let file = File::options()
            .write(true)
            .open(&dev)
            .expect("open loop device");
        file.write_all_at(&canary, canary_at).expect("write canary");
        file.sync_all().expect("sync canary");
    }
    let with_canary = allocated(&server);
    assert!(
        with_canary >= baseline + 16 * MIB,
        "16 MiB written to the loop device did not reach the server ({baseline} -> {with_canary})"
    );
    run(Command::new("blkdiscard")
        .arg("--offset")
        .arg(canary_at.to_string())
        .arg("--length")
        .arg((16 * MIB).to_string())
        .arg(&dev));
    let after_discard = allocated(&server);
    assert!(
        after_discard <= baseline,
        "blkdiscard did not punch a hole on the server ({baseline} -> {with_canary} -> \
         {after_discard} bytes allocated); refusing to run mkfs/fstrim, which discard 100 GiB"
    );

    // mkfs.ext4 discards the whole device first, then writes the metadata and zeroes the journal.
    let mkfs_start = Instant::now();
    run(Command::new("mkfs.ext4").arg("-F").arg("-q").arg(&dev));
    let mkfs_time = mkfs_start.elapsed();
    println!("mkfs.ext4 on 100 GiB took {mkfs_time:.2?}");
    let after_mkfs = allocated(&server);
    println!(
        "after mkfs: {} MiB allocated on the server, {} MiB mapped as data",
        after_mkfs / MIB,
        mapped_data(&server) / MIB
    );
    // The 512 MiB journal is zeroed with NO_HOLE (allocated), the rest must stay thin.
    assert!(
        after_mkfs < 2 * GIB,
        "a fresh filesystem should be thin, but {after_mkfs} bytes are allocated"
    );

    stack.mount();
    let files = write_test_files(&stack.mnt, &originals);
    verify_files(&stack.mnt, &originals, &files, false);

    let written: u64 = files.iter().map(|(_, len)| *len as u64).sum();
    let deleted: u64 = files
        .iter()
        .filter(|(f, _)| !f.keep)
        .map(|(_, len)| *len as u64)
        .sum();
    let before_trim = allocated(&server);
    let data_before_trim = mapped_data(&server);
    println!(
        "wrote {} MiB: {} MiB allocated on the server, {} MiB mapped as data",
        written / MIB,
        before_trim / MIB,
        data_before_trim / MIB
    );
    // Allocation is counted in whole blocks (64 KiB by default), some of which mkfs had already
    // touched: allow a few MiB of overlap.
    assert!(
        before_trim + 4 * MIB >= after_mkfs + written,
        "the files did not reach the server ({after_mkfs} -> {before_trim} bytes allocated)"
    );

    for (file, _) in files.iter().filter(|(f, _)| !f.keep) {
        std::fs::remove_file(stack.mnt.join(&file.rel)).expect("delete");
    }
    run(Command::new("sync").arg("-f").arg(&stack.mnt));
    let trim_start = Instant::now();
    let fstrim = run(Command::new("fstrim").arg("-v").arg(&stack.mnt));
    println!(
        "fstrim took {:.2?}: {}",
        trim_start.elapsed(),
        fstrim.trim()
    );
    let trimmed: u64 = fstrim
        .split('(')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse fstrim output {fstrim:?}"));
    assert!(trimmed >= deleted, "fstrim trimmed only {trimmed} bytes");
    let after_trim = allocated(&server);
    let data_after_trim = mapped_data(&server);
    println!(
        "deleted {} MiB + fstrim: {} MiB allocated on the server, {} MiB mapped as data",
        deleted / MIB,
        after_trim / MIB,
        data_after_trim / MIB
    );
    // Counted in whole 64 KiB blocks, some shared with kept data: allow 2 MiB.
    assert!(
        after_trim + deleted <= before_trim + 2 * MIB,
        "fstrim did not release the deleted files on the server \
         ({before_trim} -> {after_trim} bytes allocated, {deleted} deleted)"
    );
    assert!(
        data_after_trim + deleted <= data_before_trim + 2 * MIB,
        "block status still maps the deleted files as data \
         ({data_before_trim} -> {data_after_trim} bytes, {deleted} deleted)"
    );
    verify_files(&stack.mnt, &originals, &files, true);

    // Take everything down, restart the server on the same store, and bring it all back.
    stack.umount();
    e2fsck_clean(&dev);
    stack.down();
    let status = server.stop();
    assert!(status.success(), "bucketdisk exited with {status}");
    assert!(server.log_text().contains("stopped cleanly"));
    server.spawn();

    stack.up(&socket);
    let dev = stack.dev().to_string();
    e2fsck_clean(&dev);
    stack.mount();
    verify_files(&stack.mnt, &originals, &files, true);
    let entries = std::fs::read_dir(stack.mnt.join("tree"))
        .expect("read tree")
        .count();
    assert_eq!(entries, 3, "directory tree lost entries");

    // Still writable after the restart.
    let late = originals.join("after-restart.bin");
    write_pattern_file(&late, (2 * MIB) as usize, 99);
    std::fs::copy(&late, stack.mnt.join("after-restart.bin")).expect("write after restart");
    run(Command::new("sync").arg("-f").arg(&stack.mnt));
    assert!(
        std::fs::read(stack.mnt.join("after-restart.bin")).expect("read")
            == std::fs::read(&late).expect("read")
    );
    stack.umount();
    e2fsck_clean(&dev);
    stack.down();
    let status = server.stop();
    assert!(status.success(), "bucketdisk exited with {status}");
    println!("test took {:.2?}", test_start.elapsed());
}

/// The host loses its local disk (journal and cache) right after a `sync`: SIGKILL, delete the
/// local directory, restart from the store alone. The filesystem is whatever prefix of the
/// writes the store held; ext4 must mount (replaying its own journal), come out of `e2fsck -fn`
/// clean, and no file may hold data it was never given: every 4 KiB page of a file that is
/// there is either what was written at that place or zeros. Zeros are allowed even at full
/// size: with `dioread_nolock` (the default since Linux 5.6) ext4 allocates unwritten extents,
/// commits the file size, and marks the extents written in a later transaction once the data
/// is on the device; a crash between the two leaves a full-size file whose unconverted extents
/// read as zeros.
#[test]
fn ext4_survives_losing_the_local_disk() {
    require_ext4_stack();
    let mut server = Server::start_with(ServerOptions {
        unix_socket: true,
        size: "100G",
        extra_args: vec!["--sync-interval".into(), "200ms".into()],
        ..Default::default()
    });
    let Endpoint::Unix(socket) = server.endpoint.clone() else {
        unreachable!("unix_socket: true")
    };
    let work = tempfile::Builder::new()
        .prefix("bucketdisk-ext4-lost-")
        .tempdir()
        .expect("tempdir");
    let originals = work.path().join("originals");
    let mut stack = Stack::new(work.path());
    stack.up(&socket);
    let dev = stack.dev().to_string();
    run(Command::new("mkfs.ext4").arg("-F").arg("-q").arg(&dev));
    stack.mount();
    let files = test_files();
    for (round, chunk) in files.chunks(8).enumerate() {
        for (i, (file, len)) in chunk.iter().enumerate() {
            let original = originals.join(&file.rel);
            std::fs::create_dir_all(original.parent().expect("parent")).expect("mkdir");
            write_pattern_file(&original, *len, (round * 8 + i) as u64 + 1);
            let target = stack.mnt.join(&file.rel);
            std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir on ext4");
            std::fs::copy(&original, &target).expect("copy onto ext4");
        }
        run(Command::new("sync").arg("-f").arg(&stack.mnt));
        std::thread::sleep(Duration::from_millis(150));
    }
    // Lose the host's local disk while the filesystem is mounted and busy uploading.
    server.kill();
    stack.crash_down();
    std::fs::remove_dir_all(server.cache_dir()).expect("delete the local directory");
    server.spawn();

    stack.up(&socket);
    let dev = stack.dev().to_string();
    stack.mount(); // replays ext4's journal
    let (mut intact, mut with_zeros, mut short) = (0, 0, 0);
    for (file, len) in &files {
        let path = stack.mnt.join(&file.rel);
        if !path.exists() {
            continue;
        }
        let got = std::fs::read(&path).expect("read");
        let want = std::fs::read(originals.join(&file.rel)).expect("read original");
        assert!(
            got.len() <= *len,
            "{} grew to {} bytes (written: {len})",
            file.rel.display(),
            got.len()
        );
        let foreign = foreign_pages(&got, &want);
        assert!(
            foreign.is_empty(),
            "{} holds data that was never written there (pages {foreign:?}): {}",
            file.rel.display(),
            describe_mismatch(&got, &want)
        );
        if got == want {
            intact += 1;
        } else if got.len() == *len {
            with_zeros += 1;
        } else {
            short += 1;
        }
    }
    println!(
        "after losing the local disk, of {} files: {intact} intact, {with_zeros} full size with \
         unwritten (zero) pages, {short} shorter",
        files.len()
    );
    stack.umount();
    e2fsck_clean(&dev);
    stack.down();
    assert!(server.stop().success(), "{}", server.log_text());
}

/// Checkpoint, change, restore: the filesystem comes back exactly as it was at the checkpoint
/// (`e2fsck -fn` clean, every file the same, the files made after it gone), and the state
/// replaced is kept as a checkpoint of its own (`--keep-current`) that restores too.
#[test]
fn ext4_restored_to_a_checkpoint_is_exactly_as_it_was() {
    require_ext4_stack();
    let mut server = Server::start_with(ServerOptions {
        unix_socket: true,
        size: "100G",
        ..Default::default()
    });
    let Endpoint::Unix(socket) = server.endpoint.clone() else {
        unreachable!("unix_socket: true")
    };
    let work = tempfile::Builder::new()
        .prefix("bucketdisk-ext4-restore-")
        .tempdir()
        .expect("tempdir");
    let originals = work.path().join("originals");
    let mut stack = Stack::new(work.path());
    stack.up(&socket);
    let dev = stack.dev().to_string();
    run(Command::new("mkfs.ext4").arg("-F").arg("-q").arg(&dev));
    stack.mount();
    let files = test_files();
    for (i, (file, len)) in files.iter().enumerate() {
        let original = originals.join(&file.rel);
        std::fs::create_dir_all(original.parent().expect("parent")).expect("mkdir");
        write_pattern_file(&original, *len, i as u64 + 1);
        let target = stack.mnt.join(&file.rel);
        std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir on ext4");
        std::fs::copy(&original, &target).expect("copy onto ext4");
    }
    // A clean filesystem at the checkpoint (unmounted; the export stays up).
    stack.umount();
    let mut checkpoint = server.cli("checkpoint create");
    checkpoint
        .arg("disk")
        .arg("before-changes")
        .arg("--cache-dir")
        .arg(server.cache_dir());
    run(&mut checkpoint);
    // Change and delete files after it.
    stack.mount();
    for (file, _) in files.iter().filter(|(f, _)| !f.keep) {
        std::fs::remove_file(stack.mnt.join(&file.rel)).expect("delete");
    }
    write_pattern_file(&stack.mnt.join("tree/d0/e0/file-0.dat"), 5000, 77);
    write_pattern_file(&stack.mnt.join("made-after.bin"), 3 * MIB as usize, 78);
    stack.down();
    assert!(server.stop().success(), "{}", server.log_text());

    let mut restore = server.cli("restore");
    restore
        .arg("disk")
        .arg("before-changes")
        .arg("--keep-current")
        .arg("--cache-dir")
        .arg(server.cache_dir());
    let said = run(&mut restore);
    let kept = said
        .lines()
        .find_map(|l| l.strip_prefix("kept the replaced state as checkpoint "))
        .unwrap_or_else(|| panic!("no kept checkpoint in {said:?}"))
        .trim()
        .to_string();
    server.spawn();
    stack.up(&socket);
    let dev = stack.dev().to_string();
    e2fsck_clean(&dev);
    stack.mount();
    verify_files(&stack.mnt, &originals, &files, false);
    assert!(
        !stack.mnt.join("made-after.bin").exists(),
        "a file made after the checkpoint"
    );
    stack.down();
    assert!(server.stop().success(), "{}", server.log_text());

    // The replaced state restores too.
    let mut back = server.cli("restore");
    back.arg("disk")
        .arg(&kept)
        .arg("--cache-dir")
        .arg(server.cache_dir());
    run(&mut back);
    server.spawn();
    stack.up(&socket);
    let dev = stack.dev().to_string();
    e2fsck_clean(&dev);
    stack.mount();
    assert!(stack.mnt.join("made-after.bin").exists());
    let changed = Path::new("tree/d0/e0/file-0.dat");
    assert_eq!(
        std::fs::metadata(stack.mnt.join(changed))
            .expect("changed file")
            .len(),
        5000,
        "the file as changed after the checkpoint"
    );
    let unchanged: Vec<(TestFile, usize)> = test_files()
        .into_iter()
        .filter(|(f, _)| f.rel != changed)
        .collect();
    verify_files(&stack.mnt, &originals, &unchanged, true);
    stack.down();
    assert!(server.stop().success(), "{}", server.log_text());
}

/// The tools the FUSE + loop + ext4 stack needs, and root (losetup, mount).
fn require_ext4_stack() {
    for tool in [
        "qemu-storage-daemon",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "umount",
    ] {
        require_tool(tool);
    }
    assert_eq!(
        run(Command::new("id").arg("-u")).trim(),
        "0",
        "this test needs root (losetup, mount)"
    );
}

/// ext4 over TLS on an encrypted volume: qemu-storage-daemon connects with X.509 credentials
/// to a server that requires TLS and serves a volume created encrypted; the filesystem is
/// made, filled, checked, and read back after a restart; nothing written is in the store in
/// clear.
#[test]
fn ext4_over_tls_on_an_encrypted_volume() {
    require_ext4_stack();
    let pki = pki::Pki::new();
    let keys = tempfile::tempdir().expect("tempdir");
    let key = keys.path().join("volume.key");
    std::fs::write(&key, "3c".repeat(32)).expect("key");
    pki::set_mode(&key, 0o600);
    let mut server = Server::start_with(ServerOptions {
        size: "100G",
        extra_args: vec![
            "--tls".into(),
            "require".into(),
            "--tls-dir".into(),
            pki.path("server-dir").display().to_string(),
            "--key-file".into(),
            key.display().to_string(),
        ],
        ..Default::default()
    });
    let Endpoint::Tcp(port) = server.endpoint.clone() else {
        unreachable!("TCP")
    };
    let work = tempfile::Builder::new()
        .prefix("bucketdisk-ext4-tls-")
        .tempdir()
        .expect("tempdir");
    let originals = work.path().join("originals");
    let mut stack = Stack::new(work.path());
    let nbd = format!("server.type=inet,server.host=localhost,server.port={port},tls-creds=tls0");
    let creds = vec![format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        pki.path("ca-only").display()
    )];
    stack.up_from(&nbd, &creds);
    let dev = stack.dev().to_string();
    run(Command::new("mkfs.ext4").arg("-F").arg("-q").arg(&dev));
    stack.mount();
    let files = write_test_files(&stack.mnt, &originals);
    verify_files(&stack.mnt, &originals, &files, false);
    stack.umount();
    e2fsck_clean(&dev);
    stack.down();
    assert!(server.stop().success());

    // What ext4 wrote is nowhere in the store in clear (checked on a directory store).
    let needle = &std::fs::read(originals.join(&files[0].0.rel)).expect("original")[..4096];
    let chunks = server.store_dir().join("disk/chunks");
    for chunk in std::fs::read_dir(&chunks).into_iter().flatten() {
        let bytes = std::fs::read(chunk.expect("entry").path()).expect("chunk");
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "a file's bytes are in a chunk in clear"
        );
    }
    assert!(
        server.s3.is_some() || chunks.is_dir(),
        "no chunks in {}",
        chunks.display()
    );

    server.spawn();
    stack.up_from(&nbd, &creds);
    let dev = stack.dev().to_string();
    e2fsck_clean(&dev);
    stack.mount();
    verify_files(&stack.mnt, &originals, &files, false);
    stack.umount();
    stack.down();
    assert!(server.stop().success());
}
