//! Sustained writes on a real S3 server (moto), through the real binary and fio: a sparse fill
//! (one 4 KiB write per 64 KiB block, the worst case for per-block upload work) through a
//! journal far smaller than the data, with the store paused (SIGSTOP) while it starts. Writers
//! must wait while the store is stalled, never fail, and the volume must then cold-boot from the
//! store alone with every block present and every byte verified.

mod common;

use common::{Server, ServerOptions, require_tool, run_output};
use std::process::Command;
use std::time::{Duration, Instant};

const FILL: &str = "256M";
/// Blocks the fill writes: one per 64 KiB, each once (`--io_size`; without it fio wraps around
/// and rewrites the volume sixteen times).
const BLOCKS: u64 = 256 * 1024 / 64;

/// fio's sparse fill of the whole volume with verification headers, or (with `verify`) the
/// check of everything it wrote.
fn fill_job(uri: &str, verify: bool) -> Command {
    require_tool("fio");
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=sparse-fill",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=write:60k",
        "--bs=4k",
        &format!("--size={FILL}"),
        &format!("--io_size={}", BLOCKS * 4096),
        "--iodepth=32",
        "--verify=crc32c",
        "--verify_state_save=0",
    ]);
    cmd.arg(if verify {
        "--verify_only"
    } else {
        "--do_verify=0"
    });
    cmd
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on the moto process this test started.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

fn allocated_blocks(server: &Server) -> u64 {
    let out = run_output(server.cli("info").arg("disk").arg("--json"));
    assert!(out.status.success(), "{out:?}");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("info JSON");
    info["allocated_blocks"]
        .as_u64()
        .unwrap_or_else(|| panic!("no allocated_blocks in {info}"))
}

#[test]
fn a_sparse_fill_survives_a_stalled_store_and_cold_boots_complete() {
    let mut server = Server::start_with(ServerOptions {
        size: FILL,
        on_s3: true,
        extra_args: [
            "--journal-limit",
            "1M",
            "--upload-step-blocks",
            "256",
            "--stall-timeout",
            "120s",
        ]
        .map(String::from)
        .to_vec(),
        ..ServerOptions::default()
    });
    let moto = server.s3.as_ref().expect("on moto").pid();
    let uri = server.uri();
    // The store stalls as the fill starts: the 1 MiB journal takes 256 of the 4,096 writes,
    // then writers wait for the store to come back.
    signal(moto, libc::SIGSTOP);
    let fill = std::thread::spawn(move || {
        let started = Instant::now();
        let out = fill_job(&uri, false).output().expect("run fio");
        (out, started.elapsed())
    });
    std::thread::sleep(Duration::from_secs(10));
    assert!(
        !fill.is_finished(),
        "the fill ended while the store was stalled"
    );
    signal(moto, libc::SIGCONT);
    let (out, took) = fill.join().expect("fio thread");
    assert!(
        out.status.success(),
        "fio failed after {took:?}:\n{}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
    assert!(
        took >= Duration::from_secs(10),
        "the fill finished in {took:?}: it did not wait for the stalled store"
    );
    assert!(
        !server.log_text().contains("failing writes"),
        "a write failed:\n{}",
        server.log_text()
    );
    // A clean stop uploads everything; a new host starts from the store alone.
    assert!(server.stop().success(), "{}", server.log_text());
    std::fs::remove_dir_all(server.cache_dir()).expect("drop the local disk");
    assert_eq!(allocated_blocks(&server), BLOCKS);
    server.spawn();
    let started = Instant::now();
    let out = fill_job(&server.uri(), true).output().expect("run fio");
    eprintln!("fill {took:?}, cold verification {:?}", started.elapsed());
    assert!(
        out.status.success(),
        "verification after a cold boot failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
