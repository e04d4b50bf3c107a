//! Real clients against the real binary: qemu 10's `qemu-img` and `qemu-io` (extended headers)
//! and fio's nbd engine (libnbd, structured replies).
//!
//! Every check reads data back through the server, so a write that is lost, misplaced or
//! clobbers its neighbours fails the test. Note that qemu bounds-checks requests itself: an I/O
//! crossing the end of the export is refused inside qemu and never reaches the server, so those
//! tests prove qemu's view of the export size and that the session survives, not the server's
//! range checks. Likewise qemu opens a read-only export read-only and refuses writes itself, so
//! the server's EPERM path is not reached from here. Both are covered by protocol-level tests.

mod common;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const KIB: u64 = 1024;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A server with debug logging (connection starts are logged) on an export of `size`.
fn server_with(size: &'static str, unix_socket: bool) -> Server {
    Server::start_with(ServerOptions {
        size,
        unix_socket,
        extra_args: vec!["--log".into(), "debug".into()],
        ..ServerOptions::default()
    })
}

/// A server whose volume tracks allocation per 4 KiB block, so maps are exact to 4 KiB.
fn server_with_4k_blocks(size: &'static str) -> Server {
    Server::start_with(ServerOptions {
        size,
        extra_args: vec![
            "--log".into(),
            "debug".into(),
            "--block-size".into(),
            "4K".into(),
        ],
        ..ServerOptions::default()
    })
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs `qemu-io -f raw [extra] -c cmd... uri` and returns its output whatever the status.
fn qemu_io_output(uri: &str, extra: &[&str], commands: &[&str]) -> Output {
    require_tool("qemu-io");
    let mut cmd = Command::new("qemu-io");
    cmd.arg("-f").arg("raw").args(extra);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(uri);
    run_output(&mut cmd)
}

/// Runs qemu-io commands that must all succeed: exit status 0 and no failure or pattern
/// mismatch in the output (qemu-io prints pattern mismatches on stdout). Returns stdout.
fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let output = qemu_io_output(uri, &[], commands);
    let (stdout, stderr) = text(&output);
    assert!(
        output.status.success() && !stdout.contains("failed") && !stderr.contains("failed"),
        "qemu-io {commands:?} on {uri} failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    stdout
}

/// Runs `qemu-io -c "read -v off len"` and returns the bytes it dumped.
fn qemu_io_dump(uri: &str, offset: u64, len: u64) -> Vec<u8> {
    let stdout = qemu_io(uri, &[&format!("read -v {offset} {len}")]);
    let bytes = parse_hexdump(&stdout, offset);
    assert_eq!(bytes.len() as u64, len, "short dump:\n{stdout}");
    bytes
}

/// Parses qemu-io's `read -v` dump (`0000303a:  11 11 99 ...  ascii`), checking that the lines
/// are contiguous from `offset`.
fn parse_hexdump(stdout: &str, offset: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    for line in stdout.lines() {
        let Some((addr, rest)) = line.split_once(":  ") else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr.trim(), 16) else {
            continue;
        };
        assert_eq!(
            addr,
            offset + bytes.len() as u64,
            "dump not contiguous:\n{stdout}"
        );
        for token in rest.split_whitespace() {
            match (token.len(), u8::from_str_radix(token, 16)) {
                (2, Ok(b)) => bytes.push(b),
                _ => break, // the ASCII column
            }
        }
    }
    bytes
}

fn qemu_img(args: &[&str]) -> String {
    require_tool("qemu-img");
    run(Command::new("qemu-img").args(args))
}

/// `qemu-img map --output=json` entries as (start, length, zero, data).
fn qemu_img_map(uri: &str) -> Vec<(u64, u64, bool, bool)> {
    let json = qemu_img(&["map", "--output=json", "-f", "raw", uri]);
    let entries: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let entries = entries.as_array().expect("map is an array");
    let mut out = Vec::new();
    let mut expected_start = 0;
    for e in entries {
        let start = e["start"].as_u64().expect("start");
        let length = e["length"].as_u64().expect("length");
        assert_eq!(start, expected_start, "map has a gap or overlap:\n{json}");
        expected_start = start + length;
        out.push((
            start,
            length,
            e["zero"].as_bool().expect("zero"),
            e["data"].as_bool().expect("data"),
        ));
    }
    out
}

/// The map entries overlapping `[start, end)`, with their (zero, data) flags.
fn map_flags(map: &[(u64, u64, bool, bool)], start: u64, end: u64) -> Vec<(bool, bool)> {
    map.iter()
        .filter(|(s, l, _, _)| *s < end && s + l > start)
        .map(|&(_, _, zero, data)| (zero, data))
        .collect()
}

/// Asserts `[start, end)` is reported as all zeros; with `hole`, also as not allocated.
fn assert_map_zero(map: &[(u64, u64, bool, bool)], start: u64, end: u64, hole: bool) {
    let flags = map_flags(map, start, end);
    assert!(
        !flags.is_empty(),
        "no map entry for {start}..{end}: {map:?}"
    );
    assert!(
        flags.iter().all(|&(zero, data)| zero && !(hole && data)),
        "{start}..{end} should read as zero{}: {map:?}",
        if hole { " and be a hole" } else { "" }
    );
}

