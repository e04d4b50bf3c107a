//! `--store URL` → an object store, the key prefix inside it, and the block map's replica
//! layout. Every backend is reached through the one `ObjectStore` trait
//! (docs/ARCHITECTURE.md §1), so this is the only place that knows which URL means which
//! backend.
//!
//! - `file:///abs/path` or a plain directory path: the embedded local-directory store, the
//!   default that needs nothing installed. It uses Litestream's file layout, so
//!   `litestream restore file://…/V/blockmap` works on it (docs/ARCHITECTURE.md §2).
//! - `s3://bucket/prefix`: S3 or any S3-compatible service, configured by the standard AWS_*
//!   environment (AWS_ENDPOINT_URL or AWS_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
//!   AWS_REGION, AWS_ALLOW_HTTP=true for a plain-HTTP endpoint).
//! - `memory://`: in-process, gone at exit (tests, benchmarks).

use crate::chaos::{Chaos, ChaosStore, FaultPlan};
use crate::faulty::FaultyStore;
use crate::local::LocalStore;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ClientConfigKey, ObjectStore};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How a replica's LTX levels are named under its root: Litestream names them differently on
/// directories and on buckets, and its tools expect its own names on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `ltx/<level>/`, as Litestream writes to file:// replicas.
    File,
    /// `<level as %04x>/`, as on S3-style object stores.
    ObjectStore,
}

/// Where volumes live: everything a volume needs to find its objects.
#[derive(Clone)]
pub struct StoreLocation {
    pub store: Arc<dyn ObjectStore>,
    /// Key prefix of every volume in the store (empty for a whole directory or bucket).
    pub prefix: Path,
    /// How the block map's LTX files are named, which differs between directories and buckets.
    pub layout: Layout,
    /// For messages: where the volumes are, as a URL a user can pass back to `--store`.
    pub description: String,
}

/// S3 regions matter for signing only; S3-compatible servers usually accept this one.
const DEFAULT_REGION: &str = "us-east-1";

/// Opens the store named by `url`; see the module docs for the accepted forms.
///
/// A local directory is created if missing, so the no-flags default works on a fresh machine.
/// Errors are `InvalidInput` for a URL that names no store, and the I/O error for a directory
/// that cannot be created. No network request is made: a bad S3 endpoint shows on first use.
pub fn open_store(url: &str) -> io::Result<StoreLocation> {
    if let Some(rest) = url.strip_prefix("s3://") {
        return s3(url, rest);
    }
    if url == "memory://" || url == "memory:" {
        return Ok(memory());
    }
    local(&local_dir(url)?)
}

fn invalid(url: &str, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "store {url:?}: {why} (use file:///absolute/path, a directory path, \
             s3://bucket/prefix or memory://)"
        ),
    )
}

fn memory() -> StoreLocation {
    StoreLocation {
        store: Arc::new(InMemory::new()),
        prefix: Path::default(),
        layout: Layout::ObjectStore,
        description: "memory://".into(),
    }
}

/// The directory a `file://` URL or a plain path names, made absolute against the current
/// directory (a relative `file://` URL is ambiguous, so it is refused rather than guessed).
fn local_dir(url: &str) -> io::Result<PathBuf> {
    match url.strip_prefix("file://") {
        Some(path) if path.starts_with('/') => Ok(PathBuf::from(path)),
        Some(_) => Err(invalid(url, "a file:// URL needs an absolute path")),
        None if url.contains("://") => Err(invalid(url, "unknown scheme")),
        None if url.is_empty() => Err(invalid(url, "empty")),
        None => std::path::absolute(url),
    }
}

fn local(dir: &std::path::Path) -> io::Result<StoreLocation> {
    std::fs::create_dir_all(dir)?;
    // Canonical, so messages show the real directory and not `a/../b`.
    let dir = std::fs::canonicalize(dir)?;
    let store = LocalStore::new(&dir)?;
    Ok(StoreLocation {
        store: Arc::new(store),
        prefix: Path::default(),
        layout: Layout::File,
        description: format!("file://{}", dir.display()),
    })
}

