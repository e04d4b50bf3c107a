//! The block map as this process holds it (docs/ARCHITECTURE.md §4): its role (writer,
//! follower or empty), a connection for lookups, a connection for the uploader's transactions
//! (writers only) and the in-memory cache of lookups in front of them.

use super::helpers::{lock, map_error};
use super::locations::Locations;
use blockmap::vfs::follower::Follower;
use blockmap::writer::MapWriter;
use blockmap::{BlockLocation, BlockMap};
use std::io;
use std::sync::{Mutex, MutexGuard};

/// How this process holds the block map.
pub(super) enum MapRole {
    /// The single writer: took the lease, uploads.
    Writer(Box<MapWriter>),
    /// A read-only view of the latest replicated state (does not fence the writer).
    Follower(#[allow(dead_code)] Follower),
    /// Read-only and nothing was ever uploaded: every block is a hole.
    Empty,
}

pub(super) struct MapAccess {
    role: MapRole,
    /// Connection for lookups (reads, block status, GC's questions).
    lookups: Mutex<BlockMap>,
    /// Connection for the uploader's transactions (writers only).
    updates: Option<Mutex<BlockMap>>,
    /// Lookups remembered, kept exact by the uploader (see [`Locations`]).
    pub(super) locations: Locations,
}

impl MapAccess {
    pub(super) fn new(role: MapRole, lookups: BlockMap, updates: Option<BlockMap>) -> Self {
        MapAccess {
            role,
            lookups: Mutex::new(lookups),
            updates: updates.map(Mutex::new),
            locations: Locations::default(),
        }
    }

    /// The map writer, if this process holds the writer lease.
    pub(super) fn writer(&self) -> Option<&MapWriter> {
        match &self.role {
            MapRole::Writer(w) => Some(w),
            _ => None,
        }
    }

    /// The map state this process sees.
    pub(super) fn txid(&self) -> u64 {
        match &self.role {
            MapRole::Writer(w) => w.txid(),
            MapRole::Follower(f) => f.txid(),
            MapRole::Empty => 0,
        }
    }

    /// The lookup connection (blocking: a page may be fetched from the store).
    pub(super) fn lookups(&self) -> MutexGuard<'_, BlockMap> {
        lock(&self.lookups)
    }

    /// The update connection; an error on a read-only volume.
    pub(super) fn updates(&self) -> io::Result<MutexGuard<'_, BlockMap>> {
        self.updates
            .as_ref()
            .map(lock)
            .ok_or_else(|| io::Error::other("read-only volume"))
    }

    /// The stored blocks of `first..first+count` and where they live, from the lookup cache
    /// or the map (blocking; the answer is remembered unless the map changed meanwhile).
    pub(super) fn range(&self, first: u64, count: u64) -> io::Result<Vec<(u64, BlockLocation)>> {
        let generation = self.locations.generation();
        let rows = self
            .lookups()
            .range(first, count)
            .map_err(|e| map_error("block map lookup", e))?;
        self.locations.fill(generation, first, count, &rows);
        Ok(rows)
    }
}
