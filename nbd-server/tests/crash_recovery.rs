//! Crashes and lost disks (DESIGN.md §3, invariants I1 and I2), with a real client: a verifying
//! writer (`tests/crash/verifying_writer.py`, libnbd) writes self-checking records, FLUSHes and
//! uses FUA, logging what was sent and what was acknowledged.
//!
//! - kill -9 at a random moment, restart on the same host: no acknowledged write is lost, and
//!   every block holds a record that was really written there. Repeated (`BUCKETDISK_CRASH_ROUNDS`,
//!   default 20), each round continuing the same disk.
//! - kill -9, then delete the whole local directory and restart from the store alone: the disk
//!   holds exactly a prefix of the write history.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The region written: 16 MiB of 4 KiB records.
const BLOCKS: u64 = 4096;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/crash/verifying_writer.py")
}

/// The writer runs on the system Python, which has the libnbd module (a pyenv `python3` on
/// PATH would not).
fn python() -> Command {
    let python = Path::new("/usr/bin/python3");
    let ok = Command::new(python)
        .args(["-c", "import nbd"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "/usr/bin/python3 cannot import nbd: run scripts/install-deps.sh (python3-libnbd)"
    );
    Command::new(python)
}

fn start_writer(uri: &str, log: &Path, seed: u64) -> Child {
    let first = run(python().arg(script()).arg("next-seq").arg(log))
        .trim()
        .to_string();
    python()
        .arg(script())
        .arg("write")
        .arg(uri)
        .arg(log)
        .arg(seed.to_string())
        .arg(first)
        .arg(BLOCKS.to_string())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the verifying writer")
}

fn verify(uri: &str, log: &Path, mode: &str) -> String {
    let out = run_output(
        python()
            .arg(script())
            .arg("verify")
            .arg(uri)
            .arg(log)
            .arg(BLOCKS.to_string())
            .arg(mode),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("VERIFIED"),
        "verification ({mode}) failed:\n{text}"
    );
    text
}

fn wait_exit(child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn server() -> Server {
    Server::start_with(ServerOptions {
        size: "1G",
        extra_args: vec!["--sync-interval".into(), "100ms".into()],
        ..ServerOptions::default()
    })
}

#[test]
fn kill9_loses_no_acknowledged_write() {
    require_tool("nbdsh");
    let rounds: u64 = std::env::var("BUCKETDISK_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let mut server = server();
    let work = tempfile::tempdir().expect("tempdir");
    let log = work.path().join("writes.log");
    let mut rng = Rng(0x5eed_c4a5);
    for round in 0..rounds {
        let mut writer = start_writer(&server.uri(), &log, rng.next());
        // Kill somewhere between "just started" and "several uploads in".
        std::thread::sleep(Duration::from_millis(100 + rng.below(700)));
        server.kill();
        wait_exit(&mut writer);
        server.spawn();
        let summary = verify(&server.uri(), &log, "durable");
        println!("round {round}: {}", summary.trim());
    }
    let summary = verify(&server.uri(), &log, "durable");
    assert!(
        !summary.contains("acknowledged=0 "),
        "nothing was ever acknowledged: {summary}"
    );
}

#[test]
fn lost_local_disk_restarts_as_a_prefix_of_the_history() {
    require_tool("nbdsh");
    let mut server = server();
    let work = tempfile::tempdir().expect("tempdir");
    let log = work.path().join("writes.log");
    let mut rng = Rng(0x10c4_1d15);
    for round in 0..4 {
        let mut writer = start_writer(&server.uri(), &log, rng.next());
        std::thread::sleep(Duration::from_millis(1500 + rng.below(1000)));
        server.kill();
        wait_exit(&mut writer);
        std::fs::remove_dir_all(server.cache_dir()).expect("delete the local directory");
        server.spawn();
        let summary = verify(&server.uri(), &log, "prefix");
        println!("round {round}: {}", summary.trim());
        assert!(
            !summary.contains("position=0"),
            "after {round} rounds of 1.5 s with 100 ms uploads, the store holds nothing: {summary}"
        );
    }
}
