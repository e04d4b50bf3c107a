//! A fast hasher for maps keyed by our own integers (block numbers, chunk ids and offsets):
//! nothing an attacker chooses, so SipHash's protection is not needed, and its cost showed on
//! every cached 4 KiB read.

use std::hash::{BuildHasherDefault, Hasher};

/// FxHash's multiply-rotate step, then murmur3's finaliser so that the low bits (which the
/// table indexes by) depend on every input bit: offsets within a chunk often differ only above
/// bit 16, and block numbers of one region only in their low bits.
#[derive(Default)]
pub struct FastHasher(u64);

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x
    }
}

pub type FastHashMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<FastHasher>>;
pub type FastHashSet<K> = std::collections::HashSet<K, BuildHasherDefault<FastHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn low_bits_spread_for_keys_that_differ_only_high() {
        let build = BuildHasherDefault::<FastHasher>::default();
        let buckets: std::collections::HashSet<u64> = (0..256u64)
            .map(|i| build.hash_one((7u64, 8 + (i << 16))) & 255)
            .collect();
        assert!(
            buckets.len() > 128,
            "only {} of 256 buckets used",
            buckets.len()
        );
    }
}
