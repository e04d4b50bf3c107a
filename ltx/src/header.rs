//! The 100-byte header and 16-byte trailer, with Litestream's validation rules.

use crate::checksum::{CHECKSUM_FLAG, Checksum};
use crate::error::{Error, Result};

pub const MAGIC: &[u8; 4] = b"LTX1";
pub const HEADER_SIZE: usize = 100;
pub const PAGE_HEADER_SIZE: usize = 6;
pub const TRAILER_SIZE: usize = 16;

/// Database checksums are not tracked (pre/post-apply checksums are zero). Litestream sets it.
pub const HEADER_FLAG_NO_CHECKSUM: u32 = 1 << 1;
const HEADER_FLAG_MASK: u32 = HEADER_FLAG_NO_CHECKSUM;

/// Page frame flag: a u32 compressed size and an LZ4 block follow (else: one LZ4 frame).
pub const PAGE_FLAG_SIZE: u16 = 1 << 0;

/// SQLite's pending-byte offset; the page holding it (the lock page) is never stored.
const PENDING_BYTE: u64 = 0x4000_0000;

/// Page number of the lock page for a page size.
pub fn lock_pgno(page_size: u32) -> u32 {
    (PENDING_BYTE / u64::from(page_size.max(1))) as u32 + 1
}

pub fn is_valid_page_size(page_size: u32) -> bool {
    page_size.is_power_of_two() && (512..=65536).contains(&page_size)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub flags: u32,
    pub page_size: u32,
    /// Database size in pages after applying this file.
    pub commit: u32,
    pub min_txid: u64,
    pub max_txid: u64,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    pub pre_apply_checksum: Checksum,
    pub wal_offset: i64,
    pub wal_size: i64,
    pub wal_salt1: u32,
    pub wal_salt2: u32,
    pub node_id: u64,
}

impl Header {
    /// A file that starts at TXID 1 is a snapshot and must hold every page.
    pub fn is_snapshot(&self) -> bool {
        self.min_txid == 1
    }

    pub fn no_checksum(&self) -> bool {
        self.flags & HEADER_FLAG_NO_CHECKSUM != 0
    }

    pub fn lock_pgno(&self) -> u32 {
        lock_pgno(self.page_size)
    }

    /// The page a snapshot must hold after page `prev` (0 before its first page): pages are
    /// consecutive except that the lock page is skipped.
    pub fn next_snapshot_pgno(&self, prev: u32) -> u32 {
        if prev + 1 == self.lock_pgno() {
            prev + 2
        } else {
            prev + 1
        }
    }

