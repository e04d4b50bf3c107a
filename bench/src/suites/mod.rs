//! Benchmark suites, one module each.

pub mod nbd_local;
