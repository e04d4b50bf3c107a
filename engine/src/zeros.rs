//! Telling zeros apart fast. A byte-at-a-time `all(|b| b == 0)` does not vectorise; OR-ing
//! 64-byte lanes does, and still stops at the first lane with data.

/// Whether every byte of `data` is zero.
pub fn is_zero(data: &[u8]) -> bool {
    let lanes = data.chunks_exact(64);
    let rest = lanes.remainder();
    lanes
        .into_iter()
        .all(|lane| lane.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && rest.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_single_byte_anywhere() {
        for len in [0usize, 1, 63, 64, 65, 4096, 4100] {
            let mut data = vec![0u8; len];
            assert!(is_zero(&data), "len {len}");
            for at in 0..len {
                data[at] = 1;
                assert!(!is_zero(&data), "len {len}, byte {at}");
                data[at] = 0;
            }
        }
    }
}
