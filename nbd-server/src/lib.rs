//! The NBD server: protocol, listeners, and what the `bucketdisk` binary needs to run them.

pub mod exports;
pub mod handshake;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod transmission;
pub mod units;
