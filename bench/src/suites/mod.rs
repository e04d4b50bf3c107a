//! Benchmark suites, one module each.

pub mod blockmap;
pub mod nbd_local;
