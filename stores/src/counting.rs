//! An `ObjectStore` wrapper that counts requests and bytes, for the metrics endpoint and for
//! benchmarks that report S3 traffic.
//!
//! Wrapping the trait once, instead of counting at every call site, means nothing that reaches
//! the store can bypass the counters. Only what this wrapper can observe is counted: a request
//! the inner store retries internally is one request here, a paged listing is one LIST, and a
//! bulk delete counts one DELETE per object (the batching is invisible from outside).

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result, UploadPart,
};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a [`CountingStore`]'s counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounts {
    /// GETs with a body, whole or ranged (each range of `get_ranges` after coalescing is one).
    pub get_requests: u64,
    /// PUTs, multipart initiations, parts and completions, and server-side copies.
    pub put_requests: u64,
    /// LIST calls (one per listing, however many pages the inner store fetches).
    pub list_requests: u64,
    /// Objects deleted (bulk deletes count each object).
    pub delete_requests: u64,
    /// HEADs (`GetOptions::head`).
    pub head_requests: u64,
    /// Bytes the store answered GETs with, counted when the response arrives.
    pub bytes_read: u64,
    /// Payload bytes of successful PUTs and multipart parts.
    pub bytes_written: u64,
}

/// The live counters, shared with multipart uploads that outlive the call that started them.
#[derive(Debug, Default)]
struct Counters {
    get_requests: AtomicU64,
    put_requests: AtomicU64,
    list_requests: AtomicU64,
    delete_requests: AtomicU64,
    head_requests: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

/// Relaxed is enough: each counter is independent and only ever read as a statistic.
fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> StoreCounts {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StoreCounts {
            get_requests: load(&self.get_requests),
            put_requests: load(&self.put_requests),
            list_requests: load(&self.list_requests),
            delete_requests: load(&self.delete_requests),
            head_requests: load(&self.head_requests),
            bytes_read: load(&self.bytes_read),
            bytes_written: load(&self.bytes_written),
        }
    }
}

/// Delegates every call to `inner`, counting requests and bytes on the way.
#[derive(Debug)]
pub struct CountingStore {
    inner: Arc<dyn ObjectStore>,
    counters: Arc<Counters>,
}

impl CountingStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        CountingStore {
            inner,
            counters: Arc::default(),
        }
    }

    /// The counters so far (each field read separately: not one atomic snapshot).
    pub fn counts(&self) -> StoreCounts {
        self.counters.snapshot()
    }

    /// Counts a finished GET. The bytes are those the store said it is sending (`range`), so
    /// the body stream is passed through untouched instead of being buffered to be measured.
    fn count_get(&self, head: bool, result: &Result<GetResult>) {
        if head {
            bump(&self.counters.head_requests, 1);
            return;
        }
        bump(&self.counters.get_requests, 1);
        if let Ok(got) = result {
            let len = got.range.end.saturating_sub(got.range.start);
            bump(&self.counters.bytes_read, len);
        }
    }
}

impl fmt::Display for CountingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CountingStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for CountingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        bump(&self.counters.put_requests, 1);
        let len = payload.content_length() as u64;
        let put = self.inner.put_opts(location, payload, opts).await?;
        bump(&self.counters.bytes_written, len);
        Ok(put)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        bump(&self.counters.put_requests, 1);
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(CountingUpload {
            inner,
            counters: Arc::clone(&self.counters),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let head = options.head;
        let result = self.inner.get_opts(location, options).await;
        self.count_get(head, &result);
        result
    }

    // `get_ranges` keeps the trait's default on purpose: it coalesces the ranges and fetches
    // them through `self.get_range` → `get_opts`, so each real request is counted.

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let counters = Arc::clone(&self.counters);
        let counted = locations
            .inspect(move |location| {
                if location.is_ok() {
                    bump(&counters.delete_requests, 1);
                }
            })
            .boxed();
        self.inner.delete_stream(counted)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        bump(&self.counters.list_requests, 1);
        self.inner.list(prefix)
    }

    /// Delegated rather than left to the default so that S3 keeps pushing `offset` down.
    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        bump(&self.counters.list_requests, 1);
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        bump(&self.counters.list_requests, 1);
        self.inner.list_with_delimiter(prefix).await
    }

    /// A server-side copy is a PUT on S3; no bytes cross the wire.
    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        bump(&self.counters.put_requests, 1);
        self.inner.copy_opts(from, to, options).await
    }

    /// Delegated so a local directory keeps its atomic rename instead of the default copy +
    /// delete; counted as that copy + delete, which is what it costs on S3.
    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        bump(&self.counters.put_requests, 1);
        bump(&self.counters.delete_requests, 1);
        self.inner.rename_opts(from, to, options).await
    }
}

