//! kill -9 at every step of the volume verbs: `checkpoint create`, `checkpoint delete`, `restore`,
//! `clone`, `delete` and `resize` are each run once per change they make to the store, killed
//! (SIGKILL, by the hidden `--crash-before-store-change`) just before that change, so the store
//! is left in every state the verb passes through. After each crash every volume and checkpoint
//! still listed must read back exactly as one of its allowed states, from the store alone (a
//! read-only server with an empty cache, which changes nothing); running the verb again
//! must finish the job (or say clearly that it was done); and the result is checked again.
//!
//! Local-directory store only: each round starts from a copy of the same store directory.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: usize = 1 << 20;
/// A verb makes far fewer changes than this: a loop that gets here never completes.
const MAX_STEPS: u64 = 400;

/// A store in a known state, and the images its volumes and checkpoints must read as.
struct World {
    server: Server,
    template: tempfile::TempDir,
    images: tempfile::TempDir,
}

/// The state every round starts from: `disk` written with A and checkpointed as `c1`, its
/// first 4 MiB then rewritten (`live`) and checkpointed as `c2`; `twin` cloned from `disk@c1`.
fn world() -> Option<World> {
    if testing_on_s3() {
        eprintln!("crash_verbs runs on the local-directory store only (it copies the store)");
        return None;
    }
    require_tool("nbdcopy");
    require_tool("qemu-img");
    let mut server = Server::start_with(ServerOptions {
        size: "16M",
        ..Default::default()
    });
    let images = tempfile::tempdir().expect("tempdir");
    let a = pattern(16 * MIB, 1);
    let b = pattern(4 * MIB, 2);
    let mut live = a.clone();
    live[..4 * MIB].copy_from_slice(&b);
    std::fs::write(images.path().join("A"), &a).expect("image");
    std::fs::write(images.path().join("B"), &b).expect("image");
    std::fs::write(images.path().join("live"), &live).expect("image");
    run(Command::new("nbdcopy")
        .arg(images.path().join("A"))
        .arg(server.uri()));
    let through_server = |verb: &str, args: &[&str]| {
        let mut cmd = server.cli(verb);
        cmd.args(args).arg("--cache-dir").arg(server.cache_dir());
        run(&mut cmd);
    };
    through_server("checkpoint create", &["disk", "c1"]);
    run(Command::new("nbdcopy")
        .arg(images.path().join("B"))
        .arg(server.uri()));
    through_server("checkpoint create", &["disk", "c2"]);
    assert!(server.stop().success(), "{}", server.log_text());
    let mut clone = server.cli("clone");
    clone
        .args(["disk@c1", "twin", "--cache-dir"])
        .arg(server.cache_dir());
    run(&mut clone);
    let template = tempfile::tempdir().expect("tempdir");
    copy_dir(&server.store_dir(), &template.path().join("store"));
    copy_dir(&server.cache_dir(), &template.path().join("cache"));
    Some(World {
        server,
        template,
        images,
    })
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    run(Command::new("cp").arg("-a").arg(from).arg(to));
}

impl World {
    /// Back to the template's store and cache directory.
    fn reset(&self) {
        copy_dir(
            &self.template.path().join("store"),
            &self.server.store_dir(),
        );
        copy_dir(
            &self.template.path().join("cache"),
            &self.server.cache_dir(),
        );
    }

    fn image(&self, name: &str) -> PathBuf {
        self.images.path().join(name)
    }

    /// `bucketdisk VERB ARGS --cache-dir ...`, killed before store change `crash_at` if given.
    fn verb(&self, verb: &str, args: &[&str], crash_at: Option<u64>) -> std::process::Output {
        let mut cmd = self.server.cli(verb);
        cmd.args(args)
            .arg("--cache-dir")
            .arg(self.server.cache_dir());
        if let Some(n) = crash_at {
            cmd.env("BUCKETDISK_CRASH_BEFORE_STORE_CHANGE", n.to_string());
        }
        run_output(&mut cmd)
    }

    fn listed(&self, verb: &str, args: &[&str]) -> Vec<String> {
        let out = run(self.server.cli(verb).args(args).arg("--json"));
        let list: serde_json::Value = serde_json::from_str(&out).expect("JSON listing");
        list.as_array()
            .expect("array")
            .iter()
            .map(|v| v["name"].as_str().expect("name").to_string())
            .collect()
    }

