//! Streaming LTX encoder: header in, pages in (ascending), index and trailer out at the end.

use crate::checksum::{CHECKSUM_FLAG, Checksum, DatabaseChecksum, hasher};
use crate::decoder::FileSummary;
use crate::error::{Error, Result};
use crate::frame::{compress_bound, compress_page};
use crate::header::{HEADER_SIZE, Header, PAGE_FLAG_SIZE, PAGE_HEADER_SIZE, Trailer};
use crate::page_index::{IndexEntry, PageIndex};
use std::io::Write;

/// Writes one LTX file. Pages must come in ascending page-number order; a snapshot (min TXID 1)
/// must contain every page from 1 to `commit` except the lock page. Memory use is one compressed
/// page plus 24 bytes of index per page.
pub struct Encoder<W: Write> {
    out: W,
    digest: crc::Digest<'static, u64, crate::checksum::Crc64Impl>,
    written: u64,
    header: Header,
    prev_pgno: u32,
    index: Vec<IndexEntry>,
    compressed: Vec<u8>,
    database_checksum: Option<DatabaseChecksum>,
}

impl<W: Write> Encoder<W> {
    /// Validates and writes the header.
    pub fn new(out: W, header: Header) -> Result<Self> {
        header.validate()?;
        let mut encoder = Encoder {
            out,
            digest: hasher(),
            written: 0,
            header,
            prev_pgno: 0,
            index: Vec::new(),
            compressed: vec![0u8; compress_bound(header.page_size)],
            // Only snapshots can compute a post-apply checksum from their own pages.
            database_checksum: (header.is_snapshot() && !header.no_checksum())
                .then(|| DatabaseChecksum::new(header.page_size)),
        };
        encoder.write_hashed(&header.encode())?;
        Ok(encoder)
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn write_hashed(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes)?;
        self.digest.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Appends one page.
    pub fn encode_page(&mut self, pgno: u32, data: &[u8]) -> Result<()> {
        let h = &self.header;
        let usage = |m: String| Err(Error::Usage(m));
        if data.len() != h.page_size as usize {
            return usage(format!(
                "page {pgno} is {} bytes, the file's page size is {}",
                data.len(),
                h.page_size
            ));
        }
        if pgno == 0 || pgno > h.commit {
            return usage(format!("page {pgno} is outside 1..={}", h.commit));
        }
        let lock = h.lock_pgno();
        if pgno == lock {
            return usage(format!("page {pgno} is the lock page and is never stored"));
        }
        if h.is_snapshot() {
            let expected = h.next_snapshot_pgno(self.prev_pgno);
            if pgno != expected {
                return usage(format!(
                    "snapshot pages must be consecutive: expected page {expected}, got {pgno}"
                ));
            }
        } else if pgno <= self.prev_pgno {
            return usage(format!(
                "pages out of order: {pgno} after {}",
                self.prev_pgno
            ));
        }

        let len = compress_page(data, &mut self.compressed).map_err(Error::Usage)?;
        let offset = self.written;
        let mut head = [0u8; PAGE_HEADER_SIZE + 4];
        head[0..4].copy_from_slice(&pgno.to_be_bytes());
        head[4..6].copy_from_slice(&PAGE_FLAG_SIZE.to_be_bytes());
        head[6..10].copy_from_slice(&(len as u32).to_be_bytes());
        self.write_hashed(&head)?;
        // The file checksum covers the page as stored in the database, not its compressed form.
        self.out.write_all(&self.compressed[..len])?;
        self.digest.update(data);
        self.written += len as u64;

        self.index.push(IndexEntry {
            pgno,
            offset,
            size: self.written - offset,
        });
        if let Some(sum) = self.database_checksum.as_mut() {
            sum.add_page(pgno, data);
        }
        self.prev_pgno = pgno;
        Ok(())
    }

    /// Writes the end of the page block, the index and the trailer. `post_apply_checksum` is the
    /// database checksum after this file (0 when checksums are not tracked). Returns the writer
    /// and a description of the file written.
    pub fn finish(mut self, post_apply_checksum: Checksum) -> Result<(W, FileSummary)> {
        let h = self.header;
        if h.is_snapshot() && self.prev_pgno != h.last_snapshot_pgno() {
            return Err(Error::Usage(format!(
                "snapshot ends at page {} but the database has {} pages",
                self.prev_pgno, h.commit
            )));
        }
        if let Some(sum) = self.database_checksum {
            if sum.value() != post_apply_checksum {
                return Err(Error::Usage(format!(
                    "post-apply checksum {post_apply_checksum:016x} does not match the \
                     snapshot's pages ({:016x})",
                    sum.value()
                )));
            }
        }
        self.write_hashed(&[0u8; PAGE_HEADER_SIZE])?;
        let index_offset = self.written;
        let index_bytes = PageIndex::encode(&self.index);
        self.write_hashed(&index_bytes)?;

        self.digest.update(&post_apply_checksum.to_be_bytes());
        let trailer = Trailer {
            post_apply_checksum,
            file_checksum: CHECKSUM_FLAG | self.digest.finalize(),
        };
        trailer
            .validate(&h)
            .map_err(|e| Error::Usage(e.to_string()))?;
        self.out.write_all(&trailer.encode())?;
        self.written += trailer.encode().len() as u64;
        self.out.flush()?;
        debug_assert!(index_offset >= HEADER_SIZE as u64);
        let summary = FileSummary {
            header: h,
            trailer,
            index: PageIndex {
                entries: self.index,
            },
            len: self.written,
        };
        Ok((self.out, summary))
    }
}
