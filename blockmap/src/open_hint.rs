//! The open hint: a small object beside a replica that holds, for its newest snapshot, the
//! byte ranges an open reads from it — the header and first page frames, the page index, and
//! the frames on the path to the first blocks a boot looks up.
//!
//! A snapshot of a full 100 GiB volume's map is tens of MB. Opening it costs two ranged GETs
//! (head and index) and then one per page on the first lookup's path, each a round trip after
//! the listing. The hint is fetched blindly in the same round trip as the listing, so a boot
//! that finds it current reads nothing from the snapshot before its first block. It is only a
//! copy of bytes of an immutable file: it applies when path, size and ETag match the listing,
//! its own checksum guards it, and every frame taken from it is decoded and checked against the
//! page index like one fetched from the snapshot. A missing, stale or damaged hint costs the
//! GETs it would have saved and nothing else. Litestream never sees it: it lives beside the
//! replica's directory, not inside it.

use crate::replica::{Replica, ReplicaError, ReplicaFile};
use bytes::{Buf, BufMut, Bytes};
use crc::{CRC_32_ISCSI, Crc};
use object_store::ObjectStoreExt;
use std::ops::Range;
use stores::retry::with_retries;

const MAGIC: &[u8; 8] = b"BDOPENH1";
/// A hint larger than this is not one we wrote (ours hold ~320 KiB: head, index, a few frames).
pub const MAX_HINT_BYTES: usize = 8 << 20;
const CRC32C: Crc<u32> = Crc::<u32>::new(&CRC_32_ISCSI);

/// Byte ranges of one file known without a GET, sorted by start, not overlapping.
#[derive(Debug, Clone, Default)]
pub struct KnownRanges {
    ranges: Vec<(u64, Bytes)>,
}

impl KnownRanges {
    pub fn add(&mut self, start: u64, bytes: Bytes) {
        if bytes.is_empty() || self.covering(start..start + bytes.len() as u64).is_some() {
            return;
        }
        self.ranges.push((start, bytes));
        self.ranges.sort_by_key(|(s, _)| *s);
    }

    /// The bytes of `range` if one known range holds all of it.
    pub fn covering(&self, range: Range<u64>) -> Option<Bytes> {
        self.ranges.iter().find_map(|(start, bytes)| {
            let end = start + bytes.len() as u64;
            (*start <= range.start && range.end <= end)
                .then(|| bytes.slice((range.start - start) as usize..(range.end - start) as usize))
        })
    }

    pub fn clear(&mut self) {
        self.ranges.clear();
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &(u64, Bytes)> {
        self.ranges.iter()
    }
}

/// What a hint describes and holds.
#[derive(Debug, Clone)]
pub struct OpenHint {
    /// The snapshot's level and file name: where it is relative to the replica's root, so a
    /// volume copied or moved with its hint keeps a hint that applies.
    pub level: u8,
    pub name: String,
    pub size: u64,
    /// The snapshot's ETag when the store gave one (a rewritten object of the same size then
    /// does not match).
    pub e_tag: Option<String>,
    pub ranges: KnownRanges,
}

#[derive(Debug, thiserror::Error)]
pub enum HintError {
    #[error("open hint is {0} bytes, more than any hint written")]
    TooLarge(usize),
    #[error("open hint is damaged: {0}")]
    Damaged(&'static str),
}

impl OpenHint {
    /// Whether this hint describes `file` as listed.
    pub fn describes(&self, file: &ReplicaFile) -> bool {
        self.level == file.level
            && self.name == file.name.to_string()
            && self.size == file.size
            && (self.e_tag.is_none() || file.e_tag.is_none() || self.e_tag == file.e_tag)
    }

