//! Streaming LTX decoder that verifies every rule: header, page order, frame encoding, the page
//! index against the frames actually present, the file checksum and, for snapshots with
//! checksums, the post-apply database checksum.

use crate::checksum::{CHECKSUM_FLAG, DatabaseChecksum, hasher};
use crate::error::{Error, Result, eof_as_truncated};
use crate::frame::{compress_bound, decompress_block, read_lz4_frame};
use crate::header::{HEADER_SIZE, Header, PAGE_FLAG_SIZE, PAGE_HEADER_SIZE, TRAILER_SIZE, Trailer};
use crate::page_index::{IndexEntry, PageIndex};
use crate::varint;
use std::io::{BufReader, Read};

/// What a complete, verified (or freshly written) LTX file contains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSummary {
    pub header: Header,
    pub trailer: Trailer,
    pub index: PageIndex,
    /// Length of the file in bytes.
    pub len: u64,
}

/// Reads one LTX file front to back. Call [`Decoder::next_page`] until it returns `None`, then
/// [`Decoder::finish`], which checks the index, trailer and checksums: a file is only known to be
/// good once `finish` succeeds.
pub struct Decoder<R: Read> {
    input: BufReader<R>,
    digest: crc::Digest<'static, u64, crate::checksum::Crc64Impl>,
    read: u64,
    header: Header,
    prev_pgno: u32,
    frames: Vec<IndexEntry>,
    compressed: Vec<u8>,
    database_checksum: Option<DatabaseChecksum>,
    pages_done: bool,
}