/// Splits `bucket/some/prefix` into the bucket and the prefix, without surrounding slashes.
fn bucket_and_prefix(rest: &str) -> (&str, &str) {
    match rest.split_once('/') {
        Some((bucket, prefix)) => (bucket, prefix.trim_matches('/')),
        None => (rest, ""),
    }
}

fn s3(url: &str, rest: &str) -> io::Result<StoreLocation> {
    let (bucket, prefix) = bucket_and_prefix(rest);
    if bucket.contains('@') {
        return Err(invalid(
            &redact_credentials(url),
            "credentials do not go in the URL: use AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        ));
    }
    if bucket.is_empty() {
        return Err(invalid(url, "no bucket name"));
    }
    if !bucket
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(invalid(
            url,
            "a bucket name is letters, digits, '.', '-' and '_'",
        ));
    }
    let store = s3_builder(bucket)?
        .build()
        .map_err(|e| invalid(url, &redact_credentials(&e.to_string())))?;
    Ok(StoreLocation {
        store: Arc::new(store),
        prefix: Path::from(prefix),
        layout: Layout::ObjectStore,
        description: url.to_string(),
    })
}

/// The AWS_* environment, with two things made explicit: AWS_ENDPOINT_URL wins over the older
/// AWS_ENDPOINT when both are set (`from_env` would take whichever it meets last), and the
/// region defaults to us-east-1 so a bare S3-compatible endpoint needs no region.
fn s3_builder(bucket: &str) -> io::Result<AmazonS3Builder> {
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if let Some(endpoint) = env("AWS_ENDPOINT_URL").or_else(|| env("AWS_ENDPOINT")) {
        // It would be printed in every error about a request: keep secrets out of it.
        if redact_credentials(&endpoint) != endpoint {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the S3 endpoint {} carries credentials: use AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY",
                    redact_credentials(&endpoint)
                ),
            ));
        }
        // A plain-HTTP endpoint never uses TLS: skip loading the system's root certificates,
        // a directory of files parsed at start-up (tens of ms of a boot that aims at 240).
        if endpoint.starts_with("http://") {
            builder = builder.with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::NoSystemCertificates),
                "true",
            );
        }
        builder = builder.with_endpoint(endpoint);
    }
    if env("AWS_REGION").is_none() && env("AWS_DEFAULT_REGION").is_none() {
        builder = builder.with_region(DEFAULT_REGION);
    }
    Ok(builder)
}

/// `text` with the user information of every URL in it (`scheme://user:password@host`)
/// replaced by `***`: what is printed about a store never carries its credentials.
pub fn redact_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        let authority_end = after
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace())
            .unwrap_or(after.len());
        match after[..authority_end].rfind('@') {
            Some(userinfo_end) => {
                out.push_str("***");
                rest = &after[userinfo_end..];
            }
            None => rest = after,
        }
    }
    out.push_str(rest);
    out
}

/// Delays every request to `store` by `latency`, so a local directory behaves like a remote
/// store's first byte (`serve --inject-latency`, for tests and benchmarks on one machine).
pub fn with_latency(store: Arc<dyn ObjectStore>, latency: Duration) -> Arc<dyn ObjectStore> {
    let slow = FaultyStore::new(store);
    slow.set_latency(latency);
    Arc::new(slow)
}

/// `store` with faults injected by `plan` (hidden `serve --inject-faults`), and the wrapper,
/// to read what it injected.
pub fn with_faults(
    store: Arc<dyn ObjectStore>,
    plan: FaultPlan,
) -> (Arc<dyn ObjectStore>, Arc<ChaosStore>) {
    let chaos = Arc::new(ChaosStore::with(store, Chaos::new(plan)));
    (Arc::clone(&chaos) as Arc<dyn ObjectStore>, chaos)
}