    pub fn encode(&self) -> Bytes {
        let mut body = Vec::new();
        body.put_u8(self.level);
        put_str(&mut body, &self.name);
        body.put_u64(self.size);
        put_str(&mut body, self.e_tag.as_deref().unwrap_or(""));
        let ranges: Vec<&(u64, Bytes)> = self.ranges.iter().collect();
        body.put_u32(ranges.len() as u32);
        for (start, bytes) in ranges {
            body.put_u64(*start);
            body.put_u32(bytes.len() as u32);
            body.put_slice(bytes);
        }
        let mut out = Vec::with_capacity(body.len() + 12);
        out.put_slice(MAGIC);
        out.put_u32(CRC32C.checksum(&body));
        out.put_slice(&body);
        Bytes::from(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, HintError> {
        if bytes.len() > MAX_HINT_BYTES {
            return Err(HintError::TooLarge(bytes.len()));
        }
        let short = HintError::Damaged("shorter than its contents say");
        if bytes.len() < 12 || &bytes[..8] != MAGIC {
            return Err(HintError::Damaged("not an open hint"));
        }
        let mut body = &bytes[12..];
        let crc = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if CRC32C.checksum(body) != crc {
            return Err(HintError::Damaged("checksum mismatch"));
        }
        if body.remaining() < 1 {
            return Err(HintError::Damaged("no level"));
        }
        let level = body.get_u8();
        let name = get_str(&mut body).ok_or(HintError::Damaged("bad name"))?;
        if body.remaining() < 8 {
            return Err(short);
        }
        let size = body.get_u64();
        let e_tag = get_str(&mut body).ok_or(HintError::Damaged("bad ETag"))?;
        if body.remaining() < 4 {
            return Err(short);
        }
        let count = body.get_u32();
        let mut ranges = KnownRanges::default();
        for _ in 0..count {
            if body.remaining() < 12 {
                return Err(short);
            }
            let start = body.get_u64();
            let len = body.get_u32() as usize;
            if body.remaining() < len || start.saturating_add(len as u64) > size {
                return Err(HintError::Damaged("range outside the file"));
            }
            ranges.add(start, Bytes::copy_from_slice(&body[..len]));
            body.advance(len);
        }
        if body.has_remaining() {
            return Err(HintError::Damaged("trailing bytes"));
        }
        Ok(OpenHint {
            level,
            name,
            size,
            e_tag: (!e_tag.is_empty()).then_some(e_tag),
            ranges,
        })
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn get_str(body: &mut &[u8]) -> Option<String> {
    if body.remaining() < 2 {
        return None;
    }
    let len = body.get_u16() as usize;
    if body.remaining() < len {
        return None;
    }
    let s = std::str::from_utf8(&body[..len]).ok()?.to_string();
    body.advance(len);
    Some(s)
}

/// The replica's hint, if there is a readable one. Failing to read it is never an error:
/// the open reads the snapshot instead.
pub async fn load(replica: &Replica) -> Option<OpenHint> {
    let path = replica.hint_path();
    let bytes = match replica.store().get(&path).await {
        Ok(got) => got.bytes().await,
        Err(e) => Err(e),
    };
    match bytes {
        Ok(bytes) => match OpenHint::decode(&bytes) {
            Ok(hint) => Some(hint),
            Err(e) => {
                tracing::warn!("{path}: {e}; opening without it");
                None
            }
        },
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => {
            tracing::debug!("{path}: not read ({e}); opening without it");
            None
        }
    }
}

/// Writes the hint for snapshot `file`: its head and page index as an open reads them, and the
/// frames of `pgnos` (the pages the last open's first lookups read). What `known` holds of the
/// file (the bytes an open just read of it) is not read again: head and index then cost no
/// request, and only missing frames do; the hint itself is one PUT.
pub async fn write(
    replica: &Replica,
    file: &ReplicaFile,
    pgnos: &[u32],
    known: Option<&KnownRanges>,
) -> Result<(), ReplicaError> {
    let read_before = known.map(|ranges| OpenHint {
        level: file.level,
        name: file.name.to_string(),
        size: file.size,
        e_tag: file.e_tag.clone(),
        ranges: ranges.clone(),
    });
    let (_, index, mut ranges) = replica.read_index(file, read_before.as_ref()).await?;
    for (start, bytes) in known.iter().flat_map(|k| k.iter()) {
        ranges.add(*start, bytes.clone());
    }
    let mut frames: Vec<Range<u64>> = pgnos
        .iter()
        .filter_map(|pgno| index.entries.iter().find(|e| e.pgno == *pgno))
        .map(|e| e.offset..e.offset + e.size)
        .filter(|r| ranges.covering(r.clone()).is_none())
        .collect();
    frames.sort_by_key(|r| r.start);
    frames.dedup();
    if !frames.is_empty() {
        let got = with_retries("read frames for the open hint", || {
            replica.store().get_ranges(&file.path, &frames)
        })
        .await?;
        for (range, bytes) in frames.iter().zip(got) {
            ranges.add(range.start, bytes);
        }
    }
    let hint = OpenHint {
        level: file.level,
        name: file.name.to_string(),
        size: file.size,
        e_tag: file.e_tag.clone(),
        ranges,
    };
    replica
        .store()
        .put(&replica.hint_path(), hint.encode().into())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> OpenHint {
        let mut ranges = KnownRanges::default();
        ranges.add(0, Bytes::from_static(b"head bytes"));
        ranges.add(900, Bytes::from_static(b"tail"));
        ranges.add(400, Bytes::from_static(b"frame"));
        OpenHint {
            level: 9,
            name: "0000000000000001-0000000000000021.ltx".into(),
            size: 904,
            e_tag: Some("\"abc\"".into()),
            ranges,
        }
    }

    #[test]
    fn round_trips_and_serves_ranges() {
        let hint = OpenHint::decode(&sample().encode()).expect("decodes");
        assert_eq!(hint.size, 904);
        assert_eq!(hint.e_tag.as_deref(), Some("\"abc\""));
        assert_eq!(hint.ranges.covering(2..6).as_deref(), Some(&b"ad b"[..]));
        assert_eq!(hint.ranges.covering(401..404).as_deref(), Some(&b"ram"[..]));
        assert!(
            hint.ranges.covering(8..12).is_none(),
            "crosses the head's end"
        );
        assert!(hint.ranges.covering(500..501).is_none());
    }

    #[test]
    fn every_damage_is_refused() {
        let good = sample().encode();
        for i in 0..good.len() {
            let mut bad = good.to_vec();
            bad[i] ^= 0x20;
            assert!(OpenHint::decode(&bad).is_err(), "flipped byte {i} accepted");
        }
        for len in 0..good.len() {
            assert!(
                OpenHint::decode(&good[..len]).is_err(),
                "{len} bytes accepted"
            );
        }
        let mut longer = good.to_vec();
        longer.push(0);
        assert!(OpenHint::decode(&longer).is_err());
    }

    #[test]
    fn a_range_outside_the_file_is_refused() {
        let mut hint = sample();
        hint.size = 100;
        assert!(OpenHint::decode(&hint.encode()).is_err());
    }
}
