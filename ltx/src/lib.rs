//! The LTX file format, byte-compatible with Litestream (format version 3, "LTX1" magic).
//!
//! An LTX file holds the pages one or more SQLite transactions changed:
//!
//! ```text
//! header (100 bytes) · page frames · 6 zero bytes · page index · u64 index size · trailer (16)
//! ```
//!
//! Each page frame is a 6-byte page header (pgno u32, flags u16) followed, when flag bit 0 is
//! set (Litestream ≥ 0.5.16), by a u32 compressed size and one LZ4 *block*; older writers
//! (0.5.0–0.5.15) used flags 0 and one LZ4 *frame* per page. Both are read; the block form is
//! written. The page index lists (pgno, frame offset, frame size) as unsigned varints so one
//! page can be fetched with a single ranged read. Integers are big-endian.
//!
//! This crate is pure: it reads from `Read` and writes to `Write`, nothing else.
//!
//! - [`Encoder`] streams pages into a file, building the index as it goes.
//! - [`Decoder`] streams pages out of a file and verifies every rule and checksum.
//! - [`page_index`] reads the index from a file's tail and decodes single frames, for random
//!   access with ranged reads.
//! - [`compact`] merges contiguous files (newest page wins) with one page buffer per input.
//! - [`restore`] plans which files rebuild a database at a TXID or a point in time.

pub mod checksum;
pub mod compactor;
pub mod decoder;
pub mod encoder;
mod error;
pub mod frame;
pub mod header;
pub mod naming;
pub mod page_index;
pub mod restore;
mod varint;

pub use checksum::{CHECKSUM_FLAG, Checksum, DatabaseChecksum, page_checksum};
pub use compactor::{CompactOptions, compact};
pub use decoder::{Decoder, FileSummary};
pub use encoder::Encoder;
pub use error::{Error, Result};
pub use header::{HEADER_FLAG_NO_CHECKSUM, HEADER_SIZE, Header, TRAILER_SIZE, Trailer, lock_pgno};
pub use naming::{FileName, level_dir};
pub use page_index::{IndexEntry, PageIndex};
pub use restore::{LtxFile, RestoreTarget, plan_restore};
