//! Encode, decode and index-lookup throughput, per core, on 4 KiB pages.
//!
//! Three kinds of page: SQLite-like b-tree pages (text records with headers and free space),
//! incompressible random pages, and zero pages. Throughput counts uncompressed page bytes.
//! Run: `cargo bench -p ltx --bench codec`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ltx::{Decoder, Encoder, HEADER_FLAG_NO_CHECKSUM, Header, PageIndex};
use std::hint::black_box;

const PAGE_SIZE: u32 = 4096;
const PAGES: u32 = 2048; // 8 MiB per file

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// A leaf page of a table of short hex-text rows: cell pointers, records, and ~20% free space.
fn sqlite_like_page(seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    page[0] = 0x0d;
    let mut pos = 820;
    while pos + 80 < PAGE_SIZE as usize {
        let rowid = xorshift(&mut state);
        page[pos..pos + 8].copy_from_slice(&rowid.to_be_bytes());
        for b in &mut page[pos + 8..pos + 72] {
            *b = b"0123456789ABCDEF"[(xorshift(&mut state) & 15) as usize];
        }
        pos += 76;
    }
    page
}

fn random_page(seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..PAGE_SIZE).map(|_| xorshift(&mut state) as u8).collect()
}

fn datasets() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    vec![
        (
            "sqlite-like",
            (0..PAGES)
                .map(|i| sqlite_like_page(u64::from(i) + 1))
                .collect(),
        ),
        (
            "random",
            (0..PAGES).map(|i| random_page(u64::from(i) + 1)).collect(),
        ),
        (
            "zero",
            (0..PAGES).map(|_| vec![0u8; PAGE_SIZE as usize]).collect(),
        ),
    ]
}

fn header() -> Header {
    Header {
        flags: HEADER_FLAG_NO_CHECKSUM,
        page_size: PAGE_SIZE,
        commit: PAGES,
        min_txid: 2,
        max_txid: 2,
        timestamp: 1,
        ..Header::default()
    }
}

fn encode(pages: &[Vec<u8>]) -> Vec<u8> {
    let mut enc = Encoder::new(Vec::with_capacity(pages.len() * 4200), header()).expect("header");
    for (i, p) in pages.iter().enumerate() {
        enc.encode_page(i as u32 + 1, p).expect("page");
    }
    enc.finish(0).expect("finish").0
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("ltx");
    group.throughput(Throughput::Bytes(u64::from(PAGES) * u64::from(PAGE_SIZE)));
    group.sample_size(20);
    for (name, pages) in datasets() {
        group.bench_with_input(BenchmarkId::new("encode", name), &pages, |b, pages| {
            b.iter(|| black_box(encode(pages)))
        });
        let file = encode(&pages);
        group.bench_with_input(BenchmarkId::new("decode", name), &file, |b, file| {
            b.iter(|| {
                let mut d = Decoder::new(&file[..]).expect("decoder");
                let mut buf = vec![0u8; PAGE_SIZE as usize];
                while d.next_page(&mut buf).expect("page").is_some() {}
                black_box(d.finish().expect("verify"))
            })
        });
    }
    group.finish();

    // Index lookup: parse a file's index once, then find pages by number.
    let file = encode(&datasets().remove(0).1);
    let tail = &file[file.len() - ltx::page_index::TAIL_LEN..];
    let (start, len) = PageIndex::locate(file.len() as u64, tail).expect("locate");
    let bytes = &file[start as usize..(start + len) as usize];
    c.bench_function("ltx/index-parse-2048", |b| {
        b.iter(|| black_box(PageIndex::decode(bytes, PageIndex::frames_end(start)).expect("index")))
    });
    let index = PageIndex::decode(bytes, PageIndex::frames_end(start)).expect("index");
    let mut pgno = 0u32;
    c.bench_function("ltx/index-lookup", |b| {
        b.iter(|| {
            pgno = pgno % PAGES + 1;
            black_box(index.get(black_box(pgno)))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
