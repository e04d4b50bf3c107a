//! The real files written by Litestream 0.5.17 (testdata/ltx at the workspace root, made by
//! scripts/gen-ltx-fixtures.py; see its MANIFEST.md).

use ltx::compactor::write_database;
use ltx::page_index::TAIL_LEN;
use ltx::{Decoder, FileName, LtxFile, PageIndex, RestoreTarget, plan_restore};
use std::fs::File;
use std::path::{Path, PathBuf};

/// `testdata/ltx` in the workspace (or `$LTX_TESTDATA`).
fn testdata() -> PathBuf {
    if let Some(dir) = std::env::var_os("LTX_TESTDATA") {
        return PathBuf::from(dir);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/ltx");
    assert!(
        dir.join("MANIFEST.md").is_file(),
        "LTX test vectors not found at {}: run scripts/gen-ltx-fixtures.py",
        dir.display()
    );
    dir
}

/// Every replica file with its level, from `replica/ltx/<level>/<min>-<max>.ltx`.
fn replica_files() -> Vec<(LtxFile, PathBuf)> {
    let root = testdata().join("replica/ltx");
    let mut files = Vec::new();
    for level_dir in std::fs::read_dir(&root).expect("read replica") {
        let level_dir = level_dir.expect("dir entry").path();
        let level: u8 = level_dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .expect("numeric level directory");
        for entry in std::fs::read_dir(&level_dir).expect("read level") {
            let path = entry.expect("entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("utf-8 name");
            let range = FileName::parse(name).expect("LTX file name");
            let header = *Decoder::new(File::open(&path).expect("open"))
                .expect("header")
                .header();
            files.push((
                LtxFile {
                    level,
                    min_txid: range.min_txid,
                    max_txid: range.max_txid,
                    size: std::fs::metadata(&path).expect("stat").len(),
                    created_at_ms: header.timestamp,
                },
                path,
            ));
        }
    }
    files.sort_by_key(|(f, _)| (f.level, f.min_txid, f.max_txid));
    assert_eq!(files.len(), 18, "the replica holds 18 files");
    files
}

fn restore(target: RestoreTarget, files: &[(LtxFile, PathBuf)]) -> Vec<u8> {
    let listing: Vec<LtxFile> = files.iter().map(|(f, _)| *f).collect();
    let plan = plan_restore(&listing, target).expect("plan");
    let readers: Vec<File> = plan
        .iter()
        .map(|p| {
            let (_, path) = files
                .iter()
                .find(|(f, _)| f == p)
                .expect("planned file exists");
            File::open(path).expect("open")
        })
        .collect();
    let mut image = Vec::new();
    write_database(readers, &mut image).expect("restore");
    image
}

#[test]
fn every_replica_file_decodes_and_verifies() {
    for (info, path) in replica_files() {
        let summary = Decoder::verify(File::open(&path).expect("open"))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(summary.header.min_txid, info.min_txid, "{}", path.display());
        assert_eq!(summary.header.max_txid, info.max_txid, "{}", path.display());
        assert_eq!(summary.len, info.size);
        assert!(summary.header.no_checksum());
        assert!(!summary.index.entries.is_empty());
    }
}

#[test]
fn single_pages_decode_through_the_index() {
    for (_, path) in replica_files() {
        let bytes = std::fs::read(&path).expect("read");
        let (start, len) = PageIndex::locate(bytes.len() as u64, &bytes[bytes.len() - TAIL_LEN..])
            .expect("locate");
        let index = PageIndex::decode(
            &bytes[start as usize..(start + len) as usize],
            PageIndex::frames_end(start),
        )
        .expect("index");
        let mut decoder = Decoder::new(&bytes[..]).expect("decoder");
        let page_size = decoder.header().page_size as usize;
        let mut streamed = vec![0u8; page_size];
        let mut random = vec![0u8; page_size];
        for entry in &index.entries {
            let pgno = decoder
                .next_page(&mut streamed)
                .expect("page")
                .expect("more pages");
            assert_eq!(pgno, entry.pgno);
            let frame = &bytes[entry.offset as usize..(entry.offset + entry.size) as usize];
            assert_eq!(
                ltx::frame::decode_frame(frame, &mut random).expect("frame"),
                pgno
            );
            assert_eq!(random, streamed, "page {pgno} of {}", path.display());
        }
    }
}

#[test]
fn restoring_to_txid_7_reproduces_the_database_byte_for_byte() {
    let files = replica_files();
    let expected = std::fs::read(testdata().join("final_state.db")).expect("final_state.db");
    assert_eq!(restore(RestoreTarget::Latest, &files), expected);
    assert_eq!(restore(RestoreTarget::Txid(7), &files), expected);
    // The same state reached through the level-0 chain alone (no snapshot, no compactions).
    let l0: Vec<_> = files
        .iter()
        .filter(|(f, _)| f.level == 0)
        .cloned()
        .collect();
    assert_eq!(restore(RestoreTarget::Latest, &l0), expected);
    let l1: Vec<_> = files
        .iter()
        .filter(|(f, _)| f.level == 1)
        .cloned()
        .collect();
    assert_eq!(restore(RestoreTarget::Latest, &l1), expected);
    // An older point in time differs, and matches restoring its own snapshot.
    let at4 = restore(RestoreTarget::Txid(4), &files);
    assert_ne!(at4, expected);
    let l0_at4 = restore(RestoreTarget::Txid(4), &l0);
    assert_eq!(at4, l0_at4);
}

#[test]
fn compacting_level_0_matches_litestreams_own_compaction() {
    let files = replica_files();
    let pick = |level: u8, min: u64, max: u64| {
        files
            .iter()
            .find(|(f, _)| (f.level, f.min_txid, f.max_txid) == (level, min, max))
            .map(|(_, p)| File::open(p).expect("open"))
            .expect("file exists")
    };
    // L1 5-6 is Litestream's compaction of L0 5 and 6: same pages, same header fields.
    let (ours, summary) = ltx::compact(
        vec![pick(0, 5, 5), pick(0, 6, 6)],
        Vec::new(),
        ltx::CompactOptions::default(),
    )
    .expect("compact");
    let theirs = Decoder::verify(pick(1, 5, 6)).expect("verify theirs");
    assert_eq!(summary.header, theirs.header);
    assert_eq!(summary.index.entries.len(), theirs.index.entries.len());
    let pages = |bytes: &[u8]| {
        let mut d = Decoder::new(bytes).expect("decoder");
        let mut buf = vec![0u8; d.header().page_size as usize];
        let mut out = Vec::new();
        while let Some(p) = d.next_page(&mut buf).expect("page") {
            out.push((p, buf.clone()));
        }
        out
    };
    let theirs_bytes = std::fs::read(
        files
            .iter()
            .find(|(f, _)| (f.level, f.min_txid, f.max_txid) == (1, 5, 6))
            .expect("L1 5-6")
            .1
            .clone(),
    )
    .expect("read");
    assert_eq!(pages(&ours), pages(&theirs_bytes));
    Decoder::verify(&ours[..]).expect("our output verifies");
}

#[test]
fn the_racing_l0_file_is_rejected() {
    let path = testdata().join("negative_l0_race_0000000000000008-0000000000000008.ltx");
    let err = Decoder::verify(File::open(&path).expect("open")).expect_err("corrupt file");
    let message = err.to_string();
    eprintln!("negative_l0_race: {message}");
    assert!(
        matches!(err, ltx::Error::InvalidIndex(_)),
        "not an index error: {message}"
    );

    // The defect (see MANIFEST.md): the pages stream out intact, but 4 stray bytes sit between
    // the end-of-pages header and the page index, and the index's last frame takes them in.
    let bytes = std::fs::read(&path).expect("read");
    let mut decoder = Decoder::new(&bytes[..]).expect("header");
    let page_size = decoder.header().page_size as usize;
    let mut page = vec![0u8; page_size];
    let mut streamed = Vec::new();
    while let Some(pgno) = decoder.next_page(&mut page).expect("pages decode") {
        streamed.push((pgno, page.clone()));
    }
    let (start, len) =
        PageIndex::locate(bytes.len() as u64, &bytes[bytes.len() - TAIL_LEN..]).expect("locate");
    let index = PageIndex::decode(
        &bytes[start as usize..(start + len) as usize],
        PageIndex::frames_end(start),
    )
    .expect("index");
    let pgnos: Vec<u32> = index.entries.iter().map(|e| e.pgno).collect();
    assert_eq!(pgnos, streamed.iter().map(|(p, _)| *p).collect::<Vec<_>>());
    let last = *index.entries.last().expect("entries");
    let frame = &bytes[last.offset as usize..(last.offset + last.size) as usize];
    let mut out = vec![0u8; page_size];
    assert!(
        ltx::frame::decode_frame(frame, &mut out).is_err(),
        "the index should give the last frame 4 bytes too many"
    );
    let real_end = frame.len() - 4;
    assert_eq!(
        ltx::frame::decode_frame(&frame[..real_end], &mut out)
            .expect("frame without the stray bytes"),
        last.pgno
    );
    assert_eq!(out, streamed.last().expect("pages").1);
    // Between the real frame and the index: the zero end-of-pages header and 4 more bytes.
    let gap = &bytes[(last.offset as usize + real_end)..start as usize];
    assert_eq!(gap.len(), ltx::header::PAGE_HEADER_SIZE + 4);
    assert!(gap.iter().all(|&b| b == 0), "{gap:?}");
}

#[test]
fn legacy_v1_files_are_rejected_without_panicking() {
    let dir = testdata().join("legacy_v1");
    let path = dir.join("000000000000000d-000000000000000d.ltx");
    let err = Decoder::verify(File::open(&path).expect("open")).expect_err("v1 is not supported");
    eprintln!("legacy v1: {err}");
}
