//! bucketdisk volumes.
//!
//! The NBD server talks to a volume only through the [`BlockDevice`] trait defined here, so the
//! protocol layer never learns where bytes live. [`FileVolume`] keeps a volume in one sparse local
//! file; it is the baseline the object-storage engine is measured against.
//!
//! Public beyond the crate: the device trait, the two volume types, and the chunk format and
//! chunk store (the benchmarks build volumes straight into a store). The journal, overlay,
//! cache and the rest are the engine's own (the block cache is reachable, hidden, for its
//! benchmark).

#[doc(hidden)]
pub mod cache;
mod checksum;
pub mod chunk;
pub mod chunk_store;
pub mod device;
mod fallocate;
mod fast_hash;
mod file_volume;
#[doc(hidden)]
pub mod fuzzing;
pub mod hex;
mod journal;
mod metadata;
pub mod object_volume;
mod overlay;
pub mod sealing;
mod shared_cache;
mod zeros;

pub use device::{
    BlockDevice, BlockSizes, Capabilities, DeviceError, DeviceResult, Extent, ExtentKind,
    ReadSegment, ZeroMode,
};
pub use file_volume::{FileVolume, validate_volume_name};
pub use metadata::VolumeMetadata;
pub use object_volume::{Durability, ObjectVolume, VolumeConfig};
