//! Retrying object-store requests that fail transiently, with exponential backoff.

use std::sync::atomic::{AtomicU64, Ordering};

/// Requests tried again after a transient failure, in this process (every retry loop notes
/// its retries here: the metrics endpoint and fault runs report them).
static RETRIED: AtomicU64 = AtomicU64::new(0);

/// Counts one retry (for loops that retry on their own terms, not through [`with_retries`]).
pub fn note_retry() {
    RETRIED.fetch_add(1, Ordering::Relaxed);
}

/// Requests retried so far in this process.
pub fn retried() -> u64 {
    RETRIED.load(Ordering::Relaxed)
}

/// Reads that fail transiently are retried this many times, backing off from 50 ms.
pub const READ_RETRIES: u32 = 5;

/// Errors worth retrying: everything but answers that another try cannot change.
pub fn transient(e: &object_store::Error) -> bool {
    !matches!(
        e,
        object_store::Error::NotFound { .. }
            | object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. }
            | object_store::Error::NotImplemented { .. }
            | object_store::Error::InvalidPath { .. }
    )
}

/// Runs `op` until it succeeds, fails permanently, or runs out of retries.
pub async fn with_retries<T, F, Fut>(what: &str, mut op: F) -> object_store::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = object_store::Result<T>>,
{
    let mut delay = std::time::Duration::from_millis(50);
    let mut attempt = 0;
    loop {
        match op().await {
            Err(e) if transient(&e) && attempt < READ_RETRIES => {
                attempt += 1;
                note_retry();
                tracing::warn!("{what}: attempt {attempt} failed, retrying in {delay:?}: {e}");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            result => return result,
        }
    }
}

/// The whole object at `path`, its GET and body retried like [`with_retries`].
pub async fn get_whole(
    store: &dyn object_store::ObjectStore,
    path: &object_store::path::Path,
    what: &str,
) -> object_store::Result<bytes::Bytes> {
    use object_store::ObjectStoreExt;
    with_retries(what, || async { store.get(path).await?.bytes().await }).await
}

/// What a create-only PUT found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// The object is stored, by this call.
    Stored,
    /// The key was taken before this call's first attempt: another writer's object.
    Taken,
    /// The key was taken after one of this call's attempts failed: it may be this call's own
    /// object, stored by an attempt whose reply was lost. The caller reads it to tell.
    TakenAfterFailure,
}

/// A create-only PUT of `body` to `path`, retried like [`with_retries`]: a key already taken
/// is not an error but an answer ([`Created`]), since a retry after a lost reply meets the
/// object its own earlier attempt stored.
pub async fn create_only(
    store: &dyn object_store::ObjectStore,
    path: &object_store::path::Path,
    body: bytes::Bytes,
    what: &str,
) -> object_store::Result<Created> {
    let options = || object_store::PutOptions {
        mode: object_store::PutMode::Create,
        ..object_store::PutOptions::default()
    };
    let mut failed_before = false;
    with_retries(what, || {
        let attempt = store.put_opts(path, body.clone().into(), options());
        let first = !failed_before;
        failed_before = true;
        async move {
            match attempt.await {
                Ok(_) => Ok(Created::Stored),
                Err(object_store::Error::AlreadyExists { .. }) if first => Ok(Created::Taken),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(Created::TakenAfterFailure),
                Err(e) => Err(e),
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::{Chaos, ChaosStore, FaultKind, FaultPlan};
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;
    use object_store::path::Path;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_create_after_a_lost_reply_says_the_key_may_be_its_own() -> object_store::Result<()> {
        let inner: Arc<dyn object_store::ObjectStore> = Arc::new(InMemory::new());
        let path = Path::from("k");
        let once_lost = ChaosStore::with(
            Arc::clone(&inner),
            Chaos::new(FaultPlan {
                kinds: vec![FaultKind::LostReply],
                ..FaultPlan::default().with_rate(1.0)
            }),
        );
        let body = bytes::Bytes::from_static(b"mine");
        // Every reply is lost: the first attempt stores it, the retry finds it.
        let created = create_only(&once_lost, &path, body.clone(), "test").await?;
        assert_eq!(created, Created::TakenAfterFailure);
        assert_eq!(inner.get(&path).await?.bytes().await?, body);
        assert_eq!(
            create_only(inner.as_ref(), &path, body, "test").await?,
            Created::Taken
        );
        Ok(())
    }
}
