//! `bucketdisk verify` against a served volume (it must not disturb the server) and after damage
//! done to the store behind the volume's back: exit status, the report naming the chunk, JSON.

mod common;
use common::*;
use std::process::Command;

fn verify(server: &Server, extra: &[&str]) -> std::process::Output {
    let mut cmd = server.cli("verify");
    cmd.arg("disk").args(extra);
    run_output(&mut cmd)
}

#[test]
fn verify_reports_a_sound_volume_and_names_a_lost_chunk() {
    require_tool("nbdcopy");
    if testing_on_s3() {
        // Damage is done through the store directory here; the engine's tests cover moto.
        return;
    }
    let mut server = Server::start_with(ServerOptions {
        size: "64M",
        ..Default::default()
    });
    let work = tempfile::tempdir().expect("tempdir");
    let image = work.path().join("image.bin");
    write_pattern_file(&image, 64 << 20, 3);
    run(Command::new("nbdcopy").arg(&image).arg(server.uri()));
    let mut checkpoint = server.cli("checkpoint create");
    checkpoint
        .args(["disk", "before"])
        .arg("--cache-dir")
        .arg(server.cache_dir());
    run(&mut checkpoint);

    // While the server runs: sound, and the server goes on.
    let out = verify(&server, &["--deep", "--checkpoints"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("latest (map TXID"), "{said}");
    assert!(said.contains("checkpoint before"), "{said}");
    assert!(!said.contains("DAMAGED"), "{said}");
    assert!(server.is_running());
    run(Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(server.uri())
        .arg(&image));
    assert!(server.stop().success(), "{}", server.log_text());

    // A chunk deleted behind the volume's back, and an orphan put beside them.
    let chunks = server.store_dir().join("disk/chunks");
    let mut names: Vec<String> = std::fs::read_dir(&chunks)
        .expect("chunks")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let lost = names[0].clone();
    std::fs::remove_file(chunks.join(&lost)).expect("delete a chunk");
    std::fs::write(chunks.join("00000000fffffff0"), [0u8; 100]).expect("orphan");
    let out = verify(&server, &[]);
    assert_fails_with(out.clone(), "volume disk is damaged");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("missing chunk {lost}")), "{said}");
    assert!(said.contains("block at byte 0 (chunk"), "{said}");
    assert!(said.contains("orphaned chunks: 1"), "{said}");
    assert!(said.contains("00000000fffffff0 (100 bytes)"), "{said}");
    let out = verify(&server, &["--json"]);
    assert!(!out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["states"][0]["missing_chunks"][0], lost.as_str());
    assert_eq!(report["orphaned_bytes"], 100);
    let unknown = run_output(server.cli("verify").arg("nope"));
    assert_fails_with(unknown, "no volume nope");
}