/// Asserts `[start, end)` is reported as allocated data.
fn assert_map_data(map: &[(u64, u64, bool, bool)], start: u64, end: u64) {
    let flags = map_flags(map, start, end);
    assert!(
        !flags.is_empty(),
        "no map entry for {start}..{end}: {map:?}"
    );
    assert!(
        flags.iter().all(|&(zero, data)| data && !zero),
        "{start}..{end} should be data: {map:?}"
    );
}

/// A qemu-io process fed commands through stdin: one NBD connection kept open across steps.
struct InteractiveQemuIo {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl InteractiveQemuIo {
    fn open(uri: &str) -> Self {
        require_tool("qemu-io");
        let mut child = Command::new("qemu-io")
            .args(["-f", "raw", uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qemu-io");
        let stdin = child.stdin.take().expect("stdin");
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// Runs one read/write/discard command and waits for its statistics line; panics on any
    /// failure or pattern mismatch reported before it.
    fn run(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").expect("send to qemu-io");
        self.stdin.flush().expect("flush qemu-io stdin");
        let mut seen = Vec::new();
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("qemu-io silent after {command:?} ({e}): {seen:?}"));
            assert!(
                !line.contains("failed") && !line.contains("can't open"),
                "qemu-io {command:?}: {line}\n{seen:?}"
            );
            let done = line.contains("ops/sec");
            seen.push(line);
            if done {
                return;
            }
        }
    }

    /// `flush` prints nothing; a one-byte read afterwards shows it completed. qemu-io reads
    /// stdin through stdio, so a second line sent before it has taken the first would sit in
    /// its buffer unseen: wait until the pipe is drained before sending the read.
    fn flush(&mut self) {
        writeln!(self.stdin, "flush").expect("send to qemu-io");
        self.stdin.flush().expect("flush qemu-io stdin");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while pipe_pending(&self.stdin) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "qemu-io does not read stdin"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        self.run("read 0 1");
    }

    fn quit(mut self) {
        writeln!(self.stdin, "quit").expect("send to qemu-io");
        let status = self.child.wait().expect("wait qemu-io");
        assert!(status.success(), "interactive qemu-io exited with {status}");
    }
}

/// Bytes written to a pipe and not yet read by the other end.
fn pipe_pending(pipe: &ChildStdin) -> i32 {
    let mut pending: libc::c_int = 0;
    // SAFETY: FIONREAD on a valid pipe descriptor writes one c_int to the pointer given.
    let rc = unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut pending) };
    assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    pending
}

impl Drop for InteractiveQemuIo {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs fio (JSON output to a file in `dir`), asserts it exited 0 and every job reports
/// `error == 0`, and returns the jobs. `args` are global options, optionally followed by job
/// sections (`--name=...` then that job's options); without any, one job `name` runs.
fn fio(dir: &Path, name: &str, args: &[String]) -> Vec<Value> {
    require_tool("fio");
    let json_path = dir.join(format!("{name}.json"));
    let mut cmd = Command::new("fio");
    cmd.current_dir(dir)
        .arg("--ioengine=nbd")
        .arg("--verify_state_save=0")
        .arg("--output-format=json")
        .arg(format!("--output={}", json_path.display()))
        .args(args);
    if !args.iter().any(|a| a.starts_with("--name=")) {
        cmd.arg(format!("--name={name}"));
    }
    let output = run_output(&mut cmd);
    let json = std::fs::read_to_string(&json_path).unwrap_or_default();
    let (stdout, stderr) = text(&output);
    assert!(
        output.status.success(),
        "fio {name} {args:?} failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}\njson:\n{json}",
        output.status
    );
    let report: Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("fio JSON: {e}\n{json}"));
    let jobs = report["jobs"].as_array().expect("jobs array").clone();
    assert!(!jobs.is_empty(), "fio ran no jobs:\n{json}");
    for job in &jobs {
        assert_eq!(
            job["error"].as_i64(),
            Some(0),
            "fio job {} reported an error:\n{stderr}\n{json}",
            job["jobname"]
        );
    }
    assert!(
        !stderr.contains("verify:") && !stderr.contains("bad magic"),
        "fio reported verify problems:\n{stderr}"
    );
    jobs
}

fn io_bytes(job: &Value, direction: &str) -> u64 {
    job[direction]["io_bytes"].as_u64().expect("io_bytes")
}

/// Connections that reached the transmission phase, from the server's debug log.
fn transmission_count(server: &Server) -> usize {
    server.log_text().matches("transmission started").count()
}

// ---------------------------------------------------------------------------------------------
// qemu-img
// ---------------------------------------------------------------------------------------------