/// A multipart upload whose parts and completion are counted as PUTs.
#[derive(Debug)]
struct CountingUpload {
    inner: Box<dyn MultipartUpload>,
    counters: Arc<Counters>,
}

#[async_trait]
impl MultipartUpload for CountingUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        bump(&self.counters.put_requests, 1);
        let len = data.content_length() as u64;
        let part = self.inner.put_part(data);
        let counters = Arc::clone(&self.counters);
        Box::pin(async move {
            part.await?;
            bump(&counters.bytes_written, len);
            Ok(())
        })
    }

    async fn complete(&mut self) -> Result<PutResult> {
        bump(&self.counters.put_requests, 1);
        self.inner.complete().await
    }

    async fn abort(&mut self) -> Result<()> {
        bump(&self.counters.delete_requests, 1);
        self.inner.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

    fn store() -> CountingStore {
        CountingStore::new(Arc::new(InMemory::new()))
    }

    #[tokio::test]
    async fn counts_puts_gets_heads_and_bytes() -> Result<()> {
        let store = store();
        store.put(&Path::from("a"), vec![7u8; 100].into()).await?;
        store.put(&Path::from("b"), vec![8u8; 50].into()).await?;
        let whole = store.get(&Path::from("a")).await?.bytes().await?;
        assert_eq!(whole.len(), 100);
        let part = store.get_range(&Path::from("b"), 10..30).await?;
        assert_eq!(part.len(), 20);
        assert_eq!(store.head(&Path::from("a")).await?.size, 100);
        assert!(store.get(&Path::from("missing")).await.is_err());

        let counts = store.counts();
        assert_eq!(counts.put_requests, 2);
        assert_eq!(counts.bytes_written, 150);
        assert_eq!(counts.get_requests, 3, "whole, ranged and the failed one");
        assert_eq!(counts.bytes_read, 120);
        assert_eq!(counts.head_requests, 1);
        Ok(())
    }

    #[tokio::test]
    async fn counts_lists_and_deletes() -> Result<()> {
        let store = store();
        for name in ["d/1", "d/2", "d/3"] {
            store.put(&Path::from(name), vec![0u8; 4].into()).await?;
        }
        let listed: Vec<_> = store.list(Some(&Path::from("d"))).try_collect().await?;
        assert_eq!(listed.len(), 3);
        store.list_with_delimiter(Some(&Path::from("d"))).await?;
        store.delete(&Path::from("d/1")).await?;
        let rest = futures::stream::iter([Ok(Path::from("d/2")), Ok(Path::from("d/3"))]).boxed();
        let deleted: Vec<_> = store.delete_stream(rest).try_collect().await?;
        assert_eq!(deleted.len(), 2);

        let counts = store.counts();
        assert_eq!(counts.list_requests, 2);
        assert_eq!(counts.delete_requests, 3);
        assert_eq!(counts.get_requests, 0);
        Ok(())
    }

    #[tokio::test]
    async fn counts_multipart_parts_and_bytes() -> Result<()> {
        let store = store();
        let mut upload = store.put_multipart(&Path::from("big")).await?;
        upload.put_part(vec![1u8; 10].into()).await?;
        upload.put_part(vec![2u8; 5].into()).await?;
        upload.complete().await?;
        assert_eq!(store.get(&Path::from("big")).await?.meta.size, 15);

        let counts = store.counts();
        assert_eq!(counts.put_requests, 4, "initiate, two parts, complete");
        assert_eq!(counts.bytes_written, 15);
        assert_eq!(counts.bytes_read, 15);
        Ok(())
    }
}
