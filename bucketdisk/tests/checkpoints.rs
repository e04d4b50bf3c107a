//! `bucketdisk checkpoint` against a running server (through its control socket, never fencing
//! it) and against a volume no server holds (straight against the store, refusing to take a
//! volume a server elsewhere may still hold).

mod common;
use common::*;
use std::process::Command;

fn checkpoint(server: &Server, verb: &str) -> Command {
    let mut cmd = server.cli(&format!("checkpoint {verb}"));
    if verb != "list" {
        cmd.arg("--cache-dir").arg(server.cache_dir());
    }
    cmd
}

fn names(server: &Server) -> Vec<String> {
    let out = run(checkpoint(server, "list").arg("disk").arg("--json"));
    let list: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    list.as_array()
        .expect("array")
        .iter()
        .map(|c| c["name"].as_str().expect("name").to_string())
        .collect()
}

#[test]
fn checkpoints_of_a_served_volume_go_through_its_server() {
    require_tool("nbdcopy");
    let mut server = Server::start();
    let work = tempfile::tempdir().expect("tempdir");
    let source = work.path().join("data.bin");
    write_pattern_file(&source, 4 << 20, 1);
    run(Command::new("nbdcopy").arg(&source).arg(server.uri()));
    let name = run(checkpoint(&server, "create").arg("disk").arg("base"));
    assert_eq!(name.trim(), "base");
    let json = run(checkpoint(&server, "create").arg("disk").arg("--json"));
    let generated: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert!(
        generated["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("ckpt-")),
        "{json}"
    );
    assert_eq!(generated["allocated_blocks"].as_u64(), Some(64), "{json}");
    assert_eq!(names(&server)[0], "base");
    let human = run(checkpoint(&server, "list").arg("disk"));
    assert!(human.lines().any(|l| l.starts_with("base ")), "{human}");
    assert_fails_with(
        run_output(checkpoint(&server, "create").arg("disk").arg("base")),
        "already has a checkpoint named base",
    );
    assert_fails_with(
        run_output(checkpoint(&server, "create").arg("disk").arg("a@b")),
        "invalid checkpoint name",
    );
    assert_fails_with(
        run_output(checkpoint(&server, "delete").arg("disk").arg("nope")),
        "has no checkpoint named nope",
    );
    run(checkpoint(&server, "delete").arg("disk").arg("base"));
    assert_eq!(names(&server).len(), 1);
    // The server was never fenced: it takes writes and stops cleanly.
    run(Command::new("nbdcopy").arg(&source).arg(server.uri()));
    assert!(server.stop().success(), "{}", server.log_text());
    assert!(
        !server.log_text().contains("refusing further writes"),
        "{}",
        server.log_text()
    );
    assert!(server.log_text().contains("checkpoint taken"));
    assert!(
        !server.cache_dir().join("control.sock").exists(),
        "the control socket is removed at stop"
    );
}

#[test]
fn without_a_server_checkpoints_open_the_volume_unless_another_may_hold_it() {
    require_tool("nbdcopy");
    let mut server = Server::start();
    let work = tempfile::tempdir().expect("tempdir");
    let source = work.path().join("data.bin");
    write_pattern_file(&source, 1 << 20, 2);
    run(Command::new("nbdcopy").arg(&source).arg(server.uri()));
    // Stopped cleanly: the lease is released, the verb takes the volume.
    assert!(server.stop().success(), "{}", server.log_text());
    run(checkpoint(&server, "create").arg("disk").arg("after-stop"));
    // Killed: the lease names a process of this host that is gone; the verb replays its
    // journal (same cache folder) and goes on.
    server.spawn();
    run(Command::new("nbdcopy").arg(&source).arg(server.uri()));
    server.kill();
    run(checkpoint(&server, "create").arg("disk").arg("after-kill"));
    assert_eq!(names(&server), ["after-stop", "after-kill"]);
    if testing_on_s3() {
        return; // the rest forges a lease in the local store directory
    }
    // A lease taken by a server on another host that never released it: refused, unless
    // --force.
    forge_foreign_lease(&server);
    assert_fails_with(
        run_output(checkpoint(&server, "create").arg("disk").arg("refused")),
        "is held by elsewhere pid 1",
    );
    run(checkpoint(&server, "create")
        .arg("disk")
        .arg("forced")
        .arg("--force"));
    assert_eq!(names(&server), ["after-stop", "after-kill", "forced"]);
    // Two servers never share a cache folder.
    server.spawn();
    let second = run_output(
        server
            .cli("serve")
            .arg("--cache-dir")
            .arg(server.cache_dir())
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--volume")
            .arg("disk"),
    );
    assert!(!second.status.success());
    assert!(server.stop().success(), "{}", server.log_text());
}

/// `disk@NAME` is the disk as the checkpoint was taken, read-only, while `disk` keeps changing;
/// `serve --volume disk@NAME` serves one on its own.
#[test]
fn a_checkpoint_is_exported_read_only_while_the_disk_changes() {
    require_tool("nbdinfo");
    let Changed {
        mut server,
        first,
        second,
        _work,
    } = changed_after_checkpoint("snap", 5);
    // The writable export is rewritten all over (uploads, GC and map maintenance run) for as
    // long as the checkpoint is compared.
    require_tool("qemu-io");
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let writing = std::sync::Arc::new(AtomicBool::new(true));
    let rounds = std::sync::Arc::new(AtomicU32::new(0));
    let writer = {
        let (writing, rounds, uri) = (
            std::sync::Arc::clone(&writing),
            std::sync::Arc::clone(&rounds),
            server.uri(),
        );
        std::thread::spawn(move || {
            while writing.load(Ordering::Relaxed) {
                let round = u64::from(rounds.load(Ordering::Relaxed));
                let mut io = Command::new("qemu-io");
                io.args(["-f", "raw"]);
                for i in 0..16u64 {
                    let offset = (round * 7 + i * 4) % 64;
                    let pattern = (round + i) % 250 + 1;
                    io.args(["-c", &format!("write -P {pattern} {offset}M 1M")]);
                }
                io.args(["-c", "flush"]).arg(&uri);
                run(&mut io);
                rounds.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    while rounds.load(Ordering::Relaxed) == 0 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let same = same_as(&server.uri_for("disk@snap"), &first);
    let during = rounds.load(Ordering::Relaxed);
    writing.store(false, Ordering::Relaxed);
    writer.join().expect("writer");
    let rounds = rounds.load(Ordering::Relaxed);
    assert!(
        rounds > during,
        "the writer was still writing when the compare ended"
    );
    assert!(
        same,
        "the checkpoint export is the disk as it was, while the disk was written ({rounds} rounds)"
    );
    assert!(
        !same_as(&server.uri(), &first),
        "the disk itself has changed"
    );
    let listed = run(Command::new("nbdinfo").arg("--list").arg(server.uri()));
    assert!(listed.contains("disk@snap"), "{listed}");
    let refused = run_output(
        Command::new("nbdcopy")
            .arg(&second)
            .arg(server.uri_for("disk@snap")),
    );
    assert!(!refused.status.success(), "a checkpoint is read-only");
    let unknown = run_output(Command::new("nbdinfo").arg(server.uri_for("disk@nope")));
    assert!(!unknown.status.success());
    assert!(server.stop().success(), "{}", server.log_text());

    // Served on its own: the default export is the checkpoint.
    server.set_volumes(&["disk@snap"]);
    server.spawn();
    assert!(
        same_as(&server.uri(), &first),
        "served alone, the checkpoint is the same"
    );
    assert!(server.stop().success(), "{}", server.log_text());
}

/// `restore` refuses a volume another host may hold, and a read-only server refuses to restore
/// what it serves; a checkpoint that does not exist is an error that changes nothing.
#[test]
fn restore_refuses_what_it_must_not_take() {
    let mut server = Server::start();
    run(checkpoint(&server, "create").arg("disk").arg("base"));
    let restore = |server: &Server, name: &str| {
        let mut cmd = server.cli("restore");
        cmd.arg("disk")
            .arg(name)
            .arg("--cache-dir")
            .arg(server.cache_dir());
        cmd
    };
    assert!(server.stop().success(), "{}", server.log_text());
    assert_fails_with(
        run_output(&mut restore(&server, "nope")),
        "has no checkpoint named nope",
    );
    if !testing_on_s3() {
        forge_foreign_lease(&server);
        assert_fails_with(
            run_output(&mut restore(&server, "base")),
            "is held by elsewhere pid 1",
        );
        run(restore(&server, "base").arg("--force"));
    } else {
        run(&mut restore(&server, "base"));
    }
    server.spawn();
    assert!(server.stop().success(), "{}", server.log_text());
    // A read-only server holds no lease: it does not restore what a writer elsewhere may serve.
    server.extra_args.push("--read-only".into());
    server.spawn();
    assert_fails_with(
        run_output(&mut restore(&server, "base")),
        "is served read-only here",
    );
    assert!(server.stop().success(), "{}", server.log_text());
}

/// `bucketdisk clone` of a served volume's state now and of a checkpoint: both clones serve
/// at once what they were cloned from and change independently; the source's checkpoint and
/// the source itself cannot be deleted while clones read their chunks.
#[test]
fn clones_serve_at_once_and_change_independently() {
    require_tool("nbdcopy");
    require_tool("qemu-img");
    let mut server = Server::start_with(ServerOptions {
        size: "64M",
        ..Default::default()
    });
    let work = tempfile::tempdir().expect("tempdir");
    let first = work.path().join("first.bin");
    let second = work.path().join("second.bin");
    write_pattern_file(&first, 64 << 20, 7);
    write_pattern_file(&second, 8 << 20, 8);
    run(Command::new("nbdcopy").arg(&first).arg(server.uri()));
    // The served volume's state now: a checkpoint through its server, then the clone.
    let mut clone = server.cli("clone");
    clone
        .arg("disk")
        .arg("twin")
        .arg("--cache-dir")
        .arg(server.cache_dir());
    let said = run(&mut clone);
    assert!(
        said.contains("cloned disk@clone-twin into volume twin"),
        "{said}"
    );
    run(Command::new("nbdcopy").arg(&second).arg(server.uri()));
    assert!(server.stop().success(), "{}", server.log_text());

    server.set_volumes(&["disk", "twin"]);
    server.spawn();
    let compare = |uri: &str| {
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(uri)
            .arg(&first)
            .status()
            .expect("qemu-img compare")
    };
    assert!(
        compare(&server.uri_for("twin")).success(),
        "the clone is the source as it was"
    );
    assert!(
        !compare(&server.uri_for("disk")).success(),
        "the source changed after"
    );
    run(Command::new("nbdcopy")
        .arg(&second)
        .arg(server.uri_for("twin")));
    // Both volumes use the cache directory's one block cache (a clone reads the blocks its
    // source cached), none has a cache of its own.
    let cache_dir = server.cache_dir();
    assert!(cache_dir.join(".blocks/blocks.cache").exists());
    for volume in ["disk", "twin"] {
        assert!(!cache_dir.join(volume).join("cache").exists(), "{volume}");
    }
    assert!(server.stop().success(), "{}", server.log_text());
    let mut delete_checkpoint = server.cli("checkpoint delete");
    delete_checkpoint
        .arg("disk")
        .arg("clone-twin")
        .arg("--cache-dir")
        .arg(server.cache_dir());
    assert_fails_with(run_output(&mut delete_checkpoint), "has clones (twin)");
    let mut delete_source = server.cli("delete");
    delete_source
        .arg("disk")
        .arg("--force")
        .arg("--cache-dir")
        .arg(server.cache_dir());
    assert_fails_with(run_output(&mut delete_source), "has clones (twin)");
    let mut delete_twin = server.cli("delete");
    delete_twin
        .arg("twin")
        .arg("--cache-dir")
        .arg(server.cache_dir());
    run(&mut delete_twin);
    run(&mut delete_checkpoint);
    server.set_volumes(&["disk"]);
    server.spawn();
    assert!(server.stop().success(), "{}", server.log_text());
}

/// A lease of volume `disk` taken by a server on another host that never released it (the
/// local store directory only).
fn forge_foreign_lease(server: &Server) {
    let leases = server.store_dir().join("disk").join("lease");
    let newest = std::fs::read_dir(&leases)
        .expect("leases")
        .filter_map(|e| {
            u64::from_str_radix(&e.expect("entry").file_name().to_string_lossy(), 16).ok()
        })
        .max()
        .expect("a lease");
    std::fs::write(
        leases.join(format!("{:016x}", newest + 1)),
        "{\"epoch\":0,\"holder\":\"elsewhere pid 1\"}\n",
    )
    .expect("forge a lease");
}

/// A served volume is restored by its server, at once when no client is connected; with clients
/// connected only with `--force`, which ends their sessions. The export serves the restored
/// state without a restart.
#[test]
fn a_served_volume_is_restored_by_its_server() {
    let Changed {
        mut server,
        first,
        second,
        _work,
    } = changed_after_checkpoint("base", 11);
    let restore = |server: &Server| {
        let mut cmd = server.cli("restore");
        cmd.arg("disk")
            .arg("base")
            .arg("--cache-dir")
            .arg(server.cache_dir());
        cmd
    };
    assert!(!same_as(&server.uri(), &first));
    let said = run(&mut restore(&server));
    assert!(
        said.contains("restored volume disk to checkpoint base"),
        "{said}"
    );
    assert!(
        same_as(&server.uri(), &first),
        "the export serves the restored state at once"
    );

    // A connected client: refused; --force ends its session.
    run(Command::new("nbdcopy").arg(&second).arg(server.uri()));
    let mut client = common::nbd_client::NbdClient::connect(&server.endpoint, "").expect("connect");
    client.read(0, 4096).expect("a read before");
    assert_fails_with(
        run_output(&mut restore(&server)),
        "NBD client(s) connected to disk",
    );
    client
        .read(0, 4096)
        .expect("the refused restore left the client alone");
    run(restore(&server).arg("--force"));
    assert!(client.read(0, 4096).is_err(), "its session was ended");
    assert!(same_as(&server.uri(), &first));
    assert!(server.stop().success(), "{}", server.log_text());
    assert!(
        !server.log_text().contains("refusing further writes"),
        "{}",
        server.log_text()
    );
}

/// A 64 MiB disk served with `first` written, checkpointed as `name`, then 8 MiB of `second`
/// written over its start: the disk no longer equals `first`, the checkpoint does.
struct Changed {
    server: Server,
    first: std::path::PathBuf,
    second: std::path::PathBuf,
    _work: tempfile::TempDir,
}

fn changed_after_checkpoint(name: &str, seed: u64) -> Changed {
    require_tool("nbdcopy");
    require_tool("qemu-img");
    let server = Server::start_with(ServerOptions {
        size: "64M",
        ..Default::default()
    });
    let work = tempfile::tempdir().expect("tempdir");
    let first = work.path().join("first.bin");
    let second = work.path().join("second.bin");
    write_pattern_file(&first, 64 << 20, seed);
    write_pattern_file(&second, 8 << 20, seed + 1);
    run(Command::new("nbdcopy").arg(&first).arg(server.uri()));
    run(checkpoint(&server, "create").arg("disk").arg(name));
    run(Command::new("nbdcopy").arg(&second).arg(server.uri()));
    Changed {
        server,
        first,
        second,
        _work: work,
    }
}

/// Whether the export at `uri` holds exactly the image `file`.
fn same_as(uri: &str, file: &std::path::Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(uri)
        .arg(file)
        .status()
        .expect("qemu-img compare")
        .success()
}