#[test]
fn qemu_img_info_reports_virtual_size_of_each_export() {
    let server = Server::start_with(ServerOptions {
        size: "48M",
        volumes: vec!["alpha", "beta"],
        ..ServerOptions::default()
    });
    for uri in [
        server.uri(),
        server.uri_for("alpha"),
        server.uri_for("beta"),
    ] {
        let json = qemu_img(&["info", "--output=json", "-f", "raw", &uri]);
        let info: Value = serde_json::from_str(&json).expect("info JSON");
        assert_eq!(
            info["virtual-size"].as_u64(),
            Some(48 * MIB),
            "{uri}: {json}"
        );
        assert_eq!(info["format"].as_str(), Some("raw"), "{json}");
    }
    let human = qemu_img(&["info", "-f", "raw", &server.uri()]);
    assert!(human.contains("50331648 bytes"), "{human}");

    // An export that does not exist is refused, and the server lives on.
    let missing =
        run_output(Command::new("qemu-img").args(["info", "-f", "raw", &server.uri_for("nope")]));
    assert!(!missing.status.success(), "opening a missing export worked");
    let again = qemu_img(&[
        "info",
        "--output=json",
        "-f",
        "raw",
        &server.uri_for("beta"),
    ]);
    assert!(again.contains("\"virtual-size\": 50331648"), "{again}");

    // The exports are separate disks.
    qemu_io(&server.uri_for("beta"), &["write -P 0xbe 0 64k"]);
    qemu_io(&server.uri_for("alpha"), &["write -P 0xa1 64k 64k"]);
    qemu_io(&server.uri(), &["read -P 0 0 64k", "read -P 0xa1 64k 64k"]);
    qemu_io(
        &server.uri_for("beta"),
        &["read -P 0xbe 0 64k", "read -P 0 64k 64k"],
    );
}

#[test]
fn qemu_img_convert_round_trip_and_compare() {
    let server = server_with("32M", false);
    let uri = server.uri();
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("source.raw");
    let back = dir.path().join("back.raw");
    let len = 32 * MIB;
    write_pattern_file(&source, len as usize, 7);
    // A zero region in the middle (written as zeros, so qemu-img must detect it), and an odd
    // unaligned non-zero island inside it.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&source)
        .expect("open source");
    file.write_all_at(&vec![0u8; (12 * MIB) as usize], 8 * MIB)
        .expect("zero region");
    file.write_all_at(b"island", 14 * MIB + 333)
        .expect("island");
    drop(file);

    // Fill the export with garbage first, so zero regions only compare equal if the convert
    // really zeroed them.
    qemu_io(&uri, &["write -P 0xee 0 32M"]);
    let differs = run_output(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        source.to_str().unwrap(),
        &uri,
    ]));
    assert_eq!(
        differs.status.code(),
        Some(1),
        "compare must see a difference"
    );

    qemu_img(&[
        "convert",
        "-n",
        "-W",
        "-m",
        "8",
        "-f",
        "raw",
        "-O",
        "raw",
        source.to_str().unwrap(),
        &uri,
    ]);
    let compare = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        source.to_str().unwrap(),
        &uri,
    ]);
    assert!(compare.contains("Images are identical"), "{compare}");

    // The zeroed region is reported as zeros, the data around it as data.
    let map = qemu_img_map(&uri);
    assert_map_data(&map, 0, 8 * MIB);
    assert_map_zero(&map, 8 * MIB, 14 * MIB, false);
    assert_map_zero(&map, 15 * MIB, 20 * MIB, false);
    assert_map_data(&map, 20 * MIB, 32 * MIB);

    // And back out again, byte for byte.
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &uri,
        back.to_str().unwrap(),
    ]);
    let original = std::fs::read(&source).expect("read source");
    let copied = std::fs::read(&back).expect("read copy");
    assert_eq!(copied.len(), original.len());
    if let Some(i) = (0..original.len()).find(|&i| original[i] != copied[i]) {
        panic!("converted-back image differs first at byte {i}");
    }

    // A one-byte change through another connection is noticed: compare really compares.
    qemu_io(&uri, &["write -P 0x01 9437184 1"]);
    let changed = run_output(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        source.to_str().unwrap(),
        &uri,
    ]));
    let (stdout, _) = text(&changed);
    assert_eq!(changed.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("9437184"), "{stdout}");
}

#[test]
fn qemu_img_map_reports_holes_and_data() {
    let server = server_with_4k_blocks("64M");
    let uri = server.uri();
    let size = 64 * MIB;

    let fresh = qemu_img_map(&uri);
    assert_eq!(fresh.iter().map(|e| e.1).sum::<u64>(), size);
    assert_map_zero(&fresh, 0, size, true);

    qemu_io(
        &uri,
        &[
            "write -P 0x33 1M 1M",
            "write -P 0x44 10M 64k",
            "write -P 0x55 67104768 4096", // the last 4 KiB
            "write -P 0x66 30M 4k",
            "write -P 0x66 31M 4k",
        ],
    );
    let map = qemu_img_map(&uri);
    assert_eq!(map.last().map(|e| e.0 + e.1), Some(size));
    assert_map_zero(&map, 0, MIB, true);
    assert_map_data(&map, MIB, 2 * MIB);
    assert_map_zero(&map, 2 * MIB, 10 * MIB, true);
    assert_map_data(&map, 10 * MIB, 10 * MIB + 64 * KIB);
    assert_map_zero(&map, 11 * MIB, 30 * MIB, true);
    assert_map_data(&map, 30 * MIB, 30 * MIB + 4 * KIB);
    assert_map_zero(&map, 30 * MIB + 4 * KIB, 31 * MIB, true);
    assert_map_data(&map, 31 * MIB, 31 * MIB + 4 * KIB);
    assert_map_zero(&map, 32 * MIB, size - 4 * KIB, true);
    assert_map_data(&map, size - 4 * KIB, size);

    // Discard and unmapping write-zeroes turn data back into zeros; neighbours stay data.
    qemu_io(
        &uri,
        &[
            "discard 1M 512k",
            "write -z -u 10M 64k",
            "read -P 0x33 1536k 512k",
        ],
    );
    let map = qemu_img_map(&uri);
    assert_map_zero(&map, MIB, MIB + 512 * KIB, false);
    assert_map_data(&map, MIB + 512 * KIB, 2 * MIB);
    assert_map_zero(&map, 10 * MIB, 10 * MIB + 64 * KIB, false);
    assert_map_data(&map, 30 * MIB, 30 * MIB + 4 * KIB);
}

