//! The real `bucketdisk` binary driven by the real libnbd tools (nbdinfo, nbdcopy, nbdsh), with
//! qemu-io where a write or discard has to land at an exact offset.
//!
//! Every test checks what a client can observe: the negotiated flags and sizes, the allocation
//! map, the bytes read back, exit statuses, and that the server survives what it refuses.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

const KIB: u64 = 1 << 10;

/// Extent types in `nbdinfo --map` (base:allocation): data, and hole+zero.
const DATA: u64 = 0;
const HOLE_ZERO: u64 = 3;

// ---------------------------------------------------------------------------------------------
// Helpers local to this file.
// ---------------------------------------------------------------------------------------------

fn nbdinfo(args: &[&str]) -> String {
    run(Command::new("nbdinfo").args(args))
}

fn nbdinfo_json(args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let text = nbdinfo(&all);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("nbdinfo printed bad JSON ({e}):\n{text}"))
}

/// Exit code of `nbdinfo --can X` / `--is X`: 0 true, 2 false, 1 error.
fn nbdinfo_status(query: &str, what: &str, uri: &str) -> i32 {
    let output = run_output(Command::new("nbdinfo").arg(query).arg(what).arg(uri));
    output.status.code().unwrap_or_else(|| {
        panic!(
            "nbdinfo {query} {what} died: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// The allocation map as (offset, length, type) triples.
fn map(uri: &str) -> Vec<(u64, u64, u64)> {
    let value = nbdinfo_json(&["--map", uri]);
    value
        .as_array()
        .unwrap_or_else(|| panic!("--map --json is not an array: {value}"))
        .iter()
        .map(|e| {
            let field = |name: &str| {
                e[name]
                    .as_u64()
                    .unwrap_or_else(|| panic!("extent without {name}: {e}"))
            };
            (field("offset"), field("length"), field("type"))
        })
        .collect()
}

/// Runs qemu-io commands against a raw NBD export; fails on any error, including a pattern
/// mismatch in `read -P` (which older qemu-io versions report without a failing exit status).
fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(uri);
    let output = run_output(&mut cmd);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && !stdout.contains("failed") && !stderr.contains("failed"),
        "qemu-io {commands:?} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    stdout
}

/// nbdsh runs whichever `python3` comes first on PATH, but python3-libnbd is installed for the
/// distribution's interpreter: put /usr/bin first so a pyenv or venv python does not hide it.
fn nbdsh(script: &str) -> String {
    require_tool("nbdsh");
    let path = std::env::var("PATH").unwrap_or_default();
    run(Command::new("nbdsh")
        .env("PATH", format!("/usr/bin:{path}"))
        .arg("-c")
        .arg(script))
}

fn nbdcopy(args: &[&str]) {
    run(Command::new("nbdcopy").args(args));
}

/// A piece of a test image.
enum Piece {
    /// Pattern bytes from this seed.
    Data(u64, u64),
    /// Zero bytes really written to the file (allocated, not a hole).
    Zeroes(u64),
    /// A filesystem hole.
    Hole(u64),
}

/// Builds a local image from pieces; returns its full contents for later comparison.
fn write_image(path: &Path, pieces: &[Piece]) -> Vec<u8> {
    use std::io::{Seek, SeekFrom, Write};
    let mut file = std::fs::File::create(path).expect("create image file");
    let mut contents = Vec::new();
    for piece in pieces {
        match *piece {
            Piece::Data(len, seed) => {
                let bytes = pattern(len as usize, seed);
                file.write_all(&bytes).expect("write image data");
                contents.extend_from_slice(&bytes);
            }
            Piece::Zeroes(len) => {
                let zeroes = vec![0u8; len as usize];
                file.write_all(&zeroes).expect("write image zeroes");
                contents.extend_from_slice(&zeroes);
            }
            Piece::Hole(len) => {
                file.seek(SeekFrom::Current(len as i64))
                    .expect("seek over hole");
                contents.resize(contents.len() + len as usize, 0);
            }
        }
    }
    file.set_len(contents.len() as u64)
        .expect("set image length");
    contents
}

/// Compares two files byte for byte with cmp(1), which names the first difference.
fn assert_same_file(expected: &Path, actual: &Path) {
    require_tool("cmp");
    let output = run_output(Command::new("cmp").arg(expected).arg(actual));
    assert!(
        output.status.success(),
        "{} and {} differ: {}{}",
        expected.display(),
        actual.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Connections that reached the transmission phase so far (needs nbd_server=debug logging).
fn transmissions(server: &Server) -> usize {
    server.log_text().matches("transmission started").count()
}

/// Server options that keep the usual info lines and add the per-connection debug lines.
fn debug_log() -> Vec<String> {
    vec!["--log".into(), "info,nbd_server=debug".into()]
}

/// A read-only server over a 16 MiB volume holding `image` (written while it was writable).
fn read_only_server(work: &Path) -> (Server, std::path::PathBuf) {
    let image = work.join("ro.img");
    write_image(
        &image,
        &[
            Piece::Data(4 * MIB, 11),
            Piece::Hole(8 * MIB),
            Piece::Data(4 * MIB, 12),
        ],
    );
    let mut server = Server::start_with(ServerOptions {
        size: "16M",
        extra_args: debug_log(),
        ..ServerOptions::default()
    });
    nbdcopy(&[
        "--flush",
        image.to_str().expect("utf-8 path"),
        &server.uri(),
    ]);
    assert!(server.stop().success(), "{}", server.log_text());
    server.extra_args.push("--read-only".into());
    server.spawn();
    (server, image)
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

#[test]
fn nbdinfo_json_reports_size_flags_block_sizes_and_contexts() {
    require_tool("nbdinfo");
    let server = Server::start();
    let info = nbdinfo_json(&[&server.uri()]);

    assert_eq!(info["protocol"], "newstyle-fixed", "{info:#}");
    assert_eq!(info["TLS"], false, "{info:#}");
    assert_eq!(info["structured"], true, "{info:#}");
    let exports = info["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1, "{info:#}");
    let e = &exports[0];
    // NBD_INFO_NAME: the default export "" is the volume called "disk".
    assert_eq!(e["export-name"], "disk", "{e:#}");
    assert_eq!(e["description"], "bucketdisk volume disk", "{e:#}");
    assert_eq!(e["export-size"].as_u64(), Some(GIB), "{e:#}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
        "can_cache",
        "can_df",
    ] {
        assert_eq!(e[flag], true, "{flag} should be true: {e:#}");
    }
    assert_eq!(e["is_read_only"], false, "{e:#}");
    assert_eq!(e["is_rotational"], false, "{e:#}");
    assert_eq!(e["block_size_minimum"].as_u64(), Some(1), "{e:#}");
    assert_eq!(e["block_size_preferred"].as_u64(), Some(4096), "{e:#}");
    assert_eq!(e["block_size_maximum"].as_u64(), Some(32 * MIB), "{e:#}");
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .expect("contexts array")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(contexts, ["base:allocation"], "{e:#}");
}

#[test]
fn nbdinfo_list_shows_every_volume_and_the_default_is_the_first() {
    require_tool("nbdinfo");
    let mut server = Server::start_with(ServerOptions {
        size: "64M",
        volumes: vec!["a"],
        ..ServerOptions::default()
    });
    // Give "b" a different size so the two can be told apart: create it offline, then serve both.
    assert!(server.stop().success(), "{}", server.log_text());
    run(server.cli("create").args(["b", "--size", "8M"]));
    server
        .extra_args
        .extend(["--volume".to_string(), "b".to_string()]);
    server.spawn();

    let list = nbdinfo_json(&["--list", &server.uri()]);
    let exports = list["exports"].as_array().expect("exports array");
    let listed: Vec<(&str, u64)> = exports
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().expect("export-name"),
                e["export-size"].as_u64().expect("export-size"),
            )
        })
        .collect();
    assert_eq!(listed, [("a", 64 * MIB), ("b", 8 * MIB)], "{list:#}");
    for e in exports {
        assert_eq!(
            e["description"],
            format!(
                "bucketdisk volume {}",
                e["export-name"].as_str().unwrap_or("")
            ),
            "{e:#}"
        );
    }

    // The text form lists both too.
    let text = nbdinfo(&["--list", &server.uri()]);
    assert!(text.contains("export=\"a\""), "{text}");
    assert!(text.contains("export=\"b\""), "{text}");

    // "" is the first volume, by size and by the canonical name the server reports.
    let default = nbdinfo_json(&[&server.uri()]);
    assert_eq!(default["exports"][0]["export-name"], "a", "{default:#}");
    assert_eq!(
        nbdinfo(&["--size", &server.uri()]).trim(),
        (64 * MIB).to_string()
    );
    assert_eq!(
        nbdinfo(&["--size", &server.uri_for("a")]).trim(),
        (64 * MIB).to_string()
    );
    assert_eq!(
        nbdinfo(&["--size", &server.uri_for("b")]).trim(),
        (8 * MIB).to_string()
    );
    // An unknown export is refused, and the server carries on.
    let missing = run_output(Command::new("nbdinfo").arg(server.uri_for("nope")));
    assert!(!missing.status.success(), "unknown export was accepted");
    assert!(server.is_running());
    assert_eq!(
        nbdinfo(&["--size", &server.uri_for("b")]).trim(),
        (8 * MIB).to_string()
    );
}

#[test]
fn nbdinfo_can_and_is_exit_statuses() {
    require_tool("nbdinfo");
    let work = tempfile::tempdir().expect("tempdir");

    let writable = Server::start_with(ServerOptions {
        size: "16M",
        ..ServerOptions::default()
    });
    let uri = writable.uri();
    for what in [
        "connect",
        "read",
        "write",
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "multi-conn",
        "cache",
        "df",
        "structured-reply",
    ] {
        assert_eq!(nbdinfo_status("--can", what, &uri), 0, "--can {what}");
    }
    for what in ["read-only", "rotational", "tls"] {
        assert_eq!(nbdinfo_status("--is", what, &uri), 2, "--is {what}");
    }

    let (read_only, _) = read_only_server(work.path());
    let uri = read_only.uri();
    assert_eq!(nbdinfo_status("--is", "read-only", &uri), 0);
    assert_eq!(nbdinfo_status("--is", "rotational", &uri), 2);
    for what in ["write", "flush", "fua", "trim", "zero", "fast-zero"] {
        assert_eq!(
            nbdinfo_status("--can", what, &uri),
            2,
            "--can {what} on a read-only export"
        );
    }
    for what in [
        "connect",
        "read",
        "multi-conn",
        "cache",
        "df",
        "structured-reply",
    ] {
        assert_eq!(
            nbdinfo_status("--can", what, &uri),
            0,
            "--can {what} on a read-only export"
        );
    }
    let info = nbdinfo_json(&[&uri]);
    assert_eq!(info["exports"][0]["is_read_only"], true, "{info:#}");
}

#[test]
fn nbdinfo_map_follows_writes_discards_and_zeroes() {
    require_tool("nbdinfo");
    require_tool("qemu-io");
    // Allocation is tracked per block: 4 KiB blocks make the expected map exact.
    let server = Server::start_with(ServerOptions {
        extra_args: vec!["--block-size".into(), "4K".into()],
        ..ServerOptions::default()
    });
    let uri = server.uri();

    assert_eq!(
        map(&uri),
        [(0, GIB, HOLE_ZERO)],
        "a fresh volume is one hole"
    );

    qemu_io(&uri, &["write -P 0xab 1M 64k", "write -P 0xcd 3M 4k"]);
    assert_eq!(
        map(&uri),
        [
            (0, MIB, HOLE_ZERO),
            (MIB, 64 * KIB, DATA),
            (MIB + 64 * KIB, 2 * MIB - 64 * KIB, HOLE_ZERO),
            (3 * MIB, 4 * KIB, DATA),
            (3 * MIB + 4 * KIB, GIB - 3 * MIB - 4 * KIB, HOLE_ZERO),
        ]
    );
    qemu_io(
        &uri,
        &[
            "read -P 0xab 1M 64k",
            "read -P 0xcd 3M 4k",
            "read -P 0 0 1M",
            "read -P 0 1088k 1984k",
        ],
    );

    // A discard makes the region a hole again, and it reads as zeroes.
    qemu_io(&uri, &["discard 1M 64k"]);
    assert_eq!(
        map(&uri),
        [
            (0, 3 * MIB, HOLE_ZERO),
            (3 * MIB, 4 * KIB, DATA),
            (3 * MIB + 4 * KIB, GIB - 3 * MIB - 4 * KIB, HOLE_ZERO),
        ]
    );
    qemu_io(&uri, &["read -P 0 1M 64k", "read -P 0xcd 3M 4k"]);

    // WRITE_ZEROES that may unmap (no NO_HOLE flag) leaves a hole too.
    qemu_io(&uri, &["write -z -u 3M 4k"]);
    assert_eq!(map(&uri), [(0, GIB, HOLE_ZERO)]);
    qemu_io(&uri, &["read -P 0 3M 4k"]);

    // Data near the end of the export is mapped to the last byte.
    qemu_io(&uri, &["write -P 0x11 1023M 1M"]);
    assert_eq!(
        map(&uri),
        [(0, GIB - MIB, HOLE_ZERO), (GIB - MIB, MIB, DATA)]
    );
}

#[test]
fn nbdcopy_four_connections_round_trip_a_sparse_image() {
    require_tool("nbdcopy");
    require_tool("nbdinfo");
    let work = tempfile::tempdir().expect("tempdir");
    let image = work.path().join("in.img");
    let out = work.path().join("out.img");
    write_image(
        &image,
        &[
            Piece::Data(16 * MIB, 1),
            Piece::Zeroes(8 * MIB),
            Piece::Hole(24 * MIB),
            Piece::Data(12 * MIB, 2),
            Piece::Zeroes(4 * MIB),
        ],
    );
    let mut server = Server::start_with(ServerOptions {
        size: "64M",
        extra_args: debug_log(),
        ..ServerOptions::default()
    });
    let uri = server.uri();
    let image_arg = image.to_str().expect("utf-8 path");
    let out_arg = out.to_str().expect("utf-8 path");

    // -T 4 as well: nbdcopy never uses more connections than threads, and threads default to
    // the number of cores.
    let before = transmissions(&server);
    nbdcopy(&["-C", "4", "-T", "4", "--flush", image_arg, &uri]);
    assert_eq!(
        transmissions(&server) - before,
        4,
        "nbdcopy did not use 4 connections (multi-conn not honoured?):\n{}",
        server.log_text()
    );

    // Zero regions, written or sparse, arrive as zeroing requests and stay thin.
    assert_eq!(
        map(&uri),
        [
            (0, 16 * MIB, DATA),
            (16 * MIB, 32 * MIB, HOLE_ZERO),
            (48 * MIB, 12 * MIB, DATA),
            (60 * MIB, 4 * MIB, HOLE_ZERO),
        ]
    );

    let before = transmissions(&server);
    nbdcopy(&["-C", "4", "-T", "4", &uri, out_arg]);
    assert_eq!(transmissions(&server) - before, 4, "{}", server.log_text());
    assert_same_file(&image, &out);

    // Copy again: synchronously on the way in; on the way out without extents (holes are read
    // as hole chunks, not skipped) and with --flush.
    std::fs::remove_file(&out).expect("remove out.img");
    nbdcopy(&["--synchronous", "--flush", image_arg, &uri]);
    nbdcopy(&[
        "-C",
        "4",
        "-T",
        "4",
        "--no-extents",
        "--flush",
        &uri,
        out_arg,
    ]);
    assert_same_file(&image, &out);

    assert!(server.is_running());
    assert!(server.stop().success(), "{}", server.log_text());
    let log = server.log_text();
    assert!(!log.contains("WARN") && !log.contains("ERROR"), "{log}");
}

#[test]
fn data_survives_a_restart() {
    require_tool("nbdcopy");
    require_tool("nbdinfo");
    require_tool("qemu-io");
    let work = tempfile::tempdir().expect("tempdir");
    let image = work.path().join("in.img");
    let out = work.path().join("out.img");
    let mut expected = write_image(
        &image,
        &[
            Piece::Data(4 * MIB, 21),
            Piece::Hole(8 * MIB),
            Piece::Data(4 * MIB, 22),
        ],
    );
    let mut server = Server::start_with(ServerOptions {
        size: "16M",
        // Allocation is tracked per block: 4 KiB blocks make the expected map exact.
        extra_args: vec!["--block-size".into(), "4K".into()],
        ..ServerOptions::default()
    });
    let uri = server.uri();
    nbdcopy(&["-C", "4", "-T", "4", image.to_str().expect("path"), &uri]);
    // A last, unaligned write with no explicit flush: the clean stop must make it durable.
    qemu_io(&uri, &["write -P 0x5a 8388708 70000"]);
    let (start, end) = (8 * MIB as usize + 100, 8 * MIB as usize + 100 + 70000);
    expected[start..end].fill(0x5a);
    std::fs::write(&image, &expected).expect("write expected image");
    let map_before = map(&uri);

    let status = server.stop();
    assert!(status.success(), "{status}\n{}", server.log_text());
    assert!(server.log_text().contains("stopped cleanly"));
    server.spawn();

    assert_eq!(
        map(&uri),
        map_before,
        "the allocation map changed across a restart"
    );
    assert_eq!(
        map_before,
        [
            (0, 4 * MIB, DATA),
            (4 * MIB, 4 * MIB, HOLE_ZERO),
            // The write's partial first and last 4 KiB blocks are allocated whole.
            (8 * MIB, 72 * KIB, DATA),
            (8 * MIB + 72 * KIB, 4 * MIB - 72 * KIB, HOLE_ZERO),
            (12 * MIB, 4 * MIB, DATA),
        ]
    );
    nbdcopy(&["-C", "4", "-T", "4", &uri, out.to_str().expect("path")]);
    assert_same_file(&image, &out);
    // Without extents nbdcopy reads the holes too: replies that mix data and hole chunks.
    std::fs::remove_file(&out).expect("remove out.img");
    nbdcopy(&["--no-extents", &uri, out.to_str().expect("path")]);
    assert_same_file(&image, &out);
}

#[test]
fn unix_socket_endpoint_serves_libnbd_clients() {
    require_tool("nbdinfo");
    require_tool("nbdcopy");
    let work = tempfile::tempdir().expect("tempdir");
    let image = work.path().join("in.img");
    let out = work.path().join("out.img");
    write_image(&image, &[Piece::Data(3 * MIB, 31), Piece::Hole(MIB)]);
    let server = Server::start_with(ServerOptions {
        unix_socket: true,
        size: "4M",
        volumes: vec!["vol-on-unix"],
        ..ServerOptions::default()
    });
    let uri = server.uri();
    assert!(uri.starts_with("nbd+unix:///"), "{uri}");

    let info = nbdinfo_json(&[&uri]);
    let e = &info["exports"][0];
    assert_eq!(e["export-name"], "vol-on-unix", "{info:#}");
    assert_eq!(e["export-size"].as_u64(), Some(4 * MIB), "{info:#}");
    assert_eq!(e["can_multi_conn"], true, "{info:#}");
    let list = nbdinfo_json(&["--list", &uri]);
    assert_eq!(list["exports"][0]["export-name"], "vol-on-unix", "{list:#}");
    assert_eq!(
        nbdinfo(&["--size", &server.uri_for("vol-on-unix")]).trim(),
        (4 * MIB).to_string()
    );

    nbdcopy(&["-C", "4", "-T", "4", image.to_str().expect("path"), &uri]);
    assert_eq!(map(&uri), [(0, 3 * MIB, DATA), (3 * MIB, MIB, HOLE_ZERO)]);
    nbdcopy(&[&uri, out.to_str().expect("path")]);
    assert_same_file(&image, &out);
}

#[test]
fn socket_activation_by_libnbd() {
    require_tool("nbdinfo");
    require_tool("nbdcopy");
    require_tool("timeout");
    let work = tempfile::tempdir().expect("tempdir");
    let store = format!("file://{}", work.path().join("store").display());
    let cache = work.path().join("cache").display().to_string();
    let image = work.path().join("in.img");
    let out = work.path().join("out.img");
    let mut expected = write_image(&image, &[Piece::Data(2 * MIB, 41)]);

    // libnbd's `[ CMD ]` runs the server with LISTEN_PID/LISTEN_FDS and a Unix socket on fd 3,
    // then stops it with SIGTERM when done. `timeout` guards against a server that will not stop.
    let activated = |client: &str, before: &[&str], size: &str, after: &[&str]| {
        let mut cmd = Command::new("timeout");
        cmd.args(["30", client])
            .args(before)
            .args(["--", "["])
            .args([
                bucketdisk_bin(),
                "serve",
                "--store",
                &store,
                "--cache-dir",
                &cache,
            ])
            .args(["--size", size])
            .arg("]")
            .args(after)
            .env("BUCKETDISK_LOG", "info")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS");
        let output = run_output(&mut cmd);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(
            output.status.success(),
            "{cmd:?} failed ({}):\n{}\n{stderr}",
            output.status,
            String::from_utf8_lossy(&output.stdout)
        );
        assert!(
            stderr.contains("serving NBD on activated unix socket"),
            "the server did not use the activated socket:\n{stderr}"
        );
        assert!(
            stderr.contains("stopped cleanly"),
            "the server did not stop cleanly on SIGTERM:\n{stderr}"
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };

    let size = activated("nbdinfo", &["--size"], "96M", &[]);
    assert_eq!(size.trim(), (96 * MIB).to_string());
    assert!(
        work.path().join("store/disk/volume.json").is_file(),
        "activation did not create the volume in the given store"
    );
    // The same store again: the volume exists, so --size no longer applies.
    let size = activated("nbdinfo", &["--size"], "1G", &[]);
    assert_eq!(size.trim(), (96 * MIB).to_string());

    // Data written through one activated server is read back through another.
    activated(
        "nbdcopy",
        &["--flush", image.to_str().expect("path")],
        "1G",
        &[],
    );
    let extents = activated("nbdinfo", &["--map", "--json"], "1G", &[]);
    let extents: Value = serde_json::from_str(&extents).expect("map JSON");
    let extents: Vec<(u64, u64, u64)> = extents
        .as_array()
        .expect("map array")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().expect("offset"),
                e["length"].as_u64().expect("length"),
                e["type"].as_u64().expect("type"),
            )
        })
        .collect();
    assert_eq!(
        extents,
        [(0, 2 * MIB, DATA), (2 * MIB, 94 * MIB, HOLE_ZERO)]
    );
    activated("nbdcopy", &[], "1G", &[out.to_str().expect("path")]);
    expected.resize(96 * MIB as usize, 0);
    let actual = std::fs::read(&out).expect("read out.img");
    assert_eq!(actual.len(), expected.len(), "copied-out size");
    assert!(
        actual == expected,
        "data read back differs from data written"
    );
}

#[test]
fn read_only_export_refuses_writes_and_keeps_serving() {
    require_tool("nbdcopy");
    require_tool("nbdinfo");
    let work = tempfile::tempdir().expect("tempdir");
    let (mut server, image) = read_only_server(work.path());
    let uri = server.uri();
    let other = work.path().join("other.img");
    let out = work.path().join("out.img");
    write_image(&other, &[Piece::Data(16 * MIB, 99)]);

    // nbdcopy sees the read-only flag and refuses.
    let output = run_output(Command::new("nbdcopy").arg(&other).arg(&uri));
    assert!(
        !output.status.success(),
        "nbdcopy into a read-only export succeeded"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("read-only"), "{stderr}");
    assert!(server.is_running());

    // A client that ignores the flag (libnbd strict mode off) reaches the server, which must
    // answer EPERM to WRITE, TRIM and WRITE_ZEROES and keep the connection usable.
    let answers = nbdsh(&format!(
        r#"
h.set_strict_mode(0)
h.connect_uri({uri:?})
assert h.is_read_only()
before = h.pread(4096, 0)
for name, op in (("write", lambda: h.pwrite(b"x" * 4096, 0)),
                 ("trim", lambda: h.trim(4096, 0)),
                 ("zero", lambda: h.zero(4096, 0))):
    try:
        op()
        print(name, "ok")
    except nbd.Error as e:
        print(name, nbd.Error.__name__, e.errno)
print("same", h.pread(4096, 0) == before)
h.shutdown()
"#
    ));
    for expected in [
        "write Error EPERM",
        "trim Error EPERM",
        "zero Error EPERM",
        "same True",
    ] {
        assert!(
            answers.contains(expected),
            "expected {expected:?}:\n{answers}"
        );
    }
    assert!(server.is_running(), "{}", server.log_text());

    // Reads still work, and the volume is unchanged.
    nbdcopy(&["-C", "4", "-T", "4", &uri, out.to_str().expect("path")]);
    assert_same_file(&image, &out);
    assert!(server.stop().success(), "{}", server.log_text());
}
