//! `--key-file`: the key of encrypted volumes, for the verbs that open or create them.

use anyhow::{Context, Result};
use clap::Args;
use engine::sealing::{KEY_ENV, VolumeKey};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args)]
pub(crate) struct KeyArgs {
    /// Key of encrypted volumes: a file of 64 hex digits or 32 raw bytes (`openssl rand -hex
    /// 32 > FILE; chmod 600 FILE`), readable by its owner only. The key may instead be given as
    /// 64 hex digits in BUCKETDISK_KEY. It is never stored in the bucket: lose it and the
    /// volume's data is gone.
    #[arg(long, env = "BUCKETDISK_KEY_FILE", value_name = "FILE")]
    pub(crate) key_file: Option<PathBuf>,
}

impl KeyArgs {
    /// The key given, if any: the file's, else `BUCKETDISK_KEY`'s.
    pub(crate) fn key(&self) -> Result<Option<Arc<VolumeKey>>> {
        if let Some(path) = &self.key_file {
            let bytes = nbd_server::secret::read_secret(path).context("--key-file")?;
            let key = VolumeKey::from_file_bytes(bytes)
                .with_context(|| format!("--key-file {}", path.display()))?;
            return Ok(Some(Arc::new(key)));
        }
        match std::env::var(KEY_ENV) {
            Ok(hex) => {
                let key = VolumeKey::from_hex(&hex).context(KEY_ENV)?;
                Ok(Some(Arc::new(key)))
            }
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                anyhow::bail!("{KEY_ENV}: a key is 64 hex digits")
            }
        }
    }
}