/// `store`, with the process killed (SIGKILL) just before the `n`th change it would make to it
/// (hidden `--crash-before-store-change`, for crash tests of every step of a verb).
pub fn with_crash_point(store: Arc<dyn ObjectStore>, n: u64) -> Arc<dyn ObjectStore> {
    let doomed = FaultyStore::new(store);
    doomed.crash_before_change(n);
    Arc::new(doomed)
}

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_in_urls_are_never_printed() {
        assert_eq!(
            redact_credentials("GET http://u:SECRET@host:9000/b?x=1 failed; s3://k:S2@bkt/p"),
            "GET http://***@host:9000/b?x=1 failed; s3://***@bkt/p"
        );
        assert_eq!(redact_credentials("http://host/a@b"), "http://host/a@b");
        assert_eq!(redact_credentials("no url"), "no url");
        let e = open_store("s3://AKIA:SECRETX@bkt/p")
            .err()
            .expect("refused")
            .to_string();
        assert!(!e.contains("SECRETX") && !e.contains("AKIA"), "{e}");
        assert!(e.contains("AWS_SECRET_ACCESS_KEY"), "{e}");
    }

    use super::*;

    #[test]
    fn file_urls_are_local_stores_and_create_the_directory() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let nested = dir.path().join("a/b");
        let loc = open_store(&format!("file://{}", nested.display()))?;
        assert_eq!(loc.layout, Layout::File);
        assert_eq!(loc.prefix, Path::default());
        assert!(nested.is_dir(), "created");
        let real = std::fs::canonicalize(&nested)?;
        assert_eq!(loc.description, format!("file://{}", real.display()));
        Ok(())
    }

    #[test]
    fn plain_paths_are_local_stores() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("plain");
        let loc = open_store(&path.to_string_lossy())?;
        assert_eq!(loc.layout, Layout::File);
        assert!(path.is_dir());
        Ok(())
    }

    #[test]
    fn relative_paths_are_made_absolute() -> io::Result<()> {
        // A temporary directory inside the current one, named relatively: cleaned up on drop.
        let here = tempfile::tempdir_in(".")?;
        let name = here.path().file_name().map(PathBuf::from);
        let relative = name.ok_or_else(|| io::Error::other("tempdir has no name"))?;
        let relative = relative.join("store");
        assert!(relative.is_relative());
        let loc = open_store(&relative.to_string_lossy())?;
        let expected = std::fs::canonicalize(here.path().join("store"))?;
        assert_eq!(loc.description, format!("file://{}", expected.display()));
        Ok(())
    }

    #[test]
    fn memory_is_an_object_store_layout() -> io::Result<()> {
        let loc = open_store("memory://")?;
        assert_eq!(loc.layout, Layout::ObjectStore);
        assert_eq!(loc.prefix, Path::default());
        assert_eq!(loc.description, "memory://");
        Ok(())
    }

    #[test]
    fn s3_urls_split_bucket_and_prefix() -> io::Result<()> {
        assert_eq!(bucket_and_prefix("bkt/vols/x/"), ("bkt", "vols/x"));
        assert_eq!(bucket_and_prefix("bkt/"), ("bkt", ""));
        assert_eq!(bucket_and_prefix("bkt"), ("bkt", ""));
        let loc = open_store("s3://bkt/vols/prod/")?;
        assert_eq!(loc.prefix, Path::from("vols/prod"));
        assert_eq!(loc.layout, Layout::ObjectStore);
        assert_eq!(loc.description, "s3://bkt/vols/prod/");
        assert_eq!(open_store("s3://bkt")?.prefix, Path::default());
        Ok(())
    }

    #[test]
    fn bad_urls_are_clear_errors() {
        for url in [
            "file://relative",
            "file://",
            "gs2://x",
            "s3://",
            "s3:///p",
            "",
        ] {
            match open_store(url) {
                Ok(_) => panic!("{url:?} was accepted"),
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{url}: {e}");
                    assert!(e.to_string().contains("s3://bucket/prefix"), "{e}");
                }
            }
        }
    }

    #[tokio::test]
    async fn with_latency_delays_requests() -> object_store::Result<()> {
        use object_store::ObjectStoreExt;
        let store = with_latency(Arc::new(InMemory::new()), Duration::from_millis(20));
        let start = std::time::Instant::now();
        store.put(&Path::from("x"), vec![1u8].into()).await?;
        assert!(start.elapsed() >= Duration::from_millis(20));
        Ok(())
    }
}
