//! Secrets stay secret: store credentials never appear in a log (at debug level), in `info
//! --json` or `list --json`, nor in an error — a URL that carries credentials is refused with
//! them redacted.

mod common;
use common::{assert_fails_with, bucketdisk_bin, create_bucket, run_output, start_moto};
use std::process::Command;

const SECRET: &str = "Sup3rS3cretAccessKey9";
const KEY_ID: &str = "AKIAUNIQUEKEYID42";

#[test]
fn credentials_in_a_store_url_or_endpoint_are_refused_without_being_printed() {
    let out = run_output(Command::new(bucketdisk_bin()).args([
        "list",
        "--store",
        &format!("s3://{KEY_ID}:{SECRET}@bucket/prefix"),
    ]));
    assert!(!String::from_utf8_lossy(&out.stderr).contains(SECRET));
    assert!(!String::from_utf8_lossy(&out.stderr).contains(KEY_ID));
    assert_fails_with(out, "credentials do not go in the URL");

    let out = run_output(
        Command::new(bucketdisk_bin())
            .args(["list", "--store", "s3://bucket/prefix"])
            .env(
                "AWS_ENDPOINT_URL",
                format!("http://{KEY_ID}:{SECRET}@127.0.0.1:1"),
            ),
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains(SECRET));
    assert_fails_with(out, "carries credentials");
}

#[test]
fn store_credentials_never_reach_logs_or_listings() {
    let moto = start_moto();
    create_bucket(moto.port, "sealed");
    let dir = tempfile::tempdir().expect("tempdir");
    let with_store = |cmd: &mut Command| {
        cmd.args(["--store", "s3://sealed/vols"])
            .env(
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", moto.port),
            )
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_REGION", "us-east-1")
            .env("BUCKETDISK_LOG", "debug");
    };
    let mut seen = String::new();
    let mut run = |args: &[&str]| {
        let mut cmd = Command::new(bucketdisk_bin());
        cmd.args(args);
        with_store(&mut cmd);
        let out = run_output(&mut cmd);
        assert!(out.status.success(), "{args:?}: {out:?}");
        seen.push_str(&String::from_utf8_lossy(&out.stdout));
        seen.push_str(&String::from_utf8_lossy(&out.stderr));
    };
    run(&["create", "disk", "--size", "1G"]);
    run(&["list", "--json"]);
    run(&["info", "disk", "--json"]);
    run(&["verify", "disk", "--deep", "--json"]);
    assert!(seen.contains("disk"), "the commands ran: {seen}");
    assert!(!seen.contains(SECRET), "the secret key leaked:\n{seen}");

    // A server at debug level, through a client's writes and a clean stop.
    let mut cmd = Command::new(bucketdisk_bin());
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--cache-dir"])
        .arg(dir.path().join("cache"));
    with_store(&mut cmd);
    let log_path = dir.path().join("serve.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut child = cmd
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("serve");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let port = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if let Some(port) = text
            .lines()
            .find_map(|l| l.split("serving NBD on 127.0.0.1:").nth(1))
            .and_then(|p| p.trim().parse::<u16>().ok())
        {
            break port;
        }
        assert!(std::time::Instant::now() < deadline, "no port in:\n{text}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    common::require_tool("qemu-io");
    let out = run_output(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x11 0 1M",
        "-c",
        "flush",
        &format!("nbd://127.0.0.1:{port}/"),
    ]));
    assert!(out.status.success(), "{out:?}");
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().expect("wait").success());
    let text = std::fs::read_to_string(&log_path).expect("log");
    assert!(text.contains("stopped cleanly"), "{text}");
    assert!(!text.contains(SECRET), "the secret key leaked into the log");
}
