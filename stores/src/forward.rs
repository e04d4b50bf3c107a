//! The one forwarding layer of the store wrappers: [`Wrapped`] implements `ObjectStore` by
//! passing every call to the store inside, and lets its [`Around`] act before each request and
//! see what came back. A wrapper is then only what it adds ([`crate::counting`]: counters,
//! [`crate::faulty`]: injected latency and failures), and a method the trait gains is forwarded
//! here, once, instead of in every wrapper.

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result, UploadPart,
};
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// A request on its way to the store inside.
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    Put {
        location: &'a Path,
        bytes: u64,
    },
    MultipartStart {
        location: &'a Path,
    },
    MultipartPart {
        bytes: u64,
    },
    MultipartComplete,
    MultipartAbort,
    /// A GET, whole or ranged (`get_ranges` arrives here once per coalesced range), or a HEAD.
    Get {
        location: &'a Path,
        head: bool,
    },
    /// A listing (however many pages the store inside fetches).
    List {
        prefix: Option<&'a Path>,
    },
    /// A bulk delete: one call, whatever the number of objects ([`Around::deleting`] sees each).
    Delete,
    Copy {
        from: &'a Path,
        to: &'a Path,
    },
    Rename {
        from: &'a Path,
        to: &'a Path,
    },
}

/// What a wrapper adds around the requests [`Wrapped`] forwards. Every method has a default
/// that adds nothing.
#[async_trait]
pub trait Around: fmt::Debug + Send + Sync + 'static {
    /// The wrapper's name, in the store's `Display` (`Name(inner)`).
    const NAME: &'static str;

    /// Runs before `request` reaches the store inside; an error answers the request instead.
    async fn before(&self, request: Request<'_>) -> Result<()> {
        let _ = request;
        Ok(())
    }

    /// A GET or HEAD was answered (or failed) by the store inside; what this returns is the
    /// answer the caller gets (a wrapper may check or damage the body on its way).
    fn got(&self, location: &Path, head: bool, result: Result<GetResult>) -> Result<GetResult> {
        let _ = (location, head);
        result
    }

    /// A PUT or a multipart part of `bytes` bytes was stored.
    fn stored(&self, bytes: u64) {
        let _ = bytes;
    }

    /// A PUT to `location` was answered by the store inside; what this returns is the answer
    /// the caller gets (a wrapper may lose the reply to a PUT that succeeded).
    fn put_answered(&self, location: &Path, result: Result<PutResult>) -> Result<PutResult> {
        let _ = location;
        result
    }

    /// One object of a bulk delete is on its way to the store inside.
    fn deleting(&self, location: &Path) {
        let _ = location;
    }
}

/// `inner`, with `A` around every request. Dereferences to `A`, so a wrapper's own controls
/// and counters are called on the store itself.
#[derive(Debug)]
pub struct Wrapped<A> {
    inner: Arc<dyn ObjectStore>,
    around: Arc<A>,
}

impl<A: Around + Default> Wrapped<A> {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self::with(inner, A::default())
    }
}

impl<A: Around> Wrapped<A> {
    pub fn with(inner: Arc<dyn ObjectStore>, around: A) -> Self {
        Wrapped {
            inner,
            around: Arc::new(around),
        }
    }
}

impl<A> Deref for Wrapped<A> {
    type Target = A;

    fn deref(&self) -> &A {
        &self.around
    }
}

impl<A: Around> fmt::Display for Wrapped<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", A::NAME, self.inner)
    }
}

#[async_trait]
impl<A: Around> ObjectStore for Wrapped<A> {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let bytes = payload.content_length() as u64;
        self.around.before(Request::Put { location, bytes }).await?;
        let put = self.inner.put_opts(location, payload, opts).await;
        if put.is_ok() {
            self.around.stored(bytes);
        }
        self.around.put_answered(location, put)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.around
            .before(Request::MultipartStart { location })
            .await?;
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(WrappedUpload {
            inner,
            around: Arc::clone(&self.around),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let head = options.head;
        self.around.before(Request::Get { location, head }).await?;
        let result = self.inner.get_opts(location, options).await;
        self.around.got(location, head, result)
    }

    // `get_ranges` keeps the trait's default on purpose: it coalesces the ranges and fetches
    // each through `get_range` → `get_opts` above, so every real request passes `before`.

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let (around, inner) = (Arc::clone(&self.around), Arc::clone(&self.inner));
        let noted = {
            let around = Arc::clone(&around);
            locations
                .inspect(move |location| {
                    if let Ok(location) = location {
                        around.deleting(location);
                    }
                })
                .boxed()
        };
        gated(
            async move { around.before(Request::Delete).await },
            move || inner.delete_stream(noted),
        )
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let inner = Arc::clone(&self.inner);
        let prefix = prefix.cloned();
        gated(self.before_list(prefix.clone()), move || {
            inner.list(prefix.as_ref())
        })
    }

    /// Forwarded rather than left to the default, so that S3 keeps pushing `offset` down.
    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        let inner = Arc::clone(&self.inner);
        let (prefix, offset) = (prefix.cloned(), offset.clone());
        gated(self.before_list(prefix.clone()), move || {
            inner.list_with_offset(prefix.as_ref(), &offset)
        })
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.around.before(Request::List { prefix }).await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.around.before(Request::Copy { from, to }).await?;
        self.inner.copy_opts(from, to, options).await
    }

    /// Forwarded so a local directory keeps its atomic rename instead of the default copy +
    /// delete.
    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.around.before(Request::Rename { from, to }).await?;
        self.inner.rename_opts(from, to, options).await
    }
}

