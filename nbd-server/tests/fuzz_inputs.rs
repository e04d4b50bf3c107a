//! Every committed fuzz input of this crate's targets (`fuzz/corpus/<target>/`: seeds and what
//! fuzzing kept; `fuzz/regressions/<target>/`: inputs that once crashed, kept after the fix)
//! replayed through the same entry points the fuzz targets call: none may panic.
//!
//! `cargo test -p nbd-server --test fuzz_inputs -- --ignored` writes the seed inputs anew.

use engine::fuzzing::{replay_committed, write_seeds};
use std::path::PathBuf;

const TARGETS: &[&str] = &["nbd_session", "nbd_frames", "nbd_tls_options"];

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn run(target: &str, input: &[u8]) {
    match target {
        "nbd_session" => nbd_server::fuzzing::nbd_session(input),
        "nbd_frames" => nbd_server::fuzzing::nbd_frames(input),
        "nbd_tls_options" => nbd_server::fuzzing::nbd_tls_options(input),
        other => panic!("unknown target {other}"),
    }
}

#[test]
fn committed_fuzz_inputs_replay_without_panicking() {
    let replayed = replay_committed(&fuzz_dir(), TARGETS, run);
    assert!(
        replayed >= TARGETS.len(),
        "every target has seeds ({replayed} inputs)"
    );
}

#[test]
#[ignore = "writes the seed corpus; run by hand after a format change"]
fn write_seed_corpus() {
    write_seeds(&fuzz_dir(), nbd_server::fuzzing::seeds());
}
