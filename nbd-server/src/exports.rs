//! The set of exports a server offers, by name.

use crate::metrics::RequestMetrics;
use engine::BlockDevice;
use std::sync::Arc;

pub struct Export {
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
    /// Requests answered on this export, for `--metrics`.
    pub metrics: RequestMetrics,
}

/// Exports by name. The first one is also the default export (the empty name).
pub struct Exports {
    exports: Vec<Arc<Export>>,
}

impl Exports {
    pub fn new(exports: Vec<Export>) -> Self {
        Self {
            exports: exports.into_iter().map(Arc::new).collect(),
        }
    }

    /// Finds an export; `""` names the default export.
    pub fn find(&self, name: &str) -> Option<Arc<Export>> {
        if name.is_empty() {
            return self.exports.first().cloned();
        }
        self.exports.iter().find(|e| e.name == name).cloned()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.exports.iter()
    }
}
