//! bucketdisk volumes.
//!
//! The NBD server talks to a volume only through the [`BlockDevice`] trait defined here, so the
//! protocol layer never learns where bytes live. [`FileVolume`] keeps a volume in one sparse local
//! file; it is the baseline the object-storage engine is measured against.

pub mod cache;
pub mod checksum;
pub mod chunk;
pub mod chunk_store;
pub mod device;
pub mod fallocate;
pub mod fast_hash;
pub mod file_volume;
pub mod journal;
pub mod metadata;
pub mod object_volume;
pub mod overlay;
pub mod zeros;

pub use device::{
    BlockDevice, BlockSizes, Capabilities, DeviceError, DeviceResult, Extent, ExtentKind,
    ReadSegment, ZeroMode,
};
pub use file_volume::FileVolume;
pub use metadata::VolumeMetadata;
pub use object_volume::{Durability, ObjectVolume, VolumeConfig};