    /// Every export there is now (volumes and their checkpoints as `volume@name`) and what it
    /// reads as: `None` if it matches none of `allowed[export]` (an export missing from
    /// `allowed` is not allowed to exist).
    fn readable_state(&mut self, allowed: &Allowed) -> BTreeMap<String, Option<String>> {
        let volumes = self.listed("list", &[]);
        let mut exports = volumes.clone();
        for volume in &volumes {
            for checkpoint in self.listed("checkpoint list", &[volume]) {
                exports.push(format!("{volume}@{checkpoint}"));
            }
        }
        // Read from the store alone, without changing it: a read-only server (followers: no
        // lease, no collection) with an empty cache directory; the crashed verb's local folder
        // is left for its re-run.
        let served: Vec<&str> = volumes.iter().map(String::as_str).collect();
        self.server.set_volumes(&served);
        let cache = self.server.cache_dir();
        let kept = cache.with_extension("kept");
        std::fs::rename(&cache, &kept).expect("set the cache directory aside");
        let args = self.server.extra_args.clone();
        self.server.extra_args.push("--read-only".into());
        self.server.spawn();
        let mut state = BTreeMap::new();
        for export in exports {
            let uri = self.server.uri_for(&export);
            let matched = allowed
                .get(export.as_str())
                .into_iter()
                .flatten()
                .find(|image| same_as(&uri, &self.image(image)))
                .map(|image| image.to_string());
            state.insert(export, matched);
        }
        assert!(self.server.stop().success(), "{}", self.server.log_text());
        self.server.extra_args = args;
        std::fs::remove_dir_all(&cache).expect("remove the check's cache directory");
        std::fs::rename(&kept, &cache).expect("put the cache directory back");
        state
    }

    /// Checks that every export reads as one of its allowed images and that the `required`
    /// ones exist; returns the state for the caller's own checks.
    fn assert_consistent(
        &mut self,
        when: &str,
        allowed: &Allowed,
        required: &[&str],
    ) -> BTreeMap<String, Option<String>> {
        let state = self.readable_state(allowed);
        for (export, matched) in &state {
            assert!(
                matched.is_some(),
                "{when}: {export} exists but reads as none of {:?} (state {state:?})\n{}",
                allowed.get(export.as_str()),
                self.server.log_text()
            );
        }
        for export in required {
            assert!(
                state.contains_key(*export),
                "{when}: {export} is gone (state {state:?})"
            );
        }
        state
    }
}

/// Export → the images it may read as.
type Allowed = BTreeMap<&'static str, Vec<&'static str>>;

fn allowed(pairs: &[(&'static str, &[&'static str])]) -> Allowed {
    pairs.iter().map(|(k, v)| (*k, v.to_vec())).collect()
}

/// Whether the export at `uri` holds exactly the image `file` (a larger export's tail must be
/// zeros).
fn same_as(uri: &str, file: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(uri)
        .arg(file)
        .status()
        .expect("qemu-img compare")
        .success()
}

/// What the template holds, whatever a verb did.
const UNTOUCHED: [(&str, &[&str]); 4] = [
    ("disk", &["live"]),
    ("disk@c1", &["A"]),
    ("disk@c2", &["live"]),
    ("twin", &["A"]),
];

