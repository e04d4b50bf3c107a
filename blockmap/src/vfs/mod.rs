//! The writable, Litestream-compatible SQLite VFS that stores the block map
//! (docs/ARCHITECTURE.md §4, §7).
//!
//! [`state`] is the part SQLite's file callbacks drive: one [`state::DatabaseState`] per
//! database, shared by every connection, holding committed-but-unsynced pages over a base page
//! source (the replica, or the hydrated local file) and turning them into L0 LTX files. The
//! `sqlite3_vfs` registration that calls into it is built on top of this.

pub mod ffi;
pub mod follower;
pub mod hydrate;
pub mod remote;
pub mod state;
