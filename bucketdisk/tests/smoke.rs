//! The binary starts, serves the default export, and stops cleanly on SIGTERM.

mod common;
use common::*;
use std::process::Command;

#[test]
fn serves_default_export_and_stops_cleanly() {
    require_tool("nbdinfo");
    let mut server = Server::start();
    let size = run(Command::new("nbdinfo").arg("--size").arg(server.uri()));
    assert_eq!(size.trim(), GIB.to_string());
    assert!(server.stop().success(), "{}", server.log_text());
    assert!(server.log_text().contains("stopped cleanly"));
}

/// SIGTERM the moment the port accepts (what a supervisor or a test may do) is a clean stop:
/// the signal handlers are in place before anything is visible from outside.
#[test]
fn sigterm_right_after_start_stops_cleanly() {
    let mut server = Server::start();
    for round in 0..5 {
        let status = server.stop();
        assert!(
            status.success(),
            "round {round}: {status}\n{}",
            server.log_text()
        );
        server.spawn();
    }
    assert!(server.stop().success(), "{}", server.log_text());
}

/// `--chunk-size` bounds the chunks the uploader writes: 24 MiB of incompressible data at 4M
/// become several chunks, none much over 4 MiB (the block that crosses the target finishes it).
#[test]
fn chunk_size_sets_the_size_of_stored_chunks() {
    require_tool("nbdcopy");
    if testing_on_s3() {
        return; // the check lists the local store directory
    }
    let mut server = Server::start_with(ServerOptions {
        extra_args: vec!["--chunk-size".into(), "4M".into()],
        ..Default::default()
    });
    let work = tempfile::tempdir().expect("tempdir");
    let source = work.path().join("random.bin");
    let mut rng = Rng(7);
    std::fs::write(&source, rng.bytes(24 << 20)).expect("write source");
    run(Command::new("nbdcopy").arg(&source).arg(server.uri()));
    assert!(server.stop().success(), "{}", server.log_text());
    let chunks: Vec<u64> = std::fs::read_dir(server.store_dir().join("disk").join("chunks"))
        .expect("chunks directory")
        .map(|e| e.expect("entry").metadata().expect("stat").len())
        .collect();
    assert!(chunks.len() >= 6, "24 MiB in {} chunks", chunks.len());
    let largest = chunks.iter().max().copied().unwrap_or(0);
    assert!(
        largest <= (4 << 20) + (128 << 10),
        "largest chunk {largest} bytes"
    );
}

/// `info` describes a volume from the store alone while its server keeps running (it takes no
/// lease and opens no local folder), and a volume that does not exist is one clear error.
#[test]
fn info_reads_the_store_without_disturbing_the_server() {
    require_tool("nbdcopy");
    let mut server = Server::start();
    let work = tempfile::tempdir().expect("tempdir");
    let source = work.path().join("random.bin");
    let mut rng = Rng(11);
    std::fs::write(&source, rng.bytes(2 << 20)).expect("write source");
    // nbdcopy flushes at the end; the upload follows within the sync interval.
    run(Command::new("nbdcopy").arg(&source).arg(server.uri()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let info = loop {
        let out = run_output(server.cli("info").arg("disk").arg("--json"));
        assert!(out.status.success(), "{out:?}");
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("info JSON");
        if info["allocated"].as_u64() == Some(2 << 20) {
            break info;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never uploaded: {info}"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    assert_eq!(info["size"].as_u64(), Some(GIB));
    assert!(info["map_txid"].as_u64() > Some(0), "{info}");
    assert!(info["chunks"].as_u64() >= Some(1), "{info}");
    let human = run(server.cli("info").arg("disk"));
    assert!(human.contains("allocated:     2 MiB"), "{human}");
    // The server was not fenced: it still takes writes and stops cleanly.
    run(Command::new("nbdcopy").arg(&source).arg(server.uri()));
    assert!(server.stop().success(), "{}", server.log_text());
    assert!(!server.log_text().contains("refusing further writes"));
    let missing = run_output(server.cli("info").arg("nope"));
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.trim().lines().count() == 1 && stderr.contains("no volume nope"),
        "{stderr}"
    );
}
