//! The set of exports a server offers, by name: a fixed list, and optionally a source of
//! exports opened when a client first asks for them (a checkpoint of a served volume).

use crate::metrics::RequestMetrics;
use async_trait::async_trait;
use engine::BlockDevice;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

pub struct Export {
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
    /// Requests answered on this export, for `--metrics`.
    pub metrics: RequestMetrics,
    /// Connections in the transmission phase on this export now.
    sessions: AtomicUsize,
    /// Bumped to end every session of this export (see [`Export::disconnect_all`]).
    disconnect: watch::Sender<u64>,
}

impl Export {
    pub fn new(name: String, description: String, device: Arc<dyn BlockDevice>) -> Self {
        Export {
            name,
            description,
            device,
            metrics: RequestMetrics::default(),
            sessions: AtomicUsize::new(0),
            disconnect: watch::channel(0).0,
        }
    }

    /// Clients in the transmission phase on this export.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Acquire)
    }

    /// Ends every session of this export: each answers what it has in flight and closes (the
    /// same as a server stop, for this export only).
    pub fn disconnect_all(&self) {
        self.disconnect.send_modify(|generation| *generation += 1);
    }

    /// Counts a session for as long as the guard lives, and tells it when to end.
    pub(crate) fn session_started(&self) -> (SessionGuard<'_>, watch::Receiver<u64>) {
        self.sessions.fetch_add(1, Ordering::AcqRel);
        let mut told = self.disconnect.subscribe();
        told.mark_unchanged();
        (SessionGuard(&self.sessions), told)
    }
}

/// Un-counts a session when it ends.
pub(crate) struct SessionGuard<'a>(&'a AtomicUsize);

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Exports beyond the fixed ones, opened on demand.
#[async_trait]
pub trait ExportSource: Send + Sync + 'static {
    /// The names (and descriptions) it offers now, for NBD_OPT_LIST.
    async fn names(&self) -> Vec<(String, String)>;
    /// Opens export `name`; `None` if it offers none of that name (or opening failed: it
    /// logs why).
    async fn open(&self, name: &str) -> Option<Export>;
}

/// Exports by name. The first fixed one is also the default export (the empty name).
pub struct Exports {
    fixed: Vec<Arc<Export>>,
    source: Option<Arc<dyn ExportSource>>,
    /// Exports the source opened, kept for later clients (and closed at stop with the rest).
    opened: Mutex<Vec<Arc<Export>>>,
    /// One open at a time: two clients asking for the same new name get one export.
    opening: tokio::sync::Mutex<()>,
}

impl Exports {
    pub fn new(exports: Vec<Export>) -> Self {
        Self {
            fixed: exports.into_iter().map(Arc::new).collect(),
            source: None,
            opened: Mutex::new(Vec::new()),
            opening: tokio::sync::Mutex::new(()),
        }
    }

    /// Offers `source`'s exports too.
    pub fn with_source(mut self, source: Arc<dyn ExportSource>) -> Self {
        self.source = Some(source);
        self
    }

    fn opened(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Export>>> {
        self.opened.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn find_open(&self, name: &str) -> Option<Arc<Export>> {
        if name.is_empty() {
            return self.fixed.first().cloned();
        }
        if let Some(e) = self.fixed.iter().find(|e| e.name == name) {
            return Some(Arc::clone(e));
        }
        self.opened().iter().find(|e| e.name == name).cloned()
    }

    /// Finds an export, opening it from the source if need be; `""` names the default export.
    pub async fn find(&self, name: &str) -> Option<Arc<Export>> {
        if let Some(found) = self.find_open(name) {
            return Some(found);
        }
        let source = self.source.as_ref()?;
        let _one = self.opening.lock().await;
        if let Some(found) = self.find_open(name) {
            return Some(found);
        }
        let export = Arc::new(source.open(name).await?);
        self.opened().push(Arc::clone(&export));
        Some(export)
    }

    /// Every export's name and description, for NBD_OPT_LIST: the fixed ones, then the
    /// source's.
    pub async fn list(&self) -> Vec<(String, String)> {
        let mut names: Vec<(String, String)> = self
            .fixed
            .iter()
            .map(|e| (e.name.clone(), e.description.clone()))
            .collect();
        if let Some(source) = &self.source {
            for (name, description) in source.names().await {
                if !names.iter().any(|(n, _)| *n == name) {
                    names.push((name, description));
                }
            }
        }
        names
    }

    /// The exports open now (fixed and opened on demand): metrics, and closing at stop.
    pub fn all(&self) -> Vec<Arc<Export>> {
        let mut all = self.fixed.clone();
        all.extend(self.opened().iter().cloned());
        all
    }
}
