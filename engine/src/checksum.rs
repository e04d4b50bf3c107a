//! CRC-32C (Castagnoli), used for journal records, chunk blocks and cache slots.
//!
//! On x86-64 with SSE4.2 the CPU's `crc32` instruction does it (tens of GB/s); elsewhere the
//! `crc` crate's slice-by-16 tables (a few GB/s). The crate's default, one table and a byte at a
//! time, ran at a few hundred MB/s and was the largest cost of a 1 MiB write.

use crc::{CRC_32_ISCSI, Crc, Table};

const CRC32C: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISCSI);

pub fn crc32c(data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("sse4.2") {
            // SAFETY: the CPU supports SSE4.2, checked just above.
            return unsafe { crc32c_sse42(data) };
        }
    }
    CRC32C.checksum(data)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn crc32c_sse42(data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u8, _mm_crc32_u64};
    let mut crc: u64 = 0xffff_ffff;
    let mut words = data.chunks_exact(8);
    for word in &mut words {
        let value = u64::from_le_bytes(word.try_into().unwrap_or([0; 8]));
        crc = _mm_crc32_u64(crc, value);
    }
    let mut crc = crc as u32;
    for &byte in words.remainder() {
        crc = _mm_crc32_u8(crc, byte);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_standard_check_value() {
        // The catalogue check value of CRC-32/ISCSI.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn hardware_and_table_agree_on_every_length_and_alignment() {
        let data: Vec<u8> = (0..4099u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
            .collect();
        for start in 0..9 {
            for len in [0, 1, 7, 8, 9, 63, 64, 65, 4000] {
                let slice = &data[start..start + len];
                assert_eq!(
                    crc32c(slice),
                    CRC32C.checksum(slice),
                    "start {start} len {len}"
                );
            }
        }
    }
}