// ---------------------------------------------------------------------------------------------
// qemu-io
// ---------------------------------------------------------------------------------------------

#[test]
fn qemu_io_write_read_fua_and_flush() {
    let server = server_with("64M", false);
    let uri = server.uri();
    qemu_io(
        &uri,
        &[
            "write -P 0xa5 0 1M",
            "read -P 0xa5 0 1M",
            "write -f -P 0x3c 1M 64k", // FUA
            "read -P 0x3c 1M 64k",
            "write -f -P 0x3d 4000000 12345", // FUA, unaligned
            "flush",
            "read -P 0 2M 64k", // never written
            "read -P 0xa5 0 1M",
        ],
    );
    // A new connection sees all of it.
    qemu_io(
        &uri,
        &[
            "read -P 0xa5 0 1M",
            "read -P 0x3c 1M 64k",
            "read -P 0 1114112 10000",
            "read -P 0 3999000 1000",
            "read -P 0x3d 4000000 12345",
            "read -P 0 4012345 1000",
        ],
    );
    // A mismatch is detected (guards against a qemu-io that never checks).
    let wrong = qemu_io_output(&uri, &[], &["read -P 0xa6 0 4k"]);
    let (stdout, _) = text(&wrong);
    assert!(
        !wrong.status.success() && stdout.contains("Pattern verification failed"),
        "{stdout}"
    );
}

#[test]
fn qemu_io_write_zeroes_variants() {
    let server = server_with("64M", false);
    let uri = server.uri();
    qemu_io(&uri, &["write -P 0x77 0 4M"]);
    qemu_io(
        &uri,
        &[
            "write -z 256k 64k",           // WRITE_ZEROES with NO_HOLE
            "write -z -u 512k 128k",       // may unmap (punch)
            "write -z -n 1M 64k",          // FAST_ZERO: no slow fallback allowed
            "write -z -n -u 1536k 64k",    // FAST_ZERO that may unmap
            "write -z -f 2M 4k",           // with FUA
            "write -z 3000 5000",          // unaligned, byte-granular
            "write -z -u 3000000 70001",   // unaligned unmap
            "write -z -n -u 3500001 4097", // unaligned fast zero
        ],
    );
    qemu_io(
        &uri,
        &[
            "read -P 0x77 0 3000",
            "read -P 0 3000 5000",
            "read -P 0x77 8000 254144", // up to 256k
            "read -P 0 256k 64k",
            "read -P 0x77 320k 192k",
            "read -P 0 512k 128k",
            "read -P 0x77 640k 384k",
            "read -P 0 1M 64k",
            "read -P 0x77 1088k 448k",
            "read -P 0 1536k 64k",
            "read -P 0x77 1600k 448k",
            "read -P 0 2M 4k",
            "read -P 0x77 2101248 898752", // 2M+4k .. 3000000
            "read -P 0 3000000 70001",
            "read -P 0x77 3070001 430000",
            "read -P 0 3500001 4097",
            "read -P 0x77 3504098 690206", // .. 4M
        ],
    );
    // Zeroing past the end of what was ever written, and of a hole, also reads as zeros.
    qemu_io(&uri, &["write -z -n 8M 1M", "read -P 0 8M 1M"]);
}

#[test]
fn qemu_io_discard_reads_back_zeros() {
    let server = server_with("64M", false);
    let uri = server.uri();
    qemu_io(&uri, &["write -P 0x5e 0 8M"]);
    qemu_io(
        &uri,
        &[
            "discard 1M 1M",
            "discard 4100 10000",    // unaligned
            "discard 7340033 65535", // unaligned, odd length
            "flush",
        ],
    );
    qemu_io(
        &uri,
        &[
            "read -P 0x5e 0 4100",
            "read -P 0 4100 10000",
            "read -P 0x5e 14100 1034476", // .. 1M
            "read -P 0 1M 1M",
            "read -P 0x5e 2M 5242881", // .. 7340033
            "read -P 0 7340033 65535",
            "read -P 0x5e 7405568 983040", // .. 8M
        ],
    );
    // Discarding never-written space is harmless.
    qemu_io(&uri, &["discard 32M 16M", "read -P 0 32M 1M"]);
}