/// A verb's crash test: what it may leave after a crash, and what it must leave once run again.
struct Expect<'a> {
    /// Allowed images per export after a crash, and the exports that must still be there.
    during: Allowed,
    during_required: &'a [&'a str],
    /// The same once the verb ran to the end.
    after: Allowed,
    after_required: &'a [&'a str],
    /// The one clear error a re-run may answer with, because the crashed run got that far.
    rerun_may_say: Option<&'a str>,
    /// A verb that must then succeed (what the verb's result allows).
    then_succeeds: Option<(&'a str, &'a [&'a str])>,
}

/// Runs `verb ARGS` once per store change it makes, killed just before it, and checks each
/// crash and each re-run against `expect`. Returns the number of store changes the verb makes.
fn crash_at_every_step(world: &mut World, verb: &str, args: &[&str], expect: &Expect<'_>) -> u64 {
    let (during, after, after_required) = (&expect.during, &expect.after, expect.after_required);
    for n in 1..MAX_STEPS {
        world.reset();
        let out = world.verb(verb, args, Some(n));
        if out.status.success() {
            // Fewer than n changes: the verb ran to the end.
            world.assert_consistent(&format!("{verb} uninterrupted"), after, after_required);
            return n - 1;
        }
        assert_eq!(
            out.status.signal(),
            Some(9),
            "{verb} {args:?} failed before its crash point {n}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        world.assert_consistent(
            &format!("{verb} killed before change {n}"),
            during,
            expect.during_required,
        );
        let again = world.verb(verb, args, None);
        if !again.status.success() {
            let said = String::from_utf8_lossy(&again.stderr);
            let expected = expect.rerun_may_say.unwrap_or("(no error expected)");
            assert!(
                said.trim().lines().count() == 1 && said.contains(expected),
                "{verb} {args:?} again after a crash before change {n}: {said}"
            );
        }
        world.assert_consistent(
            &format!("{verb} run again after a crash before change {n}"),
            after,
            after_required,
        );
        if let Some((then, then_args)) = expect.then_succeeds {
            let out = world.verb(then, then_args, None);
            assert!(
                out.status.success(),
                "{then} {then_args:?} after {verb} was crashed before change {n} and run again: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    panic!("{verb} never completed in {MAX_STEPS} steps");
}

/// `base` with `extra`'s entries added or replaced.
fn with(
    base: &[(&'static str, &'static [&'static str])],
    extra: &[(&'static str, &'static [&'static str])],
) -> Allowed {
    let mut all = allowed(base);
    for (k, v) in extra {
        all.insert(k, v.to_vec());
    }
    all
}

#[test]
fn every_verb_survives_a_crash_at_every_step() {
    let Some(mut world) = world() else {
        return;
    };
    let all = ["disk", "disk@c1", "disk@c2", "twin"];
    let mut steps = Vec::new();
    let mut crash_test =
        |world: &mut World, verb: &'static str, args: &[&str], expect: Expect<'_>| {
            let n = crash_at_every_step(world, verb, args, &expect);
            steps.push((verb, n));
        };

    // checkpoint create: c3 appears whole (the live state) or not at all.
    let c3 = with(&UNTOUCHED, &[("disk@c3", &["live"])]);
    crash_test(
        &mut world,
        "checkpoint create",
        &["disk", "c3"],
        Expect {
            during: c3.clone(),
            during_required: &all,
            after: c3,
            after_required: &["disk", "disk@c1", "disk@c2", "twin", "disk@c3"],
            rerun_may_say: Some("already has a checkpoint named c3"),
            then_succeeds: None,
        },
    );

    // checkpoint delete: c2 reads as it was, or is gone.
    let mut without_c2 = with(&UNTOUCHED, &[]);
    without_c2.remove("disk@c2");
    crash_test(
        &mut world,
        "checkpoint delete",
        &["disk", "c2"],
        Expect {
            during: with(&UNTOUCHED, &[]),
            during_required: &["disk", "disk@c1", "twin"],
            after: without_c2,
            after_required: &["disk", "disk@c1", "twin"],
            rerun_may_say: Some("has no checkpoint named c2"),
            then_succeeds: None,
        },
    );

    // restore: the disk is its state before or the checkpoint's, never a mix.
    crash_test(
        &mut world,
        "restore",
        &["disk", "c1"],
        Expect {
            during: with(&UNTOUCHED, &[("disk", &["live", "A"])]),
            during_required: &all,
            after: with(&UNTOUCHED, &[("disk", &["A"])]),
            after_required: &all,
            rerun_may_say: None,
            then_succeeds: None,
        },
    );

    // clone: twin2 appears whole (c2's state) or not at all.
    let twin2 = with(&UNTOUCHED, &[("twin2", &["live"])]);
    crash_test(
        &mut world,
        "clone",
        &["disk@c2", "twin2"],
        Expect {
            during: twin2.clone(),
            during_required: &all,
            after: twin2,
            after_required: &["disk", "disk@c1", "disk@c2", "twin", "twin2"],
            rerun_may_say: Some("volume twin2 already exists"),
            // The clone is writable.
            then_succeeds: Some(("resize", &["twin2", "32M"])),
        },
    );

    // delete: twin reads as it was, or is gone.
    let mut without_twin = with(&UNTOUCHED, &[]);
    without_twin.remove("twin");
    crash_test(
        &mut world,
        "delete",
        &["twin"],
        Expect {
            during: with(&UNTOUCHED, &[]),
            during_required: &["disk", "disk@c1", "disk@c2"],
            after: without_twin,
            after_required: &["disk", "disk@c1", "disk@c2"],
            rerun_may_say: Some("no volume twin"),
            // It no longer holds the checkpoint it was made from.
            then_succeeds: Some(("checkpoint delete", &["disk", "c1"])),
        },
    );

    // resize: 16 MiB or 32 MiB, the data the same either way (qemu-img compare checks that a
    // larger export's tail is zeros).
    crash_test(
        &mut world,
        "resize",
        &["disk", "32M"],
        Expect {
            during: with(&UNTOUCHED, &[]),
            during_required: &all,
            after: with(&UNTOUCHED, &[]),
            after_required: &all,
            rerun_may_say: None,
            then_succeeds: None,
        },
    );
    // The last round left the disk grown.
    world.server.set_volumes(&["disk"]);
    world.server.spawn();
    let size = run(Command::new("nbdinfo")
        .arg("--size")
        .arg(world.server.uri()));
    assert_eq!(size.trim(), (32 * MIB).to_string(), "the disk grew");
    assert!(world.server.stop().success());

    eprintln!("store changes per verb (each crashed before): {steps:?}");
    for (verb, n) in steps {
        assert!(n > 0, "{verb} changed nothing in the store");
    }
}
