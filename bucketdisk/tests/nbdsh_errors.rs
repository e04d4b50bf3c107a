//! Bad requests sent by a real client (libnbd through `nbdsh`, strict mode off so libnbd passes
//! them on): each gets the error the NBD spec asks for, and the connection keeps working.
//!
//! The checks live in `tests/nbdsh/*.py`; each script records every wrong answer and raises at
//! the end, so one failing run lists all of them. `tests/nbdsh/prelude.py` holds the helpers.

mod common;
use common::*;
use std::path::PathBuf;
use std::process::Command;

fn script_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/nbdsh")
}

/// Runs `tests/nbdsh/<script>` in nbdsh against `uri`; panics with its output if any check failed.
fn nbdsh(uri: &str, script: &str) -> String {
    require_tool("nbdsh");
    let dir = script_dir();
    let prelude = dir.join("prelude.py");
    let script = dir.join(script);
    assert!(script.is_file(), "missing {}", script.display());
    // nbdsh runs `python3 -m nbd`; the Python module is installed for the system interpreter,
    // which a pyenv (or virtualenv) python3 earlier on PATH would hide.
    let path = match std::env::var("PATH") {
        Ok(p) => format!("/usr/bin:{p}"),
        Err(_) => "/usr/bin:/bin".to_string(),
    };
    let exec = |p: &PathBuf| format!("exec(open({:?}).read())", p.display().to_string());
    let out = run(Command::new("nbdsh")
        .env("PATH", path)
        .env("NBD_URI", uri)
        .arg("-n")
        .arg("-c")
        .arg(exec(&prelude))
        .arg("-c")
        .arg(exec(&script)));
    assert!(
        out.contains("ALL CHECKS PASSED"),
        "{} did not run to completion:\n{out}",
        script.display()
    );
    out
}

fn run_script(server: &mut Server, script: &str) {
    nbdsh(&server.uri(), script);
    assert!(
        server.is_running(),
        "bucketdisk died:\n{}",
        server.log_text()
    );
}

#[test]
fn out_of_range_requests_get_einval_or_enospc() {
    let mut server = Server::start();
    run_script(&mut server, "out_of_range.py");
}

#[test]
fn write_past_end_gets_enospc_and_next_request_works() {
    let mut server = Server::start();
    run_script(&mut server, "write_past_end.py");
}

#[test]
fn unknown_command_flags_get_einval() {
    let mut server = Server::start();
    run_script(&mut server, "unknown_flags.py");
}

#[test]
fn unadvertised_commands_get_einval() {
    let mut server = Server::start();
    run_script(&mut server, "unadvertised.py");
}

#[test]
fn writes_on_read_only_export_get_eperm() {
    // --read-only cannot create the volume: create it with a writable start, then restart.
    let mut server = Server::start();
    assert!(server.stop().success(), "{}", server.log_text());
    server.extra_args.push("--read-only".into());
    server.spawn();
    run_script(&mut server, "read_only.py");
}

#[test]
fn zero_length_requests_get_einval() {
    let mut server = Server::start();
    run_script(&mut server, "zero_length.py");
}

#[test]
fn reads_over_32_mib_get_einval() {
    let mut server = Server::start();
    run_script(&mut server, "big_reads.py");
}

#[test]
fn fast_zero_succeeds_or_fails_with_enotsup() {
    let mut server = Server::start();
    run_script(&mut server, "fast_zero.py");
}

#[test]
fn option_haggling_in_opt_mode() {
    let mut server = Server::start_with(ServerOptions {
        volumes: vec!["alpha", "beta"],
        ..ServerOptions::default()
    });
    run_script(&mut server, "opt_mode.py");
}
