//! An NBD export as a kernel block device without the `nbd` module: qemu-storage-daemon
//! exports it as a FUSE file and a loop device sits on that file (the stack of
//! bucketdisk/tests/ext4_end_to_end.rs, over TCP):
//!
//! ```text
//! qemu-storage-daemon \
//!   --blockdev driver=nbd,node-name=nbd0,server.type=inet,server.host=127.0.0.1,server.port=P,discard=unmap \
//!   --export type=fuse,id=exp0,node-name=nbd0,mountpoint=TARGET,writable=on,allow-other=off
//! losetup --find --show TARGET            # -> /dev/loopN
//! ```
//!
//! `Drop` tears down whatever is up: detach the loop device, stop qemu-storage-daemon, lazily
//! unmount a FUSE export it left behind.

use crate::process::{ServerProcess, output_of};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub struct FuseLoop {
    target: PathBuf,
    qsd: Option<ServerProcess>,
    loop_dev: Option<String>,
}

impl FuseLoop {
    /// Exports `nbd://127.0.0.1:port/` (of `size` bytes) as a FUSE file under `work` and
    /// attaches a loop device to it.
    pub fn up(work: &Path, port: u16, size: u64) -> Result<FuseLoop> {
        std::fs::create_dir_all(work)?;
        // Canonical, so the path matches /proc/self/mountinfo.
        let work = work.canonicalize()?;
        let target = work.join("fuse-target");
        std::fs::File::create(&target)?;
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=nbd,node-name=nbd0,server.type=inet,server.host=127.0.0.1,\
                 server.port={port},discard=unmap"
            ))
            .arg("--export")
            .arg(format!(
                "type=fuse,id=exp0,node-name=nbd0,mountpoint={},writable=on,allow-other=off",
                target.display()
            ));
        let qsd = ServerProcess::spawn("qemu-storage-daemon", cmd, &work.join("qsd.log"))?;
        let mut stack = FuseLoop {
            target,
            qsd: Some(qsd),
            loop_dev: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let len = std::fs::metadata(&stack.target).map(|m| m.len()).ok();
            if is_mounted(&stack.target) && len == Some(size) {
                break;
            }
            if let Some(qsd) = stack.qsd.as_mut() {
                qsd.ensure_running()?;
            }
            if Instant::now() >= deadline {
                bail!("the FUSE export did not appear (size {len:?})");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let target = stack.target.to_string_lossy().into_owned();
        let dev = output_of("losetup", &["--find", "--show", &target])?;
        if !dev.starts_with("/dev/loop") {
            bail!("losetup printed {dev:?}");
        }
        stack.loop_dev = Some(dev);
        Ok(stack)
    }

    pub fn device(&self) -> &str {
        self.loop_dev.as_deref().unwrap_or_default()
    }

    /// Tears the stack down, reporting failures (Drop does the same, ignoring them).
    pub fn down(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let mut result = Ok(());
        if let Some(dev) = self.loop_dev.take() {
            if let Err(e) = output_of("losetup", &["-d", &dev]) {
                result = Err(e);
            }
            wait_loop_detached(&dev);
        }
        if let Some(qsd) = self.qsd.take() {
            match qsd.stop() {
                Ok(status) if !status.success() => {
                    result = result.and(Err(anyhow::anyhow!(
                        "qemu-storage-daemon exited with {status}"
                    )));
                }
                Ok(_) => {}
                Err(e) => result = result.and(Err(e)),
            }
        }
        if is_mounted(&self.target) {
            let target = self.target.to_string_lossy().into_owned();
            let _ = output_of("umount", &["-l", &target]);
        }
        result.context("tearing down the FUSE + loop stack")
    }
}

impl Drop for FuseLoop {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("bench: {e:#}");
        }
    }
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

/// True if `path` is a mount point in this mount namespace.
fn is_mounted(path: &Path) -> bool {
    let wanted = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .any(|mount_point| mount_point == wanted)
}
