//! Chunks: immutable objects holding many blocks, each compressed on its own so that one block
//! is one ranged GET, with a self-describing index at the end (for GC and recovery without the
//! block map).
//!
//! ```text
//! "BDCHUNK1" · block payloads · index entries · u32 entry count · u32 CRC-32C of the index · "BDCHUNK1"
//! entry: block u64 · offset u64 · length u32 · checksum u32           (little-endian)
//! ```
//!
//! A payload is the block's LZ4 block encoding, or the raw block when compression would not
//! make it smaller (then its length equals the block size). Every block's checksum is the
//! CRC-32C of its uncompressed content; it is stored in the block map row and verified on every
//! read from storage, so a corrupt or misplaced block is an error, never data.
//!
//! An encrypted volume's payloads are sealed (see `sealing`): the payload above, sealed for the
//! place it lands in. Its checksum in the index and the map is then the CRC-32C of the sealed
//! bytes, which says nothing about the content; the seal's tag authenticates the content.

use crate::checksum::crc32c;
use crate::sealing::{ChunkSeal, Place, SealError};
use bytes::{BufMut, Bytes, BytesMut};

const MAGIC: &[u8; 8] = b"BDCHUNK1";
const ENTRY_LEN: usize = 24;

/// Bytes before a chunk's first block (its magic).
pub const HEADER_BYTES: u64 = MAGIC.len() as u64;

/// Bytes of `chunks` chunks holding `entries` blocks in all that are not block payloads: each
/// chunk's magic before its blocks, its index after them and its trailer (entry count, index
/// CRC, magic).
pub fn framing_bytes(chunks: u64, entries: u64) -> u64 {
    chunks * (HEADER_BYTES + 8 + MAGIC.len() as u64) + entries * ENTRY_LEN as u64
}
/// Bytes of a block tried first to decide whether compressing the rest is worth it, taken as
/// [`SAMPLE_SLICES`] slices spread over the block.
const SAMPLE_BYTES: usize = 4096;
const SAMPLE_SLICES: usize = 4;

/// CRC-32C of a block's content, as stored in the block map.
pub fn block_checksum(data: &[u8]) -> u32 {
    crc32c(data)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("block checksum mismatch: the map says {expected:08x}, the data gives {actual:08x}")]
    Checksum { expected: u32, actual: u32 },
    #[error("block payload does not decode: {0}")]
    Decode(String),
    #[error("chunk is malformed: {0}")]
    Malformed(String),
    #[error("sealed block: {0}")]
    Sealed(#[from] SealError),
}

/// Where a block landed in its chunk: exactly what the block map stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    pub block: u64,
    pub offset: u64,
    pub length: u32,
    pub checksum: u32,
}

/// A block just added to a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddedBlock {
    pub entry: ChunkEntry,
    /// CRC-32C of the block's content (the entry's checksum, unless the block is sealed).
    pub content_checksum: u32,
}

/// What seals an encrypted volume's blocks in one chunk.
struct Sealing {
    seal: ChunkSeal,
    /// The block being sealed (reused from block to block).
    sealed: Vec<u8>,
}

/// Builds one chunk from blocks of a fixed size.
pub struct ChunkBuilder {
    block_size: usize,
    body: BytesMut,
    entries: Vec<ChunkEntry>,
    scratch: Vec<u8>,
    sealing: Option<Sealing>,
}

impl ChunkBuilder {
    pub fn new(block_size: u32) -> Self {
        let mut body = BytesMut::with_capacity(4 << 20);
        body.put_slice(MAGIC);
        ChunkBuilder {
            block_size: block_size as usize,
            body,
            entries: Vec::new(),
            scratch: vec![0u8; lz4_flex::block::get_maximum_output_size(block_size as usize)],
            sealing: None,
        }
    }

    /// A builder for the chunk `seal` belongs to, sealing every block.
    pub fn sealed(block_size: u32, seal: ChunkSeal) -> Self {
        ChunkBuilder {
            sealing: Some(Sealing {
                seal,
                sealed: Vec::new(),
            }),
            ..Self::new(block_size)
        }
    }

