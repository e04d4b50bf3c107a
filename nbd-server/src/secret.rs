//! Secret files (TLS private keys, pre-shared keys, the metrics token): read only if no one but
//! their owner may read them, and never echoed into errors or logs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} can be read by group or others (mode {mode:03o}): a secret must be its \
         owner's alone (chmod 600)"
    )]
    Permissions { path: PathBuf, mode: u32 },
}

/// The bytes of the secret file at `path`.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, SecretError> {
    let read = |source| SecretError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mode = std::fs::metadata(path).map_err(read)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(SecretError::Permissions {
            path: path.to_path_buf(),
            mode: mode & 0o777,
        });
    }
    std::fs::read(path).map_err(read)
}