#[test]
fn qemu_io_unaligned_io_at_odd_offsets() {
    // Over a Unix socket, to cover that transport too.
    let server = server_with("64M", true);
    let uri = server.uri();
    qemu_io(&uri, &["write -P 0x11 0 2M"]);
    qemu_io(
        &uri,
        &[
            "write -P 0x99 12345 777",
            "write -P 0x42 65533 7",  // crosses a 64 KiB block boundary
            "write -P 0x24 131071 1", // a single byte
            "write -P 0x55 1048575 1048577", // > 64 KiB, starts 1 byte before 1M
            "write -P 0x66 2097152 3", // just past the pre-filled region
            "write -P 0x77 67108863 1", // the very last byte
        ],
    );
    qemu_io(
        &uri,
        &[
            "read -P 0x11 0 12345",
            "read -P 0x99 12345 777",
            "read -P 0x11 13122 52411", // .. 65533
            "read -P 0x42 65533 7",
            "read -P 0x11 65540 65531", // .. 131071
            "read -P 0x24 131071 1",
            "read -P 0x11 131072 917503", // .. 1048575
            "read -P 0x55 1048575 1048577",
            "read -P 0x66 2097152 3",
            "read -P 0 2097155 1000",
            "read -P 0x77 67108863 1",
            "read -P 0 67108000 863",
            // Unaligned reads spanning several of the writes at once.
            "read -P 0x99 12346 775",
        ],
    );
    // Exact bytes around the edges of the 777-byte write.
    let head = qemu_io_dump(&uri, 12340, 10);
    assert_eq!(
        head,
        [0x11, 0x11, 0x11, 0x11, 0x11, 0x99, 0x99, 0x99, 0x99, 0x99]
    );
    let tail = qemu_io_dump(&uri, 13118, 8);
    assert_eq!(tail, [0x99, 0x99, 0x99, 0x99, 0x11, 0x11, 0x11, 0x11]);
    let edge = qemu_io_dump(&uri, 65530, 12);
    assert_eq!(
        edge,
        [
            0x11, 0x11, 0x11, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x11, 0x11
        ]
    );
    let big = qemu_io_dump(&uri, 1048573, 4);
    assert_eq!(big, [0x11, 0x11, 0x55, 0x55]);
    let big_end = qemu_io_dump(&uri, 2097150, 7);
    assert_eq!(big_end, [0x55, 0x55, 0x66, 0x66, 0x66, 0, 0]);
}

#[test]
fn qemu_io_io_past_the_end_fails_and_the_session_survives() {
    let server = server_with("64M", false);
    let uri = server.uri();
    let size = 64 * MIB;
    let output = qemu_io_output(
        &uri,
        &[],
        &[
            &format!("write -P 0x7e {} 1", size - 1),
            &format!("write -P 0x01 {} 8192", size - 4096), // crosses the end
            &format!("read {} 1024", size - 512),           // crosses the end
            &format!("write -P 0x02 {size} 1"),             // starts at the end
            &format!("write -z {} 8192", size - 4096),      // zeroes crossing the end
            &format!("read -P 0x7e {} 1", size - 1),
            &format!("read -P 0 {} 4095", size - 4096),
            "write -P 0x03 0 4k",
            "read -P 0x03 0 4k",
        ],
    );
    let (stdout, stderr) = text(&output);
    let all = format!("{stdout}{stderr}");
    assert!(
        !output.status.success(),
        "failing commands must fail:\n{all}"
    );
    assert_eq!(all.matches("write failed").count(), 3, "{all}");
    assert_eq!(all.matches("read failed").count(), 1, "{all}");
    assert!(!all.contains("Pattern verification failed"), "{all}");
    for ok in [
        format!("wrote 1/1 bytes at offset {}", size - 1),
        format!("read 1/1 bytes at offset {}", size - 1),
        format!("read 4095/4095 bytes at offset {}", size - 4096),
        "wrote 4096/4096 bytes at offset 0".to_string(),
        "read 4096/4096 bytes at offset 0".to_string(),
    ] {
        assert!(stdout.contains(&ok), "missing {ok:?}:\n{all}");
    }
    // Nothing of the refused writes landed, and the server still serves new connections.
    qemu_io(
        &uri,
        &[
            &format!("read -P 0 {} 4095", size - 4096),
            &format!("read -P 0x7e {} 1", size - 1),
        ],
    );
}

#[test]
fn qemu_io_many_requests_in_flight() {
    // aio_* commands queue requests without waiting, so the server sees them pipelined and
    // answers out of order; aio_flush waits for all of them.
    let server = server_with("64M", false);
    let uri = server.uri();
    let mut writes = Vec::new();
    let mut reads = Vec::new();
    for i in 0..64u64 {
        // Disjoint, unaligned, of varied sizes (some beyond the 64 KiB sparse-read threshold).
        let offset = i * 512 * KIB + i * 7 + 1;
        let len = 1 + (i * 37_813) % (300 * KIB);
        let pattern = i + 1;
        let fua = if i % 5 == 0 { "-f " } else { "" };
        writes.push(format!("aio_write -q {fua}-P {pattern} {offset} {len}"));
        reads.push(format!("aio_read -q -P {pattern} {offset} {len}"));
        if i % 8 == 3 {
            // A zeroed run right after, read back on its own.
            writes.push(format!("aio_write -q -z {} 100", offset + len));
            reads.push(format!("aio_read -q -P 0 {} 100", offset + len));
        }
    }
    writes.push("aio_flush".into());
    writes.push("flush".into());
    reads.push("aio_flush".into());
    let refs: Vec<&str> = writes.iter().map(String::as_str).collect();
    qemu_io(&uri, &refs);
    // Read back on a fresh connection, all at once, twice over.
    let refs: Vec<&str> = reads
        .iter()
        .chain(reads.iter())
        .map(String::as_str)
        .collect();
    let out = qemu_io(&uri, &refs);
    assert!(!out.contains("Pattern"), "{out}");
    // Gaps between the writes are untouched zeros.
    qemu_io(
        &uri,
        &[
            "read -P 0 0 1",
            &format!("read -P 0 {} 1000", 63 * 512 * KIB + 63 * 7 + 1 + 300 * KIB),
        ],
    );
}