    /// Bytes written so far (to decide when the chunk is big enough).
    pub fn len(&self) -> usize {
        self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends one block (exactly `block_size` bytes).
    pub fn add(&mut self, block: u64, data: &[u8]) -> Result<ChunkEntry, ChunkError> {
        self.add_block(block, data).map(|added| added.entry)
    }

    /// [`Self::add`], also returning the checksum of the block's content.
    pub fn add_block(&mut self, block: u64, data: &[u8]) -> Result<AddedBlock, ChunkError> {
        if data.len() != self.block_size {
            return Err(ChunkError::Malformed(format!(
                "block {block} is {} bytes, the block size is {}",
                data.len(),
                self.block_size
            )));
        }
        let payload = match self.compress(data)? {
            Some(compressed) => &self.scratch[..compressed],
            None => data, // incompressible: stored raw, recognisable by its full length
        };
        let content_checksum = block_checksum(data);
        let offset = self.body.len() as u64;
        let (stored, checksum) = match &mut self.sealing {
            None => (payload, content_checksum),
            Some(sealing) => {
                sealing.sealed.clear();
                sealing
                    .seal
                    .seal_into(Place { block, offset }, payload, &mut sealing.sealed)?;
                (&sealing.sealed[..], block_checksum(&sealing.sealed))
            }
        };
        let entry = ChunkEntry {
            block,
            offset,
            length: stored.len() as u32,
            checksum,
        };
        self.body.put_slice(stored);
        self.entries.push(entry);
        Ok(AddedBlock {
            entry,
            content_checksum,
        })
    }

    /// Compresses `data` into `scratch`; `None` if that would not save at least 1/16 of it
    /// (storing it raw then costs less to read back). Like ZFS's LZ4 "early abort", a block
    /// none of whose sample slices (spread over it: a block partly written, the rest zeros,
    /// compresses well whatever its first bytes are) shrinks by 1/8 is not tried in full:
    /// random or already-compressed data costs a sample, not a whole pass.
    fn compress(&mut self, data: &[u8]) -> Result<Option<usize>, ChunkError> {
        let lz4 = |input: &[u8], out: &mut Vec<u8>| {
            lz4_flex::block::compress_into(input, out)
                .map_err(|e| ChunkError::Decode(e.to_string()))
        };
        if data.len() >= 4 * SAMPLE_BYTES {
            let slice = SAMPLE_BYTES / SAMPLE_SLICES;
            let stride = data.len() / SAMPLE_SLICES;
            let mut worth_trying = false;
            for i in 0..SAMPLE_SLICES {
                let sample = &data[i * stride..i * stride + slice];
                if lz4(sample, &mut self.scratch)? <= slice - slice / 8 {
                    worth_trying = true;
                    break;
                }
            }
            if !worth_trying {
                return Ok(None);
            }
        }
        let compressed = lz4(data, &mut self.scratch)?;
        Ok((compressed <= self.block_size - self.block_size / 16).then_some(compressed))
    }

    /// Writes the index and trailer; returns the chunk and its entries.
    pub fn finish(mut self) -> (Bytes, Vec<ChunkEntry>) {
        let index_start = self.body.len();
        for e in &self.entries {
            self.body.put_u64_le(e.block);
            self.body.put_u64_le(e.offset);
            self.body.put_u32_le(e.length);
            self.body.put_u32_le(e.checksum);
        }
        let crc = crc32c(&self.body[index_start..]);
        self.body.put_u32_le(self.entries.len() as u32);
        self.body.put_u32_le(crc);
        self.body.put_slice(MAGIC);
        (self.body.freeze(), self.entries)
    }
}

/// Decodes one block payload (as fetched with a ranged GET) and verifies it against the
/// checksum from the block map.
pub fn decode_block(payload: &[u8], block_size: u32, checksum: u32) -> Result<Vec<u8>, ChunkError> {
    decode_block_bytes(Bytes::copy_from_slice(payload), block_size, checksum).map(Vec::from)
}

/// [`decode_block`] of a payload already in a shared buffer: a block stored raw is verified
/// and handed back as a slice of that buffer, without a copy (cold reads move hundreds of
/// MiB/s through here).
pub fn decode_block_bytes(
    payload: Bytes,
    block_size: u32,
    checksum: u32,
) -> Result<Bytes, ChunkError> {
    let data = expand(payload, block_size)?;
    matches_checksum(&data, checksum)?;
    Ok(data)
}

/// A block's content from its payload: the payload itself when stored raw (its length is the
/// block size), else decompressed.
fn expand(payload: Bytes, block_size: u32) -> Result<Bytes, ChunkError> {
    if payload.len() == block_size as usize {
        return Ok(payload);
    }
    let mut out = vec![0u8; block_size as usize];
    decompress_block(&payload, &mut out)?;
    Ok(Bytes::from(out))
}

/// What opens a sealed block: its chunk's seal, and the block of the disk the map says it holds
/// with its offset in the chunk.
#[derive(Clone, Copy)]
pub struct Opening<'a> {
    pub seal: &'a ChunkSeal,
    pub place: Place,
}

