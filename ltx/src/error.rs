use std::io;

/// Everything that can be wrong with an LTX file or with how the crate was used. Each variant
/// says precisely which rule was broken, so a corrupt replica is diagnosable from the message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("not an LTX file: magic is {0:?}, expected \"LTX1\"")]
    BadMagic([u8; 4]),
    #[error("invalid LTX header: {0}")]
    InvalidHeader(String),
    #[error("invalid page frame at byte {offset}: {reason}")]
    InvalidPage { offset: u64, reason: String },
    #[error("invalid page index: {0}")]
    InvalidIndex(String),
    #[error("invalid LTX trailer: {0}")]
    InvalidTrailer(String),
    #[error(
        "file checksum mismatch: trailer says {stored:016x}, the content hashes to {computed:016x}"
    )]
    FileChecksumMismatch { stored: u64, computed: u64 },
    #[error(
        "post-apply checksum mismatch: trailer says {stored:016x}, the snapshot's pages give {computed:016x}"
    )]
    PostApplyChecksumMismatch { stored: u64, computed: u64 },
    #[error("truncated LTX file: {0}")]
    Truncated(String),
    #[error("{0}")]
    Usage(String),
    #[error("cannot compact: {0}")]
    Compaction(String),
    #[error("cannot plan restore: {0}")]
    Restore(String),
    /// A plan found TXIDs no file covers with files after them: a hole in the history (or in
    /// a listing made while files were being folded together, which listing again mends).
    #[error("cannot plan restore: {0}")]
    HistoryGap(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Turns an unexpected EOF into a `Truncated` error naming what was being read.
pub(crate) fn eof_as_truncated(e: io::Error, what: &str) -> Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Error::Truncated(format!("file ends inside the {what}"))
    } else {
        Error::Io(e)
    }
}