impl<A: Around> Wrapped<A> {
    /// [`Around::before`] a listing of `prefix`, owning what it needs (a listing's stream is
    /// returned before anything is awaited).
    fn before_list(
        &self,
        prefix: Option<Path>,
    ) -> impl Future<Output = Result<()>> + Send + use<A> {
        let around = Arc::clone(&self.around);
        async move {
            around
                .before(Request::List {
                    prefix: prefix.as_ref(),
                })
                .await
        }
    }
}

/// The stream `then` makes, once `allowed` lets the request through; `allowed`'s error as the
/// stream's only item otherwise. (Stream methods return before anything can be awaited.)
fn gated<T: Send + 'static>(
    allowed: impl Future<Output = Result<()>> + Send + 'static,
    then: impl FnOnce() -> BoxStream<'static, Result<T>> + Send + 'static,
) -> BoxStream<'static, Result<T>> {
    stream::once(async move {
        match allowed.await {
            Ok(()) => then(),
            Err(e) => stream::once(async { Err(e) }).boxed(),
        }
    })
    .flatten()
    .boxed()
}

/// A multipart upload whose parts, completion and abort pass the same [`Around`].
#[derive(Debug)]
struct WrappedUpload<A> {
    inner: Box<dyn MultipartUpload>,
    around: Arc<A>,
}

#[async_trait]
impl<A: Around> MultipartUpload for WrappedUpload<A> {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let bytes = data.content_length() as u64;
        let around = Arc::clone(&self.around);
        let part = self.inner.put_part(data);
        Box::pin(async move {
            around.before(Request::MultipartPart { bytes }).await?;
            part.await?;
            around.stored(bytes);
            Ok(())
        })
    }

    async fn complete(&mut self) -> Result<PutResult> {
        self.around.before(Request::MultipartComplete).await?;
        self.inner.complete().await
    }

    async fn abort(&mut self) -> Result<()> {
        self.around.before(Request::MultipartAbort).await?;
        self.inner.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;
    use std::sync::Mutex;

    /// Writes down what it is shown; fails every request to paths under `refused/`.
    #[derive(Debug, Default)]
    struct Log(Mutex<Vec<String>>);

    impl Log {
        fn push(&self, line: String) {
            self.0.lock().expect("log").push(line);
        }
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().expect("log"))
        }
    }

    #[async_trait]
    impl Around for Log {
        const NAME: &'static str = "Log";

        async fn before(&self, request: Request<'_>) -> Result<()> {
            let line = format!("{request:?}");
            let refused = line.contains("refused/");
            self.push(line);
            if refused {
                return Err(object_store::Error::Generic {
                    store: "log",
                    source: "refused".into(),
                });
            }
            Ok(())
        }
        fn got(&self, _: &Path, head: bool, result: Result<GetResult>) -> Result<GetResult> {
            self.push(format!("got head={head} ok={}", result.is_ok()));
            result
        }
        fn stored(&self, bytes: u64) {
            self.push(format!("stored {bytes}"));
        }
        fn deleting(&self, location: &Path) {
            self.push(format!("deleting {location}"));
        }
    }

    #[tokio::test]
    async fn every_call_passes_the_around_and_reaches_the_store() -> Result<()> {
        let store = Wrapped::<Log>::new(Arc::new(InMemory::new()));
        assert_eq!(store.to_string(), "Log(InMemory)");
        store.put(&Path::from("a/1"), vec![1u8; 3].into()).await?;
        assert_eq!(
            store.take(),
            [
                "Put { location: Path { raw: \"a/1\" }, bytes: 3 }",
                "stored 3"
            ]
        );
        assert_eq!(store.get(&Path::from("a/1")).await?.bytes().await?.len(), 3);
        assert_eq!(store.head(&Path::from("a/1")).await?.size, 3);
        let log = store.take();
        assert_eq!(log.len(), 4, "{log:?}");
        assert!(log[1] == "got head=false ok=true" && log[3] == "got head=true ok=true");

        let listed: Vec<_> = store.list(Some(&Path::from("a"))).try_collect().await?;
        assert_eq!(listed.len(), 1);
        let after: Vec<_> = store
            .list_with_offset(Some(&Path::from("a")), &Path::from("a/0"))
            .try_collect()
            .await?;
        assert_eq!(after.len(), 1);
        store.copy(&Path::from("a/1"), &Path::from("a/2")).await?;
        store.delete(&Path::from("a/2")).await?;
        let log = store.take();
        assert!(
            log[0].starts_with("List") && log[1].starts_with("List"),
            "{log:?}"
        );
        assert!(log[2].starts_with("Copy"), "{log:?}");
        assert!(log.contains(&"Delete".to_string()) && log.contains(&"deleting a/2".into()));

        let mut upload = store.put_multipart(&Path::from("big")).await?;
        upload.put_part(vec![2u8; 5].into()).await?;
        upload.complete().await?;
        assert_eq!(
            store.take(),
            [
                "MultipartStart { location: Path { raw: \"big\" } }",
                "MultipartPart { bytes: 5 }",
                "stored 5",
                "MultipartComplete"
            ]
        );
        Ok(())
    }

    #[tokio::test]
    async fn an_error_from_before_answers_the_request() -> Result<()> {
        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let store = Wrapped::<Log>::new(Arc::clone(&inner));
        let refused = Path::from("refused/x");
        assert!(store.put(&refused, vec![1u8].into()).await.is_err());
        assert!(
            inner.head(&refused).await.is_err(),
            "the PUT never reached the store"
        );
        let listing: Result<Vec<_>> = store.list(Some(&refused)).try_collect().await;
        assert!(listing.is_err());
        Ok(())
    }
}