/// [`decode_block_bytes`] of a sealed block: its stored bytes are checked against `checksum`
/// (a CRC of the sealed bytes), opened (authenticating the content and its place), then
/// decompressed if they were compressed.
pub fn decode_sealed_block(
    payload: &[u8],
    block_size: u32,
    checksum: u32,
    opening: Opening<'_>,
) -> Result<Bytes, ChunkError> {
    matches_checksum(payload, checksum)?;
    let mut opened = Vec::with_capacity(payload.len());
    opening
        .seal
        .open_into(opening.place, payload, &mut opened)?;
    expand(Bytes::from(opened), block_size)
}

/// Buffers [`check_block`] reuses from block to block.
#[derive(Default)]
pub struct CheckScratch {
    opened: Vec<u8>,
    decompressed: Vec<u8>,
}

/// Checks a block payload as [`decode_block_bytes`] (or, given an `opening`,
/// [`decode_sealed_block`]) does, without keeping its bytes.
pub fn check_block(
    payload: &[u8],
    block_size: u32,
    checksum: u32,
    opening: Option<Opening<'_>>,
    scratch: &mut CheckScratch,
) -> Result<(), ChunkError> {
    let Some(opening) = opening else {
        // Plain: the content's checksum is the map's.
        if payload.len() == block_size as usize {
            return matches_checksum(payload, checksum);
        }
        scratch.decompressed.resize(block_size as usize, 0);
        decompress_block(payload, &mut scratch.decompressed)?;
        return matches_checksum(&scratch.decompressed, checksum);
    };
    // Sealed: the map's checksum is of the stored bytes; opening authenticates the content,
    // which only has to decompress.
    matches_checksum(payload, checksum)?;
    opening
        .seal
        .open_into(opening.place, payload, &mut scratch.opened)?;
    if scratch.opened.len() != block_size as usize {
        scratch.decompressed.resize(block_size as usize, 0);
        decompress_block(&scratch.opened, &mut scratch.decompressed)?;
    }
    Ok(())
}

/// Decompresses a stored block into `out`, which must come out exactly full.
fn decompress_block(payload: &[u8], out: &mut [u8]) -> Result<(), ChunkError> {
    let n = lz4_flex::block::decompress_into(payload, out)
        .map_err(|e| ChunkError::Decode(e.to_string()))?;
    if n != out.len() {
        return Err(ChunkError::Decode(format!(
            "{n} bytes, expected a {}-byte block",
            out.len()
        )));
    }
    Ok(())
}

fn matches_checksum(data: &[u8], checksum: u32) -> Result<(), ChunkError> {
    let actual = block_checksum(data);
    if actual != checksum {
        return Err(ChunkError::Checksum {
            expected: checksum,
            actual,
        });
    }
    Ok(())
}

