//! The bottom of the stack: how bucketdisk reaches object storage. Everything above talks to
//! one `Arc<dyn ObjectStore>` and never knows which backend or wrapper is behind it.
//!
//! - [`url`]: `--store URL` → a store, the key prefix of the volumes in it, and the replica
//!   layout its block maps use.
//! - [`local`]: the embedded local-directory store (durable PUTs, written at low priority).
//! - [`forward`]: the one forwarding layer the wrappers below share ([`forward::Wrapped`]).
//! - [`counting`]: counts requests and bytes (the metrics endpoint, benchmarks).
//! - [`retry`]: retries of transient failures, with backoff.
//! - [`faulty`]: latency and failures injected on purpose — tests, and `serve
//!   --inject-latency` for benchmarks on one machine; never on by default.
//! - [`chaos`]: faults by a seeded schedule (errors, timeouts, stalls, damaged bodies, lost
//!   replies, an outage) — fault runs (`serve --inject-faults`) and tests.
//! - [`whole_body`]: a GET body shorter than announced is an error, not data.
//! - [`low_priority`]: threads at the lowest CPU and I/O priority, for the local store's writes
//!   and the uploader's CPU work.

pub mod chaos;
pub mod counting;
pub mod faulty;
pub mod forward;
pub mod local;
pub mod low_priority;
pub mod retry;
pub mod url;
pub mod whole_body;

pub use url::Layout;
