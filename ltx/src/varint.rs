//! Unsigned LEB128 varints, as Go's `binary.AppendUvarint` / `ReadUvarint` write and read them.

/// Appends `value` as an unsigned varint.
pub fn put(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads one varint from the front of `input`; returns it and the bytes consumed.
/// `None` if the input ends first or the value overflows 64 bits.
pub fn get(input: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &byte) in input.iter().enumerate().take(10) {
        let bits = u64::from(byte & 0x7f);
        if i == 9 && byte > 1 {
            return None; // more than 64 bits
        }
        value |= bits << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_edge_values() {
        for v in [0, 1, 127, 128, 300, 16383, 16384, u32::MAX as u64, u64::MAX] {
            let mut buf = Vec::new();
            put(&mut buf, v);
            assert_eq!(get(&buf), Some((v, buf.len())), "{v}");
        }
        assert_eq!(get(&[0x80, 0x80]), None, "truncated");
        assert_eq!(get(&[0xff; 11]), None, "overflow");
    }
}
