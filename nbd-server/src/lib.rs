//! The NBD server: protocol, listeners and the metrics endpoint, over any `BlockDevice`; the
//! `bucketdisk` crate is the command-line tool that runs it.

pub mod exports;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod limits;
pub mod metrics;
pub mod proto;
pub mod secret;
pub mod server;
pub mod tls;
pub mod transmission;
