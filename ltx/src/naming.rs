//! LTX object names: `%016x-%016x.ltx` inside a directory per compaction level.

use std::fmt;

/// The TXID range an LTX file's name states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileName {
    pub min_txid: u64,
    pub max_txid: u64,
}

impl FileName {
    /// Parses `0000000000000001-0000000000000007.ltx` (lowercase hex, exactly 16 digits each).
    pub fn parse(name: &str) -> Option<Self> {
        let stem = name.strip_suffix(".ltx")?;
        let (min, max) = stem.split_once('-')?;
        let hex16 = |s: &str| {
            (s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
                .then(|| u64::from_str_radix(s, 16).ok())
                .flatten()
        };
        Some(FileName {
            min_txid: hex16(min)?,
            max_txid: hex16(max)?,
        })
    }
}

impl fmt::Display for FileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{:016x}.ltx", self.min_txid, self.max_txid)
    }
}

/// The level holding full snapshots.
pub const SNAPSHOT_LEVEL: u8 = 9;

/// Directory of a level relative to a replica root: `ltx/<level>` on file-like stores,
/// `<level as %04x>` on S3-style object stores.
pub fn level_dir(level: u8, object_store_layout: bool) -> String {
    if object_store_layout {
        format!("{level:04x}")
    } else {
        format!("ltx/{level}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let n = FileName::parse("0000000000000001-00000000000000ff.ltx").expect("valid");
        assert_eq!((n.min_txid, n.max_txid), (1, 255));
        assert_eq!(n.to_string(), "0000000000000001-00000000000000ff.ltx");
        for bad in [
            "1-2.ltx",
            "0000000000000001-00000000000000FF.ltx",
            "0000000000000001-0000000000000002",
            "x",
        ] {
            assert!(FileName::parse(bad).is_none(), "{bad}");
        }
        assert_eq!(level_dir(9, false), "ltx/9");
        assert_eq!(level_dir(9, true), "0009");
    }
}
