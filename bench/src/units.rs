//! Sizes on the command line, parsed as `bucketdisk` parses them; a benchmark volume must not
//! be empty.

/// `bucketdisk::units::parse_size`, refusing zero.
pub fn parse_size(text: &str) -> Result<u64, String> {
    match bucketdisk::units::parse_size(text)? {
        0 => Err(format!("size out of range: {text:?}")),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("2X").is_err());
        assert!(parse_size("0").is_err());
    }
}
