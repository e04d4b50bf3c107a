//! `bucketdisk list` and `bucketdisk delete` against a store a server uses.

mod common;
use common::*;
use std::process::Command;

fn listed(server: &Server) -> Vec<serde_json::Value> {
    let out = run(server.cli("list").arg("--json"));
    serde_json::from_str::<serde_json::Value>(&out)
        .expect("JSON")
        .as_array()
        .expect("array")
        .clone()
}

fn delete(server: &Server, volume: &str) -> Command {
    let mut cmd = server.cli("delete");
    cmd.arg(volume).arg("--cache-dir").arg(server.cache_dir());
    cmd
}

#[test]
fn volumes_are_listed_and_deleted_with_what_they_hold() {
    require_tool("nbdcopy");
    let mut server = Server::start_with(ServerOptions {
        volumes: vec!["disk", "other"],
        ..Default::default()
    });
    let work = tempfile::tempdir().expect("tempdir");
    let source = work.path().join("data.bin");
    write_pattern_file(&source, 2 << 20, 3);
    run(Command::new("nbdcopy")
        .arg(&source)
        .arg(server.uri_for("other")));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let rows = loop {
        let rows = listed(&server);
        if rows
            .iter()
            .any(|r| r["name"] == "other" && r["allocated"] == 2 << 20)
        {
            break rows;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never uploaded: {rows:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["disk", "other"]);
    assert_eq!(rows[0]["size"].as_u64(), Some(GIB));
    let table = run(&mut server.cli("list"));
    assert!(table.lines().any(|l| l.starts_with("other ")), "{table}");
    assert_fails_with(
        run_output(&mut delete(&server, "other")),
        "served by the server",
    );
    assert!(server.stop().success(), "{}", server.log_text());

    let mut checkpoint = server.cli("checkpoint create");
    checkpoint
        .arg("other")
        .arg("keep")
        .arg("--cache-dir")
        .arg(server.cache_dir());
    run(&mut checkpoint);
    assert_fails_with(
        run_output(&mut delete(&server, "other")),
        "has 1 checkpoint(s) (keep)",
    );
    let out = run(delete(&server, "other").arg("--force"));
    assert!(out.contains("deleted volume other"), "{out}");
    assert!(
        !server.cache_dir().join("other").exists(),
        "the local folder goes too"
    );
    let names: Vec<String> = listed(&server)
        .iter()
        .map(|r| r["name"].as_str().expect("name").to_string())
        .collect();
    assert_eq!(names, ["disk"]);
    if !testing_on_s3() {
        let left = files_under(&server.store_dir().join("other"));
        assert!(left.is_empty(), "nothing of it is left: {left:?}");
    }
    assert_fails_with(run_output(&mut delete(&server, "nope")), "no volume nope");
    assert_fails_with(
        run_output(&mut delete(&server, "a/b")),
        "invalid volume name",
    );
    run(&mut delete(&server, "disk"));
    assert!(run(&mut server.cli("list")).contains("no volumes"));
}

/// Every file under `dir` (directories the local store leaves behind do not count).
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .map(|e| e.expect("entry").path())
        .flat_map(|p| if p.is_dir() { files_under(&p) } else { vec![p] })
        .collect()
}

/// `bucketdisk resize` of a served volume goes through its server: the next connection sees
/// the new size; shrinking over data is refused unless `--force`.
#[test]
fn resize_reaches_new_connections_of_a_running_server() {
    require_tool("nbdinfo");
    require_tool("nbdcopy");
    let mut server = Server::start_with(ServerOptions {
        size: "64M",
        ..Default::default()
    });
    let size = |server: &Server| {
        run(Command::new("nbdinfo").arg("--size").arg(server.uri()))
            .trim()
            .parse::<u64>()
            .expect("size")
    };
    let resize = |server: &Server, to: &str| {
        let mut cmd = server.cli("resize");
        cmd.arg("disk")
            .arg(to)
            .arg("--cache-dir")
            .arg(server.cache_dir());
        cmd
    };
    let said = run(&mut resize(&server, "128M"));
    assert!(said.contains("from 64 MiB to 128 MiB"), "{said}");
    assert_eq!(size(&server), 128 << 20);
    let work = tempfile::tempdir().expect("tempdir");
    let data = work.path().join("data.bin");
    write_pattern_file(&data, 128 << 20, 4);
    run(Command::new("nbdcopy").arg(&data).arg(server.uri()));
    assert_fails_with(run_output(&mut resize(&server, "64M")), "holds data past");
    assert_eq!(size(&server), 128 << 20);
    run(resize(&server, "64M").arg("--force"));
    assert_eq!(size(&server), 64 << 20);
    assert!(server.stop().success(), "{}", server.log_text());
    // Without a server the verb opens the volume; the size lasts.
    run(&mut resize(&server, "96M"));
    server.spawn();
    assert_eq!(size(&server), 96 << 20);
    assert!(server.stop().success(), "{}", server.log_text());
}
