//! Benchmark suites, one module each.

pub mod blockmap;
pub mod boot;
pub mod cold;
pub mod compare;
pub mod compare_clocks;
pub mod crash_soak;
pub mod encryption;
pub mod engine;
pub mod faults;
pub mod lifecycle;
pub mod nbd_local;
pub mod sustained;
pub mod verify;
pub mod writes;
