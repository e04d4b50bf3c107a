//! Lower-case hexadecimal, for ids, key check values and keys given as text.

/// `bytes` as two lower-case hex digits each.
pub fn encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes `hex` spells, two digits each (either case); `None` for an odd length or a
/// character that is not a hex digit.
pub fn decode(hex: &[u8]) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16);
    hex.chunks(2)
        .map(|pair| Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trips_and_refuses_what_is_not_hex() {
        assert_eq!(super::encode(&[0x00, 0xab, 0x7f]), "00ab7f");
        assert_eq!(super::decode(b"00aB7f"), Some(vec![0x00, 0xab, 0x7f]));
        assert_eq!(super::decode(b"abc"), None);
        assert_eq!(super::decode(b"zz"), None);
    }
}
