//! The block-map schema, created idempotently.

/// Version stored in `PRAGMA user_version`; bumped when the schema changes.
pub const SCHEMA_VERSION: i64 = 1;

pub const CREATE: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- One row per block in use. The rowid is the block number, so lookups and range scans walk the
-- table's own b-tree.
CREATE TABLE IF NOT EXISTS blocks (
    block    INTEGER PRIMARY KEY,
    chunk    INTEGER NOT NULL,
    offset   INTEGER NOT NULL,
    length   INTEGER NOT NULL,
    checksum INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS blocks_by_chunk ON blocks (chunk);

-- Live accounting per chunk: GC deletes chunks with no live blocks and rewrites sparse ones.
CREATE TABLE IF NOT EXISTS chunks (
    chunk       INTEGER PRIMARY KEY,
    total_bytes INTEGER NOT NULL,
    live_bytes  INTEGER NOT NULL,
    live_blocks INTEGER NOT NULL
);
";
