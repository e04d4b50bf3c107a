//! Writer leases with create-only objects alone, so fencing works on every store, including
//! object_store's local directory store, which has create-only puts but no If-Match updates.
//!
//! A writer takes the volume by creating `lease/<epoch as %016x>` for the next epoch; creation is
//! atomic, so two writers never hold the same epoch. The highest epoch holds the volume. A writer
//! whose epoch is no longer the highest has been fenced: it must stop writing and say so. Its
//! LTX uploads are create-only too, so even a fenced writer that has not noticed yet can never
//! overwrite a file, and the new writer claims the next TXID before writing anything else.

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::path::Path;
use std::sync::Arc;
use stores::retry::{Created, create_only, get_whole, with_retries};

/// A number no other process draws: std's per-process random hash keys.
fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// Attempts before giving up when other writers keep taking the next epoch first.
const ACQUIRE_ATTEMPTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("fenced: this writer holds epoch {held}, but epoch {current} has taken the volume")]
    Fenced { held: u64, current: u64 },
    #[error("could not take the lease: other writers took {ACQUIRE_ATTEMPTS} epochs in a row")]
    Contended,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub epoch: u64,
    pub holder: String,
}

fn lease_dir(root: &Path) -> Path {
    root.clone().join("lease")
}

/// The highest epoch taken so far (0 if none).
pub async fn current_epoch(store: &dyn ObjectStore, root: &Path) -> Result<u64, LeaseError> {
    let dir = lease_dir(root);
    let objects: Vec<_> =
        with_retries("list leases", || store.list(Some(&dir)).try_collect()).await?;
    let names: Vec<&str> = objects
        .iter()
        .filter_map(|m| m.location.filename())
        .collect();
    Ok(newest_epoch(&names).unwrap_or(0))
}

/// The highest epoch among the lease directory's object names (markers are not leases).
fn newest_epoch(names: &[&str]) -> Option<u64> {
    names
        .iter()
        .filter(|name| name.len() == 16)
        .filter_map(|name| u64::from_str_radix(name, 16).ok())
        .max()
}

/// Takes the next epoch. `holder` names this writer in the lease object (host, pid) for people
/// reading the bucket.
pub async fn acquire(
    store: &Arc<dyn ObjectStore>,
    root: &Path,
    holder: &str,
) -> Result<Lease, LeaseError> {
    acquire_after(store, root, holder, None).await
}

/// [`acquire`] for a caller that listed the leases already (while it fetched something else)
/// and found `listed` the highest epoch: the first attempt saves the listing's round trip.
/// The epoch may be stale; creating it then fails, and the next attempt lists again.
pub async fn acquire_after(
    store: &Arc<dyn ObjectStore>,
    root: &Path,
    holder: &str,
    mut listed: Option<u64>,
) -> Result<Lease, LeaseError> {
    for _ in 0..ACQUIRE_ATTEMPTS {
        let epoch = match listed.take() {
            Some(epoch) => epoch,
            None => current_epoch(store.as_ref(), root).await?,
        } + 1;
        let path = lease_dir(root).join(format!("{epoch:016x}"));
        // The nonce tells this call's object from another writer's with the same holder text,
        // should a retry after a lost reply find the key taken.
        let body = Bytes::from(format!(
            "{{\"epoch\":{epoch},\"holder\":{holder:?},\"nonce\":{}}}\n",
            nonce()
        ));
        let ours = match create_only(store.as_ref(), &path, body.clone(), "take the lease").await? {
            Created::Stored => true,
            Created::Taken => false,
            Created::TakenAfterFailure => {
                get_whole(store.as_ref(), &path, "read a lease").await? == body
            }
        };
        if ours {
            return Ok(Lease {
                epoch,
                holder: holder.to_string(),
            });
        }
    }
    Err(LeaseError::Contended)
}

/// Suffix of the marker a writer leaves beside its lease when it stops cleanly.
const RELEASED: &str = ".released";

/// Who holds a volume, as its lease objects say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// No writer ever took it.
    Nobody,
    /// The newest writer stopped cleanly and said so.
    Released(Lease),
    /// The newest writer has not said it stopped: it may be running (or it crashed).
    Held(Lease),
}

/// The newest lease and whether its writer released it.
pub async fn current_holder(store: &dyn ObjectStore, root: &Path) -> Result<Holder, LeaseError> {
    let dir = lease_dir(root);
    let objects: Vec<_> =
        with_retries("list leases", || store.list(Some(&dir)).try_collect()).await?;
    let names: Vec<&str> = objects
        .iter()
        .filter_map(|m| m.location.filename())
        .collect();
    let Some(epoch) = newest_epoch(&names) else {
        return Ok(Holder::Nobody);
    };
    let path = dir.join(format!("{epoch:016x}"));
    let body = get_whole(store, &path, "read a lease").await?;
    let holder = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("holder")?.as_str().map(String::from))
        .unwrap_or_else(|| "an unknown writer".into());
    let lease = Lease { epoch, holder };
    let released = format!("{epoch:016x}{RELEASED}");
    Ok(if names.contains(&released.as_str()) {
        Holder::Released(lease)
    } else {
        Holder::Held(lease)
    })
}

impl Lease {
    /// Says this writer stopped cleanly: whoever takes the volume next fences no one. (The
    /// next writer takes the next epoch as always; a released writer must not write again.)
    pub async fn release(&self, store: &dyn ObjectStore, root: &Path) -> Result<(), LeaseError> {
        let path = lease_dir(root).join(format!("{:016x}{RELEASED}", self.epoch));
        // Whoever created the marker, it says the same thing.
        create_only(store, &path, Bytes::new(), "release the lease").await?;
        Ok(())
    }

    /// Fails with `Fenced` if a newer writer has taken the volume.
    pub async fn check(&self, store: &dyn ObjectStore, root: &Path) -> Result<(), LeaseError> {
        let current = current_epoch(store, root).await?;
        if current > self.epoch {
            return Err(LeaseError::Fenced {
                held: self.epoch,
                current,
            });
        }
        Ok(())
    }
}
