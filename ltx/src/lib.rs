//! The LTX file format (Litestream-compatible). Implemented in its own issue; see DESIGN.md §5.
