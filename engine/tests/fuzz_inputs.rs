//! Every committed fuzz input of this crate's targets (`fuzz/corpus/<target>/`: seeds and what
//! fuzzing kept; `fuzz/regressions/<target>/`: inputs that once crashed, kept after the fix)
//! replayed through the same entry points the fuzz targets call: none may panic.
//!
//! `cargo test -p engine --test fuzz_inputs -- --ignored` writes the seed inputs anew.

use std::path::PathBuf;

const TARGETS: &[&str] = &["journal_segment", "cache_index", "stored_json"];

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn run(target: &str, input: &[u8]) {
    match target {
        "journal_segment" => engine::fuzzing::journal_segment(input),
        "cache_index" => engine::fuzzing::cache_index(input),
        "stored_json" => engine::fuzzing::stored_json(input),
        other => panic!("unknown target {other}"),
    }
}

#[test]
fn committed_fuzz_inputs_replay_without_panicking() {
    let mut replayed = 0;
    for target in TARGETS {
        for kind in ["corpus", "regressions"] {
            let dir = fuzz_dir().join(kind).join(target);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let input = std::fs::read(entry.path()).expect("read input");
                run(target, &input);
                replayed += 1;
            }
        }
    }
    assert!(
        replayed >= TARGETS.len(),
        "every target has seeds ({replayed} inputs)"
    );
}

#[test]
#[ignore = "writes the seed corpus; run by hand after a format change"]
fn write_seed_corpus() {
    for (target, name, bytes) in engine::fuzzing::seeds() {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
    }
}