#[test]
fn read_only_export_refuses_writes_and_serves_reads() {
    let mut server = server_with("16M", false);
    let uri = server.uri();
    qemu_io(&uri, &["write -P 0xc7 0 1M", "write -P 0xc8 5000001 333"]);
    assert!(server.stop().success(), "{}", server.log_text());
    server.extra_args.push("--read-only".into());
    server.spawn();

    let info = qemu_img(&["info", "--output=json", "-f", "raw", &uri]);
    assert!(info.contains("\"virtual-size\": 16777216"), "{info}");

    // Opening read-write is refused: the export says it is read-only.
    let rw = qemu_io_output(&uri, &[], &["write -P 1 0 4k"]);
    let (stdout, stderr) = text(&rw);
    assert!(!rw.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("Permission denied") || stderr.contains("read-only"),
        "{stderr}"
    );
    // Opened read-only, every kind of write fails and reads work.
    let ro = qemu_io_output(
        &uri,
        &["-r"],
        &[
            "write -P 1 0 4k",
            "write -z 0 4k",
            "discard 0 4k",
            "read -P 0xc7 0 1M",
            "read -P 0xc8 5000001 333",
            "read -P 0 16000000 4096",
        ],
    );
    let (stdout, stderr) = text(&ro);
    assert!(!ro.status.success(), "{stdout}{stderr}");
    assert_eq!(
        stderr.matches("read-only").count() + stderr.matches("not permitted").count(),
        3,
        "each write must be refused:\n{stderr}"
    );
    assert!(!stdout.contains("wrote"), "{stdout}");
    assert!(!stdout.contains("Pattern verification failed"), "{stdout}");
    assert_eq!(stdout.matches("read ").count(), 3, "{stdout}");

    // Writing a whole image into it fails too, and the data is unchanged afterwards.
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("img.raw");
    write_pattern_file(&image, MIB as usize, 3);
    let convert = run_output(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        image.to_str().unwrap(),
        &uri,
    ]));
    assert!(
        !convert.status.success(),
        "convert into a read-only export worked"
    );
    let map = qemu_img_map(&uri);
    assert_map_data(&map, 0, MIB);
    let out = qemu_io_output(&uri, &["-r"], &["read -P 0xc7 0 1M"]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(server.is_running());
}

#[test]
fn writes_on_one_connection_are_seen_by_another() {
    let server = server_with("64M", false);
    let uri = server.uri();
    // Connection A stays open throughout; it reads the area first, so stale data would show.
    let mut a = InteractiveQemuIo::open(&uri);
    a.run("read -P 0 0 64k");
    a.run("read -P 0 1M 64k");

    // B writes and flushes; A then sees it.
    qemu_io(&uri, &["write -P 0x5a 0 64k", "flush"]);
    a.run("read -P 0x5a 0 64k");

    // A writes (plain, then FUA) and flushes; a new connection C sees both.
    a.run("write -P 0xc3 1M 64k");
    a.run("write -f -P 0xc4 2M 100");
    a.flush();
    qemu_io(&uri, &["read -P 0xc3 1M 64k", "read -P 0xc4 2M 100"]);

    // C zeroes and discards; A sees the zeros.
    qemu_io(&uri, &["write -z 1M 32k", "discard 0 64k", "flush"]);
    a.run("read -P 0 1M 32k");
    a.run("read -P 0xc3 1081344 32k");
    a.run("read -P 0 0 64k");
    a.quit();
    assert!(
        transmission_count(&server) >= 4,
        "expected separate connections:\n{}",
        server.log_text()
    );
}

// ---------------------------------------------------------------------------------------------
// fio (libnbd)
// ---------------------------------------------------------------------------------------------