impl<R: Read> Decoder<R> {
    /// Reads and validates the header.
    pub fn new(input: R) -> Result<Self> {
        let mut input = BufReader::with_capacity(64 * 1024, input);
        let mut bytes = [0u8; HEADER_SIZE];
        input
            .read_exact(&mut bytes)
            .map_err(|e| eof_as_truncated(e, "header"))?;
        let header = Header::decode(&bytes)?;
        header.validate()?;
        let mut digest = hasher();
        digest.update(&bytes);
        Ok(Decoder {
            input,
            digest,
            read: HEADER_SIZE as u64,
            header,
            prev_pgno: 0,
            frames: Vec::new(),
            compressed: Vec::new(),
            database_checksum: (header.is_snapshot() && !header.no_checksum())
                .then(|| DatabaseChecksum::new(header.page_size)),
            pages_done: false,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    fn read_hashed(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.input
            .read_exact(buf)
            .map_err(|e| eof_as_truncated(e, what))?;
        self.digest.update(buf);
        self.read += buf.len() as u64;
        Ok(())
    }

    fn invalid_page(&self, offset: u64, reason: String) -> Error {
        Error::InvalidPage { offset, reason }
    }

    /// Decodes the next page into `page` (exactly one page long). Returns its page number, or
    /// `None` at the end of the page block.
    pub fn next_page(&mut self, page: &mut [u8]) -> Result<Option<u32>> {
        if self.pages_done {
            return Ok(None);
        }
        let h = self.header;
        if page.len() != h.page_size as usize {
            return Err(Error::Usage(format!(
                "page buffer is {} bytes, the file's page size is {}",
                page.len(),
                h.page_size
            )));
        }
        let offset = self.read;
        let mut head = [0u8; PAGE_HEADER_SIZE];
        self.read_hashed(&mut head, "page block")?;
        let pgno = u32::from_be_bytes(head[0..4].try_into().expect("4 bytes"));
        let flags = u16::from_be_bytes(head[4..6].try_into().expect("2 bytes"));
        if pgno == 0 && flags == 0 {
            self.pages_done = true;
            self.check_snapshot_complete(offset)?;
            return Ok(None);
        }
        self.check_page_number(offset, pgno)?;
        if flags & !PAGE_FLAG_SIZE != 0 {
            let mut reason = format!("page {pgno} has unknown flags {flags:#06x}");
            if self.frames.is_empty() {
                reason.push_str(" (an LTX v1 file with 4-byte page headers? it is not supported)");
            }
            return Err(self.invalid_page(offset, reason));
        }
        if flags & PAGE_FLAG_SIZE != 0 {
            let mut size = [0u8; 4];
            self.read_hashed(&mut size, "page size field")?;
            let size = u32::from_be_bytes(size) as usize;
            if size == 0 || size > compress_bound(h.page_size) {
                return Err(self.invalid_page(
                    offset,
                    format!(
                        "page {pgno} claims {size} compressed bytes for a {}-byte page",
                        h.page_size
                    ),
                ));
            }
            self.compressed.resize(size, 0);
            self.input
                .read_exact(&mut self.compressed)
                .map_err(|e| eof_as_truncated(e, "page data"))?;
            self.read += size as u64;
            decompress_block(&self.compressed, page)
                .map_err(|reason| self.invalid_page(offset, format!("page {pgno}: {reason}")))?;
        } else {
            let used = read_lz4_frame(&mut self.input, page)
                .map_err(|reason| self.invalid_page(offset, format!("page {pgno}: {reason}")))?;
            self.read += used;
        }
        self.digest.update(page);
        if let Some(sum) = self.database_checksum.as_mut() {
            sum.add_page(pgno, page);
        }
        self.frames.push(IndexEntry {
            pgno,
            offset,
            size: self.read - offset,
        });
        self.prev_pgno = pgno;
        Ok(Some(pgno))
    }

    fn check_page_number(&self, offset: u64, pgno: u32) -> Result<()> {
        let h = &self.header;
        let fail = |reason: String| Err(self.invalid_page(offset, reason));
        if pgno == 0 {
            return fail("page number 0".into());
        }
        if pgno > h.commit {
            return fail(format!(
                "page {pgno} is beyond the database size of {} pages",
                h.commit
            ));
        }
        let lock = h.lock_pgno();
        if pgno == lock {
            return fail(format!(
                "page {pgno} is the lock page, which is never stored"
            ));
        }
        if h.is_snapshot() {
            let expected = h.next_snapshot_pgno(self.prev_pgno);
            if pgno != expected {
                return fail(format!(
                    "snapshot pages must be consecutive: expected page {expected}, found {pgno}"
                ));
            }
        } else if pgno <= self.prev_pgno {
            return fail(format!(
                "page numbers must increase: page {pgno} after page {}",
                self.prev_pgno
            ));
        }
        Ok(())
    }

    fn check_snapshot_complete(&self, offset: u64) -> Result<()> {
        let h = &self.header;
        if !h.is_snapshot() {
            return Ok(());
        }
        if self.prev_pgno != h.last_snapshot_pgno() {
            return Err(self.invalid_page(
                offset,
                format!(
                    "snapshot ends at page {} but the database has {} pages",
                    self.prev_pgno, h.commit
                ),
            ));
        }
        Ok(())
    }

    /// Skips the remaining pages, then reads and verifies the index and trailer.
    pub fn finish(mut self) -> Result<FileSummary> {
        let mut page = vec![0u8; self.header.page_size as usize];
        while self.next_page(&mut page)?.is_some() {}
        let frames_end = self.read - PAGE_HEADER_SIZE as u64;

        // The index: varint triples and a zero terminator, then its length as a u64. It can
        // list no more pages than the file holds, which bounds what a corrupt file makes us read.
        let mut index_bytes = Vec::with_capacity(self.frames.len() * 8 + 1);
        let mut terminated = false;
        for _ in 0..=self.frames.len() {
            if self.read_index_varint(&mut index_bytes)? == 0 {
                terminated = true;
                break;
            }
            self.read_index_varint(&mut index_bytes)?;
            self.read_index_varint(&mut index_bytes)?;
        }
        if !terminated {
            return Err(Error::InvalidIndex(format!(
                "more entries than the {} pages in the file",
                self.frames.len()
            )));
        }
        let mut size = [0u8; 8];
        self.read_hashed(&mut size, "page index size")?;
        let size = u64::from_be_bytes(size);
        if size != index_bytes.len() as u64 {
            return Err(Error::InvalidIndex(format!(
                "index size field says {size} bytes, the index is {}",
                index_bytes.len()
            )));
        }
        let index = PageIndex::decode(&index_bytes, frames_end)?;
        if index.entries != self.frames {
            return Err(Error::InvalidIndex(
                "the index does not describe the page frames in the file".into(),
            ));
        }

        let mut trailer_bytes = [0u8; TRAILER_SIZE];
        self.input
            .read_exact(&mut trailer_bytes)
            .map_err(|e| eof_as_truncated(e, "trailer"))?;
        self.read += TRAILER_SIZE as u64;
        self.digest.update(&trailer_bytes[0..8]);
        let trailer = Trailer::decode(&trailer_bytes);
        let computed = CHECKSUM_FLAG | self.digest.finalize();
        if trailer.file_checksum != computed {
            return Err(Error::FileChecksumMismatch {
                stored: trailer.file_checksum,
                computed,
            });
        }
        trailer.validate(&self.header)?;
        if let Some(sum) = self.database_checksum {
            if sum.value() != trailer.post_apply_checksum {
                return Err(Error::PostApplyChecksumMismatch {
                    stored: trailer.post_apply_checksum,
                    computed: sum.value(),
                });
            }
        }
        let mut extra = [0u8; 1];
        if self.input.read(&mut extra)? != 0 {
            return Err(Error::InvalidTrailer("bytes after the trailer".into()));
        }
        Ok(FileSummary {
            header: self.header,
            trailer,
            index,
            len: self.read,
        })
    }

    /// Reads one index varint (hashing it) and appends its bytes to `bytes`.
    fn read_index_varint(&mut self, bytes: &mut Vec<u8>) -> Result<u64> {
        let start = bytes.len();
        for _ in 0..10 {
            let mut byte = [0u8; 1];
            self.read_hashed(&mut byte, "page index")?;
            bytes.push(byte[0]);
            if byte[0] & 0x80 == 0 {
                return varint::get(&bytes[start..])
                    .map(|(value, _)| value)
                    .ok_or_else(|| Error::InvalidIndex("varint overflows 64 bits".into()));
            }
        }
        Err(Error::InvalidIndex("varint longer than 10 bytes".into()))
    }

    /// Reads and verifies a whole file.
    pub fn verify(input: R) -> Result<FileSummary> {
        Decoder::new(input)?.finish()
    }
}
