//! Property tests: random page sets, page sizes 512–65536, incompressible and zero pages.

use ltx::{CompactOptions, Decoder, Encoder, HEADER_FLAG_NO_CHECKSUM, Header, PageIndex};
use proptest::prelude::*;
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
enum Fill {
    Zero,
    Random(u64),
    Pattern(u8),
}

fn page(fill: &Fill, size: usize) -> Vec<u8> {
    match *fill {
        Fill::Zero => vec![0; size],
        Fill::Pattern(b) => (0..size).map(|i| b.wrapping_add((i % 7) as u8)).collect(),
        Fill::Random(seed) => {
            let mut x = seed | 1;
            (0..size)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        }
    }
}

fn fill() -> impl Strategy<Value = Fill> {
    prop_oneof![
        Just(Fill::Zero),
        any::<u64>().prop_map(Fill::Random),
        any::<u8>().prop_map(Fill::Pattern),
    ]
}

fn page_size() -> impl Strategy<Value = u32> {
    (9u32..=16).prop_map(|shift| 1 << shift)
}

/// Pages of one file: page number → content. Page numbers stay far below any lock page.
fn page_set(max_pgno: u32) -> impl Strategy<Value = BTreeMap<u32, Fill>> {
    prop::collection::btree_map(1..=max_pgno, fill(), 1..24)
}

fn header(page_size: u32, commit: u32, min: u64, max: u64) -> Header {
    Header {
        flags: HEADER_FLAG_NO_CHECKSUM,
        page_size,
        commit,
        min_txid: min,
        max_txid: max,
        timestamp: 1_700_000_000_000 + max as i64,
        ..Header::default()
    }
}

fn encode(h: Header, pages: &BTreeMap<u32, Fill>) -> Vec<u8> {
    let mut enc = Encoder::new(Vec::new(), h).expect("header");
    for (&pgno, f) in pages {
        enc.encode_page(pgno, &page(f, h.page_size as usize))
            .expect("page");
    }
    enc.finish(0).expect("finish").0
}

