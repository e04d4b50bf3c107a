//! Read-only followers: a database that tracks a live writer by polling the replica's level-0
//! files and applying each new transaction whole, between readers' transactions.

use super::ffi::{attach, open_connection, with_quiet_database};
use super::remote::RemoteSource;
use super::state::{DatabaseState, PageSource};
use crate::replica::{Replica, ReplicaError, ReplicaResult};
use ltx::RestoreTarget;
use std::sync::Arc;
use tokio::runtime::Handle;

pub struct Follower {
    name: String,
    state: Arc<DatabaseState>,
    replica: Arc<Replica>,
}

impl Follower {
    pub async fn open(replica: Arc<Replica>, name: &str, runtime: Handle) -> ReplicaResult<Self> {
        Self::open_at(replica, name, runtime, RestoreTarget::Latest).await
    }

    /// A follower of the state at `target` (a fixed TXID stays there: do not poll it).
    pub async fn open_at(
        replica: Arc<Replica>,
        name: &str,
        runtime: Handle,
        target: RestoreTarget,
    ) -> ReplicaResult<Self> {
        let source = RemoteSource::open(Arc::clone(&replica), target, runtime).await?;
        let state = Arc::new(
            DatabaseState::new(Some(Arc::new(source) as Arc<dyn PageSource>), 4096)
                .map_err(|e| ReplicaError::Invalid(e.to_string()))?,
        );
        attach(name, Arc::clone(&state));
        Ok(Follower {
            name: name.to_string(),
            state,
            replica,
        })
    }

    /// A read-only connection (writes would be lost at the next poll: do not write).
    pub fn connection(&self) -> rusqlite::Result<rusqlite::Connection> {
        let conn = open_connection(&self.name)?;
        conn.pragma_update(None, "query_only", true)?;
        Ok(conn)
    }

    pub fn txid(&self) -> u64 {
        self.state.txid()
    }

    /// Restores the followed state into the local file `path` (verified) and reads its pages
    /// from there from then on: one GET per map file instead of one per page, for a reader
    /// that walks the whole map. The file may be unlinked once this returns (it stays open).
    pub async fn hydrate(&self, path: &std::path::Path) -> ReplicaResult<()> {
        let progress = super::hydrate::Progress::default();
        let local = super::hydrate::hydrate(&self.replica, self.txid(), path, &progress).await?;
        self.state
            .replace_base(Arc::new(local))
            .map_err(|e| ReplicaError::Invalid(e.to_string()))
    }

    /// Applies every new level-0 transaction in order. Returns the TXID reached; stops early
    /// (without error) when readers are busy, to continue at the next poll.
    pub async fn poll(&self) -> ReplicaResult<u64> {
        let mut files: Vec<_> = self
            .replica
            .list_level(0)
            .await?
            .into_iter()
            .filter(|f| f.name.max_txid > self.state.txid())
            .collect();
        files.sort_by_key(|f| f.name);
        for file in files {
            let txid = self.state.txid();
            if file.name.min_txid != txid + 1 {
                return Err(ReplicaError::Invalid(format!(
                    "gap: at TXID {txid:016x}, next level-0 file is {}",
                    file.name
                )));
            }
            let bytes = self.replica.fetch(&file).await?;
            let ltx_err = |source| ReplicaError::Ltx {
                path: file.path.to_string(),
                source,
            };
            let mut decoder = ltx::Decoder::new(&bytes[..]).map_err(ltx_err)?;
            let header = *decoder.header();
            let mut pages = Vec::new();
            let mut page = vec![0u8; header.page_size as usize];
            while let Some(pgno) = decoder.next_page(&mut page).map_err(ltx_err)? {
                pages.push((pgno, page.clone()));
            }
            decoder.finish().map_err(ltx_err)?;
            let applied = with_quiet_database(&self.name, |state| {
                state.apply_remote(pages, header.commit, header.max_txid)
            });
            match applied {
                None => break, // readers are busy: next poll
                Some(result) => result.map_err(|e| ReplicaError::Invalid(e.to_string()))?,
            }
        }
        Ok(self.state.txid())
    }
}
