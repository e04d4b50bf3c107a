//! Page frame payloads: the LZ4 block form written since Litestream 0.5.16, and the LZ4 frame
//! form of 0.5.0–0.5.15 (read only).

use crate::header::{PAGE_FLAG_SIZE, PAGE_HEADER_SIZE};
use std::io::{self, Read};

/// Largest compressed size an LZ4 block of `page_size` bytes can have.
pub fn compress_bound(page_size: u32) -> usize {
    lz4_flex::block::get_maximum_output_size(page_size as usize)
}

/// Compresses one page as an LZ4 block into `out` (sized by [`compress_bound`]); returns the
/// compressed length.
pub(crate) fn compress_page(page: &[u8], out: &mut [u8]) -> Result<usize, String> {
    lz4_flex::block::compress_into(page, out).map_err(|e| format!("LZ4 compression failed: {e}"))
}

/// Decompresses an LZ4 block that must expand to exactly `out.len()` bytes.
pub fn decompress_block(compressed: &[u8], out: &mut [u8]) -> Result<(), String> {
    let n = lz4_flex::block::decompress_into(compressed, out)
        .map_err(|e| format!("LZ4 block does not decompress: {e}"))?;
    if n != out.len() {
        return Err(format!(
            "LZ4 block decompresses to {n} bytes, expected a {}-byte page",
            out.len()
        ));
    }
    Ok(())
}

const LZ4_FRAME_MAGIC: u32 = 0x184D_2204;

/// Reads one legacy LZ4 frame from `r` into `out`, consuming exactly the frame's bytes, and
/// returns how many bytes that was. The frame must expand to exactly `out.len()` bytes.
/// Header and content checksums (xxhash) are skipped, not verified: the LTX file checksum
/// covers the decompressed page anyway.
pub(crate) fn read_lz4_frame<R: Read>(r: &mut R, out: &mut [u8]) -> Result<u64, String> {
    let io = |e: io::Error| format!("reading legacy LZ4 frame: {e}");
    let mut consumed = 0u64;
    let mut take = |r: &mut R, buf: &mut [u8]| -> Result<(), String> {
        r.read_exact(buf).map_err(io)?;
        consumed += buf.len() as u64;
        Ok(())
    };
    let mut head = [0u8; 6];
    take(r, &mut head)?;
    let magic = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
    if magic != LZ4_FRAME_MAGIC {
        return Err(format!(
            "page data is neither an LZ4 block (flag 0x1 unset) nor an LZ4 frame (magic {magic:#x})"
        ));
    }
    let (flg, bd) = (head[4], head[5]);
    if flg >> 6 != 0b01 {
        return Err(format!("unsupported LZ4 frame version in FLG {flg:#04x}"));
    }
    if flg & 0b10 != 0 || bd & 0b1000_1111 != 0 {
        return Err("reserved bits set in the LZ4 frame descriptor".into());
    }
    if flg & 0b1 != 0 {
        return Err("LZ4 frames with a dictionary id are not supported".into());
    }
    let independent = flg & 0b10_0000 != 0;
    let block_checksums = flg & 0b1_0000 != 0;
    let content_size = flg & 0b1000 != 0;
    let content_checksum = flg & 0b100 != 0;
    let max_block = match (bd >> 4) & 0b111 {
        4 => 64 << 10,
        5 => 256 << 10,
        6 => 1 << 20,
        7 => 4 << 20,
        other => return Err(format!("invalid LZ4 block size code {other}")),
    };
    let mut skip = [0u8; 9];
    let optional = if content_size { 8 } else { 0 } + 1; // + header checksum byte
    take(r, &mut skip[..optional])?;

    let mut filled = 0usize;
    let mut block = Vec::new();
    loop {
        let mut size = [0u8; 4];
        take(r, &mut size)?;
        let size = u32::from_le_bytes(size);
        if size == 0 {
            break; // end mark
        }
        let stored = size & 0x8000_0000 != 0;
        let len = (size & 0x7fff_ffff) as usize;
        if len > max_block {
            return Err(format!(
                "LZ4 block of {len} bytes exceeds the frame's {max_block}"
            ));
        }
        block.resize(len, 0);
        take(r, &mut block)?;
        if block_checksums {
            take(r, &mut [0u8; 4])?;
        }
        let room = out.len() - filled;
        if stored {
            if len > room {
                return Err("LZ4 frame expands beyond the page size".into());
            }
            out[filled..filled + len].copy_from_slice(&block);
            filled += len;
        } else {
            let (done, rest) = out.split_at_mut(filled);
            let dict: &[u8] = if independent { &[] } else { done };
            let n = lz4_flex::block::decompress_into_with_dict(&block, rest, dict)
                .map_err(|e| format!("LZ4 frame block does not decompress: {e}"))?;
            filled += n;
        }
    }
    if content_checksum {
        take(r, &mut [0u8; 4])?;
    }
    if filled != out.len() {
        return Err(format!(
            "LZ4 frame decompresses to {filled} bytes, expected a {}-byte page",
            out.len()
        ));
    }
    Ok(consumed)
}

