//! The block map names the local directory whose journal holds its unuploaded tail
//! (`journal_owner`; see `local_state`). A directory that opens a volume another directory
//! uploaded last — another host, or this host after its cache directory was lost — starts a
//! journal the map does not name yet. Until it does, a crash would make the next open take
//! this journal for an abandoned one and move it aside, losing writes a FLUSH had
//! acknowledged. So the open records the new owner in the map in the background, and a FLUSH
//! (or FUA write) waits for that before it answers; reads and unflushed writes do not wait.

use super::{META_JOURNAL_OWNER, Shared, upload};
use crate::device::DeviceError;
use std::sync::Arc;
use tokio::sync::watch;

/// Where the claim stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// The map does not name this directory yet.
    Pending,
    /// It does (or needs not: the map names nobody, or this directory already).
    Recorded,
    /// Recording failed for good (the volume was fenced): flushes fail with this.
    Failed(String),
}

/// This directory's claim on the map's journal owner.
pub(super) struct JournalClaim(watch::Sender<State>);

impl JournalClaim {
    /// A claim that is needed when the map names another directory's journal.
    pub(super) fn new(map_owner: Option<&str>, instance: &str) -> Self {
        let needed = map_owner.is_some_and(|owner| owner != instance);
        JournalClaim(
            watch::channel(if needed {
                State::Pending
            } else {
                State::Recorded
            })
            .0,
        )
    }

    pub(super) fn pending(&self) -> bool {
        *self.0.borrow() == State::Pending
    }

    /// Returns once the map names this directory's journal.
    pub(super) async fn wait(&self) -> Result<(), DeviceError> {
        // Every FLUSH asks: answered without a subscription once recorded.
        if *self.0.borrow() == State::Recorded {
            return Ok(());
        }
        let mut seen = self.0.subscribe();
        let settled = seen
            .wait_for(|state| *state != State::Pending)
            .await
            .map_err(|_| DeviceError::Io(std::io::Error::other("journal claim dropped")))?;
        match &*settled {
            State::Failed(why) => Err(DeviceError::Io(std::io::Error::other(why.clone()))),
            _ => Ok(()),
        }
    }
}

/// Records this directory as the map's journal owner (synced to the store, retried until it
/// lands or the volume is fenced), then lets waiting flushes answer.
pub(super) async fn record(shared: Arc<Shared>) {
    let result = {
        let _maintenance = shared.maintenance.lock().await;
        upload::commit_meta(&shared, META_JOURNAL_OWNER, shared.instance.clone()).await
    };
    let state = match result {
        Ok(()) => {
            tracing::info!(volume = %shared.meta.name, "the block map now names this directory's journal");
            State::Recorded
        }
        Err(e) => State::Failed(format!(
            "recording this directory as the journal's owner failed: {e}"
        )),
    };
    shared.journal_claim.0.send_replace(state);
}