/// Reads a whole chunk's index (for GC rewrites and recovery).
pub fn read_index(chunk: &[u8]) -> Result<Vec<ChunkEntry>, ChunkError> {
    let bad = |m: &str| ChunkError::Malformed(m.to_string());
    if chunk.len() < 2 * MAGIC.len() + 8
        || &chunk[..8] != MAGIC
        || &chunk[chunk.len() - 8..] != MAGIC
    {
        return Err(bad("missing chunk magic"));
    }
    let tail = chunk.len() - 8;
    let count = u32::from_le_bytes(chunk[tail - 8..tail - 4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(chunk[tail - 4..tail].try_into().expect("4 bytes"));
    let index_len = count
        .checked_mul(ENTRY_LEN)
        .ok_or_else(|| bad("entry count overflows"))?;
    let index_start = (tail - 8)
        .checked_sub(index_len)
        .filter(|s| *s >= 8)
        .ok_or_else(|| bad("index larger than the chunk"))?;
    let index = &chunk[index_start..tail - 8];
    if crc32c(index) != crc {
        return Err(bad("index checksum mismatch"));
    }
    let entries: Vec<ChunkEntry> = index
        .chunks_exact(ENTRY_LEN)
        .map(|e| ChunkEntry {
            block: u64::from_le_bytes(e[0..8].try_into().expect("8 bytes")),
            offset: u64::from_le_bytes(e[8..16].try_into().expect("8 bytes")),
            length: u32::from_le_bytes(e[16..20].try_into().expect("4 bytes")),
            checksum: u32::from_le_bytes(e[20..24].try_into().expect("4 bytes")),
        })
        .collect();
    if entries
        .iter()
        .any(|e| e.offset < 8 || e.offset + u64::from(e.length) > index_start as u64)
    {
        return Err(bad("an entry points outside the block area"));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_is_what_a_chunk_holds_besides_its_payloads() {
        let mut builder = ChunkBuilder::new(4096);
        let mut payloads = 0u64;
        for block in 0..5u64 {
            payloads += u64::from(
                builder
                    .add(block, &[block as u8; 4096])
                    .expect("add")
                    .length,
            );
        }
        let (chunk, _) = builder.finish();
        assert_eq!(chunk.len() as u64 - payloads, framing_bytes(1, 5));
    }
    use proptest::prelude::*;

    fn block(seed: u64, compressible: bool, size: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..size)
            .map(|i| {
                if compressible {
                    (i / 64) as u8 ^ seed as u8
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn blocks_round_trip_through_ranged_reads(kinds in prop::collection::vec(any::<bool>(), 1..40), shift in 12u32..17) {
            let size = 1usize << shift;
            let mut builder = ChunkBuilder::new(size as u32);
            let blocks: Vec<Vec<u8>> = kinds.iter().enumerate().map(|(i, c)| block(i as u64 + 1, *c, size)).collect();
            for (i, b) in blocks.iter().enumerate() {
                builder.add(i as u64 * 3, b).expect("add");
            }
            let (chunk, entries) = builder.finish();
            prop_assert_eq!(read_index(&chunk).expect("index"), entries.clone());
            for (e, b) in entries.iter().zip(&blocks) {
                let payload = &chunk[e.offset as usize..(e.offset + u64::from(e.length)) as usize];
                prop_assert_eq!(&decode_block(payload, size as u32, e.checksum).expect("decode"), b);
            }
        }
    }

    #[test]
    fn random_data_is_stored_raw_after_a_sample() {
        let size = 64 * 1024;
        let mut builder = ChunkBuilder::new(size as u32);
        let random = builder.add(1, &block(9, false, size)).expect("add");
        assert_eq!(random.length as usize, size, "incompressible: raw");
        // A block partly written (4 KiB of noise, then zeros, as a sparse or partial write
        // leaves it) compresses, whatever its first bytes are.
        let mut zeros_after_noise = block(9, false, SAMPLE_BYTES);
        zeros_after_noise.resize(size, 0);
        let partial = builder.add(2, &zeros_after_noise).expect("add");
        assert!(
            (partial.length as usize) < SAMPLE_BYTES + 512,
            "{} bytes",
            partial.length
        );
        let compressible = builder.add(3, &block(3, true, size)).expect("add");
        assert!((compressible.length as usize) < size / 4);
        let (chunk, entries) = builder.finish();
        for (e, seed) in entries
            .iter()
            .zip([&block(9, false, size), &zeros_after_noise])
        {
            let payload = &chunk[e.offset as usize..(e.offset + u64::from(e.length)) as usize];
            assert_eq!(
                &decode_block(payload, size as u32, e.checksum).expect("decode"),
                seed
            );
        }
    }

    #[test]
    fn corruption_is_an_error_never_data() {
        let mut builder = ChunkBuilder::new(4096);
        let e = builder.add(7, &block(1, true, 4096)).expect("add");
        let raw = builder.add(8, &block(2, false, 4096)).expect("add");
        assert_eq!(raw.length, 4096, "incompressible blocks are stored raw");
        let (chunk, _) = builder.finish();
        let payload = chunk[e.offset as usize..(e.offset + u64::from(e.length)) as usize].to_vec();
        // Wrong checksum (a map row pointing at the wrong block).
        assert!(matches!(
            decode_block(&payload, 4096, e.checksum ^ 1),
            Err(ChunkError::Checksum { .. })
        ));
        // A flipped bit in the payload.
        let mut bad = payload.clone();
        let middle = bad.len() / 2;
        bad[middle] ^= 0x10;
        assert!(decode_block(&bad, 4096, e.checksum).is_err());
        let mut raw_bad = chunk[raw.offset as usize..(raw.offset + 4096) as usize].to_vec();
        raw_bad[100] ^= 1;
        assert!(matches!(
            decode_block(&raw_bad, 4096, raw.checksum),
            Err(ChunkError::Checksum { .. })
        ));
        // A damaged index.
        let mut damaged = chunk.to_vec();
        let at = damaged.len() - 20;
        damaged[at] ^= 1;
        assert!(read_index(&damaged).is_err());
        assert!(read_index(b"short").is_err());
        assert!(ChunkBuilder::new(4096).add(1, &[0u8; 10]).is_err());
    }
}