    /// The last page a snapshot holds: `commit`, or the page before it if that is the lock page.
    pub fn last_snapshot_pgno(&self) -> u32 {
        if self.commit == self.lock_pgno() {
            self.commit - 1
        } else {
            self.commit
        }
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&self.flags.to_be_bytes());
        b[8..12].copy_from_slice(&self.page_size.to_be_bytes());
        b[12..16].copy_from_slice(&self.commit.to_be_bytes());
        b[16..24].copy_from_slice(&self.min_txid.to_be_bytes());
        b[24..32].copy_from_slice(&self.max_txid.to_be_bytes());
        b[32..40].copy_from_slice(&self.timestamp.to_be_bytes());
        b[40..48].copy_from_slice(&self.pre_apply_checksum.to_be_bytes());
        b[48..56].copy_from_slice(&self.wal_offset.to_be_bytes());
        b[56..64].copy_from_slice(&self.wal_size.to_be_bytes());
        b[64..68].copy_from_slice(&self.wal_salt1.to_be_bytes());
        b[68..72].copy_from_slice(&self.wal_salt2.to_be_bytes());
        b[72..80].copy_from_slice(&self.node_id.to_be_bytes());
        b
    }

    /// Parses a header; checks the magic only (call [`Header::validate`] for the rules).
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Result<Self> {
        let magic: [u8; 4] = b[0..4].try_into().expect("4 bytes");
        if &magic != MAGIC {
            return Err(Error::BadMagic(magic));
        }
        let u32_at = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Ok(Header {
            flags: u32_at(4),
            page_size: u32_at(8),
            commit: u32_at(12),
            min_txid: u64_at(16),
            max_txid: u64_at(24),
            timestamp: u64_at(32) as i64,
            pre_apply_checksum: u64_at(40),
            wal_offset: u64_at(48) as i64,
            wal_size: u64_at(56) as i64,
            wal_salt1: u32_at(64),
            wal_salt2: u32_at(68),
            node_id: u64_at(72),
        })
    }

    /// Litestream's header rules.
    pub fn validate(&self) -> Result<()> {
        let invalid = |m: String| Err(Error::InvalidHeader(m));
        if self.flags & !HEADER_FLAG_MASK != 0 {
            return invalid(format!("unknown flags {:#010x}", self.flags));
        }
        if !is_valid_page_size(self.page_size) {
            return invalid(format!(
                "page size {} is not a power of two from 512 to 65536",
                self.page_size
            ));
        }
        if self.min_txid == 0 || self.max_txid == 0 {
            return invalid("minimum and maximum TXID must be non-zero".into());
        }
        if self.min_txid > self.max_txid {
            return invalid(format!(
                "TXIDs out of order: min {} > max {}",
                self.min_txid, self.max_txid
            ));
        }
        if self.wal_offset < 0 || self.wal_size < 0 {
            return invalid("negative WAL offset or size".into());
        }
        if (self.wal_salt1 != 0 || self.wal_salt2 != 0) && self.wal_offset == 0 {
            return invalid("WAL salts set without a WAL offset".into());
        }
        if self.wal_offset == 0 && self.wal_size != 0 {
            return invalid("WAL size set without a WAL offset".into());
        }
        if self.is_snapshot() || self.no_checksum() {
            if self.pre_apply_checksum != 0 {
                return invalid(if self.is_snapshot() {
                    "a snapshot must have a zero pre-apply checksum".into()
                } else {
                    "pre-apply checksum set although checksums are not tracked".into()
                });
            }
        } else if self.pre_apply_checksum & CHECKSUM_FLAG == 0 {
            return invalid("pre-apply checksum missing or without its flag bit".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Trailer {
    pub post_apply_checksum: Checksum,
    pub file_checksum: Checksum,
}

impl Trailer {
    pub fn encode(&self) -> [u8; TRAILER_SIZE] {
        let mut b = [0u8; TRAILER_SIZE];
        b[0..8].copy_from_slice(&self.post_apply_checksum.to_be_bytes());
        b[8..16].copy_from_slice(&self.file_checksum.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; TRAILER_SIZE]) -> Self {
        Trailer {
            post_apply_checksum: u64::from_be_bytes(b[0..8].try_into().expect("8 bytes")),
            file_checksum: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
        }
    }

    pub fn validate(&self, header: &Header) -> Result<()> {
        let invalid = |m: &str| Err(Error::InvalidTrailer(m.to_string()));
        if header.no_checksum() {
            if self.post_apply_checksum != 0 {
                return invalid("post-apply checksum set although checksums are not tracked");
            }
        } else if self.post_apply_checksum & CHECKSUM_FLAG == 0 {
            return invalid("post-apply checksum missing or without its flag bit");
        }
        if self.file_checksum & CHECKSUM_FLAG == 0 {
            return invalid("file checksum missing or without its flag bit");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            flags: HEADER_FLAG_NO_CHECKSUM,
            page_size: 4096,
            commit: 3,
            min_txid: 2,
            max_txid: 5,
            timestamp: 1_700_000_000_000,
            ..Header::default()
        }
    }

    #[test]
    fn round_trip_and_magic() {
        let h = header();
        let bytes = h.encode();
        assert_eq!(Header::decode(&bytes).expect("decode"), h);
        let mut bad = bytes;
        bad[0] = b'X';
        assert!(matches!(Header::decode(&bad), Err(Error::BadMagic(_))));
    }

    #[test]
    fn validation_rules() {
        assert!(header().validate().is_ok());
        let broken = [
            Header {
                flags: 1,
                ..header()
            },
            Header {
                page_size: 1000,
                ..header()
            },
            Header {
                page_size: 256,
                ..header()
            },
            Header {
                min_txid: 0,
                ..header()
            },
            Header {
                min_txid: 6,
                ..header()
            },
            Header {
                wal_salt1: 1,
                ..header()
            },
            Header {
                wal_size: 10,
                ..header()
            },
            Header {
                pre_apply_checksum: CHECKSUM_FLAG | 1,
                ..header()
            },
            Header {
                flags: 0,
                pre_apply_checksum: 5,
                ..header()
            },
            Header {
                min_txid: 1,
                flags: 0,
                pre_apply_checksum: CHECKSUM_FLAG,
                ..header()
            },
        ];
        for h in broken {
            assert!(h.validate().is_err(), "{h:?}");
        }
    }

    #[test]
    fn snapshots_skip_the_lock_page() {
        let h = Header {
            page_size: 65536,
            min_txid: 1,
            commit: 16_385,
            ..header()
        };
        assert_eq!(h.next_snapshot_pgno(0), 1);
        assert_eq!(h.next_snapshot_pgno(16_383), 16_384);
        assert_eq!(h.next_snapshot_pgno(16_384), 16_386);
        assert_eq!(
            h.last_snapshot_pgno(),
            16_384,
            "a database ending on the lock page"
        );
        assert_eq!(
            Header {
                commit: 16_390,
                ..h
            }
            .last_snapshot_pgno(),
            16_390
        );
    }

    #[test]
    fn lock_page_numbers() {
        assert_eq!(lock_pgno(4096), 262_145);
        assert_eq!(lock_pgno(512), 2_097_153);
        assert_eq!(lock_pgno(65536), 16_385);
    }
}
