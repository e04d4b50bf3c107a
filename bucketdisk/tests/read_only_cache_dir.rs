//! `serve` on a cache directory it cannot write (a read-only filesystem, mounted for the test):
//! it stops at start with one line naming the directory and why, and a non-zero exit, rather
//! than serving a volume whose writes would have nowhere to go. (A directory that turns
//! read-only while serving: `engine/tests/local_faults.rs`.)

mod common;
use common::{assert_fails_with, bucketdisk_bin, run, run_output};
use std::path::Path;
use std::process::Command;

/// A read-only tmpfs mounted at `path` for as long as this lives.
struct ReadOnlyMount(std::path::PathBuf);

impl ReadOnlyMount {
    fn new(path: &Path) -> ReadOnlyMount {
        std::fs::create_dir_all(path).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a tmpfs needs root");
        ReadOnlyMount(path.to_path_buf())
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn serve_on_a_read_only_cache_directory_stops_with_one_clear_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    run(Command::new(bucketdisk_bin())
        .args(["create", "disk", "--size", "1G", "--store"])
        .arg(&store));
    let cache = dir.path().join("cache");
    let _mount = ReadOnlyMount::new(&cache);

    // The directory itself, and one to be created inside it.
    for (cache_dir, names) in [
        (cache.clone(), cache.display().to_string()),
        (
            cache.join("volumes"),
            cache.join("volumes").display().to_string(),
        ),
    ] {
        let started = std::time::Instant::now();
        let out = run_output(
            Command::new(bucketdisk_bin())
                .args(["serve", "--listen", "127.0.0.1:0", "--store"])
                .arg(&store)
                .arg("--cache-dir")
                .arg(&cache_dir),
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "it stops at start"
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(stderr.contains(&names), "names the directory: {stderr}");
        assert_fails_with(out, "Read-only file system");
    }
}
