//! Encrypted volumes through the CLI and real NBD clients: `create --encrypt` and `serve
//! --key-file`, nothing written by `nbdcopy` found in clear in the store (on the local-directory
//! store and on moto), a missing, wrong or exposed key refused with one line, and checkpoint,
//! clone and `verify --deep` on an encrypted volume.

mod common;
use common::{
    Server, ServerOptions, assert_fails_with, bucketdisk_bin, require_tool, run, run_output,
};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const MARKER: &[u8] = b"ENCRYPTED-AT-REST-MARKER/";

/// A key file (mode 0600) holding `hex` (64 hex digits).
fn key_file(dir: &Path, name: &str, hex: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{hex}\n")).expect("write key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

const KEY: &str = "8f1c2a9e5b7d3f60a4e2c81b9d7f5a3ce6b4d2f08a1c3e5b7d9f1a3c5e7b9d0f";
const OTHER_KEY: &str = "0000000000000000000000000000000000000000000000000000000000000001";

/// 4 MiB: 64 KiB blocks of noise with the marker every 4 KiB (stored raw), alternating with
/// blocks of the marker over and over (compressed).
fn marked_data() -> Vec<u8> {
    let mut out = common::pattern(4 << 20, 7);
    for (i, block) in out.chunks_mut(64 << 10).enumerate() {
        if i % 2 == 0 {
            for piece in block.chunks_mut(4096) {
                piece[..MARKER.len()].copy_from_slice(MARKER);
            }
        } else {
            for (j, byte) in block.iter_mut().enumerate() {
                *byte = MARKER[j % MARKER.len()];
            }
        }
    }
    out
}

/// Files under `dir` (recursively) that contain the marker.
fn files_with_marker(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read(&path)
                .expect("read")
                .windows(MARKER.len())
                .any(|w| w == MARKER)
            {
                found.push(path);
            }
        }
    }
    found
}

/// `serve` of the server's store and cache with `args`, expected to fail at once.
fn serve_fails(server: &Server, args: &[&str], expected: &str) {
    let mut cmd = server.cli("serve");
    cmd.arg("--cache-dir")
        .arg(server.cache_dir())
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("BUCKETDISK_LOG", "error");
    assert_fails_with(run_output(&mut cmd), expected);
}

/// The whole export read back with nbdcopy, its first `len` bytes.
fn read_back(uri: &str, dir: &Path, len: usize) -> Vec<u8> {
    let out = dir.join("read-back.img");
    let _ = std::fs::remove_file(&out);
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", uri])
        .arg(&out));
    let mut bytes = std::fs::read(&out).expect("read back");
    bytes.truncate(len);
    bytes
}

fn an_encrypted_volume_end_to_end(on_s3: bool) {
    require_tool("nbdcopy");
    require_tool("qemu-img");
    let keys = tempfile::tempdir().expect("tempdir");
    let key = key_file(keys.path(), "key", KEY);
    let key_arg = key.to_str().expect("utf-8 path");
    // A volume created by `serve` given a key is encrypted with it.
    let mut server = Server::start_with(ServerOptions {
        size: "64M",
        extra_args: vec!["--key-file".into(), key_arg.into()],
        on_s3,
        ..ServerOptions::default()
    });
    assert!(
        server.log_text().contains("encrypted=true"),
        "{}",
        server.log_text()
    );
    let data = marked_data();
    let source = keys.path().join("marked.img");
    std::fs::write(&source, &data).expect("write source");
    run(Command::new("nbdcopy").arg(&source).arg(server.uri()));
    run(server
        .cli("checkpoint create")
        .args(["disk", "base", "--cache-dir"])
        .arg(server.cache_dir()));
    assert_eq!(read_back(&server.uri(), keys.path(), data.len()), data);
    server.stop();

    let info = run(server.cli("info").args(["disk", "--json"]));
    assert!(info.contains("\"encryption\":\"aes-256-gcm\""), "{info}");
    assert!(!info.contains(KEY), "{info}");
    if !on_s3 {
        assert_eq!(
            files_with_marker(&server.store_dir()),
            Vec::<PathBuf>::new()
        );
    }

    // Without the key, with another or with one others can read: one line, at once.
    serve_fails(&server, &[], "volume disk is encrypted: give its key");
    let other = key_file(keys.path(), "other", OTHER_KEY);
    serve_fails(
        &server,
        &["--key-file", other.to_str().expect("utf-8")],
        "encrypted with another key",
    );
    let exposed = key_file(keys.path(), "exposed", KEY);
    std::fs::set_permissions(&exposed, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    serve_fails(
        &server,
        &["--key-file", exposed.to_str().expect("utf-8")],
        "can be read by group or others",
    );
    // The key in the environment works as the file does.
    let mut deep = server.cli("verify");
    deep.args(["disk", "--deep", "--checkpoints"])
        .env("BUCKETDISK_KEY", KEY);
    let report = run(&mut deep);
    assert!(
        report.contains("latest (map TXID")
            && report.contains("ok — 64 blocks in 1 chunk, 64 read back"),
        "{report}"
    );
    assert_fails_with(
        run_output(server.cli("verify").args(["disk", "--deep"])),
        "volume disk is encrypted",
    );

    // A clone of the checkpoint is encrypted with the same key and reads the same data.
    run(server
        .cli("clone")
        .args(["disk@base", "twin", "--cache-dir"])
        .arg(server.cache_dir()));
    server.set_volumes(&["twin"]);
    server.spawn();
    assert_eq!(read_back(&server.uri(), keys.path(), data.len()), data);
    server.stop();
    serve_fails(&server, &["--volume", "twin"], "volume twin is encrypted");
}

#[test]
fn an_encrypted_volume_on_a_directory_store() {
    an_encrypted_volume_end_to_end(false);
}

#[test]
fn an_encrypted_volume_on_s3() {
    an_encrypted_volume_end_to_end(true);
}

#[test]
fn create_encrypt_needs_a_key_and_the_object_engine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = format!("file://{}", dir.path().join("store").display());
    let create = |extra: &[&str]| {
        let mut cmd = Command::new(bucketdisk_bin());
        cmd.args(["create", "vol", "--size", "16M", "--store", &store])
            .args(extra)
            .env_remove("BUCKETDISK_KEY")
            .env_remove("BUCKETDISK_KEY_FILE");
        run_output(&mut cmd)
    };
    assert_fails_with(create(&["--encrypt"]), "--encrypt needs a key");
    let key = key_file(dir.path(), "key", KEY);
    let key = key.to_str().expect("utf-8");
    assert_fails_with(
        create(&["--encrypt", "--key-file", key, "--engine", "file"]),
        "needs the object engine",
    );
    assert_fails_with(create(&["--key-file", key]), "without --encrypt");
    let short = key_file(dir.path(), "short", "abcd");
    assert_fails_with(
        create(&["--encrypt", "--key-file", short.to_str().expect("utf-8")]),
        "a key is 32 bytes",
    );
    let out = create(&["--encrypt", "--key-file", key]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("created encrypted volume vol"));
    let meta = std::fs::read_to_string(dir.path().join("store/vol/volume.json")).expect("meta");
    assert!(
        meta.contains("aes-256-gcm") && !meta.contains(KEY),
        "{meta}"
    );
}
