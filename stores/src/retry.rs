//! Retrying object-store requests that fail transiently, with exponential backoff.

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
                tracing::warn!("{what}: attempt {attempt} failed, retrying in {delay:?}: {e}");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            result => return result,
        }
    }
}
