//! The page index at the end of an LTX file, for random access to single pages.
//!
//! Layout: varint triples (pgno, absolute frame offset, frame size) sorted by pgno, a zero
//! varint, then a big-endian u64 with the byte length of the triples plus the terminator, then
//! the 16-byte trailer. Reading a page at random therefore takes three ranged reads at most:
//! the tail ([`TAIL_LEN`] bytes), the index, and the frame.

use crate::error::{Error, Result};
use crate::header::{HEADER_SIZE, PAGE_HEADER_SIZE, TRAILER_SIZE};
use crate::varint;

/// Bytes at the end of a file that locate the index: the u64 index size and the trailer.
pub const TAIL_LEN: usize = 8 + TRAILER_SIZE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub pgno: u32,
    /// Offset of the page frame from the start of the file.
    pub offset: u64,
    /// Frame length: page header, size field and payload.
    pub size: u64,
}

/// A decoded page index, sorted by page number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageIndex {
    pub entries: Vec<IndexEntry>,
}

impl PageIndex {
    /// Serialises entries (which must be sorted), terminator and size field.
    pub fn encode(entries: &[IndexEntry]) -> Vec<u8> {
        let mut out = Vec::with_capacity(entries.len() * 8 + 9);
        for e in entries {
            varint::put(&mut out, u64::from(e.pgno));
            varint::put(&mut out, e.offset);
            varint::put(&mut out, e.size);
        }
        varint::put(&mut out, 0);
        let len = out.len() as u64;
        out.extend_from_slice(&len.to_be_bytes());
        out
    }

    /// Where the index lies, given the file length and its last [`TAIL_LEN`] bytes:
    /// `(offset, length)` of the varint entries and terminator.
    pub fn locate(file_len: u64, tail: &[u8]) -> Result<(u64, u64)> {
        let tail: &[u8; TAIL_LEN] = tail.try_into().map_err(|_| {
            Error::InvalidIndex(format!("expected the last {TAIL_LEN} bytes of the file"))
        })?;
        let len = u64::from_be_bytes(tail[0..8].try_into().expect("8 bytes"));
        let min_file = (HEADER_SIZE + PAGE_HEADER_SIZE + TAIL_LEN) as u64;
        let end = file_len
            .checked_sub(TAIL_LEN as u64)
            .filter(|_| file_len >= min_file)
            .ok_or_else(|| Error::Truncated(format!("{file_len} bytes is too short")))?;
        let start = end
            .checked_sub(len)
            .filter(|&s| s >= (HEADER_SIZE + PAGE_HEADER_SIZE) as u64 && len > 0)
            .ok_or_else(|| {
                Error::InvalidIndex(format!(
                    "index size {len} does not fit in a {file_len}-byte file"
                ))
            })?;
        Ok((start, len))
    }

    /// Parses the varint entries and terminator (exactly; trailing bytes are an error).
    /// `frames_end` is the offset of the zero page header: every frame must lie before it.
    pub fn decode(bytes: &[u8], frames_end: u64) -> Result<Self> {
        let invalid = |m: String| Err(Error::InvalidIndex(m));
        let mut entries: Vec<IndexEntry> = Vec::new();
        let mut pos = 0usize;
        let mut next = |what: &str| -> Result<u64> {
            let (v, n) = varint::get(&bytes[pos..]).ok_or_else(|| {
                Error::InvalidIndex(format!("bad or truncated varint for {what} at byte {pos}"))
            })?;
            pos += n;
            Ok(v)
        };
        loop {
            let pgno = next("page number")?;
            if pgno == 0 {
                break;
            }
            let offset = next("frame offset")?;
            let size = next("frame size")?;
            let Ok(pgno) = u32::try_from(pgno) else {
                return invalid(format!("page number {pgno} exceeds 32 bits"));
            };
            if let Some(prev) = entries.last() {
                if pgno <= prev.pgno {
                    return invalid(format!("page {pgno} listed after page {}", prev.pgno));
                }
                if offset < prev.offset + prev.size {
                    return invalid(format!("frame of page {pgno} overlaps the previous frame"));
                }
            }
            let in_bounds = offset >= HEADER_SIZE as u64
                && size > PAGE_HEADER_SIZE as u64
                && offset
                    .checked_add(size)
                    .is_some_and(|end| end <= frames_end);
            if !in_bounds {
                return invalid(format!(
                    "frame of page {pgno} ({offset}+{size}) lies outside the page block"
                ));
            }
            entries.push(IndexEntry { pgno, offset, size });
        }
        if pos != bytes.len() {
            return invalid(format!(
                "{} unexpected bytes after the index terminator",
                bytes.len() - pos
            ));
        }
        Ok(PageIndex { entries })
    }

