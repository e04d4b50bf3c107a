//! The local-directory store: object_store's `LocalFileSystem`, made to keep S3's promises
//! without competing with the requests being served.
//!
//! - **Durable PUTs.** A PUT returns once the file and its directory entry are on disk
//!   (`with_fsync`), as a PUT to S3 returns once stored. The uploader trims the journal after a
//!   chunk's PUT and the map's upload: without the fsync, a power loss after the trim would lose
//!   blocks the map points at.
//! - **Writes at low priority.** Every PUT (chunks, map files) is written on threads at the
//!   lowest CPU and I/O priority ([`LowPriorityThreads`]) instead of tokio's blocking pool, so
//!   when the machine is short of CPU or disk, reads and writes being served go first and the
//!   upload takes what is left. A writer that outruns the uploads is held back by the journal
//!   limit as with any store.
//!
//! Everything else (GETs, listings, deletes, copies) is passed through unchanged.

use crate::low_priority::LowPriorityThreads;
use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};
use std::fmt;
use std::io;
use std::sync::Arc;

/// PUTs written at once: the uploader keeps two chunk PUTs in flight, and a map upload may
/// run beside them.
const WRITER_THREADS: usize = 2;

pub struct LocalStore {
    files: Arc<LocalFileSystem>,
    writers: LowPriorityThreads,
}

impl LocalStore {
    /// The store rooted at `dir`, which must exist.
    pub fn new(dir: &std::path::Path) -> io::Result<LocalStore> {
        let files = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| io::Error::other(format!("store {}: {e}", dir.display())))?
            .with_fsync(true);
        Ok(LocalStore {
            files: Arc::new(files),
            writers: LowPriorityThreads::start("store-writes", WRITER_THREADS)?,
        })
    }
}

impl fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LocalStore({:?})", self.files)
    }
}

impl fmt::Display for LocalStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LocalStore({})", self.files)
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let files = Arc::clone(&self.files);
        let location = location.clone();
        // Outside a tokio runtime `LocalFileSystem` does its blocking work on the calling
        // thread, which is what puts the write at the writer thread's priority.
        let written = self
            .writers
            .run(move || {
                Ok(futures::executor::block_on(
                    files.put_opts(&location, payload, opts),
                ))
            })
            .await;
        match written {
            Ok(result) => result,
            Err(e) => Err(object_store::Error::Generic {
                store: "LocalStore",
                source: Box::new(e),
            }),
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.files.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.files.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[std::ops::Range<u64>],
    ) -> Result<Vec<bytes::Bytes>> {
        self.files.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.files.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.files.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.files.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.files.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.files.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.files.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::{ObjectStoreExt, PutMode};

    #[tokio::test]
    async fn puts_land_in_the_directory_and_create_only_holds() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| object_store::Error::Generic {
            store: "test",
            source: Box::new(e),
        })?;
        let store = LocalStore::new(dir.path()).expect("store");
        let create = || PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let path = Path::from("vol/chunks/0000000000000001");
        store
            .put_opts(&path, PutPayload::from(vec![5u8; 1000]), create())
            .await?;
        let on_disk = std::fs::read(dir.path().join("vol/chunks/0000000000000001"))
            .expect("the chunk is a plain file under the store directory");
        assert_eq!(on_disk, vec![5u8; 1000]);
        let again = store
            .put_opts(&path, PutPayload::from(vec![6u8; 10]), create())
            .await;
        assert!(
            matches!(again, Err(object_store::Error::AlreadyExists { .. })),
            "a second create-only PUT of one key fails: {again:?}"
        );
        assert_eq!(store.get(&path).await?.bytes().await?.len(), 1000);
        let ranges = store.get_ranges(&path, &[0..10, 990..1000]).await?;
        assert_eq!(ranges.iter().map(|r| r.len()).sum::<usize>(), 20);
        Ok(())
    }

    #[tokio::test]
    async fn puts_from_many_tasks_all_finish() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(LocalStore::new(dir.path()).expect("store"));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..16u8 {
            let store = Arc::clone(&store);
            tasks.spawn(async move {
                store
                    .put(&Path::from(format!("d/{i}")), vec![i; 4096].into())
                    .await
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("task")?;
        }
        for i in 0..16u8 {
            let body = store
                .get(&Path::from(format!("d/{i}")))
                .await?
                .bytes()
                .await?;
            assert_eq!(body.as_ref(), vec![i; 4096].as_slice());
        }
        Ok(())
    }
}
