//! The block map and its Litestream-compatible SQLite VFS. See DESIGN.md §5.