fn verify_args(uri: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        format!("--uri={uri}"),
        "--rw=randwrite".to_string(),
        "--iodepth=32".to_string(),
        "--verify=crc32c".to_string(),
        "--verify_fatal=1".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn fio_randwrite_4k_verifies() {
    let server = server_with("256M", false);
    let jobs = fio(
        server.dir.path(),
        "randwrite4k",
        &verify_args(&server.uri(), &["--bs=4k", "--size=256M"]),
    );
    assert_eq!(jobs.len(), 1);
    assert_eq!(io_bytes(&jobs[0], "write"), 256 * MIB);
    // The verify phase read everything back.
    assert_eq!(io_bytes(&jobs[0], "read"), 256 * MIB);
}

#[test]
fn fio_mixed_block_sizes_verify_over_unix_socket() {
    let server = server_with("256M", true);
    let jobs = fio(
        server.dir.path(),
        "mixed",
        &verify_args(
            &server.uri(),
            &[
                "--bsrange=4k-1M",
                "--bs_unaligned=1",
                "--size=256M",
                "--fsync=16", // a FLUSH among the writes in flight every 16 writes
            ],
        ),
    );
    assert_eq!(jobs.len(), 1);
    let written = io_bytes(&jobs[0], "write");
    assert!(written > 200 * MIB, "wrote only {written} bytes");
    assert_eq!(
        io_bytes(&jobs[0], "read"),
        written,
        "verify did not read it all"
    );
}

#[test]
fn fio_two_connections_on_disjoint_regions_verify() {
    let server = server_with("256M", false);
    let before = transmission_count(&server);
    let jobs = fio(
        server.dir.path(),
        "multiconn",
        &verify_args(
            &server.uri(),
            &[
                "--bsrange=4k-256k",
                "--size=128M",
                "--numjobs=2",
                "--offset_increment=128M",
            ],
        ),
    );
    assert_eq!(jobs.len(), 2);
    for job in &jobs {
        let written = io_bytes(job, "write");
        assert!(written > 100 * MIB, "job wrote only {written} bytes");
        assert_eq!(io_bytes(job, "read"), written);
    }
    assert!(
        transmission_count(&server) - before >= 2,
        "fio did not open two connections:\n{}",
        server.log_text()
    );
}

#[test]
fn fio_sequential_reads_over_holes_and_data_verify() {
    // libnbd (structured replies, no extended headers) reassembling 1 MiB reads from data and
    // hole chunks: the first half is mostly holes with a few allocated zero runs, the second
    // half is one pattern.
    let server = server_with("64M", false);
    let uri = server.uri();
    qemu_io(
        &uri,
        &[
            "write -P 0 4M 1M",
            "write -P 0 10485000 70000",
            "write -P 0x5a 32M 32M",
        ],
    );
    let args: Vec<String> = [
        format!("--uri={uri}"),
        "--rw=read".into(),
        "--iodepth=8".into(),
        "--verify_fatal=1".into(),
        "--verify=pattern".into(),
        "--name=holes".into(),
        "--offset=0".into(),
        "--size=32M".into(),
        "--bs=1M".into(),
        "--verify_pattern=0".into(),
        "--name=data".into(),
        "--offset=32M".into(),
        "--size=32M".into(),
        "--bs=256k".into(),
        "--verify_pattern=0x5a".into(),
    ]
    .into();
    let jobs = fio(server.dir.path(), "sparse-read", &args);
    assert_eq!(jobs.len(), 2);
    for job in &jobs {
        assert_eq!(io_bytes(job, "read"), 32 * MIB, "{}", job["jobname"]);
    }
    // The check can fail: the data half is not zero.
    let wrong = run_output(
        Command::new("fio")
            .current_dir(server.dir.path())
            .arg("--ioengine=nbd")
            .arg(format!("--uri={uri}"))
            .args(["--rw=read", "--bs=1M", "--offset=32M", "--size=1M"])
            .args(["--verify=pattern", "--verify_pattern=0", "--verify_fatal=1"])
            .arg("--name=wrong"),
    );
    assert!(!wrong.status.success(), "{:?}", text(&wrong));
}

#[test]
fn fio_data_verifies_after_a_restart() {
    let mut server = server_with("64M", false);
    let uri = server.uri();
    let common = ["--bs=16k", "--size=64M", "--randseed=1234"];
    let write = fio(
        server.dir.path(),
        "persist",
        &[
            verify_args(&uri, &common),
            vec!["--do_verify=0".to_string()],
        ]
        .concat(),
    );
    assert_eq!(io_bytes(&write[0], "write"), 64 * MIB);
    assert!(server.stop().success(), "{}", server.log_text());
    server.spawn();
    let verify = fio(
        server.dir.path(),
        "persist",
        &[
            verify_args(&uri, &common),
            vec!["--verify_only".to_string()],
        ]
        .concat(),
    );
    assert_eq!(io_bytes(&verify[0], "read"), 64 * MIB);
    // Completed writes also survive the process being killed outright.
    server.kill();
    server.spawn();
    let verify = fio(
        server.dir.path(),
        "persist",
        &[
            verify_args(&uri, &common),
            vec!["--verify_only".to_string()],
        ]
        .concat(),
    );
    assert_eq!(io_bytes(&verify[0], "read"), 64 * MIB);
    // And a corrupted block is caught by the same verification (the check can fail).
    qemu_io(&uri, &["write -P 0 40M 16k"]);
    let output = run_output(
        Command::new("fio")
            .current_dir(server.dir.path())
            .arg("--ioengine=nbd")
            .arg("--verify_state_save=0")
            .args(verify_args(&uri, &common))
            .arg("--verify_only")
            .arg("--name=persist"),
    );
    assert!(
        !output.status.success(),
        "fio verify missed a zeroed block: {:?}",
        text(&output)
    );
}

// ---------------------------------------------------------------------------------------------
// Mixed workloads checked against a model
// ---------------------------------------------------------------------------------------------

/// First differing byte of two equally long buffers.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    assert_eq!(a.len(), b.len(), "lengths differ");
    (0..a.len()).find(|&i| a[i] != b[i])
}

