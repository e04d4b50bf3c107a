//! The checked-out workspace: where it is, and its release `bucketdisk` built from it.

use anyhow::{Context, Result, ensure};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (bench/ is one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Builds the release `bucketdisk` so results always match the checked-out source.
fn build_bucketdisk(workspace: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("bench: building bucketdisk (release)");
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "bucketdisk",
            "--bin",
            "bucketdisk",
        ])
        .current_dir(workspace)
        .status()
        .context("running cargo build")?;
    ensure!(
        status.success(),
        "cargo build --release -p bucketdisk failed ({status})"
    );
    Ok(workspace.join("target").join("release").join("bucketdisk"))
}

/// The `bucketdisk` to measure: `given`, or the one built from this workspace; absolute.
pub fn bucketdisk_binary(given: Option<&Path>, workspace: &Path) -> Result<PathBuf> {
    let bin = match given {
        Some(p) => p.to_path_buf(),
        None => build_bucketdisk(workspace)?,
    };
    bin.canonicalize()
        .with_context(|| format!("bucketdisk binary {}", bin.display()))
}

/// What every suite that starts servers takes: the binary under test, where scratch goes and
/// where results go.
#[derive(Debug, clap::Args)]
pub struct Places {
    /// A prebuilt bucketdisk; by default this workspace's is built (release) and used.
    #[arg(long)]
    pub bucketdisk: Option<PathBuf>,
    /// Where the scratch directories (stores, caches, kept server logs) go.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    pub dir: PathBuf,
    /// Where results go [bench/results].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep the scratch directory (server logs, stores) when the suite ends, to inspect it.
    #[arg(long)]
    pub keep_scratch: bool,
}

impl Places {
    /// Where results go: `--out`, or bench/results of `workspace`.
    pub fn out_dir(&self, workspace: &Path) -> PathBuf {
        self.out
            .clone()
            .unwrap_or_else(|| workspace.join("bench").join("results"))
    }

    /// A new scratch directory under `--dir`, named `<prefix>XXXXXX`, deleted when dropped.
    pub fn scratch(&self, prefix: &str) -> Result<tempfile::TempDir> {
        let mut dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&self.dir)
            .with_context(|| format!("creating a scratch directory in {}", self.dir.display()))?;
        if self.keep_scratch {
            dir.disable_cleanup(true);
            eprintln!("bench: scratch kept in {}", dir.path().display());
        }
        Ok(dir)
    }
}

/// `work/name`, emptied (or made): a scratch directory a step starts from nothing in.
pub fn fresh_dir(work: &Path, name: &str) -> Result<PathBuf> {
    let dir = work.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