fn decode_all(bytes: &[u8]) -> ltx::Result<(Header, BTreeMap<u32, Vec<u8>>)> {
    let mut d = Decoder::new(bytes)?;
    let h = *d.header();
    let mut buf = vec![0u8; h.page_size as usize];
    let mut out = BTreeMap::new();
    while let Some(pgno) = d.next_page(&mut buf)? {
        out.insert(pgno, buf.clone());
    }
    d.finish()?;
    Ok((h, out))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn round_trip(ps in page_size(), pages in page_set(200), txid in 2u64..1000) {
        let commit = *pages.keys().last().expect("non-empty") + 3;
        let h = header(ps, commit, txid, txid + 2);
        let bytes = encode(h, &pages);
        let (decoded_header, decoded) = decode_all(&bytes).expect("decode");
        prop_assert_eq!(decoded_header, h);
        prop_assert_eq!(decoded.len(), pages.len());
        for (pgno, f) in &pages {
            prop_assert_eq!(&decoded[pgno], &page(f, ps as usize));
        }
        // Random access through the index gives the same pages.
        let tail = &bytes[bytes.len() - ltx::page_index::TAIL_LEN..];
        let (start, len) = PageIndex::locate(bytes.len() as u64, tail).expect("locate");
        let index = PageIndex::decode(&bytes[start as usize..(start + len) as usize], PageIndex::frames_end(start)).expect("index");
        let mut buf = vec![0u8; ps as usize];
        for e in &index.entries {
            let frame = &bytes[e.offset as usize..(e.offset + e.size) as usize];
            prop_assert_eq!(ltx::frame::decode_frame(frame, &mut buf).expect("frame"), e.pgno);
            prop_assert_eq!(&buf, &decoded[&e.pgno]);
        }
    }

    #[test]
    fn snapshots_with_checksums_verify(ps in page_size(), fills in prop::collection::vec(fill(), 1..20)) {
        let h = Header { flags: 0, ..header(ps, fills.len() as u32, 1, 1) };
        let mut sum = ltx::DatabaseChecksum::new(ps);
        let images: Vec<Vec<u8>> = fills.iter().map(|f| page(f, ps as usize)).collect();
        for (i, p) in images.iter().enumerate() {
            sum.add_page(i as u32 + 1, p);
        }
        let mut enc = Encoder::new(Vec::new(), h).expect("header");
        for (i, p) in images.iter().enumerate() {
            enc.encode_page(i as u32 + 1, p).expect("page");
        }
        let (bytes, summary) = enc.finish(sum.value()).expect("finish");
        prop_assert_eq!(summary.trailer.post_apply_checksum, sum.value());
        prop_assert!(Decoder::verify(&bytes[..]).is_ok());
        prop_assert_eq!(sum.value(), ltx::DatabaseChecksum::of_database(&images.concat(), ps));
    }

    #[test]
    fn corruption_is_detected_or_harmless(ps in page_size(), pages in page_set(50), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let commit = *pages.keys().last().expect("non-empty");
        let bytes = encode(header(ps, commit, 5, 5), &pages);
        let mut bad = bytes.clone();
        let i = at.index(bad.len());
        bad[i] ^= 1 << bit;
        // Never a panic; and a file that still verifies must still hold exactly the same pages
        // (a flipped bit inside LZ4 data can, rarely, decode to the same bytes).
        if let Ok((_, decoded)) = decode_all(&bad) {
            let (_, original) = decode_all(&bytes).expect("original");
            prop_assert_eq!(decoded, original);
        }
        prop_assert!(Decoder::verify(&bad[..bad.len() - 1]).is_err(), "truncation must fail");
    }

    #[test]
    fn compaction_keeps_the_newest_page(ps in page_size(), files in prop::collection::vec(page_set(60), 1..6), shrink in 0u32..10) {
        let mut expected: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
        let mut encoded = Vec::new();
        let max_pgno = files.iter().flat_map(|f| f.keys()).copied().max().expect("pages");
        let final_commit = (max_pgno - shrink.min(max_pgno - 1)).max(1);
        for (i, pages) in files.iter().enumerate() {
            let txid = i as u64 + 2;
            let last = i + 1 == files.len();
            let commit = if last { final_commit } else { max_pgno };
            let pages: BTreeMap<u32, Fill> = pages.iter().filter(|(p, _)| **p <= commit).map(|(p, f)| (*p, f.clone())).collect();
            if pages.is_empty() {
                continue;
            }
            for (p, f) in &pages {
                expected.insert(*p, page(f, ps as usize));
            }
            encoded.push(encode(header(ps, commit, txid, txid), &pages));
        }
        prop_assume!(!encoded.is_empty());
        // Renumber TXIDs to be contiguous after skipped (empty) files.
        let encoded: Vec<Vec<u8>> = encoded
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                let (h, pages) = decode_all(&b).expect("decode");
                let t = i as u64 + 2;
                let mut enc = Encoder::new(Vec::new(), Header { min_txid: t, max_txid: t, ..h }).expect("header");
                for (p, data) in &pages {
                    enc.encode_page(*p, data).expect("page");
                }
                enc.finish(0).expect("finish").0
            })
            .collect();
        let last_commit = decode_all(encoded.last().expect("files")).expect("decode").0.commit;
        expected.retain(|p, _| *p <= last_commit);
        let (out, summary) = ltx::compact(encoded.iter().map(|b| &b[..]).collect(), Vec::new(), CompactOptions::default()).expect("compact");
        prop_assert_eq!(summary.header.min_txid, 2);
        prop_assert_eq!(summary.header.max_txid, encoded.len() as u64 + 1);
        let (_, merged) = decode_all(&out).expect("decode compacted");
        prop_assert_eq!(merged, expected);
    }
}