#[test]
fn random_unaligned_workload_matches_a_model() {
    let server = server_with("8M", false);
    let uri = server.uri();
    let size = 8 * MIB;
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut commands = Vec::new();
    for i in 0..300 {
        // Mostly small and odd, sometimes large (beyond the 64 KiB sparse-read threshold).
        let len = if rng.below(4) == 0 {
            1 + rng.below(1536 * KIB)
        } else {
            1 + rng.below(20_000)
        };
        let offset = rng.below(size - len + 1);
        let range = offset as usize..(offset + len) as usize;
        match rng.below(8) {
            0 => {
                let unmap = if rng.below(2) == 0 { " -u" } else { "" };
                let fast = if rng.below(2) == 0 { " -n" } else { "" };
                commands.push(format!("write -z{unmap}{fast} {offset} {len}"));
                model[range].fill(0);
            }
            1 => {
                commands.push(format!("discard {offset} {len}"));
                model[range].fill(0);
            }
            kind => {
                let pattern = (i % 254 + 1) as u8;
                let fua = if kind == 2 { " -f" } else { "" };
                commands.push(format!("write{fua} -P {pattern} {offset} {len}"));
                model[range].fill(pattern);
            }
        }
        if i % 50 == 49 {
            commands.push("flush".to_string());
        }
    }
    let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io(&uri, &refs);

    let dir = tempfile::tempdir().expect("tempdir");
    // Plain sequential reads of an odd size: every read spans holes and data unaligned.
    let dd = dir.path().join("dd.raw");
    qemu_img(&[
        "dd",
        "-f",
        "raw",
        "-O",
        "raw",
        &format!("if={uri}"),
        &format!("of={}", dd.display()),
        "bs=333333",
    ]);
    let got = std::fs::read(&dd).expect("read dd output");
    if let Some(i) = first_difference(&model, &got) {
        panic!(
            "byte {i} reads {:#x}, the model says {:#x}",
            got[i], model[i]
        );
    }
    // The block-status-driven copy agrees too.
    let converted = dir.path().join("converted.raw");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &uri,
        converted.to_str().unwrap(),
    ]);
    let got = std::fs::read(&converted).expect("read converted");
    if let Some(i) = first_difference(&model, &got) {
        panic!(
            "converted byte {i} is {:#x}, the model says {:#x}",
            got[i], model[i]
        );
    }
    // Block status never calls non-zero data zero.
    for (start, length, zero, _) in qemu_img_map(&uri) {
        if zero {
            let region = &model[start as usize..(start + length) as usize];
            if let Some(i) = region.iter().position(|&b| b != 0) {
                panic!(
                    "map says {start}+{length} is zero, but byte {} is {:#x}",
                    start as usize + i,
                    region[i]
                );
            }
        }
    }
}

#[test]
fn large_export_offsets_beyond_4_gib() {
    // 100 GiB, sparse: only what is written takes space.
    let server = server_with_4k_blocks("100G");
    let uri = server.uri();
    let size: u64 = 100 * GIB;
    let info = qemu_img(&["info", "--output=json", "-f", "raw", &uri]);
    assert!(
        info.contains(&format!("\"virtual-size\": {size}")),
        "{info}"
    );
    qemu_io(
        &uri,
        &[
            "write -P 0x12 5G 64k",
            "write -P 0x13 4294967000 1000", // crosses the 4 GiB line
            "write -P 0x14 8G 1M",
            &format!("write -P 0x15 {} 400", size - 400),
            "write -P 0x16 20G 1M",
        ],
    );
    qemu_io(
        &uri,
        &[
            "read -P 0x12 5G 64k",
            "read -P 0x13 4294967000 1000",
            "read -P 0 4294968000 1000",
            "read -P 0x14 8G 1M",
            &format!("read -P 0x15 {} 400", size - 400),
            "read -P 0x16 20G 1M",
        ],
    );
    let map = qemu_img_map(&uri);
    assert_eq!(map.last().map(|e| e.0 + e.1), Some(size));
    assert_map_zero(&map, 0, 4 * GIB - 4096, true);
    assert_map_data(&map, 4 * GIB - 296, 4 * GIB + 704);
    assert_map_data(&map, 5 * GIB, 5 * GIB + 64 * KIB);
    assert_map_zero(&map, 9 * GIB, 20 * GIB, true); // one 11 GiB extent: needs 64-bit lengths
    assert_map_zero(&map, 21 * GIB, size - 4096, true);
    assert_map_data(&map, size - 400, size);

    // Zeroing and discarding gigabytes at once (one request each with extended headers); -n
    // with -u lets qemu-io send more than 2 GiB, and unmapping keeps it from allocating.
    qemu_io(&uri, &["write -z -u -n 4G 6G", "discard 19G 2047M"]);
    qemu_io(
        &uri,
        &[
            "read -P 0 5G 64k",
            "read -P 0 8G 1M",
            "read -P 0 4294967296 704",
            "read -P 0x13 4294967000 296", // just below 4 GiB, untouched
            "read -P 0 20G 1M",
            &format!("read -P 0x15 {} 400", size - 400),
        ],
    );
    let map = qemu_img_map(&uri);
    assert_map_zero(&map, 4 * GIB, 10 * GIB, false);
    assert_map_zero(&map, 19 * GIB, 19 * GIB + 2047 * MIB, false);
    assert_map_data(&map, size - 400, size);
    // Only a few MiB were ever allocated.
    let data: u64 = map.iter().filter(|e| e.3).map(|e| e.1).sum();
    assert!(data < 64 * MIB, "{data} bytes mapped as data: {map:?}");
}
