//! Compaction: merge contiguous LTX files into one, newest version of each page winning, with
//! one page buffer per input whatever the database size. Restores use the same merge to write a
//! database image.

use crate::decoder::{Decoder, FileSummary};
use crate::encoder::Encoder;
use crate::error::{Error, Result};
use crate::header::{HEADER_FLAG_NO_CHECKSUM, Header};
use std::io::{Read, Write};

#[derive(Debug, Clone, Copy)]
pub struct CompactOptions {
    /// Header flags of the output. Litestream writes `HEADER_FLAG_NO_CHECKSUM`.
    pub header_flags: u32,
    /// Accept inputs whose TXID ranges leave gaps (never for a restore).
    pub allow_non_contiguous: bool,
}

impl Default for CompactOptions {
    fn default() -> Self {
        Self {
            header_flags: HEADER_FLAG_NO_CHECKSUM,
            allow_non_contiguous: false,
        }
    }
}

/// Whether a file covering `min..=max` continues a history that ends at `prev_max`.
pub fn is_contiguous(prev_max: u64, min: u64, max: u64) -> bool {
    min <= prev_max + 1 && max > prev_max
}

/// K-way merge over decoders ordered oldest to newest, yielding each page once, newest first.
pub(crate) struct Merger<R: Read> {
    inputs: Vec<Decoder<R>>,
    pending: Vec<Option<u32>>,
    buffers: Vec<Vec<u8>>,
    exhausted: Vec<bool>,
}

impl<R: Read> Merger<R> {
    /// Opens every input and checks page sizes and TXID continuity.
    pub(crate) fn new(readers: Vec<R>, allow_non_contiguous: bool) -> Result<Self> {
        if readers.is_empty() {
            return Err(Error::Compaction("no input files".into()));
        }
        let mut inputs = Vec::with_capacity(readers.len());
        for (i, r) in readers.into_iter().enumerate() {
            let decoder =
                Decoder::new(r).map_err(|e| Error::Compaction(format!("input {i}: {e}")))?;
            inputs.push(decoder);
        }
        for pair in inputs.windows(2) {
            let (a, b) = (pair[0].header(), pair[1].header());
            if a.page_size != b.page_size {
                return Err(Error::Compaction(format!(
                    "page sizes differ: {} then {}",
                    a.page_size, b.page_size
                )));
            }
            if !allow_non_contiguous && !is_contiguous(a.max_txid, b.min_txid, b.max_txid) {
                return Err(Error::Compaction(format!(
                    "TXIDs not contiguous: {:016x}-{:016x} then {:016x}-{:016x}",
                    a.min_txid, a.max_txid, b.min_txid, b.max_txid
                )));
            }
        }
        let n = inputs.len();
        let page_size = inputs[0].header().page_size as usize;
        Ok(Merger {
            inputs,
            pending: vec![None; n],
            buffers: vec![vec![0u8; page_size]; n],
            exhausted: vec![false; n],
        })
    }

    pub(crate) fn first_header(&self) -> Header {
        *self.inputs[0].header()
    }

    pub(crate) fn last_header(&self) -> Header {
        *self.inputs[self.inputs.len() - 1].header()
    }

    /// The next page number and its newest content, or `None` when every input is done.
    pub(crate) fn next_page(&mut self) -> Result<Option<(u32, &[u8])>> {
        for i in 0..self.inputs.len() {
            if self.pending[i].is_none() && !self.exhausted[i] {
                match self.inputs[i].next_page(&mut self.buffers[i])? {
                    Some(pgno) => self.pending[i] = Some(pgno),
                    None => self.exhausted[i] = true,
                }
            }
        }
        let Some(pgno) = self.pending.iter().flatten().copied().min() else {
            return Ok(None);
        };
        // Consume this page from every input that has it; the newest (last) one wins.
        let mut winner = None;
        for i in (0..self.inputs.len()).rev() {
            if self.pending[i] == Some(pgno) {
                self.pending[i] = None;
                winner.get_or_insert(i);
            }
        }
        let winner = winner.expect("some input holds the minimum page");
        Ok(Some((pgno, &self.buffers[winner])))
    }

    /// Verifies every input to its end (index, trailer, checksums) and returns their summaries.
    pub(crate) fn finish(self) -> Result<Vec<FileSummary>> {
        self.inputs
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                d.finish()
                    .map_err(|e| Error::Compaction(format!("input {i}: {e}")))
            })
            .collect()
    }
}

/// Compacts `inputs` (ordered oldest to newest, contiguous) into one file written to `out`,
/// shaped as Litestream's compactor shapes it: TXIDs from the first input's min to the last's
/// max, the last input's commit and timestamp, the first's pre-apply and the last's post-apply
/// checksum. Pages past the final commit (the database shrank) are dropped.
pub fn compact<R: Read, W: Write>(
    inputs: Vec<R>,
    out: W,
    options: CompactOptions,
) -> Result<(W, FileSummary)> {
    let mut merger = Merger::new(inputs, options.allow_non_contiguous)?;
    let (first, last) = (merger.first_header(), merger.last_header());
    let header = Header {
        flags: options.header_flags,
        page_size: first.page_size,
        commit: last.commit,
        min_txid: first.min_txid,
        max_txid: last.max_txid,
        timestamp: last.timestamp,
        pre_apply_checksum: first.pre_apply_checksum,
        ..Header::default()
    };
    let mut encoder = Encoder::new(out, header)?;
    while let Some((pgno, page)) = merger.next_page()? {
        if pgno <= header.commit {
            encoder.encode_page(pgno, page)?;
        }
    }
    let summaries = merger.finish()?;
    let post_apply = summaries
        .last()
        .map(|s| s.trailer.post_apply_checksum)
        .unwrap_or_default();
    encoder.finish(post_apply)
}

/// Writes the database image that `inputs` (a restore plan: a snapshot first, then contiguous
/// files, oldest to newest) produce: pages 1..=commit, the lock page as zeros. Every input is
/// fully verified. Returns the last input's header (its TXID is the restored position).
pub fn write_database<R: Read, W: Write>(inputs: Vec<R>, mut out: W) -> Result<Header> {
    let mut merger = Merger::new(inputs, false)?;
    let (first, last) = (merger.first_header(), merger.last_header());
    if !first.is_snapshot() {
        return Err(Error::Restore(format!(
            "the first file ({:016x}-{:016x}) is not a snapshot",
            first.min_txid, first.max_txid
        )));
    }
    let zeros = vec![0u8; first.page_size as usize];
    let mut next = 1u32;
    while let Some((pgno, page)) = merger.next_page()? {
        if pgno > last.commit {
            continue;
        }
        // A snapshot holds every page, so only the lock page can be missing here.
        while next < pgno {
            if next != last.lock_pgno() {
                return Err(Error::Restore(format!("page {next} is missing")));
            }
            out.write_all(&zeros)?;
            next += 1;
        }
        out.write_all(page)?;
        next = pgno + 1;
    }
    if next <= last.last_snapshot_pgno() {
        return Err(Error::Restore(format!(
            "pages {next}..={} are missing",
            last.commit
        )));
    }
    if next == last.commit {
        // The database ends with the lock page, which is never stored.
        out.write_all(&zeros)?;
    }
    out.flush()?;
    merger.finish()?;
    Ok(last)
}
