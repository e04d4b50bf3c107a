//! An `ObjectStore` wrapper that counts requests and bytes, for the metrics endpoint and for
//! benchmarks that report S3 traffic.
//!
//! Wrapping the trait once, instead of counting at every call site, means nothing that reaches
//! the store can bypass the counters. Only what this wrapper can observe is counted: a request
//! the inner store retries internally is one request here, a paged listing is one LIST, and a
//! bulk delete counts one DELETE per object (the batching is invisible from outside).

use crate::forward::{Around, Request, Wrapped};
use async_trait::async_trait;
use object_store::path::Path;
use object_store::{GetResult, Result};
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

/// Every request to the store inside, counted (see [`StoreCounts`]).
pub type CountingStore = Wrapped<Counters>;

/// The live counters of a [`CountingStore`].
#[derive(Debug, Default)]
pub struct Counters {
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
    /// The counters so far (each field read separately: not one atomic snapshot).
    pub fn counts(&self) -> StoreCounts {
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

#[async_trait]
impl Around for Counters {
    const NAME: &'static str = "CountingStore";

    async fn before(&self, request: Request<'_>) -> Result<()> {
        match request {
            // A server-side copy is a PUT on S3 (no bytes cross the wire).
            Request::Put { .. }
            | Request::MultipartStart { .. }
            | Request::MultipartPart { .. }
            | Request::MultipartComplete
            | Request::Copy { .. } => bump(&self.put_requests, 1),
            // Counted as the copy + delete it costs on S3.
            Request::Rename { .. } => {
                bump(&self.put_requests, 1);
                bump(&self.delete_requests, 1);
            }
            Request::MultipartAbort => bump(&self.delete_requests, 1),
            Request::List { .. } => bump(&self.list_requests, 1),
            // Counted when answered, and per object.
            Request::Get { .. } | Request::Delete => {}
        }
        Ok(())
    }

    /// The bytes are those the store said it is sending (`range`), so the body stream is
    /// not buffered to be measured. Every body the engine reads passes here, so this is also
    /// where one that ends short of that becomes an error ([`crate::whole_body`]).
    fn got(&self, _: &Path, head: bool, result: Result<GetResult>) -> Result<GetResult> {
        if head {
            bump(&self.head_requests, 1);
            return result;
        }
        bump(&self.get_requests, 1);
        if let Ok(got) = &result {
            bump(
                &self.bytes_read,
                got.range.end.saturating_sub(got.range.start),
            );
        }
        crate::whole_body::checked(result)
    }

    fn stored(&self, bytes: u64) {
        bump(&self.bytes_written, bytes);
    }

    fn deleting(&self, _location: &Path) {
        bump(&self.delete_requests, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{StreamExt, TryStreamExt};
    use object_store::ObjectStore;
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;
    use std::sync::Arc;

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
