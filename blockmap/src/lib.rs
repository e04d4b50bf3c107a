//! The block map of a volume: for every block in use, the chunk that holds it, where in the
//! chunk, how long its compressed form is and its checksum; plus per-chunk live-byte accounting
//! for garbage collection and the volume's metadata.
//!
//! An absent row means the block was never written or was trimmed: it reads as zeros and costs
//! nothing. The map is an ordinary SQLite database; how that database is stored (a local file,
//! or the Litestream-compatible VFS over object storage) is the caller's choice of connection.

pub mod compaction;
pub mod lease;
mod map;
pub mod open_hint;
pub mod replica;
mod schema;
pub mod vfs;
pub mod writer;

pub use ltx::RestoreTarget;
pub use map::{BlockLocation, BlockMap, ChunkStats, Error, MapChange, Result};
