//! The test volume: created with `bucketdisk create --engine file` (one raw file every peer can
//! serve), then filled with pseudo-random bytes so
//! that every read is a real read (no holes, no zero pages) for every subject.

use crate::process::output_of;
use crate::subjects::Volume;
use anyhow::{Context, Result, bail};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

const FILL_CHUNK: usize = 4 << 20;

/// Creates volume `name` of `size` bytes in a new store under `dir` and fills it.
pub fn create_filled(bucketdisk: &Path, dir: &Path, name: &str, size: u64) -> Result<Volume> {
    let store = dir.join("store");
    let store_url = format!("file://{}", store.display());
    let size_arg = size.to_string();
    output_of(
        &bucketdisk.to_string_lossy(),
        &[
            "create", name, "--engine", "file", "--size", &size_arg, "--store", &store_url,
        ],
    )
    .context("bucketdisk create")?;
    let file = store.join(name).join("disk.raw");
    let len = std::fs::metadata(&file)
        .with_context(|| format!("bucketdisk create made no {}", file.display()))?
        .len();
    if len != size {
        bail!("{} is {len} bytes, expected {size}", file.display());
    }
    fill(&file, size)?;
    Ok(Volume {
        store,
        name: name.to_string(),
        file,
    })
}

/// Overwrites the whole file with xorshift output (never all-zero words) and syncs it.
pub fn fill(path: &Path, size: u64) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; FILL_CHUNK];
    let mut left = size;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = usize::try_from(left.min(FILL_CHUNK as u64)).unwrap_or(FILL_CHUNK);
        file.write_all(&buf[..n])
            .with_context(|| format!("filling {}", path.display()))?;
        left -= n as u64;
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))
}

/// Writes dirty pages of the volume back so one run's writes do not slow the next run.
pub fn settle(volume: &Volume) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(&volume.file)
        .with_context(|| format!("opening {}", volume.file.display()))?;
    file.sync_data()
        .with_context(|| format!("syncing {}", volume.file.display()))
}