/// Decodes one whole page frame (page header + payload) fetched on its own, e.g. by a ranged
/// read found through the page index. Returns the page number; the page goes into `out`,
/// which must be one page long.
pub fn decode_frame(frame: &[u8], out: &mut [u8]) -> crate::Result<u32> {
    let invalid = |reason: String| crate::Error::InvalidPage { offset: 0, reason };
    if frame.len() < PAGE_HEADER_SIZE {
        return Err(invalid(format!(
            "frame of {} bytes is too short",
            frame.len()
        )));
    }
    let pgno = u32::from_be_bytes(frame[0..4].try_into().expect("4 bytes"));
    let flags = u16::from_be_bytes(frame[4..6].try_into().expect("2 bytes"));
    if pgno == 0 {
        return Err(invalid("page number 0".into()));
    }
    if flags & !PAGE_FLAG_SIZE != 0 {
        return Err(invalid(format!("unknown page flags {flags:#06x}")));
    }
    let body = &frame[PAGE_HEADER_SIZE..];
    if flags & PAGE_FLAG_SIZE != 0 {
        if body.len() < 4 {
            return Err(invalid("frame ends before its size field".into()));
        }
        let size = u32::from_be_bytes(body[0..4].try_into().expect("4 bytes")) as usize;
        if body.len() != 4 + size {
            return Err(invalid(format!(
                "frame holds {} payload bytes, its size field says {size}",
                body.len() - 4
            )));
        }
        decompress_block(&body[4..], out).map_err(invalid)?;
    } else {
        let mut cursor = body;
        let used = read_lz4_frame(&mut cursor, out).map_err(invalid)?;
        if used as usize != body.len() {
            return Err(invalid("bytes left over after the LZ4 frame".into()));
        }
    }
    Ok(pgno)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn page(seed: u8) -> Vec<u8> {
        (0..4096u32)
            .map(|i| (i as u8).wrapping_mul(seed) ^ (i >> 7) as u8)
            .collect()
    }

    #[test]
    fn legacy_frames_from_an_independent_encoder_decode() {
        let data = page(7);
        let mut enc = lz4_flex::frame::FrameEncoder::new(Vec::new());
        enc.write_all(&data).expect("encode");
        let mut frame = enc.finish().expect("finish");
        let frame_len = frame.len();
        frame.extend_from_slice(b"next"); // the reader must stop exactly at the frame's end
        let mut out = vec![0u8; 4096];
        let mut cursor = &frame[..];
        let used = read_lz4_frame(&mut cursor, &mut out).expect("decode");
        assert_eq!(used as usize, frame_len);
        assert_eq!(cursor, b"next");
        assert_eq!(out, data);
    }

    #[test]
    fn wrong_sizes_are_errors() {
        let data = page(3);
        let compressed = lz4_flex::block::compress(&data);
        let mut small = vec![0u8; 2048];
        assert!(decompress_block(&compressed, &mut small).is_err());
        let mut big = vec![0u8; 8192];
        assert!(decompress_block(&compressed, &mut big).is_err());
        let mut garbage = vec![0u8; 4096];
        assert!(decompress_block(&[0xff, 0xff, 0xff], &mut garbage).is_err());
    }
}
