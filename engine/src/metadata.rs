//! `volume.json`: what a volume is (name, size, block size), stored beside its data.

use serde::{Deserialize, Serialize};
use std::io;
use std::path::Path;

pub const METADATA_FILE: &str = "volume.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMetadata {
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    /// Storage format; lets a future engine refuse a volume it cannot read.
    pub format: String,
    /// Random identity given at creation. Local state (journal, cache) records the volume it
    /// belongs to, so a volume deleted and created again under the same name never replays
    /// another volume's journal.
    #[serde(default)]
    pub uuid: String,
    /// For a clone: the checkpoint it was made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Parent>,
    /// For a clone: whose chunks its ids up to each epoch are (oldest ancestor first; see
    /// `object_volume::clone`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inherits: Vec<Inherited>,
    /// For an encrypted volume: how its blocks are sealed and what tells its key (never the
    /// key). A clone keeps its source's: it reads the source's chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crate::sealing::Encryption>,
}

/// The checkpoint a clone was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parent {
    pub volume: String,
    pub checkpoint: String,
}

/// Chunk ids whose epoch is at most `through_epoch` (and above the previous entry's) live in
/// `volume`'s `chunks/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inherited {
    pub volume: String,
    pub through_epoch: u64,
    /// That volume's `uuid` (empty in clones made before it was recorded).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uuid: String,
}

impl VolumeMetadata {
    /// The tag cache keys carry for this volume's chunks: the same for every volume that
    /// reads them (see `ChunkStore::cache_key`).
    pub fn owner_tag(&self, root: &str) -> u64 {
        identity_tag(&self.uuid, root)
    }
}

impl Inherited {
    /// The tag cache keys carry for the chunks inherited from this ancestor.
    pub fn owner_tag(&self, root: &str) -> u64 {
        identity_tag(&self.uuid, root)
    }
}

/// A volume's uuid, or its root for volumes made before they had one, as a cache-key tag.
fn identity_tag(uuid: &str, root: &str) -> u64 {
    if uuid.is_empty() {
        crate::chunk_store::owner_tag(root)
    } else {
        crate::chunk_store::owner_tag(uuid)
    }
}

/// 128 random bits as hex, from the kernel's generator.
pub fn random_id() -> io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(crate::hex::encode(&bytes))
}

impl VolumeMetadata {
    pub fn load(dir: &Path) -> io::Result<Self> {
        let text = std::fs::read_to_string(dir.join(METADATA_FILE))?;
        serde_json::from_str(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", dir.join(METADATA_FILE).display()),
            )
        })
    }

    /// Writes the metadata atomically (temp file + rename + fsync of both).
    pub fn store(&self, dir: &Path) -> io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        let tmp = dir.join(format!("{METADATA_FILE}.tmp"));
        std::fs::write(&tmp, text.as_bytes())?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, dir.join(METADATA_FILE))?;
        std::fs::File::open(dir)?.sync_all()
    }
}