    pub fn get(&self, pgno: u32) -> Option<IndexEntry> {
        self.entries
            .binary_search_by_key(&pgno, |e| e.pgno)
            .ok()
            .map(|i| self.entries[i])
    }

    /// Offset of the zero page header that ends the page block, given the index's offset.
    pub fn frames_end(index_offset: u64) -> u64 {
        index_offset - PAGE_HEADER_SIZE as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_locate_decode() {
        let entries = vec![
            IndexEntry {
                pgno: 1,
                offset: 100,
                size: 50,
            },
            IndexEntry {
                pgno: 3,
                offset: 150,
                size: 4000,
            },
            IndexEntry {
                pgno: 70000,
                offset: 4150,
                size: 12,
            },
        ];
        let index = PageIndex::encode(&entries);
        // Build a fake file: 4162 bytes of frames, the zero page header, index, trailer.
        let index_offset = 4162 + PAGE_HEADER_SIZE as u64;
        let file_len = index_offset + index.len() as u64 + TRAILER_SIZE as u64;
        let mut tail = index[index.len() - 8..].to_vec();
        tail.extend_from_slice(&[0u8; TRAILER_SIZE]);
        let (start, len) = PageIndex::locate(file_len, &tail).expect("locate");
        assert_eq!(start, index_offset);
        assert_eq!(len as usize, index.len() - 8);
        let decoded = PageIndex::decode(&index[..len as usize], PageIndex::frames_end(start))
            .expect("decode");
        assert_eq!(decoded.entries, entries);
        assert_eq!(decoded.get(3), Some(entries[1]));
        assert_eq!(decoded.get(2), None);
    }

    #[test]
    fn rejects_disorder_overlap_and_garbage() {
        let cases = [
            vec![
                IndexEntry {
                    pgno: 2,
                    offset: 100,
                    size: 10,
                },
                IndexEntry {
                    pgno: 1,
                    offset: 110,
                    size: 10,
                },
            ],
            vec![
                IndexEntry {
                    pgno: 1,
                    offset: 100,
                    size: 10,
                },
                IndexEntry {
                    pgno: 2,
                    offset: 105,
                    size: 10,
                },
            ],
            vec![IndexEntry {
                pgno: 1,
                offset: 100,
                size: 1_000_000,
            }],
            vec![IndexEntry {
                pgno: 1,
                offset: 10,
                size: 10,
            }],
        ];
        for entries in cases {
            let index = PageIndex::encode(&entries);
            assert!(
                PageIndex::decode(&index[..index.len() - 8], 10_000).is_err(),
                "{entries:?}"
            );
        }
        let mut index = PageIndex::encode(&[IndexEntry {
            pgno: 1,
            offset: 100,
            size: 10,
        }]);
        index.truncate(index.len() - 8);
        index.extend_from_slice(&[1, 2]);
        assert!(PageIndex::decode(&index, 10_000).is_err(), "trailing bytes");
        assert!(PageIndex::locate(50, &[0u8; TAIL_LEN]).is_err());
        let mut huge = [0u8; TAIL_LEN];
        huge[0..8].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(PageIndex::locate(10_000, &huge).is_err());
    }
}
